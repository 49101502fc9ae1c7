"""ONNX Runtime sessions and a runner, configured the way prune-export measures and checks graphs.

Two facts about ONNX Runtime shape this module:

- Several sessions in one process slow each other down: an idle session's worker threads keep spinning and
  cost the next session 15-20 ms per run on a 2-core machine. Every session made here therefore sets
  ``session.intra_op.allow_spinning = "0"``, so dense-vs-pruned comparisons measure the graphs, not the
  spinning.
- ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even where CUDA cannot start (no GPU, no
  cuDNN); the session then logs an error and silently runs on CPU. A figure labelled "CUDA" that was measured
  on CPU is worse than no figure, so the loader reports the provider that is really active and an explicit
  ``provider="cuda"`` fails when CUDA did not come up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
import onnxruntime as ort

from engines.runner import Runner
from prune_core.errors import BuildError

__all__ = [
    "InputMetadata",
    "Optimization",
    "OrtRunner",
    "Provider",
    "SessionFromOnnx",
    "active_provider",
    "session_from_onnx",
]

Provider = Literal["auto", "cpu", "cuda"]
Optimization = Literal["all", "basic", "disabled"]

#: ``name -> (numpy dtype, shape)``; a dynamic dimension is its symbolic name (``"?"`` when unnamed).
InputMetadata = dict[str, tuple[np.dtype, tuple[int | str, ...]]]

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_PROVIDERS: dict[str, list[str]] = {
    "cpu": [CPU_PROVIDER],
    "cuda": [CUDA_PROVIDER, CPU_PROVIDER],
}
_OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
#: ONNX Runtime's own default severity of its default logger (WARNING); it offers no getter to read it back.
_ORT_DEFAULT_LOG_SEVERITY = 2
#: FATAL: the only level that hides the ERROR line ORT prints when the CUDA provider library fails to load.
_ORT_SILENT_LOG_SEVERITY = 4

#: ORT tensor type strings of the inputs a runner can feed from numpy.
_ORT_TO_NUMPY: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in {
        "float": np.float32,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "double": np.float64,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
        "string": np.object_,
    }.items()
}


def _check_choice(value: str, known: tuple[str, ...], what: str) -> None:
    """Raise a BuildError listing the known values when ``value`` is not one of them."""
    if value not in known:
        raise BuildError(f"unknown {what} {value!r}: expected one of {', '.join(repr(k) for k in known)}")


def active_provider(session: ort.InferenceSession) -> str:
    """The execution provider that really runs ``session`` (the first one ORT kept, not the first asked for)."""
    return session.get_providers()[0]


class SessionFromOnnx:
    """Loader: an ``onnxruntime.InferenceSession`` for an ONNX file, on the provider that was asked for.

    Configured in ``__init__``, the session is created on each call. ``provider="auto"`` asks for CUDA first
    when this ONNX Runtime build lists it and accepts a CPU fallback (silencing ORT's fallback error log);
    ``"cuda"`` raises :class:`BuildError` when CUDA did not become active; ``"cpu"`` never tries CUDA.
    ``threads`` sets ``intra_op_num_threads`` (ORT's default: one per core). ``optimization`` selects ORT's
    graph optimizations; ``"disabled"`` runs the graph exactly as written, which is what parity checks of
    graph passes want.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        provider: Provider = "auto",
        threads: int | None = None,
        optimization: Optimization = "all",
    ) -> None:
        _check_choice(provider, ("auto", *_PROVIDERS), "provider")
        _check_choice(optimization, tuple(_OPTIMIZATION_LEVELS), "optimization")
        self.path = Path(path)
        self.provider = provider
        self.optimization = optimization
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BuildError(f"threads must be a positive integer or None (ORT's default), got {threads!r}")
        self.threads = threads

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.optimization]
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        return options

    def _requested_providers(self) -> list[str]:
        if self.provider != "auto":
            return list(_PROVIDERS[self.provider])
        if CUDA_PROVIDER in ort.get_available_providers():
            return [CUDA_PROVIDER, CPU_PROVIDER]
        return [CPU_PROVIDER]

    def __call__(self) -> ort.InferenceSession:
        """Create the session; raise :class:`BuildError` for a missing/invalid file or an unavailable CUDA."""
        if not self.path.is_file():
            raise BuildError(f"ONNX file not found: {self.path}; check the path, or export the graph first")
        if self.provider == "cuda" and CUDA_PROVIDER not in ort.get_available_providers():
            raise BuildError(
                f"provider 'cuda' was asked for {self.path}, but this ONNX Runtime build has no "
                f"CUDAExecutionProvider (available: {', '.join(ort.get_available_providers())}); install "
                "onnxruntime-gpu on a machine with an NVIDIA GPU, or use provider 'cpu' / 'auto'"
            )
        providers = self._requested_providers()
        silence = self.provider == "auto" and CUDA_PROVIDER in providers
        if silence:
            ort.set_default_logger_severity(_ORT_SILENT_LOG_SEVERITY)
        try:
            session = ort.InferenceSession(str(self.path), self._options(), providers=providers)
        except Exception as err:  # ORT raises its own Exception subclasses (Fail, InvalidGraph, ...).
            text = str(err)
            if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
                raise BuildError(
                    f"ONNX Runtime has no kernel for an operator of {self.path} on "
                    f"{', '.join(providers)} ({text.strip()}); that provider does not run this graph's "
                    "precision or operator: build with another --dtype (the CPU provider runs fp32 and fp16, "
                    "not bf16) or run it on a provider that has the kernel"
                ) from err
            raise BuildError(
                f"ONNX Runtime could not load {self.path}: {text}; check that the file is a complete ONNX "
                "model in an IR version this onnxruntime reads (re-export it; external data files must sit "
                "next to it)"
            ) from err
        finally:
            if silence:
                ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)
        if self.provider == "cuda" and active_provider(session) != CUDA_PROVIDER:
            raise BuildError(
                f"provider 'cuda' was asked for {self.path}, but ONNX Runtime fell back to "
                f"{active_provider(session)} (CUDA or cuDNN libraries missing, or no GPU; ORT's log above says "
                "which); install the CUDA/cuDNN versions onnxruntime-gpu needs, or use provider 'cpu' / 'auto'"
            )
        return session


def session_from_onnx(
    path: str | os.PathLike[str],
    *,
    provider: Provider = "auto",
    threads: int | None = None,
    optimization: Optimization = "all",
) -> ort.InferenceSession:
    """Create a session at once; see :class:`SessionFromOnnx`."""
    return SessionFromOnnx(path, provider=provider, threads=threads, optimization=optimization)()


def _format_shape(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


class OrtRunner(Runner):
    """Runner over an ONNX Runtime session: input metadata, checked feeds, outputs by name.

    Takes a session or a loader returning one (e.g. :class:`SessionFromOnnx`); a loader runs on
    :meth:`activate`, on entering a ``with`` block, or on first use (:class:`engines.runner.Runner`). Feeds are checked before ORT sees
    them so that a wrong name or dtype is reported as what was expected and what was received.
    """

    def __init__(self, session: ort.InferenceSession | Callable[[], ort.InferenceSession]) -> None:
        self._loader: Callable[[], ort.InferenceSession] | None = None
        self._session: ort.InferenceSession | None = None
        if isinstance(session, ort.InferenceSession):
            self._session = session
        else:
            self._loader = session

    @property
    def is_active(self) -> bool:
        return self._session is not None

    def _activate(self) -> None:
        assert self._loader is not None, "a runner without a session always has a loader"
        self._session = self._loader()

    def _deactivate(self) -> None:
        """Drop a session this runner created (its threads and memory go with it); a given session stays."""
        if self._loader is not None:
            self._session = None

    def _active_session(self) -> ort.InferenceSession:
        self.activate()
        assert self._session is not None
        return self._session

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying session (created on first use)."""
        return self._active_session()

    @property
    def provider(self) -> str:
        """The execution provider that really runs the session."""
        return active_provider(self.session)

    def input_metadata(self) -> InputMetadata:
        """``name -> (numpy dtype, shape)`` of the graph inputs, in graph order; dynamic dims are strings."""
        metadata: InputMetadata = {}
        for node_arg in self.session.get_inputs():
            dtype = _ORT_TO_NUMPY.get(node_arg.type)
            if dtype is None:
                raise BuildError(
                    f"input {node_arg.name!r} has type {node_arg.type}, which numpy cannot feed; cast the graph "
                    "inputs to float16/float32 or an integer type when exporting"
                )
            shape = tuple("?" if dim is None else dim for dim in node_arg.shape)
            metadata[node_arg.name] = (dtype, shape)
        return metadata

    def output_names(self) -> list[str]:
        """Graph output names, in graph order."""
        return [node_arg.name for node_arg in self.session.get_outputs()]

    def _check_feeds(self, feeds: Mapping[str, np.ndarray], metadata: InputMetadata) -> None:
        missing = [name for name in metadata if name not in feeds]
        unknown = [name for name in feeds if name not in metadata]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(unknown)}")
            raise BuildError(
                f"feeds do not match the graph inputs ({'; '.join(parts)}): expected exactly "
                f"{', '.join(metadata)}"
            )
        for name, (dtype, shape) in metadata.items():
            value = feeds[name]
            if not isinstance(value, np.ndarray):
                raise BuildError(f"input {name!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype != dtype:
                raise BuildError(
                    f"input {name!r} expects dtype {dtype}, received {value.dtype}; cast it first"
                )
            fixed_mismatch = any(
                isinstance(want, int) and want != got for want, got in zip(shape, value.shape, strict=False)
            )
            if value.ndim != len(shape) or fixed_mismatch:
                raise BuildError(
                    f"input {name!r} expects shape {_format_shape(shape)}, received {list(value.shape)}"
                )

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once; returns every output by name."""
        self._check_feeds(feeds, self.input_metadata())
        names = self.output_names()
        try:
            outputs = self.session.run(names, dict(feeds))
        except Exception as err:  # ORT raises its own Exception subclasses.
            shapes = ", ".join(f"{name}{list(value.shape)}" for name, value in feeds.items())
            raise BuildError(f"ONNX Runtime failed to run the graph with inputs {shapes}: {err}") from err
        return dict(zip(names, outputs, strict=True))
