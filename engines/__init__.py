"""Engines: run and measure the graphs graph_passes produced.

The last stage of the house (calib -> exporter -> graph_passes -> engines). It turns optimized ONNX files
into something that runs and tells how fast:

- :mod:`engines.onnxruntime`: ONNX Runtime sessions that report the provider really in use and do not let
  idle sessions spin, and a runner with checked feeds;
- :mod:`engines.tensorrt`: TensorRT engine builds with an optimization profile covering every dynamic input
  and shape tensor, saved atomically;
- :mod:`engines.runner`: the one lifecycle of every runner (activate, deactivate, ``with``);
- :mod:`engines.prefill` and :mod:`engines.generate`: a build's prefill (single or split) and greedy answers
  through its graphs;
- :mod:`engines.benchmark`: the one interleaved timer (rotating order, warm-up, medians and p90) and the
  speedup report (measured speedup next to FLOPs speedup);
- :mod:`engines.triton`: the Triton model repository, the models it copies in, a local server and a client.

It uses only the vocabulary, :mod:`prune_core`, never calib, exporter or graph_passes. Heavy imports are
lazy: importing :mod:`engines` does not import TensorRT, which only GPU machines have.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public names and the module each lives in, imported on first use: importing one submodule (the timer,
#: for the GPU benchmark) does not import ONNX Runtime or the TensorRT bindings.
_EXPORTS = {
    "LatencyStats": "benchmark", "SpeedupReport": "benchmark", "compare_latency": "benchmark",
    "time_interleaved": "benchmark",
    "OrtRunner": "onnxruntime", "SessionFromOnnx": "onnxruntime", "active_provider": "onnxruntime",
    "session_from_onnx": "onnxruntime",
    "Runner": "runner",
    "EngineFromOnnx": "tensorrt", "SaveEngine": "tensorrt", "engine_from_onnx": "tensorrt",
    "require_tensorrt": "tensorrt", "save_engine": "tensorrt", "tensorrt_version": "tensorrt",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engines' has no attribute {name!r}")
    return getattr(importlib.import_module(f"engines.{_EXPORTS[name]}"), name)
