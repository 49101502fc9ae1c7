"""The graph models of a Triton model repository, written from a build directory.

:class:`GraphModelsFromBuild` lays out one Triton model per graph of a build::

    REPO/
      NAME_vision/config.pbtxt      NAME_vision/1/model.onnx (+ its external data file, same name as in the build)
      NAME_prefill/...              (or NAME_prefill_head/, NAME_prefill_tail/ for a split AutoPrune build)
      NAME_embed/...                NAME_decode/...
      versions.json                 what the repository was generated for and by

Graphs with a TensorRT engine in the build (``--target tensorrt`` built where TensorRT runs) are served
as ``tensorrt_plan`` (``1/model.plan``), the others as ``onnxruntime_onnx``. Every configuration is
generated from the manifest and checked (:mod:`engines.triton.config`) before the repository is renamed
into place, so a repository directory that exists is complete. Model files are hard-linked from the build
where the file system allows it (a 7B build's weights are not copied twice), else copied.

The orchestrating Python-backend model a client calls (image + question in, answer out, by BLS requests to
these graph models; it will carry the tokenizer and processor files in its version folder: a directory
without ``config.pbtxt`` at the repository's top level would be taken for a broken model) is the next part of
``prune-export deploy`` and is not written here yet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from prune_export.errors import BuildError
from prune_export.io import staged_directory
from prune_export.manifest import Manifest

from .config import MODEL_FILES, GraphModelConfig, Kind, check_against_onnx, parse_config

#: Model names Triton serves without escaping in URLs: letters, digits, ``_``, ``-`` and ``.``, not
#: starting with ``.`` (a hidden directory), at most 128 characters.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
VERSIONS_FILE = "versions.json"


def check_model_name(name: str) -> None:
    """Refuse a model name Triton would reject or a URL would have to escape."""
    if not _NAME.match(name):
        raise BuildError(
            f"model name {name!r} cannot be served: use letters, digits, '_', '-' and '.', not starting with '.', "
            "at most 128 characters (it becomes a directory and part of every request URL)"
        )


def _place(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` where possible, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class GraphModelsFromBuild:
    """Write the graph models of ``build_dir`` into a new Triton repository ``repo_dir`` (atomically)."""

    def __init__(
        self,
        build_dir: str | Path,
        repo_dir: str | Path,
        *,
        name: str = "prune_export",
        instances: int = 1,
        kind: Kind = "cpu",
        overwrite: bool = False,
        manifest: Manifest | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        check_model_name(name)
        if instances < 1:
            raise BuildError(f"--instances must be >= 1, got {instances}")
        self.build_dir = Path(build_dir)
        self.repo_dir = Path(repo_dir)
        self.name = name
        self.instances = instances
        self.kind: Kind = kind
        self.overwrite = overwrite
        self.manifest = manifest or Manifest.load(self.build_dir, verify="full")
        self.log = log

    def model_name(self, graph: str) -> str:
        return f"{self.name}_{graph}"

    def _engine(self, graph: str) -> Path | None:
        engines = self.manifest.engines
        if engines is None or engines.status != "built" or graph not in engines.files:
            return None
        return self.build_dir / engines.files[graph]

    def __call__(self) -> Path:
        repo = self.repo_dir
        if repo.exists() and (not repo.is_dir() or any(repo.iterdir())) and not self.overwrite:
            raise BuildError(f"{repo} already exists and is not empty; pass --overwrite to replace it, or choose another --repo")
        with staged_directory(repo) as work:
            self._write(work)
        return repo

    def _write(self, work: Path) -> None:
        m = self.manifest
        shape_values = frozenset(m.shape_values)
        for graph, entry in m.graphs.items():
            model_dir = work / self.model_name(graph)
            engine = self._engine(graph)
            platform = "tensorrt_plan" if engine is not None else "onnxruntime_onnx"
            shape_tensors = shape_values & {i.name for i in entry.inputs} if engine is not None else frozenset()
            config = GraphModelConfig(self.model_name(graph), entry, platform=platform, kind=self.kind,
                                      instances=self.instances, shape_tensors=shape_tensors)  # fmt: skip
            text = config.text()
            source = f"{self.model_name(graph)}/config.pbtxt"
            parsed = parse_config(text, source)
            onnx_path = self.build_dir / entry.file
            check_against_onnx(parsed, onnx_path, source)
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(text)
            if engine is not None:
                _place(engine, model_dir / "1" / MODEL_FILES[platform])
            else:
                _place(onnx_path, model_dir / "1" / MODEL_FILES[platform])
                if entry.external_data:  # the graph names its data file; keep that name beside model.onnx
                    _place(self.build_dir / entry.external_data, model_dir / "1" / entry.external_data)
            self.log(f"  {self.model_name(graph)}: {platform}, {len(entry.inputs)} inputs, {len(entry.outputs)} outputs")
        versions = {
            "generated_by": {k: v for k, v in m.versions.items() if k == "prune-export"},
            "onnxruntime": m.versions.get("onnxruntime") or m.versions.get("onnxruntime-gpu"),
            "tensorrt": m.engines.tensorrt if m.engines is not None else None,
            "build": {"dtype": m.dtype, "target": m.target, "fingerprint": m.model["fingerprint"],
                      "prefill_layout": m.prefill_layout},  # fmt: skip
        }
        (work / VERSIONS_FILE).write_text(json.dumps(versions, indent=2) + "\n")
