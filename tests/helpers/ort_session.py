"""The ONNX Runtime session the exporter tests run graphs in: CPU, 2 threads."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from engines.onnxruntime import session_from_onnx


def cpu_session(path: str | Path) -> ort.InferenceSession:
    sess = session_from_onnx(path, provider="cpu", threads=2)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return sess
