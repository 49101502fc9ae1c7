"""A decoder prefill with a plan baked in: a traceable PyTorch module for ONNX export.

:class:`BakedPrefill` computes exactly what :class:`~exporter.executor.PlanExecutor` computes for one
prompt under a plan's static GSOP operations plus its token section (a fixed keep schedule, or an AutoPrune
curve), but with every static row set decided at build time and every dynamic one decided by TopK nodes
inside the graph, so the exported graph has no NonZero, no boolean masking and no host round trip:

* the prompt is laid out as ``[sys | img_key | img_rest | txt]`` (docs/methods.md: what is static for
  export). Key tokens are the top ``K = spec.key_tokens()`` visual tokens by the vision tower's [CLS]
  attention, picked in-graph by a sort with a constant K; within each block tokens keep their original
  order. RoPE and the causal mask use every token's position, so the layout changes no result. Where no
  layer distinguishes ``img_key`` from ``img_rest`` the image block simply stays in its original order and
  no sort is emitted;
* per layer and module (``q``, ``kv``, ``mlp``) the kept rows are a union of whole blocks, i.e. at most a
  few static slices: pruned work is absent from the graph, not masked;
* a **fixed** keep stage after layer ``l`` scores the visual tokens by that layer's attention from the text
  rows (mean over heads and rows; 0 for tokens that gave no K/V there), keeps the top ``K_l`` (ties: lower
  original index, as the executor) and restores their original order;
* **AutoPrune** (:class:`AutoPruneBake`): layer 0 keeps the top ``N0`` (a constant) by
  ``0.3 * I0 * txt_attn + cls_attn``; layer 1 computes the complexity ``I1``, hence ``k``, hence the row of
  the schedule table (a constant in the graph) holding every later ``K_l`` and ``c_l``; each layer
  ``1..L-2`` keeps ``min(K_l, current)`` by TopK with a run-time K and, with recycling on, merges the best
  dropped tokens by DPC-KNN into ``c_l`` tokens inserted after the kept ones. With ``part="head"`` /
  ``"tail"`` the same computation is cut where ``I1`` is known, so that a TensorRT engine receives the
  keep counts as an int64 shape-tensor input (docs/build.md, "Runtime contract");
* positions are the original ones, or renumbered ``0..n-1`` after every selection (``positions=
  "renumbered"``, AutoPrune's default); merged tokens take the last visual position in original mode.

All sorts have a size of at most the visual count (far below TensorRT's TopK limit of 3840). After the
first selection the kept visual tokens form one block of mixed groups; a later layer that prunes
``img_key`` but not ``img_rest`` (or the reverse) would need a data-dependent split and is refused at
build time.

Inputs (batch 1, ``part="full"`` and ``"head"``): ``sys_embeds [1, s, d]`` (the tokens before the image),
``image_embeds [1, V, d]`` (the projected visual features, ``V = spec.visual_tokens``), ``text_embeds
[1, t, d]`` (everything after the image) and ``cls_attention [1, V]`` (float32). ``s`` and ``t`` are the
graph's dynamic dimensions.

Outputs: ``logits [1, vocab]`` of the last prompt token, then per layer ``l``: ``present.l.key`` and
``present.l.value`` ``[1, kv_heads, n_kv_l, head_dim]`` (post-RoPE, the tokens that gave K/V at that layer,
in layout order) and ``present.l.position [1, n_kv_l]`` (their positions; a decode step continues at the
largest position plus one). AutoPrune graphs also output ``autoprune.complexity`` (``I1``, float32 ``[1]``)
and ``autoprune.keep`` / ``autoprune.merged`` (the table row used, int64 ``[L-1]``). See
:attr:`BakedPrefill.input_names` / :attr:`~BakedPrefill.output_names` for the head and tail graphs.

Why one file of ~700 lines: the traced forward, its static layout and its in-graph token selection must
change together (the layout decides which rows every TopK and slice sees); split, each half would be wrong
without the other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from prune_core.autoprune import (
    INDEX_SLACK,
    ScheduleTable,
    _ascending,
    _rank,
    _topk,
    complexity_i0,
    complexity_i1,
    n0_for_budget,
    recycle_tokens,
)
from prune_core.errors import BuildError
from prune_core.ops import MODULES, Group, Module, Operation, pruned_by_layer
from prune_core.plan import AutoPruneSection
from prune_core.spec import DEFAULT_KEY_FRACTION, key_ratio

from .adapters.base import VLMAdapter
from .autoprune_policy import LAYER0_TEXT_WEIGHT
from .executor import PositionMode, apply_rope
from .sample import Sample

_VISUAL = frozenset({Group.IMG_KEY, Group.IMG_REST})
Part = Literal["full", "head", "tail"]
PARTS: tuple[str, ...] = ("full", "head", "tail")


@dataclass(frozen=True)
class Block:
    """A contiguous run of rows in the layout, named by the groups its tokens may belong to."""

    name: str
    groups: frozenset[Group]

    @property
    def visual(self) -> bool:
        return bool(self.groups & _VISUAL)


SYS = Block("sys", frozenset({Group.SYS}))
KEY = Block("img_key", frozenset({Group.IMG_KEY}))
REST = Block("img_rest", frozenset({Group.IMG_REST}))
IMG = Block("img", _VISUAL)
TXT = Block("txt", frozenset({Group.TXT}))


@dataclass(frozen=True)
class LayerLayout:
    """The static row layout entering one layer: blocks in order, and what selection follows the layer."""

    blocks: tuple[Block, ...]
    visual_count: int | None  # rows in the visual blocks (None: decided at run time)
    visual_in_original_order: bool
    kept: dict[Module, tuple[bool, ...]]  # per module, whether each block does that work
    keep_after: int | None  # visual tokens kept after this layer by a fixed stage (None: no fixed stage)
    dynamic_after: bool = False  # a run-time selection (AutoPrune) follows this layer


def _kept_blocks(
    blocks: tuple[Block, ...], pruned: frozenset[Group], layer: int, module: Module
) -> tuple[bool, ...]:
    out = []
    for block in blocks:
        hit = block.groups & pruned
        if hit and hit != block.groups:
            raise BuildError(
                f"layer {layer} prunes {module.value} for {sorted(g.value for g in hit)} but not for "
                f"{sorted(g.value for g in block.groups - hit)}, after a token-selection stage has mixed "
                "img_key and img_rest tokens; separating them again would need a data-dependent split. "
                "Prune both image groups at this layer (the group rule does), or select tokens later"
            )
        out.append(not hit)
    return tuple(out)


def plan_layout(
    num_layers: int,
    visual_tokens: int | None,
    key_tokens: int | None,
    ops: Iterable[Operation],
    keep_stages: Mapping[int, int] | None,
    dynamic_stages: Iterable[int] = (),
) -> tuple[bool, list[LayerLayout]]:
    """The static layout of every layer: whether key tokens must be split off, and each layer's blocks.

    ``keep_stages`` are fixed selections ``{layer: count}``; ``dynamic_stages`` are layers after which a
    run-time selection (AutoPrune) keeps a count known only at run time. ``visual_tokens`` and
    ``key_tokens`` are None when the prompt's visual count is only known at run time (any-resolution
    models): then every fixed stage is a stage (it keeps ``min(count, visual)``) and key tokens are split off
    wherever a layer before the first stage prunes one image group and not the other.

    Raises :class:`BuildError` for plans that cannot be baked with static shapes (ops on ``sys``/``txt``,
    layers out of range, a key/rest split needed after a selection stage).
    """
    ops = frozenset(ops)
    stages = {int(k): int(v) for k, v in (keep_stages or {}).items()}
    dynamic = frozenset(int(layer) for layer in dynamic_stages)
    for op in ops:
        if op.group not in _VISUAL:
            raise BuildError(
                f"operation {op} prunes {op.group.value}; only img_key and img_rest can be pruned"
            )
        if not 0 <= op.layer < num_layers:
            raise BuildError(f"operation {op} is outside the model's layers 0..{num_layers - 1}")
    for layer in [*stages, *dynamic]:
        if not 0 <= layer < num_layers:
            raise BuildError(
                f"keep stage after layer {layer} is outside the model's layers 0..{num_layers - 1}"
            )
    if set(stages) & dynamic:
        raise BuildError(f"layers {sorted(set(stages) & dynamic)} have both a fixed and a run-time selection")
    table = pruned_by_layer(ops, num_layers)
    # The first stage that drops tokens (one keeping at least every visual token is no stage).
    first_stage = min(
        [*(layer for layer, keep in stages.items() if visual_tokens is None or keep < visual_tokens), *dynamic],
        default=num_layers,
    )
    split = any(
        len(table[layer][m] & _VISUAL) == 1 for layer in range(min(first_stage + 1, num_layers)) for m in MODULES
    ) and (visual_tokens is None or (key_tokens is not None and 0 < key_tokens < visual_tokens))
    if split:
        blocks: tuple[Block, ...] = (SYS, KEY, REST, TXT)
        sizes: dict[Block, int | None] = (
            {KEY: None, REST: None} if visual_tokens is None or key_tokens is None
            else {KEY: key_tokens, REST: visual_tokens - key_tokens}
        )  # fmt: skip
    else:
        blocks = (SYS, IMG, TXT)
        sizes = {IMG: visual_tokens}
    in_order = not split
    layouts: list[LayerLayout] = []
    for layer in range(num_layers):
        counts = [sizes[b] for b in blocks if b.visual]
        visual = None if None in counts else sum(c for c in counts if c is not None)
        kept = {m: _kept_blocks(blocks, table[layer][m] & _VISUAL, layer, m) for m in MODULES}
        keep = stages.get(layer)
        keep = None if keep is None or (visual is not None and keep >= visual) else max(0, keep)
        is_dynamic = layer in dynamic
        layouts.append(LayerLayout(blocks, visual, in_order, kept, keep, is_dynamic))
        if keep is not None or is_dynamic:
            blocks = tuple(b for b in blocks if not b.visual)
            if is_dynamic or keep:
                blocks = (blocks[0], IMG, *blocks[1:])
            sizes = {IMG: None if is_dynamic else keep}
            in_order = True
    return split, layouts


def _ranges(lengths: list, kept: tuple[bool, ...]) -> list[tuple[object, object, bool]]:
    """Merge consecutive blocks with the same kept flag into (start, end, kept) row ranges."""
    out: list[list] = []
    start = 0
    for length, flag in zip(lengths, kept, strict=True):
        end = start + length
        if out and out[-1][2] == flag:
            out[-1][1] = end
        else:
            out.append([start, end, flag])
        start = end
    return [tuple(r) for r in out]


def _take(t: torch.Tensor, ranges: list[tuple[object, object, bool]]) -> torch.Tensor:
    """Rows of ``t`` in the kept ranges (the whole tensor when every row is kept)."""
    if len(ranges) == 1 and ranges[0][2]:
        return t
    parts = [t[a:b] for a, b, flag in ranges if flag]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class _Rows:
    """The rows of one module's kept ranges: taken and added back by static slices, or, where block sizes
    are only known at run time (``by_index``: an any-resolution image split into key and rest), by one index
    of the kept rows. Slicing at run-time offsets makes the exporter reason about every slice's clamped
    size (``min``/``max`` of symbolic sums), which grows with each layer until it stalls; gathering and
    scattering by index keeps every size a plain sum.
    """

    def __init__(self, ranges: list[tuple[object, object, bool]], device: torch.device, by_index: bool) -> None:
        self.ranges = ranges
        self.index = None
        if by_index and not (len(ranges) == 1 and ranges[0][2]):
            pieces = [torch.arange(a, b, device=device) for a, b, flag in ranges if flag]
            self.index = pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return _take(t, self.ranges) if self.index is None else t.index_select(0, self.index)

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return _add_rows(h, delta, self.ranges)
        # The rows are distinct, so a plain scatter of (row + delta) is the same sum as a scatter-add, and
        # TensorRT takes ScatterND only with reduction 'none'.
        return h.index_put((self.index,), h.index_select(0, self.index) + delta.to(h.dtype))


def _add_rows(
    h: torch.Tensor, delta: torch.Tensor, ranges: list[tuple[object, object, bool]]
) -> torch.Tensor:
    """``h`` with ``delta`` added to the rows of the kept ranges (``delta`` holds exactly those rows)."""
    if len(ranges) == 1 and ranges[0][2]:
        return h + delta
    parts, offset = [], 0
    for a, b, flag in ranges:
        if flag:
            size = b - a
            parts.append(h[a:b] + delta[offset : offset + size])
            offset = offset + size
        else:
            parts.append(h[a:b])
    return torch.cat(parts, dim=0)


def _count(value: torch.Tensor, upper: object) -> object:
    """A run-time count from a 0-d int64 tensor, as an integer the exporter can size tensors with.

    The graph says the count is never negative (a ``Max`` with 0; the counts are not, whatever the inputs),
    so every TopK's ``K = count + 1`` is provably at least 1 from the graph alone (``graph_passes.value_range``).
    """
    n = torch.maximum(value, torch.zeros_like(value)).item()
    torch._check(n >= 0)
    torch._check(n <= upper)
    return n


class Float32Region(nn.Module):
    """Runs ``fn`` so that the exported nodes keep float32 when a build lowers precision.

    torch.onnx records this class in each node's metadata; the precision pass keeps such nodes in fp32
    (:mod:`prune_core.precision`). Used for AutoPrune's complexity signal, token scores and recycling,
    whose small differences and ``1e-6`` floors change which tokens survive when computed in fp16.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: object) -> torch.Tensor:
        return self.fn(*args)


def layer0_scores(attn: torch.Tensor, cls: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """AutoPrune's layer-0 token score ``0.3 * I0 * txt_attn + cls_attn`` in ``dtype``."""
    attn = attn.to(dtype)
    i0 = complexity_i0(attn, dtype)
    return LAYER0_TEXT_WEIGHT * i0 * attn.mean(dim=(0, 1)) + cls.to(dtype)


@dataclass(frozen=True)
class AutoPruneBake:
    """An AutoPrune section bound to a model for baking: its ``N0`` and its schedule table.

    ``score_dtype`` is the precision of the complexity signal, the layer-0 score and recycling: float64 by
    default (the executor's, so graph and executor pick the same tokens and table row); float32 for
    TensorRT, which has no float64.
    """

    section: AutoPruneSection
    table: ScheduleTable
    n0: int
    score_dtype: torch.dtype = torch.float64

    @classmethod
    def for_model(
        cls,
        section: AutoPruneSection,
        num_layers: int,
        visual_tokens: int,
        score_dtype: torch.dtype = torch.float64,
    ) -> AutoPruneBake:
        if num_layers < 3:
            raise BuildError(
                f"baking AutoPrune needs at least 3 decoder layers (layer 0, the complexity layer 1, one more), "
                f"the model has {num_layers}"
            )
        table = ScheduleTable.for_section(section, num_layers, visual_tokens)
        return cls(section, table, n0_for_budget(section.tokens, visual_tokens), score_dtype)


@dataclass
class _State:  # never mutated; not frozen, which dynamo traces less well
    """Rows entering a layer: hidden states, positions (and their RoPE), block lengths, visual [CLS].

    A dataclass, not a NamedTuple: torch 2.11's dynamo fails (IndexError inside its variable builder) when
    a NamedTuple of tensors and sizes enters a frame it compiles after a graph break.
    """

    h: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    s: object
    vis: object
    t: object
    cls: torch.Tensor | None  # [CLS] attention of the visual rows in layout order (layer 0 only)
    key: object = None  # rows of the img_key block while key and rest are split (None: not split)


class BakedPrefill(nn.Module):
    """The decoder prefill of one prompt under a plan; see the module docstring for the I/O."""

    def __init__(
        self,
        adapter: VLMAdapter,
        ops: Iterable[Operation] = (),
        keep_stages: Mapping[int, int] | None = None,
        key_fraction: float | None = None,
        *,
        positions: PositionMode = "original",
        autoprune: AutoPruneBake | None = None,
        part: Part = "full",
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.spec = spec = adapter.spec
        self.ops = frozenset(ops)
        self.keep_stages = dict(keep_stages or {})
        self.autoprune = autoprune
        if part not in PARTS:
            raise BuildError(f"unknown graph part {part!r}; expected one of {', '.join(PARTS)}")
        if part != "full" and autoprune is None:
            raise BuildError(f"part={part!r} splits an AutoPrune prefill; this plan has no AutoPrune section")
        self.part = part
        if autoprune is not None:
            if self.keep_stages:
                raise BuildError("a plan holds one token section: a fixed schedule or AutoPrune, not both")
            if (
                autoprune.table.num_layers != spec.num_layers
                or autoprune.table.visual_tokens != spec.visual_tokens
            ):
                raise BuildError("the AutoPrune schedule table was built for another model shape")
            positions = autoprune.section.positions
            stages = {0: autoprune.n0}
            dynamic = range(1, spec.num_layers - 1)  # after the last layer a selection changes nothing
        else:
            stages, dynamic = self.keep_stages, ()
        self.positions: PositionMode = positions
        self.key_fraction = DEFAULT_KEY_FRACTION if key_fraction is None else key_fraction
        self.key_tokens = spec.key_tokens(self.key_fraction)
        #: Any-resolution models: the visual count is the prompt's (the image_embeds length), not a constant.
        self.dynamic_visual = spec.any_resolution
        self.split_key, self.layouts = plan_layout(
            spec.num_layers, None if self.dynamic_visual else spec.visual_tokens,
            None if self.dynamic_visual else self.key_tokens, self.ops, stages, dynamic,
        )  # fmt: skip
        if autoprune is not None:
            table = autoprune.table
            self.register_buffer(
                "schedule_keep", torch.tensor([list(e.keep) for e in table.entries]), persistent=False
            )
            self.register_buffer(
                "schedule_merged", torch.tensor([list(e.merged) for e in table.entries]), persistent=False
            )
            dtype = autoprune.score_dtype
            self.layer0_scores = Float32Region(functools.partial(layer0_scores, dtype=dtype))
            self.complexity = Float32Region(functools.partial(complexity_i1, dtype=dtype))
            self.recycle = Float32Region(recycle_tokens)
        # Registered so that .to()/export see the weights as this module's own parameters.
        self.model = adapter.model

    # -- I/O -------------------------------------------------------------------------------------------
    #: Inputs of a ``full`` or ``head`` graph: the prompt's three embedding spans and the [CLS] attention.
    PROMPT_INPUTS = ("sys_embeds", "image_embeds", "text_embeds", "cls_attention")

    @staticmethod
    def inputs_from_sample(sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs of a ``full`` or ``head`` graph for one prepared :class:`~exporter.sample.Sample`, in the
        order of :attr:`PROMPT_INPUTS`."""
        e = sample.embeds
        return (
            e[None, : sample.image_start],
            e[None, sample.image_start : sample.image_end],
            e[None, sample.image_end :],
            sample.cls_attention.float()[None],
        )

    @classmethod
    def feeds_from_sample(cls, sample: Sample) -> dict[str, np.ndarray]:
        """:meth:`inputs_from_sample` as float32 ONNX Runtime feeds by input name."""
        values = (x.float().cpu().numpy() for x in cls.inputs_from_sample(sample))
        return dict(zip(cls.PROMPT_INPUTS, values, strict=True))

    #: Inputs of the tail graph besides the schedule; produced by the head graph under the same names.
    TAIL_STATE = (
        "tail.sys_hidden",
        "tail.visual_hidden",
        "tail.text_hidden",
        "tail.visual_positions",
        "tail.visual_scores",
        "tail.text_positions",
    )
    SCHEDULE_INPUTS = ("keep_counts", "merged_counts")
    #: Inputs/outputs that stay float32 in fp16/bf16 builds: scores that rank tokens (the vision tower's
    #: [CLS] attention, the layer-1 scores the head hands to the tail; rounded to fp16, near-equal scores
    #: tie and other tokens are kept or recycled) and the complexity signal (it picks the schedule row).
    FLOAT32_IO = ("cls_attention", "autoprune.complexity", "tail.visual_scores")

    @property
    def input_names(self) -> list[str]:
        if self.part == "tail":
            return [*self.TAIL_STATE, *self.SCHEDULE_INPUTS]
        return list(self.PROMPT_INPUTS)

    def _layers_out(self) -> range:
        return {
            "full": range(self.spec.num_layers),
            "head": range(2),
            "tail": range(2, self.spec.num_layers),
        }[self.part]

    @property
    def output_names(self) -> list[str]:
        names = [] if self.part == "head" else ["logits"]
        for layer in self._layers_out():
            names += [f"present.{layer}.key", f"present.{layer}.value", f"present.{layer}.position"]
        if self.part == "head":
            names += ["autoprune.complexity", *self.TAIL_STATE]
        elif self.part == "full" and self.autoprune is not None:
            names += ["autoprune.complexity", "autoprune.keep", "autoprune.merged"]
        return names

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.reshape(x.shape[0], heads, self.spec.head_dim).transpose(0, 1)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec, ap = self.spec, self.autoprune
        outputs: list[torch.Tensor] = []
        keep_row = merged_row = complexity = None
        if self.part == "tail":
            st, scores = self._tail_state(*inputs[:6])
            keep_row, merged_row = inputs[6], inputs[7]
            st = self._select_dynamic(1, self.layouts[1], st, scores, keep_row, merged_row)
            first = 2
        else:
            st = self._initial_state(*inputs[:4])
            first = 0
        for layer in range(first, spec.num_layers):
            lay = self.layouts[layer]
            want = lay.keep_after is not None or lay.dynamic_after
            st, vis_attn = self._layer(layer, lay, st, outputs, want)
            if ap is not None and layer == 0:
                if want:
                    st = self._select_layer0(lay, st, vis_attn)
            elif lay.keep_after is not None:
                st = self._select_fixed(lay, st, vis_attn)
            elif lay.dynamic_after:
                scores = vis_attn.float().mean(dim=(0, 1))
                if layer == 1:
                    complexity = self.complexity(vis_attn)
                    if self.part == "head":
                        return self._head_outputs(outputs, complexity, st, scores)
                    keep_row, merged_row = self._table_row(complexity)
                st = self._select_dynamic(layer, lay, st, scores, keep_row, merged_row)
        logits = self.adapter.lm_head(self.adapter.final_norm(st.h[-1:])).float()
        extra: list[torch.Tensor] = []
        if self.part == "full" and ap is not None:
            extra = [complexity.float().reshape(1), keep_row, merged_row]
        return (logits, *outputs, *extra)

    def _initial_state(
        self,
        sys_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        cls_attention: torch.Tensor,
    ) -> _State:
        spec = self.spec
        dtype = next(self.model.parameters()).dtype
        sys_e, img_e, txt_e = sys_embeds[0].to(dtype), image_embeds[0].to(dtype), text_embeds[0].to(dtype)
        s, t = sys_e.shape[0], txt_e.shape[0]
        v_all = img_e.shape[0] if self.dynamic_visual else spec.visual_tokens
        device = sys_e.device
        cls = cls_attention[0].float()
        key = None
        if self.split_key:
            key = self._run_time_key_count(cls_attention[0]) if self.dynamic_visual else self.key_tokens
            order = _rank(cls, v_all)
            key_idx = _ascending(order[:key])
            rest_idx = _ascending(order[key:])
            vis_idx = torch.cat([key_idx, rest_idx])
            img_rows = img_e.index_select(0, vis_idx)
            img_pos = vis_idx + s
            cls = cls.index_select(0, vis_idx)
        else:
            img_rows = img_e
            img_pos = torch.arange(v_all, device=device) + s
        h = torch.cat([sys_e, img_rows, txt_e], dim=0)
        positions = torch.cat(
            [torch.arange(s, device=device), img_pos, torch.arange(t, device=device) + (s + v_all)]
        )
        cos, sin = self.adapter.rope(positions)
        return _State(h, positions, cos, sin, s, v_all, t, cls, key)

    def _run_time_key_count(self, cls: torch.Tensor) -> object:
        """:func:`~prune_core.spec.key_count` of a visual count known at run time, computed with tensor ops and read
        back as one opaque count: symbolic shape arithmetic on min/max/floor-division of ``V`` grows with every
        slice of every layer and stalls the exporter's reasoning."""
        p, q = key_ratio(self.key_fraction)
        v = torch.ones_like(cls, dtype=torch.int64).sum()
        n = torch.div(2 * p * v + q, 2 * q, rounding_mode="floor")
        # min(n, V), then at least 1: the max comes last, so the graph's TopK K is provably >= 1 (TensorRT lint).
        n = torch.maximum(torch.minimum(n, v), torch.ones_like(n))  # Max, not Clip: TensorRT clips floats only
        count = n.item()
        torch._check(count >= 1)
        torch._check(count <= cls.shape[0])
        return count

    def _tail_state(
        self,
        sys_h: torch.Tensor,
        vis_h: torch.Tensor,
        txt_h: torch.Tensor,
        vis_pos: torch.Tensor,
        scores: torch.Tensor,
        txt_pos: torch.Tensor,
    ) -> tuple[_State, torch.Tensor]:
        """The state entering layer 1's selection, rebuilt from the head graph's outputs.

        System positions follow from the shape (``0..s-1``); the visual and text positions come from the
        head: text starts after the image block, which spans the image's own ``V`` positions (original
        mode; an any-resolution image's count is known to the head only) or the tokens that left layer 0
        (renumbered mode).
        """
        s, vis, t = sys_h.shape[1], vis_h.shape[1], txt_h.shape[1]
        dev = sys_h.device
        pos = torch.cat([torch.arange(s, device=dev), vis_pos[0], txt_pos[0]])
        h = torch.cat([sys_h[0], vis_h[0], txt_h[0]], dim=0)
        cos, sin = self.adapter.rope(pos)
        return _State(h, pos, cos, sin, s, vis, t, None), scores[0]

    def _head_outputs(
        self, outputs: list[torch.Tensor], complexity: torch.Tensor, st: _State, scores: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        s, vis = st.s, st.vis
        return (
            *outputs,
            complexity.float().reshape(1),
            st.h[:s].unsqueeze(0),
            st.h[s : s + vis].unsqueeze(0),
            st.h[s + vis :].unsqueeze(0),
            st.positions[s : s + vis].unsqueeze(0),
            scores.unsqueeze(0),
            st.positions[s + vis :].unsqueeze(0),
        )

    def _table_row(self, complexity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule row for ``I1``: ``k = max(k0 - gamma*I1, 0)``, nearest grid point (halves up)."""
        ap = self.autoprune
        assert ap is not None
        sec, table = ap.section, ap.table
        k = torch.clamp(sec.k0 - sec.gamma * complexity, min=0.0, max=table.k0)
        index = torch.floor(k / table.k_step + 0.5 + INDEX_SLACK).long().clamp(max=len(table.entries) - 1)
        return self.schedule_keep[index], self.schedule_merged[index]

    # -- one layer -------------------------------------------------------------------------------------
    def _layer(
        self, layer: int, lay: LayerLayout, st: _State, outputs: list[torch.Tensor], want_scores: bool
    ) -> tuple[_State, torch.Tensor | None]:
        spec = self.spec
        parts = self.adapter.layers[layer]
        h, positions, cos, sin = st.h, st.positions, st.cos, st.sin
        static = {IMG: st.vis, KEY: st.key, REST: None if st.key is None else st.vis - st.key}
        lengths = [st.s if b is SYS else st.t if b is TXT else static[b] for b in lay.blocks]
        # Run-time block sizes (any-resolution images split into key and rest) go by row index (see _Rows).
        by_index = st.key is not None and self.dynamic_visual
        rows = {m: _Rows(_ranges(lengths, lay.kept[m]), h.device, by_index) for m in MODULES}
        r_kv, r_q, r_mlp = rows[Module.KV], rows[Module.Q], rows[Module.MLP]

        # K/V of the tokens that give them (post-RoPE, as cached). The norm is per row: normalise only
        # the rows some projection reads.
        xk = parts.attn_norm(r_kv.take(h))
        pos_kv = r_kv.take(positions)
        k = apply_rope(self._heads(parts.k_proj(xk), spec.num_kv_heads), r_kv.take(cos), r_kv.take(sin))
        v = self._heads(parts.v_proj(xk), spec.num_kv_heads)
        outputs += [k.unsqueeze(0), v.unsqueeze(0), pos_kv.unsqueeze(0)]

        xq = xk if lay.kept[Module.Q] == lay.kept[Module.KV] else parts.attn_norm(r_q.take(h))
        pos_q = r_q.take(positions)
        q = apply_rope(self._heads(parts.q_proj(xq), spec.num_heads), r_q.take(cos), r_q.take(sin))
        n_q = q.shape[1]
        rep = spec.num_heads // spec.num_kv_heads
        # [kv_heads, rep, n_q, hd] x [kv_heads, 1, hd, n_kv]: grouped heads without copying K/V.
        q4 = q.reshape(spec.num_kv_heads, rep, n_q, spec.head_dim)
        scores = torch.matmul(q4, k.unsqueeze(1).transpose(2, 3)).float() * parts.scaling
        allowed = pos_q.unsqueeze(1) >= pos_kv.unsqueeze(0)  # causality by position
        # An additive mask ([n_q, n_kv]: 0 or -inf), broadcast over the heads: the same scores as a masked
        # fill (x + 0 = x), but ONNX Runtime's CPU Add broadcasts at about twice the speed of a Where over
        # every head's [n_q, n_kv] scores, which took a quarter of a 3,000-token dense prefill.
        scores = scores + torch.where(allowed, 0.0, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        attn = torch.matmul(probs.to(v.dtype), v.unsqueeze(1))  # [kv_heads, rep, n_q, hd]
        attn = attn.reshape(spec.num_heads, n_q, spec.head_dim).transpose(0, 1).reshape(n_q, spec.q_dim)
        h = r_q.add(h, parts.o_proj(attn))

        y = parts.mlp_norm(r_mlp.take(h))
        y = parts.down_proj(parts.act(parts.gate_proj(y)) * parts.up_proj(y))
        h = r_mlp.add(h, y)

        vis_attn = None
        if want_scores:
            vis_attn = self._visual_text_attention(lay, lengths, probs, st.t)
        return _State(h, st.positions, st.cos, st.sin, st.s, st.vis, st.t, st.cls, st.key), vis_attn

    def _visual_text_attention(
        self, lay: LayerLayout, lengths: list, probs: torch.Tensor, t: object
    ) -> torch.Tensor:
        """Text rows' attention to every visual row in layout order ``[heads, t, vis]`` (0: gave no K/V).

        Text rows are the last ``t`` query rows (text is never pruned, and txt is the last block).
        """
        text = probs[:, :, -t:, :].reshape(self.spec.num_heads, t, probs.shape[-1])
        pieces, offset = [], 0
        for block, length, kept_kv in zip(lay.blocks, lengths, lay.kept[Module.KV], strict=True):
            if block.visual:
                if kept_kv:
                    pieces.append(text[:, :, offset : offset + length])
                else:
                    pieces.append(text.new_zeros(text.shape[0], text.shape[1], length))
            if kept_kv:
                offset = offset + length
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    # -- token selection -------------------------------------------------------------------------------
    def _in_original_order(self, lay: LayerLayout, st: _State) -> torch.Tensor | None:
        """Permutation putting the visual rows in original order (None when they already are)."""
        if lay.visual_in_original_order:
            return None
        vis_pos = st.positions[st.s : st.s + st.vis]
        return _topk(vis_pos, st.vis, largest=False)[1]

    def _keep(self, lay: LayerLayout, st: _State, scores: torch.Tensor, k: object) -> torch.Tensor:
        """Visual rows (indices within the visual block) of the top ``k`` scores, in original order."""
        perm = self._in_original_order(lay, st)
        if perm is None:
            return _ascending(_rank(scores, k))
        return perm[_ascending(_rank(scores[perm], k))]

    def _rebuild(self, st: _State, rows: torch.Tensor, merged: torch.Tensor | None = None) -> _State:
        """The state with the visual block replaced by ``rows`` of it (then ``merged`` tokens)."""
        s, vis_end = st.s, st.s + st.vis
        kept = rows + s

        def pick(x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
            pieces = [x[:s], x.index_select(0, kept)]
            if extra is not None:
                pieces.append(extra)
            pieces.append(x[vis_end:])
            return torch.cat(pieces, dim=0)

        vis = rows.shape[0] if merged is None else rows.shape[0] + merged.shape[0]
        if self.positions == "renumbered":
            positions = torch.arange(s + vis + st.t, device=st.h.device)
            cos, sin = self.adapter.rope(positions)
            h = pick(st.h, None if merged is None else merged.to(st.h.dtype))
            return _State(h, positions, cos, sin, s, vis, st.t, None)
        if merged is None:
            return _State(pick(st.h), pick(st.positions), pick(st.cos), pick(st.sin), s, vis, st.t, None)
        # Merged tokens take the last visual position, so causality still reads "image, then text".
        last = st.positions[s:vis_end].max()
        m_pos = last.expand(merged.shape[0])
        m_cos, m_sin = self.adapter.rope(m_pos)
        return _State(
            pick(st.h, merged.to(st.h.dtype)),
            pick(st.positions, m_pos),
            pick(st.cos, m_cos),
            pick(st.sin, m_sin),
            s,
            vis,
            st.t,
            None,
        )

    def _select_fixed(self, lay: LayerLayout, st: _State, vis_attn: torch.Tensor) -> _State:
        """A fixed stage: keep the top ``lay.keep_after`` visual tokens by text attention."""
        scores = vis_attn.float().mean(dim=(0, 1))
        keep = lay.keep_after if not self.dynamic_visual else torch.sym_min(lay.keep_after, st.vis)
        return self._rebuild(st, self._keep(lay, st, scores, keep))

    def _select_layer0(self, lay: LayerLayout, st: _State, vis_attn: torch.Tensor) -> _State:
        """AutoPrune after layer 0: top ``N0`` by ``0.3 * I0 * txt_attn + cls_attn`` (no recycling)."""
        ap = self.autoprune
        assert ap is not None and st.cls is not None
        scores = self.layer0_scores(vis_attn, st.cls)
        # Only called when N0 < V (plan_layout puts no stage after layer 0 otherwise), or when the visual
        # count is the prompt's: then N0 = min(2.5 T, V) as the executor keeps.
        n0 = ap.n0 if not self.dynamic_visual else torch.sym_min(ap.n0, st.vis)
        return self._rebuild(st, self._keep(lay, st, scores, n0))

    def _select_dynamic(
        self,
        layer: int,
        lay: LayerLayout,
        st: _State,
        scores: torch.Tensor,
        keep_row: torch.Tensor,
        merged_row: torch.Tensor,
    ) -> _State:
        """AutoPrune after layer ``l >= 1``: keep ``min(K_l, current)``, recycle into ``c_l`` tokens."""
        ap = self.autoprune
        assert ap is not None
        vis = st.vis
        # min(K_l, current) by Where, not Clip: TensorRT's ONNX parser takes Clip on floats only (onnx-tensorrt
        # 10.x operator table), and this count is int64.
        kc = torch.where(keep_row[layer - 1] > vis, vis, keep_row[layer - 1])
        k = _count(kc, vis)
        perm = self._in_original_order(lay, st)
        ranked = scores if perm is None else scores[perm]
        order = _rank(ranked, vis)  # every visual row, best first
        kept = _ascending(order[:k])
        if perm is not None:
            kept = perm[kept]
        if not ap.section.recycle:
            return self._rebuild(st, kept)
        # floor(0.3*D) + 1 candidates (capped at D), of which c_l = min(merged_l, candidates) clusters.
        dropped = vis - kc
        n_cand = torch.minimum(torch.div(3 * dropped, 10, rounding_mode="floor") + 1, dropped)
        cand = _count(n_cand, vis - k)
        c = _count(torch.minimum(merged_row[layer - 1], n_cand), cand)
        chosen = _ascending(order[k : k + cand])  # ascending original order
        if perm is not None:
            chosen = perm[chosen]
        x = st.h[st.s : st.s + vis].index_select(0, chosen).to(ap.score_dtype)
        merged = self.recycle(x, c)
        return self._rebuild(st, kept, merged)
