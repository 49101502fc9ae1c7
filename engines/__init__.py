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

from engines.benchmark import LatencyStats, SpeedupReport, compare_latency, time_interleaved
from engines.onnxruntime import OrtRunner, SessionFromOnnx, active_provider, session_from_onnx
from engines.runner import Runner
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
    "Runner",
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
    "time_interleaved",
]
