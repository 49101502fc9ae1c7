"""exporter: model adapters, the PyTorch executor of a plan, demo models and (later) ONNX export."""
