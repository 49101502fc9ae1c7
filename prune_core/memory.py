"""Will it fit? Peak-memory estimates made before anything is loaded, so no user meets the OOM killer.

A model folder's parameter count is read from its safetensors headers (a few KB each, no weights read); a
build's graph weights are the size of its ONNX files. Each estimate is that many bytes in the precision
the work holds them in, times a measured overhead, plus a fixed allowance for the Python process:

* loading a model in PyTorch (``eval``, ``search``, ``sweep``, a build's check): parameters x bytes per
  parameter of ``--dtype``;
* ``build`` without ``--low-memory``: the model in fp32 (the export traces the fp32 model; an fp16/bf16 build
  casts the graphs afterwards); with ``--low-memory``: the model in its fp16/bf16 precision. Measured at
  LLaVA-1.5-7B shapes on a 24 GB machine: the low-memory fp16 build peaks at 14.5 GiB, about its weights
  once (docs/benchmarks.md), so the overhead factor 1.15 leaves room;
* running a build's prefill (``inspect``): the graphs' weight files, once.

The memory available is ``MemAvailable`` of ``/proc/meminfo`` (what can be had without swapping), or the
``PRUNE_EXPORT_MEMORY_GB`` environment variable where it is set (a cap on a shared machine, or a test).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .errors import PruneExportError

#: Working memory of the process besides the weights (torch, ONNX Runtime, the Python heap).
BASE_BYTES = 1 << 30
#: Peak over the weights held once: export buffers, graph passes, allocator slack.
OVERHEAD = 1.15
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
GIB = float(1 << 30)


class InsufficientMemoryError(PruneExportError):
    """The work would need more memory than this machine has available."""


def available_bytes() -> int | None:
    """Memory that can be had now (``PRUNE_EXPORT_MEMORY_GB`` where set, else ``MemAvailable``); None when
    neither can be read (then nothing is refused)."""
    override = os.environ.get("PRUNE_EXPORT_MEMORY_GB")
    if override:
        try:
            return int(float(override) * GIB)
        except ValueError:
            raise PruneExportError(f"PRUNE_EXPORT_MEMORY_GB={override!r} is not a number of GiB; unset it or "
                                   "give one, e.g. 20") from None  # fmt: skip
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_parameters(model_dir: str | Path) -> int | None:
    """The parameter count of a model folder's safetensors weights, from their headers alone (None when the
    folder holds none: then nothing is estimated)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def estimate(weight_bytes: float) -> int:
    """Peak bytes of work that holds ``weight_bytes`` of weights."""
    return int(weight_bytes * OVERHEAD + BASE_BYTES)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits(what: str, needed: int, fix: str) -> None:
    """One line when ``needed`` bytes exceed what is available: what needs it, both figures, and ``fix``."""
    have = available_bytes()
    if have is not None and needed > have:
        raise InsufficientMemoryError(f"{what} needs about {gib(needed)} of memory and {gib(have)} is available; {fix}")


def load_estimate(params: int, dtype: str) -> int:
    """Peak bytes of holding ``params`` parameters in PyTorch in ``dtype``."""
    return estimate(params * BYTES_PER_PARAM[dtype])


def load_bytes(model_dir: str | Path, dtype: str) -> int | None:
    """Peak bytes of loading a model folder in PyTorch in ``dtype`` (None: no safetensors to count)."""
    params = model_parameters(model_dir)
    return None if params is None else load_estimate(params, dtype)


def check_model_fits(model_dir: str | Path, dtype: str, command: str) -> None:
    """Refuse, before loading, a model that would not fit in ``dtype`` (``eval``, ``search``, ``sweep``)."""
    params = model_parameters(model_dir)
    if params is None:
        return
    smaller = "" if dtype != "fp32" else f" (in bf16 or fp16 it needs about {gib(load_estimate(params, 'bf16'))})"
    check_fits(f"{command} of {model_dir} in {dtype}", load_estimate(params, dtype),
               f"run it on a machine with more memory, or with --dtype bf16/fp16{smaller}")  # fmt: skip


def graphs_bytes(build_dir: str | Path, names: list[str]) -> int:
    """Bytes of a build's graphs (each ``NAME.onnx`` and its external data file)."""
    total = 0
    for name in names:
        for path in (Path(build_dir) / f"{name}.onnx", Path(build_dir) / f"{name}.onnx.data"):
            if path.is_file():
                total += path.stat().st_size
    return total
