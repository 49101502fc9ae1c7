"""A decoder prefill with a static plan baked in: a traceable PyTorch module for ONNX export.

:class:`BakedPrefill` computes exactly what :class:`~exporter.executor.PlanExecutor` computes for one
prompt under a static GSOP plan (a set of pruned operations) and an optional fixed keep schedule
(``{layer: visual tokens kept after it}``), but with every row set decided at build time, so the exported
graph has no data-dependent shapes (no NonZero, no boolean masking, no host round trips):

* the prompt is laid out as ``[sys | img_key | img_rest | txt]`` (../shared/METHODS.md, "What is static
  for export"). Key tokens are the top ``K = spec.key_tokens()`` visual tokens by the vision tower's [CLS]
  attention, picked in-graph by a sort with a constant K; within each block tokens keep their original
  order. RoPE and the causal mask use every token's *original* position, so the layout changes no result.
  Where no layer distinguishes ``img_key`` from ``img_rest`` the image block simply stays in its
  original order and no sort is emitted;
* per layer and module (``q``, ``kv``, ``mlp``) the kept rows are a union of whole blocks, i.e. at most a
  few static slices: pruned work is absent from the graph, not masked;
* a fixed keep stage after layer ``l`` scores the visual tokens by that layer's attention from the text
  rows (mean over heads and rows; 0 for tokens that gave no K/V there), keeps the top ``K_l`` (ties: lower
  original index, as the executor) and restores their original order. Both sorts have a constant size
  (the visual count at that layer, far below TensorRT's TopK limit of 3840). After a stage the kept visual
  tokens form one block of mixed groups; a later layer that prunes ``img_key`` but not ``img_rest`` (or
  the reverse) would need a data-dependent split and is refused at build time.

Inputs (batch 1): ``sys_embeds [1, s, d]`` (the tokens before the image), ``image_embeds [1, V, d]``
(the projected visual features, ``V = spec.visual_tokens``), ``text_embeds [1, t, d]`` (everything after
the image) and ``cls_attention [1, V]`` (float32). ``s`` and ``t`` are the graph's dynamic dimensions;
every pruned length is a constant or derived from these shapes (TensorRT shape tensors).

Outputs: ``logits [1, vocab]`` of the last prompt token, then per layer ``l``: ``present.l.key`` and
``present.l.value`` ``[1, kv_heads, n_kv_l, head_dim]`` (post-RoPE, the tokens that gave K/V at that layer,
in layout order) and ``present.l.position [1, n_kv_l]`` (their original positions; a decode step continues
at position ``s + V + t``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prune_export.errors import BuildError
from prune_export.ops import MODULES, Group, Module, Operation, pruned_by_layer

from .adapters.base import VLMAdapter
from .executor import apply_rope
from .sample import Sample

_VISUAL = frozenset({Group.IMG_KEY, Group.IMG_REST})


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
    """The static row layout entering one layer: blocks in order with their sizes (None: dynamic)."""

    blocks: tuple[Block, ...]
    visual_count: int  # rows in the visual blocks (static)
    visual_in_original_order: bool
    kept: dict[Module, tuple[bool, ...]]  # per module, whether each block does that work
    keep_after: int | None  # visual tokens kept after this layer (None: no selection)


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
    visual_tokens: int,
    key_tokens: int,
    ops: Iterable[Operation],
    keep_stages: Mapping[int, int] | None,
) -> tuple[bool, list[LayerLayout]]:
    """The static layout of every layer: whether key tokens must be split off, and each layer's blocks.

    Raises :class:`BuildError` for plans that cannot be baked with static shapes (ops on ``sys``/``txt``,
    layers out of range, a key/rest split needed after a selection stage).
    """
    ops = frozenset(ops)
    stages = {int(k): int(v) for k, v in (keep_stages or {}).items()}
    for op in ops:
        if op.group not in _VISUAL:
            raise BuildError(
                f"operation {op} prunes {op.group.value}; only img_key and img_rest can be pruned"
            )
        if not 0 <= op.layer < num_layers:
            raise BuildError(f"operation {op} is outside the model's layers 0..{num_layers - 1}")
    for layer in stages:
        if not 0 <= layer < num_layers:
            raise BuildError(
                f"keep stage after layer {layer} is outside the model's layers 0..{num_layers - 1}"
            )
    table = pruned_by_layer(ops, num_layers)
    # The first stage that drops tokens (one keeping at least every visual token is no stage).
    first_stage = min((layer for layer, keep in stages.items() if keep < visual_tokens), default=num_layers)
    split = (
        any(
            len(table[layer][m] & _VISUAL) == 1
            for layer in range(min(first_stage + 1, num_layers))
            for m in MODULES
        )
        and 0 < key_tokens < visual_tokens
    )
    if split:
        blocks: tuple[Block, ...] = (SYS, KEY, REST, TXT)
        sizes = {KEY: key_tokens, REST: visual_tokens - key_tokens}
    else:
        blocks = (SYS, IMG, TXT)
        sizes = {IMG: visual_tokens}
    in_order = not split
    layouts: list[LayerLayout] = []
    for layer in range(num_layers):
        visual = sum(sizes[b] for b in blocks if b.visual)
        kept = {m: _kept_blocks(blocks, table[layer][m] & _VISUAL, layer, m) for m in MODULES}
        keep = stages.get(layer)
        keep = None if keep is None or keep >= visual else max(0, keep)
        layouts.append(LayerLayout(blocks, visual, in_order, kept, keep))
        if keep is not None:
            blocks = tuple(b for b in blocks if not b.visual)
            if keep:
                blocks = (blocks[0], IMG, *blocks[1:])
            sizes = {IMG: keep}
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


def _rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, best first; ties go to the lower index.

    Eager: a stable sort (as the executor). Under export: ``TopK`` (ONNX TopK breaks ties by the lower
    index, and torch.onnx has no translation of a stable sort).
    """
    if torch.compiler.is_exporting():
        return torch.topk(scores, k, largest=True, sorted=True).indices
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _ascending(indices: torch.Tensor) -> torch.Tensor:
    """Distinct integer indices in ascending order (a TopK of the smallest, whole length)."""
    return torch.topk(indices, indices.shape[0], largest=False, sorted=True).values


class BakedPrefill(nn.Module):
    """The decoder prefill of one prompt under a static plan; see the module docstring for the I/O."""

    def __init__(
        self,
        adapter: VLMAdapter,
        ops: Iterable[Operation] = (),
        keep_stages: Mapping[int, int] | None = None,
        key_fraction: float | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.spec = spec = adapter.spec
        self.ops = frozenset(ops)
        self.keep_stages = dict(keep_stages or {})
        self.key_tokens = spec.key_tokens() if key_fraction is None else spec.key_tokens(key_fraction)
        self.split_key, self.layouts = plan_layout(
            spec.num_layers, spec.visual_tokens, self.key_tokens, self.ops, self.keep_stages
        )
        # Registered so that .to()/export see the weights as this module's own parameters.
        self.model = adapter.model

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def inputs_from_sample(sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph inputs of one prepared :class:`~exporter.sample.Sample`."""
        e = sample.embeds
        return (
            e[None, : sample.image_start],
            e[None, sample.image_start : sample.image_end],
            e[None, sample.image_end :],
            sample.cls_attention.float()[None],
        )

    @property
    def input_names(self) -> list[str]:
        return ["sys_embeds", "image_embeds", "text_embeds", "cls_attention"]

    @property
    def output_names(self) -> list[str]:
        names = ["logits"]
        for layer in range(self.spec.num_layers):
            names += [f"present.{layer}.key", f"present.{layer}.value", f"present.{layer}.position"]
        return names

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.reshape(x.shape[0], heads, self.spec.head_dim).transpose(0, 1)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        sys_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        cls_attention: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        spec, adapter = self.spec, self.adapter
        dtype = next(self.model.parameters()).dtype
        sys_e, img_e, txt_e = sys_embeds[0].to(dtype), image_embeds[0].to(dtype), text_embeds[0].to(dtype)
        s, v_all, t = sys_e.shape[0], spec.visual_tokens, txt_e.shape[0]
        device = sys_e.device
        sys_pos = torch.arange(s, device=device)
        txt_pos = torch.arange(t, device=device) + (s + v_all)
        if self.split_key:
            order = _rank(cls_attention[0].float(), v_all)
            key_idx = _ascending(order[: self.key_tokens])
            rest_idx = _ascending(order[self.key_tokens :])
            vis_idx = torch.cat([key_idx, rest_idx])
            img_rows = img_e.index_select(0, vis_idx)
            img_pos = vis_idx + s
        else:
            img_rows = img_e
            img_pos = torch.arange(v_all, device=device) + s
        h = torch.cat([sys_e, img_rows, txt_e], dim=0)
        positions = torch.cat([sys_pos, img_pos, txt_pos])
        cos, sin = adapter.rope(positions)

        gqa_rep = spec.num_heads // spec.num_kv_heads
        outputs: list[torch.Tensor] = []
        for parts, lay in zip(adapter.layers, self.layouts, strict=True):
            static = {IMG: lay.visual_count, KEY: self.key_tokens, REST: v_all - self.key_tokens}
            lengths = [s if b is SYS else t if b is TXT else static[b] for b in lay.blocks]
            ranges = {m: _ranges(lengths, lay.kept[m]) for m in MODULES}

            x = parts.attn_norm(h)
            # K/V of the tokens that give them (post-RoPE, as cached).
            r_kv = ranges[Module.KV]
            xk = _take(x, r_kv)
            pos_kv = _take(positions, r_kv)
            k = apply_rope(
                self._heads(parts.k_proj(xk), spec.num_kv_heads), _take(cos, r_kv), _take(sin, r_kv)
            )
            v = self._heads(parts.v_proj(xk), spec.num_kv_heads)
            outputs += [k.unsqueeze(0), v.unsqueeze(0), pos_kv.unsqueeze(0)]

            r_q = ranges[Module.Q]
            xq = _take(x, r_q)
            pos_q = _take(positions, r_q)
            q = apply_rope(self._heads(parts.q_proj(xq), spec.num_heads), _take(cos, r_q), _take(sin, r_q))
            n_q = q.shape[1]
            # [kv_heads, rep, n_q, hd] x [kv_heads, 1, hd, n_kv]: grouped heads without copying K/V.
            q4 = q.reshape(spec.num_kv_heads, gqa_rep, n_q, spec.head_dim)
            scores = torch.matmul(q4, k.unsqueeze(1).transpose(2, 3)).float() * parts.scaling
            allowed = pos_q.unsqueeze(1) >= pos_kv.unsqueeze(0)  # causality by original position
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            attn = torch.matmul(probs.to(v.dtype), v.unsqueeze(1))  # [kv_heads, rep, n_q, hd]
            attn = attn.reshape(spec.num_heads, n_q, spec.head_dim).transpose(0, 1).reshape(n_q, spec.q_dim)
            h = _add_rows(h, parts.o_proj(attn), r_q)

            r_mlp = ranges[Module.MLP]
            y = _take(h, r_mlp)
            y = parts.mlp_norm(y)
            y = parts.down_proj(parts.act(parts.gate_proj(y)) * parts.up_proj(y))
            h = _add_rows(h, y, r_mlp)

            if lay.keep_after is not None:
                h, positions, cos, sin = self._select(lay, lengths, probs, t, h, positions, cos, sin)

        logits = adapter.lm_head(adapter.final_norm(h[-1:])).float()
        return (logits, *outputs)

    def _select(
        self,
        lay: LayerLayout,
        lengths: list,
        probs: torch.Tensor,
        t: object,
        h: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the top ``lay.keep_after`` visual tokens by text attention, in original order."""
        # Text rows are the last t query rows (text is never pruned, and txt is the last block).
        text_probs = probs[:, :, -t:, :]  # [kv_heads, rep, t, n_kv]
        col_score = text_probs.mean(dim=(0, 1, 2))  # [n_kv]
        # Scores of every visual row in layout order: its K/V column's score, 0 where it gave no K/V.
        pieces, kv_offset = [], 0
        for block, length, kept_kv in zip(lay.blocks, lengths, lay.kept[Module.KV], strict=True):
            if block.visual:
                if kept_kv:
                    pieces.append(col_score[kv_offset : kv_offset + length])
                else:
                    pieces.append(torch.zeros(length, dtype=col_score.dtype, device=col_score.device))
            if kept_kv:
                kv_offset = kv_offset + length
        scores = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        s = lengths[0]
        vis_end = s + lay.visual_count
        vis_pos = positions[s:vis_end]
        if lay.visual_in_original_order:
            rows = _ascending(_rank(scores, lay.keep_after))
        else:
            # Ties must go to the lower original index, as in the executor: rank in original order.
            perm = torch.topk(vis_pos, lay.visual_count, largest=False, sorted=True).indices
            rows = perm[_ascending(_rank(scores[perm], lay.keep_after))]
        rows = rows + s

        def pick(x: torch.Tensor) -> torch.Tensor:
            kept = x.index_select(0, rows)
            return torch.cat([x[:s], kept, x[vis_end:]], dim=0)

        return pick(h), pick(positions), pick(cos), pick(sin)
