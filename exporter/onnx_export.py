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

from prune_export.errors import BuildError
from prune_export.ops import Operation

from .adapters.base import VLMAdapter
from .baked import AutoPruneBake, BakedPrefill, Part
from .decode import DecodeStep, EmbedTokens
from .executor import PositionMode

#: onnxruntime 1.31 reads at most IR version 13.
IR_VERSION = 10
DEFAULT_OPSET = 20
#: Graphs with more weight bytes than this keep them in one external ``.onnx.data`` file.
INLINE_LIMIT = 1 << 30
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
    beside ``path`` (old weights streamed from their memory map, never all in memory), then renamed over
    the old files. Returns the external data path, or None when the weights are inline.
    """
    import shutil

    import onnx_ir as ir

    path = Path(path)
    model.ir_version = min(model.ir_version, IR_VERSION) if model.ir_version else IR_VERSION
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = size > inline_limit
    data_name = path.name + ".data"
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".save", dir=path.parent))
    try:
        if external:
            ir.save(model, stage / path.name, external_data=data_name, size_threshold_bytes=1024)
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
    with tempfile.TemporaryDirectory(prefix="prune-export-") as tmp:
        raw = Path(tmp) / path.name
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
            except Exception as exc:  # torch.export / onnx conversion failures
                raise BuildError(
                    f"ONNX export of {type(module).__name__} failed: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                onnx_logger.setLevel(level)
        # Weights go to an external file and are streamed from its memory map into the final one: an
        # inline save would hold the whole model in one protobuf (and fail past protobuf's 2 GB limit).
        program.save(str(raw), external_data=True)
        del program
        import onnx_ir as ir

        external = save_ir_for_ort(ir.load(str(raw)), path, inline_limit)
    return ExportReport(path, time.perf_counter() - start, input_names, output_names, external)


class OnnxFromPlan:
    """Export the prefill of ``adapter`` under a plan (ops + fixed keep stages or AutoPrune) to ONNX.

    The graph's dynamic dimensions are the system-prefix length ``sys_len`` and the text length
    ``text_len``; the image length is the model's constant ``visual_tokens``. ``part`` picks the whole
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
        if self.part == "tail":
            dynamic: tuple[object, ...] = ({1: sys_len}, None, {1: text_len}, None, None, None, None)
            args = self.example_tail_inputs()
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

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.adapter.vision(pixel_values)
        return out.features, out.cls_attention


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
        batch = torch.export.Dim("batch", min=1, max=self.max_batch)
        return _export(
            VisionGraph(self.adapter).eval(),
            (pixels,),
            Path(path),
            ["pixel_values"],
            ["image_features", "cls_attention"],
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
    """Export one decoding step over per-layer KV caches (:class:`exporter.decode.DecodeStep`).

    Each layer's past length is its own dynamic dimension ``past_len_l`` in ``[1, max_kv_tokens]``.
    """

    def __init__(
        self, adapter: VLMAdapter, *, opset: int = DEFAULT_OPSET, max_kv_tokens: int = 8192,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:  # fmt: skip
        self.adapter = adapter
        self.opset = opset
        self.max_kv_tokens = max_kv_tokens
        self.inline_limit = inline_limit

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """A token and per-layer caches of distinct lengths (distinct, so no two dims get unified)."""
        spec, dtype = self.adapter.spec, self.adapter.dtype
        gen = torch.Generator().manual_seed(0)
        args: list[torch.Tensor] = [torch.tensor([[1]], dtype=torch.int64)]
        for layer in range(spec.num_layers):
            n = 5 + layer
            args += [
                torch.randn(1, spec.num_kv_heads, n, spec.head_dim, generator=gen).to(dtype),
                torch.randn(1, spec.num_kv_heads, n, spec.head_dim, generator=gen).to(dtype),
                torch.arange(n, dtype=torch.int64).reshape(1, n) * 2,
            ]
        return tuple(args)

    def __call__(self, path: str | os.PathLike[str]) -> ExportReport:
        module = DecodeStep(self.adapter).eval()
        past: list[object] = []
        for layer in range(self.adapter.spec.num_layers):
            n = torch.export.Dim(f"past_len_{layer}", min=1, max=self.max_kv_tokens)
            past += [{2: n}, {2: n}, {1: n}]
        args = self.example_inputs()
        return _export(module, args, Path(path), module.input_names, module.output_names,
                       (None, tuple(past)), self.opset, self.inline_limit)  # fmt: skip
