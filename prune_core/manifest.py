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

File digests: ``files`` records the size and sha256 of every file of the build directory but
``manifest.json`` itself (relative POSIX paths, subfolders included). The build records them in its final
save (``manifest.with_file_digests(work).save(work)``), ``prune-export engines`` adds the engines it writes
(``with_file_digests(build_dir, only=...)``), and :meth:`Manifest.load` checks them (sizes by default, sizes
then sha256 with ``verify="full"``), so a missing, truncated or modified file is named in one line instead of
failing later inside ONNX Runtime or TensorRT. Manifests written before digests existed have an empty
``files`` and load unchecked (:func:`verify_files` returns ``False`` for them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BuildDirError, BuildError
from .io import atomic_write_text

if TYPE_CHECKING:
    from .autoprune import ScheduleTable

MANIFEST_NAME = "manifest.json"
#: The other files of a build directory the tools read by name.
#: The build check's first prompt as prefill inputs (``inspect``, ``bench``).
CHECK_INPUTS = "check_inputs.npz"
#: The check report a build that failed its check keeps (``<name>.failed/``).
CHECK_REPORT = "check_report.json"
#: The folder that holds the tokenizer and image processor files.
PROCESSOR_DIR = "processor"
#: A split AutoPrune prefill's schedule table (:class:`prune_core.autoprune.ScheduleTable`).
SCHEDULE_TABLE = "schedule_table.json"
#: The trtexec / polygraphy command lines of a ``--target tensorrt`` build.
TRT_COMMANDS = "tensorrt_commands.sh"
MANIFEST_FORMAT = "prune-export-build"
MANIFEST_VERSION = 1
#: Read size of the streamed sha256 (graphs' external data files can be many GB).
DIGEST_CHUNK = 1 << 20
#: ``progress(bytes_done, bytes_total)``, called after every chunk read.
Progress = Callable[[int, int], None]
#: How :meth:`Manifest.load` checks the recorded files: ``none``; ``size`` (one ``stat`` per file: catches
#: missing and truncated files); ``full`` (sizes first, then the sha256 of every byte).
Verify = Literal["none", "size", "full"]


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
    #: None: reported, not bounded (a quantized token-selecting build's KV caches: the rounding may keep
    #: other tokens than the executor, so the caches are not comparable row by row; the answers carry it)
    tolerance: float | None
    ok: bool
    #: ``max_abs_diff`` over the reference's largest magnitude (quantized builds are judged on it)
    max_rel_diff: float | None = None
    #: what ``tolerance`` bounds: ``absolute`` (``max_abs_diff``) or ``relative`` (``max_rel_diff``)
    tolerance_kind: Literal["absolute", "relative"] = "absolute"


class TokenFlip(_Strict):
    """A check step where the graphs' greedy token differs from the executor's."""

    #: ``logits``: the prefill's next token; ``generate``: a step of the greedy answer through the runtime
    output: Literal["logits", "generate"]
    prompt: int
    step: int
    #: the executor's two best logits apart there
    gap: float
    #: quantized builds: twice the largest logits error where the tokens agree; a gap at most this is a near tie
    bound: float | None = None
    near_tie: bool = False


class CheckReport(_Strict):
    """The parity check of the exported graphs against the PyTorch executor."""

    status: Literal["passed", "failed", "skipped"]
    provider: str | None = None
    samples: int = 0
    tolerance: float | None = None
    same_next_token: bool | None = None
    #: greedy answers through the graphs (embed, vision, prefill, decode) equal the executor's, token for
    #: token, on every check prompt; ``generated_tokens``: the executor's tokens per prompt
    same_generation: bool | None = None
    generated_tokens: list[int] = Field(default_factory=list)
    outputs: list[CheckOutput] = Field(default_factory=list)
    #: quantized builds: greedy-token flips at a near tie (the executor's top-2 gap at most ``bound``, twice
    #: the largest logits error measured where the tokens agree), at most 2 of the 4 decisions. None: float builds
    near_ties: int | None = None
    #: every step where the greedy token differed, with the executor's top-2 gap there
    token_flips: list[TokenFlip] = Field(default_factory=list)


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


class FileDigest(_Strict):
    """Size and sha256 of one file of a build, as written by the build (or by ``prune-export engines``)."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


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
    #: what a runtime needs besides the graphs to answer a question: ``processor`` (folder of the copied
    #: tokenizer and image processor), ``image_token_id``, ``eos_token_ids``, ``max_new_tokens`` (the decode
    #: cache bound of the shape ranges), ``max_batch`` (most sequences per decode step; absent: a build made
    #: before batched decoding, batch 1 only). None: a build made before decode graphs existed.
    generation: dict[str, Any] | None = None
    #: ``--quantize``: mode, calibration file, rows and fingerprint (int8), and per graph the weight matmuls
    #: quantized. None: float graphs.
    quantization: dict[str, Any] | None = None
    #: every file of the build directory but ``manifest.json``: relative POSIX path (``processor/vocab.json``)
    #: -> size and sha256; empty in manifests written before digests existed (those load unchecked)
    files: dict[str, FileDigest] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, FileDigest]) -> dict[str, FileDigest]:
        for name in files:
            _check_relative(name)
        return files

    def model_spec(self) -> Any:
        """The :class:`~prune_core.spec.ModelSpec` the build was made from, as ``model`` records it."""
        from .spec import ModelSpec

        return ModelSpec(**{k: v for k, v in self.model.items() if k not in ("path", "fingerprint")})

    def graph_path(self, build_dir: str | Path, name: str) -> Path:
        try:
            return Path(build_dir) / self.graphs[name].file
        except KeyError:
            raise BuildError(
                f"build {build_dir} has no {name!r} graph (it has {', '.join(sorted(self.graphs))})"
            ) from None

    def with_file_digests(
        self, build_dir: str | Path, *, only: Iterable[str] | None = None, progress: Progress | None = None
    ) -> Manifest:
        """This manifest with ``files`` recomputed from ``build_dir`` (nothing is written; ``.save`` it).

        ``only=None``: scan the whole directory and hash every file (the build's final save). ``only``: keep
        the record of every other file and (re)hash just these relative paths, dropping those that do not
        exist (``prune-export engines`` re-saving after writing ``<graph>.plan`` files).
        """
        folder = Path(build_dir)
        if only is None:
            files = compute_file_digests(folder, progress=progress)
        else:
            files = dict(self.files)
            names = [_check_relative(name) for name in only]
            present = [name for name in names if (folder / name).is_file()]
            total = sum((folder / name).stat().st_size for name in present)
            done = 0
            for name in names:
                if name not in present:
                    files.pop(name, None)
                    continue
                files[name] = _digest(folder / name, progress, done, total)
                done += files[name].bytes
            files = dict(sorted(files.items()))
        return self.model_copy(update={"files": files})

    def save(self, build_dir: str | Path) -> Path:
        path = Path(build_dir) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def load(
        cls, build_dir: str | Path, *, verify: Verify = "size", progress: Progress | None = None
    ) -> Manifest:
        """Read and validate ``BUILD_DIR/manifest.json``, then check the files it records.

        A missing directory, one without ``manifest.json`` (not a build) or a foreign file raises a one-line
        :class:`BuildDirError`/:class:`BuildError` that says how to make a build. ``verify`` (see
        :func:`verify_files`):

        * ``"full"``: sizes, then the sha256 of every byte (0.86 s per GiB measured on one core with SHA-NI,
          warm page cache; from a cold disk, its read speed bounds it).
          Used by the loaders that run or read a build's graphs: ``prune-export inspect``
          (``inspect_build``), ``bench`` (both builds), ``engines`` (``build_engines``, before TensorRT
          spends minutes on a graph) and any future ``run``.
        * ``"size"`` (default): one ``stat`` per file; catches missing and truncated files, not a flipped
          byte. Every other caller (``PrefillRunner`` without a manifest, tests, tools reading metadata).
        * ``"none"``: metadata only, e.g. a directory that is being written.

        A manifest without digests (written before they existed) loads unchecked: ``not manifest.files``.
        """
        folder = Path(build_dir)
        path = folder / MANIFEST_NAME
        if not folder.exists():
            raise BuildDirError(
                f"build directory {folder} does not exist; make one with `prune-export build MODEL --out {folder}`"
            )
        if not folder.is_dir():
            raise BuildDirError(
                f"{folder} is a file, not a build directory; make one with `prune-export build MODEL --out DIR`"
            )
        if not path.is_file():
            raise BuildDirError(
                f"{folder} is not a build directory (no {MANIFEST_NAME}; a failed or interrupted build leaves "
                f"none); make one with `prune-export build MODEL --out {folder}`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BuildError(
                f"cannot read {path}: {_one_line(exc)}; rebuild with `prune-export build`"
            ) from None
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise BuildError(
                f"{path} is not a prune-export build manifest of version {MANIFEST_VERSION} ({loc}: "
                f"{_one_line(first['msg'])}); rebuild with this version of `prune-export build`"
            ) from None
        if verify != "none":
            verify_files(folder, manifest, mode=verify, progress=progress)
        return manifest


# -- file digests ----------------------------------------------------------------------------------------
def check_new_tokens(manifest: Manifest, requested: int) -> int:
    """``requested`` when a build's runtime can give that many new tokens: from 1 to the bound its decode
    graph was made for (``build --max-new-tokens``); else one line saying so."""
    bound = int((manifest.generation or {}).get("max_new_tokens", 0))
    if not bound:
        raise BuildError("this build has no decode graph (an older prune-export); rebuild it with `prune-export build`")
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= bound:
        raise BuildError(
            f"--max-new-tokens must be between 1 and the build's bound {bound} (the longest answer its decode "
            f"graph was made for), got {requested}; rebuild with `prune-export build --max-new-tokens N` for longer answers"
        )
    return requested


def max_decode_batch(manifest: Manifest) -> int:
    """Most sequences one decode step of the build runs together (1 for builds made before batching)."""
    return int((manifest.generation or {}).get("max_batch", 1))


def check_batch_size(manifest: Manifest, requested: int, option: str = "--batch-size") -> int:
    """``requested`` when the build's decode graph takes that many sequences per step; else one line."""
    bound = max_decode_batch(manifest)
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= bound:
        older = " (a build made before batched decoding: batch 1 only)" if "max_batch" not in (manifest.generation or {}) else ""
        raise BuildError(
            f"{option} must be between 1 and the build's decode batch bound {bound}{older}, got {requested}; "
            "rebuild with `prune-export build --max-batch N` for larger batches"
        )
    return requested


def load_schedule_table(build_dir: str | Path, manifest: Manifest) -> ScheduleTable:
    """The schedule table of a split AutoPrune build (what the host looks up between ``prefill_head`` and
    ``prefill_tail``), or one line saying why the build cannot be run that way."""
    from .autoprune import ScheduleTable

    path = Path(build_dir) / SCHEDULE_TABLE
    if manifest.autoprune is None:
        raise BuildError(f"{build_dir}: a split prefill needs the manifest's autoprune section; rebuild the directory")
    try:
        return ScheduleTable.from_dict(json.loads(path.read_text()), source=str(path))
    except OSError as exc:
        raise BuildError(f"cannot read the schedule table {path}: {exc}; rebuild the directory") from None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_relative(name: str) -> str:
    """``name`` if it is a clean relative POSIX path inside a build directory, else a :class:`ValueError`."""
    p = PurePosixPath(name)
    if (
        not name
        or p.is_absolute()
        or "\\" in name
        or p.as_posix() != name
        or any(part in ("", ".", "..") for part in p.parts)
    ):
        raise ValueError(f"{name!r} is not a relative POSIX path inside the build directory")
    if name == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} cannot record its own digest")
    return name


def _is_temp(name: str) -> bool:
    """A temporary file of :func:`prune_core.io.atomic_write_bytes` (``.NAME.XXXX.tmp``), never recorded."""
    return name.startswith(".") and name.endswith(".tmp")


def _raise_walk_error(err: OSError) -> None:
    raise BuildDirError(
        f"cannot list {err.filename}: {_one_line(err.strerror or err)}; check its permissions"
    )


def build_files(build_dir: str | Path) -> list[str]:
    """Relative POSIX paths of the files a digest record covers, sorted.

    Every regular file under ``build_dir`` (symlinks to files are followed, symlinked folders are not),
    except the top-level ``manifest.json`` and leftover ``.NAME.XXXX.tmp`` files of interrupted atomic writes.
    """
    folder = Path(build_dir)
    out = []
    for root, dirs, names in os.walk(folder, onerror=_raise_walk_error):
        dirs.sort()
        rel_root = Path(root).relative_to(folder)
        for name in names:
            rel = (rel_root / name).as_posix()
            if rel == MANIFEST_NAME or _is_temp(name) or not (Path(root) / name).is_file():
                continue
            out.append(rel)
    return sorted(out)


def _sha256(path: Path, on_chunk: Callable[[int], None]) -> tuple[str, int]:
    """Streamed sha256 and size of ``path`` (chunks of :data:`DIGEST_CHUNK`, one reused buffer)."""
    digest = hashlib.sha256()
    buf = bytearray(DIGEST_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
            on_chunk(n)
    return digest.hexdigest(), size


def _digest(path: Path, progress: Progress | None, done: int, total: int) -> FileDigest:
    state = [done]

    def on_chunk(n: int) -> None:
        state[0] += n
        if progress is not None:
            progress(state[0], total)

    try:
        sha, size = _sha256(path, on_chunk)
    except OSError as exc:
        raise BuildDirError(
            f"cannot read {path}: {_one_line(exc.strerror or exc)}; check the file and its permissions"
        ) from None
    return FileDigest(sha256=sha, bytes=size)


def digest_file(path: str | Path, *, progress: Progress | None = None) -> FileDigest:
    """Size and sha256 of one file, read in 1 MiB chunks; ``progress(bytes_done, bytes_total)`` per chunk."""
    path = Path(path)
    return _digest(path, progress, 0, path.stat().st_size)


def compute_file_digests(build_dir: str | Path, *, progress: Progress | None = None) -> dict[str, FileDigest]:
    """``{relative path: FileDigest}`` of every file of :func:`build_files`, streamed, printing nothing.

    ``progress(bytes_done, bytes_total)`` is called after every 1 MiB chunk, over the whole directory.
    """
    folder = Path(build_dir)
    names = build_files(folder)
    total = sum((folder / name).stat().st_size for name in names)
    out: dict[str, FileDigest] = {}
    done = 0
    for name in names:
        out[name] = _digest(folder / name, progress, done, total)
        done += out[name].bytes
    return out


def _role(manifest: Manifest, build_dir: Path, name: str) -> tuple[str, str]:
    """What ``name`` is in the build (``graph file``, ``TensorRT engine``, ...) and the command that remakes it."""
    rebuild = f"rebuild it with `prune-export build MODEL --out {build_dir}`"
    graph_files = {g.file for g in manifest.graphs.values()}
    data_files = {g.external_data for g in manifest.graphs.values() if g.external_data}
    engine_files = set(manifest.engines.files.values()) if manifest.engines else set()
    if name in graph_files:
        return "graph file", rebuild
    if name in data_files:
        return "graph data file", rebuild
    if name in engine_files or name.endswith(".plan"):
        return "TensorRT engine", f"rebuild the engines with `prune-export engines {build_dir}`"
    return "file", rebuild


def _and_more(names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f" (and {len(names)} more: {shown})"


def verify_files(
    build_dir: str | Path, manifest: Manifest, *, mode: Literal["size", "full"] = "full",
    progress: Progress | None = None,
) -> bool:  # fmt: skip
    """Check the files ``manifest.files`` records against ``build_dir``; ``False`` if it records none.

    Sizes of every file first (one ``stat`` each: missing, truncated and grown files are found before any
    byte is hashed), then, with ``mode="full"``, the sha256 of every file in 1 MiB chunks
    (``progress(bytes_done, bytes_total)`` after each). The first problem raises a one-line
    :class:`BuildDirError` naming the file (and counting the others of its kind). Files the manifest does
    not record are ignored. See :meth:`Manifest.load` for which loaders use which mode.
    """
    folder = Path(build_dir)
    if not manifest.files:
        return False
    missing: list[str] = []
    resized: list[tuple[str, int]] = []
    for name, rec in manifest.files.items():
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            missing.append(name)
            continue
        except OSError as exc:
            raise BuildDirError(
                f"{folder}: cannot read {name}: {_one_line(exc.strerror or exc)}; check its permissions"
            ) from None
        if not (folder / name).is_file():
            missing.append(name)
        elif st.st_size != rec.bytes:
            resized.append((name, st.st_size))
    if missing:
        kind, fix = _role(manifest, folder, missing[0])
        raise BuildDirError(
            f"{folder}: {kind} {missing[0]} is missing{_and_more(missing[1:])}; the build is incomplete — {fix}"
        )
    if resized:
        (name, size), rest = resized[0], [n for n, _ in resized[1:]]
        kind, fix = _role(manifest, folder, name)
        rec_size = manifest.files[name].bytes
        what = (f"is truncated ({size} of {rec_size} bytes the manifest records)" if size < rec_size
                else f"has {size} bytes, the manifest records {rec_size}")  # fmt: skip
        raise BuildDirError(f"{folder}: {kind} {name} {what}{_and_more(rest)}; the build is damaged — {fix}")
    if mode == "size":
        return True
    total = sum(rec.bytes for rec in manifest.files.values())
    done = 0
    for name, rec in manifest.files.items():
        got = _digest(folder / name, progress, done, total)
        done += rec.bytes
        if got.sha256 != rec.sha256:
            kind, fix = _role(manifest, folder, name)
            raise BuildDirError(
                f"{folder}: {kind} {name} has sha256 {got.sha256[:16]}…, the manifest records {rec.sha256[:16]}… "
                f"(same size, {rec.bytes} bytes): it was modified or corrupted after the build — {fix}"
            )
    return True
