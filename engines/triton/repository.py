"""A Triton model repository written from a build directory (``prune-export deploy``).

:class:`RepositoryFromBuild` lays out::

    REPO/
      NAME/config.pbtxt             the model a client calls: Python backend, image + question -> answer
      NAME/1/model.py               engines/triton/models/orchestrator.py (BLS requests to the graph models)
      NAME/1/generation.json        graph model names, input dtypes, token ids, bounds, schedule table
      NAME/1/processor/...          the build's tokenizer and image processor
      NAME/1/prune_export_prompt.py the prompt and detokenisation rules of ``prune-export run``
      NAME/1/prune_export_anyres.py any-resolution (LLaVA-NeXT) builds: the tiling rules that pack each image's tiles
      NAME/1/prune_export_batching.py ``--max-batch`` > 1 or ``--stream``: the continuous-batching scheduler
      NAME_vision/config.pbtxt      NAME_vision/1/model.onnx (+ its external data file, same name as in the build)
      NAME_prefill/...              (or NAME_prefill_head/, NAME_prefill_tail/ for a split AutoPrune build)
      NAME_embed/...                NAME_decode/...
      versions.json                 what the repository was generated for and by
      README.md                     how to serve it (NGC Triton container, or ``prune-export serve``)

Graphs with a TensorRT engine in the build (``--target tensorrt`` built where TensorRT runs) are served as
``tensorrt_plan`` (``1/model.plan``), the others as ``onnxruntime_onnx``. Every configuration is generated
from the manifest and checked (:mod:`engines.triton.config`: Triton's own schema, then names, types and
ranks against the ONNX graph) before the repository is renamed into place, so a repository directory that
exists is complete. Model files are reflinked from the build where the file system can (btrfs, XFS: a 7B
build's weights share their blocks instead of being stored twice), else copied. Never hard-linked: ONNX
and onnx-ir refuse to read external data with more than one hard link (a "hard link attack"), which would
leave both the build and the repository unreadable by them. Files at the repository's top level are ignored
by Triton, which loads directories only.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engines.batching as batching_rules
import prune_core.anyres as anyres_rules
import prune_core.prompt as prompt_rules
from prune_core import defaults
from prune_core.autoprune import INDEX_SLACK
from prune_core.errors import BuildError
from prune_core.io import staged_directory
from prune_core.manifest import Manifest, check_batch_size, check_new_tokens, load_schedule_table

from .config import MODEL_FILES, GraphModelConfig, Kind, check_against_onnx, parse_config

#: Model names Triton serves without escaping in URLs: letters, digits, ``_``, ``-`` and ``.``, not
#: starting with ``.`` (a hidden directory), at most 128 characters.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
VERSIONS_FILE = "versions.json"
GENERATION_FILE = "generation.json"
MODELS_DIR = Path(__file__).parent / "models"


def check_model_name(name: str) -> None:
    """Refuse a model name Triton would reject or a URL would have to escape."""
    if not _NAME.match(name):
        raise BuildError(
            f"model name {name!r} cannot be served: use letters, digits, '_', '-' and '.', not starting with '.', "
            "at most 128 characters (it becomes a directory and part of every request URL)"
        )


#: Linux ``ioctl(FICLONE)``: make ``dst`` share ``src``'s blocks (copy-on-write), as ``cp --reflink``.
_FICLONE = 0x40049409


def _place(src: Path, dst: Path) -> None:
    """``dst`` as a reflink of ``src`` where the file system can make one, else a copy; each file keeps one
    hard link (see the module docstring)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        shutil.copystat(src, dst)
    except (OSError, ImportError):
        shutil.copy2(src, dst)


def orchestrator_config(name: str, *, instances: int, stream: bool) -> str:
    """``config.pbtxt`` of the Python-backend model a client calls (see ``models/orchestrator.py``)."""

    def tensor(tname: str, dtype: str, optional: bool = False) -> str:
        extra = "\n    optional: true" if optional else ""
        return f'  {{\n    name: "{tname}"\n    data_type: {dtype}\n    dims: [ 1 ]{extra}\n  }}'

    inputs = [tensor("image", "TYPE_STRING"), tensor("question", "TYPE_STRING"),
              tensor("max_new_tokens", "TYPE_INT32", True), tensor("ignore_eos", "TYPE_BOOL", True)]  # fmt: skip
    outputs = [tensor("answer", "TYPE_STRING"), tensor("new_tokens", "TYPE_INT32")]
    text = (
        f'name: "{name}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        "input [\n" + ",\n".join(inputs) + "\n]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
    )
    if stream:
        text += "model_transaction_policy {\n  decoupled: true\n}\n"
    return text


class RepositoryFromBuild:
    """Write ``build_dir`` as a new Triton repository ``repo_dir`` (atomically); calling returns its path."""

    def __init__(
        self,
        build_dir: str | Path,
        repo_dir: str | Path,
        *,
        name: str = "prune_export",
        instances: int = 1,
        kind: Kind = "cpu",
        max_new_tokens: int | None = None,
        max_image_pixels: int = defaults.MAX_IMAGE_PIXELS,
        stream: bool = False,
        max_batch: int = 1,
        kv_budget_mb: float | None = None,
        decode_in: str | None = None,
        overwrite: bool = False,
        manifest: Manifest | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        check_model_name(name)
        if instances < 1:
            raise BuildError(f"--instances must be >= 1, got {instances}")
        if kind not in ("cpu", "gpu"):
            raise BuildError(f"--device must be cpu or gpu, got {kind!r}")
        self.build_dir = Path(build_dir)
        self.repo_dir = Path(repo_dir)
        self.name = name
        self.instances = instances
        self.kind: Kind = kind
        self.stream = stream
        self.overwrite = overwrite
        self.manifest = manifest or Manifest.load(self.build_dir, verify="full")
        self.log = log
        generation = self.manifest.generation
        if generation is None or not {"embed", "decode"} <= set(self.manifest.graphs):
            raise BuildError(
                f"{self.build_dir} was built without the decode and embed graphs (an older prune-export); "
                "rebuild it with `prune-export build` to deploy it"
            )
        if max_image_pixels < 1:
            raise BuildError(f"--max-image-pixels must be >= 1, got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
        bound = int(generation["max_new_tokens"])
        self.max_new_tokens = bound if max_new_tokens is None else check_new_tokens(self.manifest, max_new_tokens)
        self.max_batch = check_batch_size(self.manifest, max_batch, "--max-batch")
        if kv_budget_mb is not None and not kv_budget_mb > 0:
            raise BuildError(f"--kv-budget-mb must be > 0, got {kv_budget_mb}")
        self.kv_budget_bytes = None if kv_budget_mb is None else int(kv_budget_mb * 2**20)
        onnx_decode = self._engine("decode") is None
        if decode_in not in (None, "orchestrator", "bls"):
            raise BuildError(f"--decode-in must be orchestrator or bls, got {decode_in!r}")
        if decode_in == "orchestrator" and not onnx_decode:
            raise BuildError("--decode-in orchestrator runs decode.onnx with ONNX Runtime inside the served model; this "
                             "build's decode graph is a TensorRT engine: use --decode-in bls")  # fmt: skip
        if decode_in == "orchestrator" and not self.decoupled:
            raise BuildError("--decode-in orchestrator is the batching model's engine: pass --max-batch N or --stream")
        #: where the batching model runs decode steps: in its own process (ONNX Runtime, caches stay there) or
        #: by BLS requests to NAME_decode (TensorRT engines; every step sends the caches there and back)
        self.decode_in = decode_in or ("orchestrator" if self.decoupled and onnx_decode else "bls")

    @property
    def decoupled(self) -> bool:
        """The served model is decoupled (the batching scheduler runs it) when it streams or batches."""
        return self.stream or self.max_batch > 1

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
            platforms = self._write_graphs(work)
            self._write_orchestrator(work)
            self._write_versions(work)
            (work / "README.md").write_text(self._readme(platforms))
        return repo

    # -- graph models ----------------------------------------------------------------------------------
    def _write_graphs(self, work: Path) -> dict[str, str]:
        m = self.manifest
        shape_values = frozenset(m.shape_values)
        platforms = {}
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
            platforms[self.model_name(graph)] = platform
            self.log(f"  {self.model_name(graph)}: {platform}, {len(entry.inputs)} inputs, {len(entry.outputs)} outputs")
        return platforms

    # -- the model a client calls ----------------------------------------------------------------------
    def generation_spec(self) -> dict[str, Any]:
        """``generation.json``: everything the orchestrator needs that is not in the graphs themselves."""
        m = self.manifest
        gen = m.generation or {}
        graphs = m.graphs
        prompt_graph = "prefill" if m.prefill_layout == "single" else "prefill_head"
        dtypes = {spec.name: spec.dtype for spec in graphs[prompt_graph].inputs}
        dtypes["pixel_values"] = next(s.dtype for s in graphs["vision"].inputs if s.name == "pixel_values")
        spec: dict[str, Any] = {
            "format": "prune-export-triton-generation",
            "version": 1,
            "models": {graph: self.model_name(graph) for graph in graphs},
            "prefill_layout": m.prefill_layout,
            "num_layers": int(m.model["num_layers"]),
            "visual_tokens": int(m.model["visual_tokens"]),
            "image_token_id": int(gen["image_token_id"]),
            "eos_token_ids": [int(i) for i in gen["eos_token_ids"]],
            "max_new_tokens": self.max_new_tokens,
            "default_new_tokens": min(defaults.ANSWER_NEW_TOKENS, self.max_new_tokens),
            "max_sys_tokens": int(m.shape_ranges["sys_len"][2]),
            "max_text_tokens": int(m.shape_ranges["text_len"][2]),
            "max_image_pixels": self.max_image_pixels,
            "input_dtypes": dtypes,
            "processor": "processor",
            "stream": self.stream,
            "max_batch": self.max_batch,
            "kv_budget_bytes": self.kv_budget_bytes,
            "decode_in": self.decode_in,
            "device": self.kind,
        }
        tiling = m.model_spec().tiling
        if tiling is not None:
            spec["any_resolution"] = {"image_size": tiling.image_size, "patch_size": tiling.patch_size,
                                      "image_grid_pinpoints": [list(p) for p in tiling.pinpoints]}  # fmt: skip
            spec["autoprune_n0"] = (m.autoprune or {}).get("n0")
        if m.prefill_layout != "single":
            table = load_schedule_table(self.build_dir, m)
            spec["head_outputs"] = [o.name for o in graphs["prefill_head"].outputs]
            spec["tail_outputs"] = [o.name for o in graphs["prefill_tail"].outputs]
            spec["schedule"] = {
                "k0": table.k0, "gamma": float(m.autoprune["gamma"]), "k_step": table.k_step,
                "index_slack": INDEX_SLACK,
                "keep": [list(e.keep) for e in table.entries], "merged": [list(e.merged) for e in table.entries],
            }  # fmt: skip
        return spec

    def _write_orchestrator(self, work: Path) -> None:
        model_dir = work / self.name
        version = model_dir / "1"
        version.mkdir(parents=True)
        text = orchestrator_config(self.name, instances=self.instances, stream=self.decoupled)
        parse_config(text, f"{self.name}/config.pbtxt")
        (model_dir / "config.pbtxt").write_text(text)
        shutil.copyfile(MODELS_DIR / "orchestrator.py", version / "model.py")
        shutil.copyfile(Path(prompt_rules.__file__), version / "prune_export_prompt.py")
        if self.manifest.model_spec().any_resolution:
            shutil.copyfile(Path(anyres_rules.__file__), version / "prune_export_anyres.py")
        if self.decoupled:
            shutil.copyfile(Path(batching_rules.__file__), version / "prune_export_batching.py")
        (version / GENERATION_FILE).write_text(json.dumps(self.generation_spec(), indent=2) + "\n")
        source = self.build_dir / str((self.manifest.generation or {})["processor"])
        if not source.is_dir():
            raise BuildError(f"{source} (the build's tokenizer and image processor) is missing; rebuild the directory")
        for path in sorted(source.rglob("*")):
            if path.is_file():
                _place(path, version / "processor" / path.relative_to(source))
        mode = "decoupled, streams text pieces" if self.stream else (
            "decoupled, one response per request" if self.decoupled else "one response per request")
        if self.decoupled:
            budget = "no KV budget" if self.kv_budget_bytes is None else f"KV budget {self.kv_budget_bytes / 2**20:.0f} MiB"
            where = "in this model (ONNX Runtime)" if self.decode_in == "orchestrator" else f"by BLS to {self.model_name('decode')}"
            mode += f", continuous batching of up to {self.max_batch} sequences, {budget}, decode steps {where}"
        self.log(f"  {self.name}: python (BLS orchestrator, {mode}), max_new_tokens <= {self.max_new_tokens}")

    def _write_versions(self, work: Path) -> None:
        m = self.manifest
        versions = {
            "generated_by": {k: v for k, v in m.versions.items() if k == "prune-export"},
            "triton": {"served_locally_by": "tritonserver 2.51 (nvidia-pytriton 0.7.0), Python backend",
                       "production": "an NGC tritonserver release with the python and onnxruntime (or tensorrt) backends"},
            "onnxruntime": m.versions.get("onnxruntime") or m.versions.get("onnxruntime-gpu"),
            "tensorrt": m.engines.tensorrt if m.engines is not None else None,
            "build": {"dtype": m.dtype, "target": m.target, "fingerprint": m.model["fingerprint"],
                      "prefill_layout": m.prefill_layout},  # fmt: skip
            "orchestrator_needs": ["numpy<2", "transformers", "tokenizers", "pillow"]
            + (["onnxruntime (onnxruntime-gpu with --device gpu)"] if self.decode_in == "orchestrator" else []),
        }
        (work / VERSIONS_FILE).write_text(json.dumps(versions, indent=2) + "\n")

    def _extra_pip(self) -> str:
        if self.decode_in != "orchestrator":
            return ""
        return " onnxruntime-gpu" if self.kind == "gpu" else " onnxruntime"

    def _mode_text(self) -> str:
        if not self.decoupled:
            return "One request at a time per instance: HTTP or gRPC."
        text = ("The model is **decoupled** (gRPC streaming or HTTP `generate_stream`): it streams the answer's "
                "text pieces as they come." if self.stream else
                "The model is **decoupled** (gRPC streaming or HTTP `generate_stream`): one response with the "
                "whole answer, then the final flag.")  # fmt: skip
        budget = "" if self.kv_budget_bytes is None else f", within a KV-cache budget of {self.kv_budget_bytes / 2**20:.0f} MiB"
        where = (f"this model runs the decode graph itself (`{self.model_name('decode')}/1/model.onnx`, ONNX Runtime, "
                 "so the KV caches stay in its process between steps; it needs `onnxruntime` in its Python)"
                 if self.decode_in == "orchestrator" else f"each decode step is a BLS request to `{self.model_name('decode')}`")
        return (f"{text} Concurrent requests are decoded together, up to {self.max_batch} sequences per decode "
                f"step{budget}: a request joins between decode steps and leaves when its answer ends; {where}.")

    def _readme(self, platforms: dict[str, str]) -> str:
        rows = "\n".join(f"| `{model}` | `{platform}` |" for model, platform in platforms.items())
        engine_note = (
            "TensorRT engines (`model.plan`) only load on the TensorRT version and GPU they were built with "
            f"({self.manifest.engines.tensorrt if self.manifest.engines else 'see versions.json'}).\n\n"
            if "tensorrt_plan" in platforms.values() else ""
        )  # fmt: skip
        return f"""# Triton model repository: `{self.name}`

Generated by `prune-export deploy` from a build of `{Path(str(self.manifest.model.get("path", "model"))).name}`
({self.manifest.dtype}, prefill `{self.manifest.prefill_layout}`). Clients call **`{self.name}`**:

| input | type | |
|---|---|---|
| `image` | `TYPE_STRING [1]` | the encoded image file (PNG, JPEG, ...) as bytes |
| `question` | `TYPE_STRING [1]` | UTF-8 text |
| `max_new_tokens` | `TYPE_INT32 [1]`, optional | 1 to {self.max_new_tokens}; default {min(defaults.ANSWER_NEW_TOKENS, self.max_new_tokens)} |
| `ignore_eos` | `TYPE_BOOL [1]`, optional | generate exactly `max_new_tokens` (benchmarks) |

Outputs: `answer` (`TYPE_STRING [1]`, greedy) and `new_tokens` (`TYPE_INT32 [1]`).
{self._mode_text()}

`{self.name}` is a Python-backend model that runs the graph models below by BLS requests
(vision -> embed -> prefill -> greedy decode steps, carrying every layer's KV cache):

| model | platform |
|---|---|
{rows}

{engine_note}## Serve it with the NGC Triton container (production)

The graph models use Triton's native backends; the Python model needs `transformers` and `pillow` with
`numpy<2` in the container's Python:

```bash
docker run --rm --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD:/models \\
  nvcr.io/nvidia/tritonserver:24.10-py3 \\
  bash -c "pip install 'numpy<2' transformers pillow{self._extra_pip()} && tritonserver --model-repository=/models"
```

(or pack that environment with conda-pack and point the Python model at it with the
`EXECUTION_ENV_PATH` parameter). Graph models were generated with instance kind
`KIND_{self.kind.upper()}`; regenerate with `prune-export deploy --device gpu|cpu` to change it.

## Serve it locally (CPU, tests)

`prune-export serve REPO` runs the `tritonserver` bundled with nvidia-pytriton, which has the Python backend
only; it serves the `onnxruntime` models through a small Python-based backend with ONNX Runtime. The
repository is the same directory either way.

Ask: `prune-export ask http://127.0.0.1:8000 --image photo.jpg --question "What is in the picture?"`
"""
