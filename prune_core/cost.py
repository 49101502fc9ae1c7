"""The FLOPs cost model (docs/methods.md, section 2): prefill matmul FLOPs of the decoder layers.

Per layer, with ``n_q`` query tokens, ``n_kv`` key/value tokens and ``n_mlp`` MLP tokens::

    attn = 2*n_q*d*q_dim (Q) + 2*n_q*q_dim*d (O) + 2*2*n_kv*d*kv_dim (K, V) + 2*2*n_q*n_kv*q_dim (QK^T, AV)
    mlp  = 3 * 2*n_mlp*d*m

which is the paper's ``2*d*d*(2*n_kv + 2*n_q) + 4*n_q*n_kv*d`` for multi-head attention and counts the
real K/V width under GQA. The vision tower, the LM head and decode steps are not counted in
:func:`prefill_flops`; :func:`lm_head_flops` is the LM head's one logits row a prefill graph adds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ops import GROUPS, Module, Operation, pruned_by_layer
from .spec import GroupSizes, ModelSpec


@dataclass(frozen=True)
class LayerCounts:
    """Tokens doing each kind of work at one layer."""

    n_q: int
    n_kv: int
    n_mlp: int


def attention_flops(spec: ModelSpec, n_q: int, n_kv: int) -> int:
    """Q/K/V/O projections plus the two attention matmuls."""
    d = spec.hidden_size
    proj = 2 * n_q * d * spec.q_dim * 2 + 2 * 2 * n_kv * d * spec.kv_dim
    return proj + 2 * 2 * n_q * n_kv * spec.q_dim


def mlp_flops(spec: ModelSpec, n_mlp: int) -> int:
    """Gate, up and down projections of a gated MLP."""
    return 3 * 2 * n_mlp * spec.hidden_size * spec.intermediate_size


def layer_flops(spec: ModelSpec, counts: LayerCounts) -> int:
    return attention_flops(spec, counts.n_q, counts.n_kv) + mlp_flops(spec, counts.n_mlp)


def layer_counts(
    spec: ModelSpec, sizes: Sequence[GroupSizes] | GroupSizes, ops: Iterable[Operation] = ()
) -> list[LayerCounts]:
    """Per-layer token counts given the group sizes entering each layer and the pruned operations.

    ``sizes`` is one :class:`GroupSizes` (the same at every layer: static GSOP plans) or one per layer
    (token pruning shrinks the image groups with depth).
    """
    per_layer = [sizes] * spec.num_layers if isinstance(sizes, GroupSizes) else list(sizes)
    if len(per_layer) != spec.num_layers:
        raise ValueError(f"need group sizes for {spec.num_layers} layers, got {len(per_layer)}")
    table = pruned_by_layer(ops, spec.num_layers)
    out = []
    for row, gs in zip(table, per_layer, strict=True):
        kept = {m: sum(gs[g] for g in GROUPS if g not in row[m]) for m in row}
        out.append(LayerCounts(n_q=kept[Module.Q], n_kv=kept[Module.KV], n_mlp=kept[Module.MLP]))
    return out


def prefill_flops(
    spec: ModelSpec, sizes: Sequence[GroupSizes] | GroupSizes, ops: Iterable[Operation] = ()
) -> int:
    """Decoder prefill FLOPs of one prompt under a set of pruned operations."""
    return sum(layer_flops(spec, c) for c in layer_counts(spec, sizes, ops))


def lm_head_flops(spec: ModelSpec) -> int:
    """FLOPs of the LM head's one logits row: what a prefill graph computes beyond :func:`prefill_flops`
    (the graph returns the logits of the last prompt token; the cost model counts decoder layers only)."""
    return 2 * spec.hidden_size * spec.vocab_size
