"""Engines: run and measure the graphs graph_passes produced.

The last stage of the house (calib -> exporter -> graph_passes -> engines). It turns optimized ONNX files
into something that runs and tells how fast:

- :mod:`engines.onnxruntime`: ONNX Runtime sessions that report the provider really in use and do not let
  idle sessions spin, and a runner with checked feeds;
- :mod:`engines.tensorrt`: TensorRT engine builds with an optimization profile covering every dynamic input
  and shape tensor, saved atomically;
- :mod:`engines.benchmark`: interleaved dense-vs-pruned latency measurement and the speedup report
  (measured speedup next to FLOPs speedup).

It uses only the core package :mod:`prune_export`, never calib, exporter or graph_passes. Heavy imports are
lazy: importing :mod:`engines` does not import TensorRT, which only GPU machines have.
"""

from engines.benchmark import LatencyStats, SpeedupReport, compare_latency
from engines.onnxruntime import OrtRunner, SessionFromOnnx, active_provider, session_from_onnx
from engines.tensorrt import (
    EngineFromOnnx,
    SaveEngine,
    engine_from_onnx,
    require_tensorrt,
    save_engine,
    tensorrt_version,
)

__all__ = [
    "EngineFromOnnx",
    "LatencyStats",
    "OrtRunner",
    "SaveEngine",
    "SessionFromOnnx",
    "SpeedupReport",
    "active_provider",
    "compare_latency",
    "engine_from_onnx",
    "require_tensorrt",
    "save_engine",
    "session_from_onnx",
    "tensorrt_version",
]
