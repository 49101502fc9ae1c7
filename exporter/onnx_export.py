"""ONNX export of a build's graphs (torch.onnx, dynamo): baked prefill, vision, token embedding, decode.

Loaders in Polygraphy style: :class:`OnnxFromPlan`, :class:`VisionOnnxFromAdapter`,
:class:`EmbedOnnxFromAdapter` and :class:`DecodeOnnxFromAdapter` are configured in ``__init__`` and export
on call; :func:`export_prefill` / :func:`export_vision` run them at once.

Every saved file is readable by ONNX Runtime 1.31 (IR version <= 13; onnx 1.23 writes 14 by default).
Weights are stored inline when the model is under ``inline_limit`` bytes, else in one external data
file ``<name>.onnx.data`` next to the graph.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from prune_core.errors import BuildError
from prune_core.ops import Operation

from .adapters.base import VLMAdapter
from .baked import AutoPruneBake, BakedPrefill, Part
from .decode import DecodeStep, EmbedTokens
from .executor import PositionMode

#: onnxruntime 1.31 reads at most IR version 13.
IR_VERSION = 10
DEFAULT_OPSET = 20
#: Graphs with more weight bytes than this keep them in one external ``.onnx.data`` file.
INLINE_LIMIT = 256 << 20
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how long it took."""

    path: Path
    seconds: float
    input_names: list[str]
    output_names: list[str]
    external_data: Path | None


def save_for_ort(
    model: onnx.ModelProto, path: str | os.PathLike[str], inline_limit: int = INLINE_LIMIT
) -> Path | None:
    """Save ``model`` with IR version :data:`IR_VERSION`, weights inline or in one external file.

    Written atomically: a temporary file in the same folder, then a rename. Returns the external data
    path, or None when the weights are inline.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = min(model.ir_version, IR_VERSION) if model.ir_version else IR_VERSION
    size = sum(t.ByteSize() for t in model.graph.initializer)
    external = size > inline_limit
    data_name = path.name + ".data"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if external:
            onnx.save_model(
                model,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stale = path.parent / data_name
    if not external and stale.exists():
        stale.unlink()
    return path.parent / data_name if external else None


def save_ir_for_ort(model: Any, path: str | os.PathLike[str], inline_limit: int = INLINE_LIMIT) -> Path | None:
    """Save an ``onnx_ir`` model over ``path`` as :func:`save_for_ort` does, with a fresh external data file.

    A model loaded from ``path`` keeps its unchanged weights as references into ``path``'s data file;
    saving the proto again would append the changed ones (a cast pass: every weight) to that file and leave
    the old bytes in it, unreferenced (an fp16 7B decode graph would carry its fp32 weights too). Here the
    model and a new data file holding exactly the weights it references are written into a staging folder
    beside ``path``, then renamed over the old files. The weights are streamed one at a time: those read
    from a data file are copied with plain reads in chunks (never memory-mapped, so they do not stay
    resident), the others (in-memory arrays, the exporter's torch parameters) are serialized one by one.
    Peak memory is one weight, whatever the model's size. Returns the external data path, or None when the
    weights are inline.
    """
    import shutil

    import onnx_ir as ir

    path = Path(path)
    model.ir_version = min(model.ir_version, IR_VERSION) if model.ir_version else IR_VERSION
    values = [v for graph in model.graphs() for v in graph.initializers.values() if v.const_value is not None]
    external = sum(v.const_value.nbytes for v in values) > inline_limit
    data_name = path.name + ".data"
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".save", dir=path.parent))
    try:
        if external:
            _stream_weights(values, stage / data_name, data_name, path.parent)
            os.replace(stage / data_name, path.parent / data_name)
        else:
            ir.external_data.load_to_model(model)  # inline: every weight into the proto
        ir.save(model, stage / path.name)
        os.replace(stage / path.name, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    stale = path.parent / data_name
    if not external and stale.exists():
        stale.unlink()
    return path.parent / data_name if external else None


#: Weights above this size go to the external data file (smaller ones stay in the proto).
EXTERNAL_THRESHOLD = 1024
#: Large weights start at offsets aligned to this, so runtimes can memory-map them.
_ALIGN, _ALIGN_ABOVE = 4096, 1 << 20
_CHUNK = 64 << 20


def _stream_weights(values: list[Any], data_path: Path, data_name: str, base_dir: Path) -> None:
    """Write every initializer above :data:`EXTERNAL_THRESHOLD` into ``data_path`` and point it there.

    ``base_dir`` is where ``data_name`` will live once the staged files are renamed. Weights already in an
    external data file are copied by ``read``/``write`` in :data:`_CHUNK` pieces; any memory map a loaded
    weight holds is released.
    """
    import onnx_ir as ir

    sources: dict[str, Any] = {}
    moved = []
    try:
        with open(data_path, "wb") as out:
            for value in values:
                tensor = value.const_value
                if tensor.nbytes <= EXTERNAL_THRESHOLD:
                    if isinstance(tensor, ir.ExternalTensor):
                        value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name)
                        tensor.release()
                    continue
                offset = out.tell()
                if tensor.nbytes > _ALIGN_ABOVE and offset % _ALIGN:
                    out.write(b"\0" * (_ALIGN - offset % _ALIGN))
                    offset = out.tell()
                if isinstance(tensor, ir.ExternalTensor):
                    src = sources.get(tensor.path)
                    if src is None:
                        src = sources[tensor.path] = open(tensor.path, "rb")  # noqa: SIM115
                    src.seek(tensor.offset or 0)
                    left = tensor.length or tensor.nbytes
                    while left:
                        chunk = src.read(min(left, _CHUNK))
                        if not chunk:
                            raise BuildError(f"{tensor.path} ends inside weight {tensor.name!r}; the file is truncated")
                        out.write(chunk)
                        left -= len(chunk)
                    tensor.release()
                else:
                    out.write(tensor.tobytes())
                moved.append((value, ir.ExternalTensor(
                    data_name, offset, out.tell() - offset, tensor.dtype, shape=tensor.shape,
                    name=tensor.name or value.name, base_dir=base_dir,
                )))  # fmt: skip
    finally:
        for src in sources.values():
            src.close()
    for value, tensor in moved:
        value.const_value = tensor


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[object, ...],
    opset: int,
    inline_limit: int,
) -> ExportReport:
    start = time.perf_counter()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch/transformers)
        onnx_logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
            _forget_removed_values(program.model)
        except Exception as exc:  # torch.export / onnx conversion failures
            raise BuildError(
                f"ONNX export of {type(module).__name__} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            onnx_logger.setLevel(level)
    # The exported weights are the module's own tensors (no copy); they are streamed into the data file
    # one by one. An inline save would hold the whole model in one protobuf (and fail past 2 GB).
    external = save_ir_for_ort(program.model, path, inline_limit)
    # onnxscript's optimizer keeps its global rewrite rules pointing at the last graph they matched; a graph
    # whose initializers still held the module's tensors would keep them alive (at 7B, 13 GB of weights
    # resident after the model is gone). The saved file holds them now.
    _drop_weights(program.model)
    del program
    return ExportReport(path, time.perf_counter() - start, input_names, output_names, external)


def _forget_removed_values(model: Any) -> None:
    """Release the tensors of values the exporter removed from the graph's inputs.

    torch.onnx lifts every parameter of the module as a graph input and removes the ones the graph does not
    read; onnx_ir's input list keeps such a removed value (with the module's tensor) as a zero-count key
    of its reference counter, so a graph reachable from the optimizer's global rules would keep those
    tensors alive. The counter is private: where it is absent (another onnx_ir), there is nothing to do.
    """
    for graph in model.graphs():
        for io in (graph.inputs, graph.outputs):
            counter = getattr(io, "_ref_counter", None)
            if not isinstance(counter, dict):
                continue
            for value, count in list(counter.items()):
                if count <= 0:
                    del counter[value]
                    if value.name not in graph.initializers:
                        value.const_value = None


def _drop_weights(model: Any) -> None:
    """Let go of every initializer's tensor (after the save: the files hold them)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = None


class OnnxFromPlan:
    """Export the prefill of ``adapter`` under a plan (ops + fixed keep stages or AutoPrune) to ONNX.

    The graph's dynamic dimensions are the system-prefix length ``sys_len`` and the text length
    ``text_len``; the image length is the model's constant ``visual_tokens``, or for an any-resolution model
    (LLaVA-NeXT) a third dynamic dimension ``image_len`` up to it. ``part`` picks the whole
    prefill or, for AutoPrune, its head or tail (see :mod:`exporter.baked`).
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        ops: Iterable[Operation] = (),
        keep_stages: Mapping[int, int] | None = None,
        *,
        dtype: str = "fp32",
        opset: int = DEFAULT_OPSET,
        max_sys_tokens: int = 1024,
        max_text_tokens: int = 4096,
        inline_limit: int = INLINE_LIMIT,
        positions: PositionMode = "original",
        autoprune: AutoPruneBake | None = None,
        part: Part = "full",
    ) -> None:
        if dtype not in _DTYPES:
            raise BuildError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        if _DTYPES[dtype] != adapter.dtype:
            raise BuildError(
                f"the model is loaded in {adapter.dtype} but dtype={dtype!r} was asked; load the model in that "
                "dtype (the exported precision is the model's)"
            )
        self.adapter = adapter
        self.ops = frozenset(ops)
        self.keep_stages = dict(keep_stages or {})
        self.opset = opset
        self.max_sys_tokens = max_sys_tokens
        self.max_text_tokens = max_text_tokens
        self.inline_limit = inline_limit
        self.positions: PositionMode = positions
        self.autoprune = autoprune
        self.part: Part = part

    def module(self, part: Part | None = None) -> BakedPrefill:
        return BakedPrefill(
            self.adapter,
            self.ops,
            self.keep_stages,
            positions=self.positions,
            autoprune=self.autoprune,
            part=self.part if part is None else part,
        ).eval()

    def example_inputs(self, sys_tokens: int = 5, text_tokens: int = 7) -> tuple[torch.Tensor, ...]:
        spec, dtype = self.adapter.spec, self.adapter.dtype
        gen = torch.Generator().manual_seed(0)
        d, v = spec.hidden_size, spec.visual_tokens
        if spec.any_resolution:  # a count no other dimension has, so that the export keeps it symbolic
            v = max(3, v - 3)
        return (
            torch.randn(1, sys_tokens, d, generator=gen).to(dtype),
            torch.randn(1, v, d, generator=gen).to(dtype),
            torch.randn(1, text_tokens, d, generator=gen).to(dtype),
            torch.rand(1, v, generator=gen),
        )

    def example_tail_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs of the tail graph: the head's outputs on :meth:`example_inputs`, the k=0 schedule row."""
        head = self.module("head")
        with torch.no_grad():
            out = dict(zip(head.output_names, head(*self.example_inputs()), strict=True))
        assert self.autoprune is not None
        row = self.autoprune.table.entries[0]
        return (
            *(out[name] for name in BakedPrefill.TAIL_STATE),
            torch.tensor(row.keep, dtype=torch.int64),
            torch.tensor(row.merged, dtype=torch.int64),
        )

    def __call__(self, path: str | os.PathLike[str]) -> ExportReport:
        module = self.module()
        sys_len = torch.export.Dim("sys_len", min=1, max=self.max_sys_tokens)
        text_len = torch.export.Dim("text_len", min=1, max=self.max_text_tokens)
        spec = self.adapter.spec
        if self.part == "tail":  # the visual rows are N0 (static): AutoPrune's layer-0 selection keeps them
            dynamic: tuple[object, ...] = ({1: sys_len}, None, {1: text_len}, None, None, {1: text_len}, None, None)
            args = self.example_tail_inputs()
        elif spec.any_resolution:
            # LLaVA-NeXT: the image span's length is the image's own visual count, up to the largest.
            image_len = torch.export.Dim("image_len", min=2, max=spec.visual_tokens)
            dynamic = ({1: sys_len}, {1: image_len}, {1: text_len}, {1: image_len})
            args = self.example_inputs()
        else:
            dynamic = ({1: sys_len}, None, {1: text_len}, None)
            args = self.example_inputs()
        dynamic = (dynamic,)  # BakedPrefill.forward takes *inputs: one entry for the whole tuple
        return _export(
            module,
            args,
            Path(path),
            module.input_names,
            module.output_names,
            dynamic,
            self.opset,
            self.inline_limit,
        )


def export_prefill(
    adapter: VLMAdapter,
    ops: Iterable[Operation],
    keep_stages: Mapping[int, int] | None,
    path: str | os.PathLike[str],
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    **kwargs: int,
) -> ExportReport:
    """Export the baked prefill graph to ``path`` (see :class:`OnnxFromPlan`)."""
    return OnnxFromPlan(adapter, ops, keep_stages, dtype=dtype, opset=opset, **kwargs)(path)


class VisionGraph(nn.Module):
    """Vision tower + projector: ``pixel_values [B, 3, H, W] -> (features [B, V, d], cls_attention [B, V])``.

    Calls the adapter's own :meth:`~exporter.adapters.base.VLMAdapter.vision`, which runs the tower directly
    (not ``get_image_features``, whose per-image list would fix the batch size).
    """

    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.adapter.spec.any_resolution:
            # LLaVA-NeXT: one row per tower input (base images and tiles), not yet packed; the runtime packs
            # them by the image's size (ModelSpec.pack_index) and puts image_newline after every grid row.
            out = self.adapter.vision_tiles(pixel_values)  # type: ignore[attr-defined]
            return out.features, out.cls_attention, self.adapter.image_newline.reshape(1, -1)  # type: ignore[attr-defined]
        out = self.adapter.vision(pixel_values)
        return out.features, out.cls_attention

    @staticmethod
    def output_names(any_resolution: bool) -> list[str]:
        return ["image_features", "cls_attention", *(["image_newline"] if any_resolution else [])]


class VisionOnnxFromAdapter:
    """Export the vision graph of ``adapter`` with a dynamic batch dimension."""

    def __init__(
        self,
        adapter: VLMAdapter,
        *,
        opset: int = DEFAULT_OPSET,
        max_batch: int = 64,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:
        self.adapter = adapter
        self.opset = opset
        self.max_batch = max_batch
        self.inline_limit = inline_limit

    def __call__(self, path: str | os.PathLike[str]) -> ExportReport:
        spec = self.adapter.spec
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(2, 3, spec.image_size, spec.image_size, generator=gen).to(self.adapter.dtype)
        # Any-resolution models: the batch is of tower inputs, up to max_batch images of the most tiles.
        batch = torch.export.Dim("batch", min=1, max=self.max_batch * spec.max_tiles)
        return _export(
            VisionGraph(self.adapter).eval(),
            (pixels,),
            Path(path),
            ["pixel_values"],
            VisionGraph.output_names(spec.any_resolution),
            ({0: batch},),
            self.opset,
            self.inline_limit,
        )


def export_vision(
    adapter: VLMAdapter, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET, **kwargs: int
) -> ExportReport:
    """Export the vision tower + projector to ``path`` (see :class:`VisionOnnxFromAdapter`)."""
    return VisionOnnxFromAdapter(adapter, opset=opset, **kwargs)(path)


class EmbedOnnxFromAdapter:
    """Export the token embedding ``input_ids [1, tokens] -> inputs_embeds [1, tokens, hidden]``."""

    def __init__(
        self, adapter: VLMAdapter, *, opset: int = DEFAULT_OPSET, max_tokens: int = 8192,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:  # fmt: skip
        self.adapter = adapter
        self.opset = opset
        self.max_tokens = max_tokens
        self.inline_limit = inline_limit

    def __call__(self, path: str | os.PathLike[str]) -> ExportReport:
        module = EmbedTokens(self.adapter).eval()
        ids = torch.arange(7, dtype=torch.int64).reshape(1, 7) % self.adapter.spec.vocab_size
        tokens = torch.export.Dim("tokens", min=1, max=self.max_tokens)
        return _export(module, (ids,), Path(path), module.input_names, module.output_names,
                       ({1: tokens},), self.opset, self.inline_limit)  # fmt: skip


class DecodeOnnxFromAdapter:
    """Export one decoding step of a batch of sequences over per-layer KV caches
    (:class:`exporter.decode.DecodeStep`).

    Each layer's past length is its own dynamic dimension ``past_len_l`` in ``[1, max_kv_tokens]``; the
    batch is ``decode_batch`` in ``[1, max_batch]``.
    """

    def __init__(
        self, adapter: VLMAdapter, *, opset: int = DEFAULT_OPSET, max_kv_tokens: int = 8192, max_batch: int = 8,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:  # fmt: skip
        self.adapter = adapter
        self.opset = opset
        self.max_kv_tokens = max_kv_tokens
        self.max_batch = max_batch
        self.inline_limit = inline_limit

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Two sequences and per-layer caches of distinct lengths (distinct, so no two dims get unified);
        the second sequence is one token shorter at every layer (a padded slot, position -1)."""
        spec, dtype = self.adapter.spec, self.adapter.dtype
        gen = torch.Generator().manual_seed(0)
        batch = 2
        args: list[torch.Tensor] = [torch.tensor([[1], [2]], dtype=torch.int64)]
        for layer in range(spec.num_layers):
            n = 5 + layer
            positions = (torch.arange(n, dtype=torch.int64) * 2).repeat(batch, 1)
            positions[1, 0] = -1
            args += [
                torch.randn(batch, spec.num_kv_heads, n, spec.head_dim, generator=gen).to(dtype),
                torch.randn(batch, spec.num_kv_heads, n, spec.head_dim, generator=gen).to(dtype),
                positions,
            ]
        return tuple(args)

    def __call__(self, path: str | os.PathLike[str]) -> ExportReport:
        module = DecodeStep(self.adapter).eval()
        batch = torch.export.Dim("decode_batch", min=1, max=max(self.max_batch, 2))
        past: list[object] = []
        for layer in range(self.adapter.spec.num_layers):
            n = torch.export.Dim(f"past_len_{layer}", min=1, max=self.max_kv_tokens)
            past += [{0: batch, 2: n}, {0: batch, 2: n}, {0: batch, 1: n}]
        args = self.example_inputs()
        return _export(module, args, Path(path), module.input_names, module.output_names,
                       ({0: batch}, tuple(past)), self.opset, self.inline_limit)  # fmt: skip


