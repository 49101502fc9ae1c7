"""``manifest.json``: what a build directory holds, for the tools that run, inspect and deploy it.

Written last by ``prune-export build`` (a directory without it is not a finished build), read by
``inspect``, ``bench`` and the engine runtimes. It names the model (fingerprint) and plan (hash, budget,
token section) the graphs were baked from, every graph file with its inputs and outputs and the range of
each dynamic dimension, the precision and target, the versions of the tools that made it, what the plan
promises in FLOPs, and what the parity check measured.

Split AutoPrune prefills (``--target tensorrt``) follow the runtime contract in docs/build.md: run
``prefill_head``, read ``autoprune.complexity`` (``I1``), compute ``k = max(k0 - gamma*I1, 0)``, take the row
of ``schedule_table.json`` nearest to ``k`` and feed its ``keep``/``merged`` counts to ``prefill_tail`` as
``keep_counts``/``merged_counts`` together with the head's ``tail.*`` outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BuildError
from .io import atomic_write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "prune-export-build"
MANIFEST_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output: ``shape`` holds ints (static) and names (dynamic dims)."""

    name: str
    dtype: str
    shape: list[int | str]


class GraphEntry(_Strict):
    """One ONNX file of the build and its interface."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None


class CheckOutput(_Strict):
    name: str
    max_abs_diff: float
    tolerance: float
    ok: bool


class CheckReport(_Strict):
    """The parity check of the exported graphs against the PyTorch executor."""

    status: Literal["passed", "failed", "skipped"]
    provider: str | None = None
    samples: int = 0
    tolerance: float | None = None
    same_next_token: bool | None = None
    outputs: list[CheckOutput] = Field(default_factory=list)


class EngineReport(_Strict):
    """TensorRT engines of a ``--target tensorrt`` build: one ``<graph>.plan`` per graph, or why there is none.

    ``status``: ``built``; ``not_built`` (TensorRT is not installed where the build ran: the checked graphs
    are complete, and ``prune-export engines BUILD_DIR`` builds the engines on a machine with TensorRT);
    ``failed`` (TensorRT refused a graph; ``reason`` says why).
    """

    status: Literal["built", "not_built", "failed"]
    reason: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    tensorrt: str | None = None


class Manifest(_Strict):
    format: Literal["prune-export-build"] = MANIFEST_FORMAT
    version: Literal[1] = MANIFEST_VERSION
    created: str
    model: dict[str, Any]
    plan: dict[str, Any]
    dtype: Literal["fp32", "fp16", "bf16"]
    target: Literal["onnxruntime", "tensorrt"]
    #: ``single``: one ``prefill`` graph; ``split``: ``prefill_head`` + host table lookup + ``prefill_tail``.
    prefill_layout: Literal["single", "split"]
    graphs: dict[str, GraphEntry]
    #: dynamic dimension name -> ``[min, opt, max]``
    shape_ranges: dict[str, list[int]]
    #: shape-tensor input (an int64 vector a TensorRT engine reads as sizes) -> ``[min, opt, max]`` value
    #: vectors, one value per element (a split AutoPrune prefill's ``keep_counts``/``merged_counts``: the
    #: smallest, a typical and the largest count of every layer over the schedule table's rows)
    shape_values: dict[str, list[list[int]]] = Field(default_factory=dict)
    autoprune: dict[str, Any] | None = None
    flops: dict[str, Any]
    check: CheckReport
    passes: list[dict[str, Any]] = Field(default_factory=list)
    versions: dict[str, str | None]
    engines: EngineReport | None = None  # --target tensorrt only

    def graph_path(self, build_dir: str | Path, name: str) -> Path:
        try:
            return Path(build_dir) / self.graphs[name].file
        except KeyError:
            raise BuildError(
                f"build {build_dir} has no {name!r} graph (it has {', '.join(sorted(self.graphs))})"
            ) from None

    def save(self, build_dir: str | Path) -> Path:
        path = Path(build_dir) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, build_dir: str | Path) -> Manifest:
        """Read and validate ``BUILD_DIR/manifest.json``; a missing or foreign file says how to make one."""
        folder = Path(build_dir)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise BuildError(f"build directory {folder} does not exist; make one with `prune-export build`")
        if not path.is_file():
            raise BuildError(
                f"{folder} has no {MANIFEST_NAME}, so it is not a finished build (a failed or interrupted build "
                "leaves none); rebuild it with `prune-export build`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BuildError(f"cannot read {path}: {exc}; rebuild with `prune-export build`") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise BuildError(
                f"{path} is not a prune-export build manifest of version {MANIFEST_VERSION} ({loc}: {first['msg']}); "
                "rebuild with this version of `prune-export build`"
            ) from None
