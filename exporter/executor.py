"""The PyTorch executor of a plan: the single source of truth for what a pruned model computes.

It runs the decoder of one prompt under a set of pruned GSOP operations and an optional token-selection
policy, computing only what the plan keeps (docs/methods.md, docs/executor.md):

* a token whose ``q`` op is pruned at a layer forms no query there and keeps its hidden state (the
  residual carries it); a token whose ``mlp`` op is pruned skips the MLP;
* a token whose ``kv`` op is pruned is not projected to K/V, is invisible to every query at that layer
  and is absent from that layer's KV cache, so generated tokens cannot see it there either;
* RoPE and causality use each token's position (the original one, unless a token policy renumbers);
* token selection (a fixed keep schedule, AutoPrune) drops visual tokens after a layer, scored by that
  layer's attention from the text rows; dropped tokens never return;
* decode steps (one new token) are never pruned.

Every matmul goes through :class:`FlopCounter`, so tests can check that the work really done equals
the cost model. The executor is eager PyTorch; the exported graphs (exporter/) are checked against it.

Why one file of ~700 lines: it is the one executor every other part is checked against; the layer
forward, the token policies' hooks and the FLOPs count are read together when its semantics change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from prune_core.cost import LayerCounts
from prune_core.ops import Group, Module, Operation, pruned_by_layer
from prune_core.spec import GroupSizes

from .adapters.base import LayerParts, VLMAdapter
from .sample import GROUP_INDEX, Sample, group_sizes_of

PositionMode = Literal["original", "renumbered"]
_TXT = GROUP_INDEX[Group.TXT]
_VISUAL = (GROUP_INDEX[Group.IMG_KEY], GROUP_INDEX[Group.IMG_REST])


class FlopCounter:
    """Counts the matmul FLOPs the executor really performs, by layer."""

    def __init__(self) -> None:
        self.by_layer: dict[int, int] = {}

    def add(self, layer: int, flops: int) -> None:
        self.by_layer[layer] = self.by_layer.get(layer, 0) + int(flops)

    @property
    def total(self) -> int:
        return sum(self.by_layer.values())


# -- token selection ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectionContext:
    """What a token policy sees after a layer: the visual tokens still alive and the text rows' attention."""

    layer: int
    num_layers: int
    visual_hidden: torch.Tensor  # [v, hidden], the layer's output for alive visual tokens, in order
    visual_original_index: torch.Tensor  # [v] index of each visual token in the prompt (merged: -1)
    text_attention: torch.Tensor  # [heads, text_rows, v] post-softmax attention of text queries to them
    cls_attention: torch.Tensor  # [v] vision [CLS] attention (0 for merged tokens)


@dataclass(frozen=True)
class Selection:
    """Which alive visual tokens survive (indices into the context's rows, ascending) and merged tokens to
    insert after them (``[c, hidden]``)."""

    keep: torch.Tensor
    merged: torch.Tensor | None = None


class TokenPolicy(Protocol):
    """Decides after which layers visual tokens are dropped and which survive.

    A policy that keeps per-prompt state (AutoPrune: ``N0`` at layer 0, the schedule at layer 1) also has a
    ``begin()`` method returning a fresh :class:`TokenPolicy` that serves exactly one prefill; the executor
    calls it at the start of every prefill (:func:`begin_prefill`), so one policy object can be reused across
    prompts. Stateless policies (:class:`FixedKeepPolicy`) need no ``begin``.
    """

    positions: PositionMode

    def wants_selection(self, layer: int) -> bool:
        """Whether :meth:`select` runs after ``layer`` (the executor then computes attention eagerly)."""
        ...

    def select(self, ctx: SelectionContext) -> Selection | None:
        """The selection after ``ctx.layer``, or None to keep every token."""
        ...


def begin_prefill(policy: TokenPolicy | None) -> TokenPolicy | None:
    """The policy object that serves one prefill: ``policy.begin()`` where the policy has one, else itself."""
    begin = getattr(policy, "begin", None)
    return policy if begin is None else begin()


def text_attention_scores(text_attention: torch.Tensor) -> torch.Tensor:
    """Score of each visual token: attention from text rows, mean over heads and rows."""
    return text_attention.float().mean(dim=(0, 1))


def topk_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending (kept tokens keep their order; ties: lower index)."""
    k = max(0, min(int(k), int(scores.shape[0])))
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return torch.sort(order).values


@dataclass
class FixedKeepPolicy:
    """A fixed schedule: after layer ``l``, at most ``keep_after[l]`` visual tokens remain (FastV, PDrop)."""

    keep_after: dict[int, int]
    positions: PositionMode = "original"

    @classmethod
    def from_stages(cls, stages: Iterable[tuple[int, int]], positions: PositionMode = "original") -> FixedKeepPolicy:
        return cls({int(layer): int(count) for layer, count in stages}, positions)

    def wants_selection(self, layer: int) -> bool:
        return layer in self.keep_after

    def select(self, ctx: SelectionContext) -> Selection | None:
        count = self.keep_after.get(ctx.layer)
        if count is None or count >= ctx.visual_hidden.shape[0]:
            return None
        return Selection(keep=topk_in_order(text_attention_scores(ctx.text_attention), count))


# -- state ----------------------------------------------------------------------------------------------
@dataclass
class PrefillState:
    """The tokens alive at a layer boundary, in sequence order. Tensors are never modified in place, so a
    state can be kept and resumed from (search reuses unchanged prefixes this way)."""

    hidden: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [n] int64
    groups: torch.Tensor  # [n] int64
    original_index: torch.Tensor  # [n] int64 (merged tokens: -1)
    cls_attention: torch.Tensor  # [n] float32 (0 off the image)

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    def take(self, rows: torch.Tensor) -> PrefillState:
        return PrefillState(
            self.hidden[rows], self.positions[rows], self.groups[rows], self.original_index[rows], self.cls_attention[rows]
        )

    def visual_count(self) -> int:
        return int(_is_visual(self.groups).sum())

    def group_sizes(self) -> GroupSizes:
        return group_sizes_of(self.groups)

    @classmethod
    def concat(cls, parts: Sequence[PrefillState]) -> PrefillState:
        """The rows of ``parts`` one after the other."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass
class LayerCache:
    """One layer's KV cache: post-RoPE keys and values of the tokens that gave K/V, and the position the
    next decoded token takes at this layer."""

    keys: torch.Tensor  # [kv_heads, n, head_dim]
    values: torch.Tensor  # [kv_heads, n, head_dim]
    next_position: int


@dataclass
class LayerTrace:
    """What one layer executed: token counts by work kind and the visual tokens that entered it."""

    counts: LayerCounts
    visual_tokens_in: int
    tokens_in: int
    group_sizes_in: GroupSizes | None = None  # tokens per group that entered the layer (merged: img_rest)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [vocab], the last prompt token's logits (float32)
    cache: list[LayerCache] | None
    trace: list[LayerTrace]
    flops: int
    state: PrefillState | None = None
    policy: TokenPolicy | None = None  # the policy object that served this prefill (its per-prompt decisions)
    row_logits: torch.Tensor | None = None  # [logits_rows, vocab]: logits of the last prompt rows

    @property
    def layer_counts(self) -> list[LayerCounts]:
        return [t.counts for t in self.trace]

    @property
    def group_sizes_per_layer(self) -> list[GroupSizes | None]:
        """Tokens per group entering each executed layer: with the ops, what the cost model needs."""
        return [t.group_sizes_in for t in self.trace]

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return [t.visual_tokens_in for t in self.trace]


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prefill: PrefillResult
    step_logits: list[torch.Tensor] = field(default_factory=list)


def _is_visual(groups: torch.Tensor) -> torch.Tensor:
    return (groups == _VISUAL[0]) | (groups == _VISUAL[1])


def _pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``t``'s rows ``rows`` (None: all of ``t``, no copy)."""
    return t if rows is None else t[rows]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, n, head_dim]; cos/sin: [n, head_dim]
    return x * cos.unsqueeze(0) + rotate_half(x) * sin.unsqueeze(0)


class PlanExecutor:
    """Runs one model under a plan. Stateless between calls; thread-compatible like the model itself."""

    def __init__(self, adapter: VLMAdapter) -> None:
        self.adapter = adapter
        self.spec = adapter.spec
        self._num_layers = len(adapter.layers)

    # -- public API ------------------------------------------------------------------------------------
    def initial_state(self, sample: Sample) -> PrefillState:
        n = sample.num_tokens
        cls = torch.zeros(n, dtype=torch.float32, device=sample.embeds.device)
        cls[sample.image_start : sample.image_end] = sample.cls_attention.to(cls.device)
        return PrefillState(
            hidden=sample.embeds.to(self.adapter.dtype),
            positions=torch.arange(n, device=sample.embeds.device),
            groups=sample.groups,
            original_index=torch.arange(n, device=sample.embeds.device),
            cls_attention=cls,
        )

    @torch.no_grad()
    def prefill(
        self,
        sample: Sample,
        ops: Iterable[Operation] = (),
        policy: TokenPolicy | None = None,
        *,
        with_cache: bool = True,
        counter: FlopCounter | None = None,
        start: tuple[int, PrefillState] | None = None,
        keep_states: Sequence[int] = (),
        states_out: dict[int, PrefillState] | None = None,
        start_cache: Sequence[LayerCache] | None = None,
        logits_rows: int = 1,
    ) -> PrefillResult:
        """Prefill one prompt under pruned ``ops`` and an optional token ``policy``.

        ``start=(layer, state)`` resumes from a stored state at the entry of ``layer`` (the layers before it
        must be unchanged by ``ops``; the caller guarantees it). States at the entry of the layers in
        ``keep_states`` are written to ``states_out``.
        """
        table = pruned_by_layer(ops, self._num_layers)
        policy = begin_prefill(policy)
        counter = counter if counter is not None else FlopCounter()
        first, state = start if start is not None else (0, self.initial_state(sample))
        cache: list[LayerCache] | None = [] if with_cache else None
        if cache is not None and first != 0:
            if start_cache is None or len(start_cache) != first:
                raise ValueError(f"resuming at layer {first} with a KV cache needs the caches of layers 0..{first - 1}")
            # Copies of the cache records: decoding appends to them, the stored prefix stays as it was.
            cache = [LayerCache(c.keys, c.values, c.next_position) for c in start_cache]
        trace: list[LayerTrace] = []
        for layer in range(first, self._num_layers):
            if states_out is not None and layer in keep_states:
                states_out[layer] = state
            wants = policy is not None and policy.wants_selection(layer)
            visual_in, tokens_in, sizes_in = state.visual_count(), state.num_tokens, state.group_sizes()
            state, layer_cache, counts, text_attn = self._layer(layer, state, table[layer], counter, wants)
            trace.append(LayerTrace(counts, visual_in, tokens_in, group_sizes_in=sizes_in))
            if cache is not None:
                cache.append(layer_cache)
            if wants and policy is not None:
                state = self._select(layer, state, policy, text_attn)
        rows = self.adapter.lm_head(self.adapter.final_norm(state.hidden[-logits_rows:])).float()
        result = PrefillResult(rows[-1], cache, trace, counter.total, state, policy)
        result.row_logits = rows
        return result

    @torch.no_grad()
    def decode_step(self, token_id: int, cache: list[LayerCache], step: int) -> torch.Tensor:
        """Run one generated token through every layer (never pruned), appending to ``cache``."""
        h = self.adapter.embed_tokens(torch.tensor([token_id], device=self.adapter.device))
        for layer, parts in enumerate(self.adapter.layers):
            c = cache[layer]
            pos = torch.tensor([c.next_position + step], device=h.device)
            cos, sin = self.adapter.rope(pos)
            x = parts.attn_norm(h)
            q = apply_rope(self._heads(parts.q_proj(x), self.spec.num_heads), cos, sin)
            k = apply_rope(self._heads(parts.k_proj(x), self.spec.num_kv_heads), cos, sin)
            v = self._heads(parts.v_proj(x), self.spec.num_kv_heads)
            c.keys = torch.cat([c.keys, k], dim=1)
            c.values = torch.cat([c.values, v], dim=1)
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0), c.keys.unsqueeze(0), c.values.unsqueeze(0), scale=parts.scaling,
                enable_gqa=self.spec.num_kv_heads != self.spec.num_heads,
            )[0]
            h = h + parts.o_proj(attn.transpose(0, 1).reshape(1, -1))
            h = h + self._mlp(parts, parts.mlp_norm(h))
        return self.adapter.lm_head(self.adapter.final_norm(h))[0].float()

    @torch.no_grad()
    def generate(
        self,
        sample: Sample,
        ops: Iterable[Operation] = (),
        policy: TokenPolicy | None = None,
        max_new_tokens: int = 16,
    ) -> GenerationResult:
        """Greedy answer with a KV cache: a pruned prefill, then unpruned decode steps."""
        pre = self.prefill(sample, ops, policy, with_cache=True)
        step_logits: list[torch.Tensor] = []
        ids = self.continue_greedy(pre, max_new_tokens, step_logits)
        return GenerationResult(ids, self.adapter.decode(ids), pre, step_logits)

    @torch.no_grad()
    def continue_greedy(
        self, prefill: PrefillResult, max_new_tokens: int, step_logits: list[torch.Tensor] | None = None
    ) -> list[int]:
        """Greedy token ids after a prefill (with cache), stopping at EOS; appends to its cache."""
        if prefill.cache is None:
            raise ValueError("greedy decoding needs a prefill run with with_cache=True")
        logits = prefill.logits
        if step_logits is not None:
            step_logits.append(logits)
        ids: list[int] = []
        eos = set(self.adapter.eos_token_ids)
        for step in range(max_new_tokens):
            token = int(torch.argmax(logits))
            if token in eos:
                break
            ids.append(token)
            if step + 1 == max_new_tokens:
                break
            logits = self.decode_step(token, prefill.cache, step)
            if step_logits is not None:
                step_logits.append(logits)
        return ids

    # -- internals -------------------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], heads, self.spec.head_dim).transpose(0, 1)

    @staticmethod
    def _mlp(parts: LayerParts, x: torch.Tensor) -> torch.Tensor:
        return parts.down_proj(parts.act(parts.gate_proj(x)) * parts.up_proj(x))

    @staticmethod
    def _rows(groups: torch.Tensor, pruned: frozenset[Group]) -> torch.Tensor | None:
        """Rows whose group is not pruned, or None when that is every row."""
        if not pruned:
            return None
        keep = torch.ones_like(groups, dtype=torch.bool)
        for g in pruned:
            keep &= groups != GROUP_INDEX[g]
        return None if bool(keep.all()) else keep.nonzero().flatten()

    def _layer(
        self,
        layer: int,
        state: PrefillState,
        pruned: dict[Module, frozenset[Group]],
        counter: FlopCounter,
        want_text_attention: bool,
    ) -> tuple[PrefillState, LayerCache, LayerCounts, torch.Tensor | None]:
        spec, parts = self.spec, self.adapter.layers[layer]
        d, n = spec.hidden_size, state.num_tokens
        q_rows = self._rows(state.groups, pruned[Module.Q])
        kv_rows = self._rows(state.groups, pruned[Module.KV])
        mlp_rows = self._rows(state.groups, pruned[Module.MLP])
        h = state.hidden
        x = parts.attn_norm(h)
        pos_q, pos_kv = _pick(state.positions, q_rows), _pick(state.positions, kv_rows)
        n_q, n_kv = int(pos_q.shape[0]), int(pos_kv.shape[0])
        cos, sin = self.adapter.rope(state.positions)
        # K/V of the tokens that give them (post-RoPE, as cached).
        xk = _pick(x, kv_rows)
        k = apply_rope(self._heads(parts.k_proj(xk), spec.num_kv_heads), _pick(cos, kv_rows), _pick(sin, kv_rows))
        v = self._heads(parts.v_proj(xk), spec.num_kv_heads)
        counter.add(layer, 2 * 2 * n_kv * d * spec.kv_dim)
        next_position = int(state.positions.max()) + 1 if n else 0
        layer_cache = LayerCache(k, v, next_position)

        text_attn: torch.Tensor | None = None
        if n_q:
            xq = _pick(x, q_rows)
            q = apply_rope(self._heads(parts.q_proj(xq), spec.num_heads), _pick(cos, q_rows), _pick(sin, q_rows))
            counter.add(layer, 2 * n_q * d * spec.q_dim)
            if n_kv:
                allowed = pos_q.unsqueeze(1) >= pos_kv.unsqueeze(0)  # causality by position
                counter.add(layer, 2 * 2 * n_q * n_kv * spec.q_dim)
                if want_text_attention:
                    attn, probs = self._eager_attention(q, k, v, allowed, parts.scaling)
                    text_attn = self._text_attention(state, q_rows, kv_rows, probs)
                else:
                    attn = self._sdpa(q, k, v, allowed, parts.scaling)
            else:
                attn = torch.zeros_like(q)
            out = parts.o_proj(attn.transpose(0, 1).reshape(n_q, spec.q_dim))
            counter.add(layer, 2 * n_q * spec.q_dim * d)
            h = h + out if q_rows is None else h.index_add(0, q_rows, out)
        n_mlp = n if mlp_rows is None else int(mlp_rows.shape[0])
        if n_mlp:
            y = self._mlp(parts, parts.mlp_norm(_pick(h, mlp_rows)))
            counter.add(layer, 3 * 2 * n_mlp * d * spec.intermediate_size)
            h = h + y if mlp_rows is None else h.index_add(0, mlp_rows, y)
        new_state = PrefillState(h, state.positions, state.groups, state.original_index, state.cls_attention)
        return new_state, layer_cache, LayerCounts(n_q, n_kv, n_mlp), text_attn

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> torch.Tensor:
        gqa = self.spec.num_kv_heads != self.spec.num_heads
        causal_square = allowed.shape[0] == allowed.shape[1] and bool(
            torch.equal(allowed, torch.ones_like(allowed).tril())
        )
        if causal_square:
            # 4-D inputs: PyTorch's fused CPU/GPU kernels take [batch, heads, n, d]; 3-D falls back to the
            # unfused math path (about 4x slower on CPU).
            return F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=gqa
            )[0]
        empty = ~allowed.any(dim=1)
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=allowed, scale=scale, enable_gqa=gqa
        )[0]
        if bool(empty.any()):  # a query with no visible key attends to nothing
            out = out.masked_fill(empty.view(1, -1, 1), 0.0)
        return out

    def _eager_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.spec.num_heads // self.spec.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)).float() * scale
        scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
        return torch.matmul(probs.to(v.dtype), v), probs

    @staticmethod
    def _text_attention(
        state: PrefillState, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None, probs: torch.Tensor
    ) -> torch.Tensor:
        """Text rows' attention to every alive visual token ``[heads, text_rows, v]`` (0 where a visual
        token gave no K/V at this layer)."""
        n = state.num_tokens
        q_index = torch.arange(n, device=state.groups.device) if q_rows is None else q_rows
        kv_index = torch.arange(n, device=state.groups.device) if kv_rows is None else kv_rows
        text_q = (state.groups[q_index] == _TXT).nonzero().flatten()
        visual = _is_visual(state.groups).nonzero().flatten()
        full = torch.zeros(probs.shape[0], int(text_q.shape[0]), n, dtype=probs.dtype, device=probs.device)
        full[:, :, kv_index] = probs[:, text_q, :]
        return full[:, :, visual]

    def _select(
        self, layer: int, state: PrefillState, policy: TokenPolicy, text_attn: torch.Tensor | None
    ) -> PrefillState:
        visual = _is_visual(state.groups).nonzero().flatten()
        if visual.numel() == 0:
            return state
        if text_attn is None:  # no query at this layer: nothing to score with
            text_attn = torch.zeros(self.spec.num_heads, 0, int(visual.shape[0]), device=state.hidden.device)
        ctx = SelectionContext(
            layer=layer,
            num_layers=self._num_layers,
            visual_hidden=state.hidden[visual],
            visual_original_index=state.original_index[visual],
            text_attention=text_attn,
            cls_attention=state.cls_attention[visual],
        )
        sel = policy.select(ctx)
        if sel is None:
            return state
        dev = state.hidden.device
        first, last = int(visual[0]), int(visual[-1]) + 1
        before = torch.arange(0, first, device=dev)
        after = torch.arange(last, state.num_tokens, device=dev)
        parts = [state.take(torch.cat([before, visual[sel.keep]]))]
        if sel.merged is not None and sel.merged.shape[0]:
            c = int(sel.merged.shape[0])
            # Merged tokens go after the kept visual tokens; in original-position mode they take the
            # position of the last visual slot so causality still reads "image, then text".
            parts.append(PrefillState(
                hidden=sel.merged.to(state.hidden.dtype),
                positions=torch.full((c,), int(state.positions[visual[-1]]), device=dev),
                groups=torch.full((c,), GROUP_INDEX[Group.IMG_REST], device=dev),
                original_index=torch.full((c,), -1, device=dev),
                cls_attention=torch.zeros(c, device=dev),
            ))
        parts.append(state.take(after))
        new = PrefillState.concat(parts)
        if policy.positions == "renumbered":
            new = PrefillState(new.hidden, torch.arange(new.num_tokens, device=dev), new.groups, new.original_index, new.cls_attention)
        return new


# -- batched prefill (GSOP operations only) ----------------------------------------------------------------
@dataclass
class BatchState:
    """The tokens of several prompts packed one after another (row-contiguous, each in sequence order).

    ``row[i]`` is the batch row (0..B-1) of token ``i``. Only per-token work (norms, projections, MLP) runs
    on the packed tokens, so no FLOP is spent on padding; attention pads each row to the batch's longest
    and masks. Tensors are never modified in place, so a state can be kept and resumed from.
    """

    hidden: torch.Tensor  # [T, hidden]
    positions: torch.Tensor  # [T] int64, per row from 0
    groups: torch.Tensor  # [T] int64
    row: torch.Tensor  # [T] int64
    rows: int

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])


@dataclass
class BatchLayerCache:
    """One layer's packed KV cache of a batch: keys/values ``[kv_heads, T_kv, head_dim]`` and their rows."""

    keys: torch.Tensor
    values: torch.Tensor
    row: torch.Tensor  # [T_kv]
    next_position: list[int]  # per row

    def split(self) -> list[LayerCache]:
        """Per-row :class:`LayerCache` records (what decoding appends to)."""
        out = []
        for b, nxt in enumerate(self.next_position):
            idx = (self.row == b).nonzero().flatten()
            out.append(LayerCache(self.keys[:, idx], self.values[:, idx], nxt))
        return out


@dataclass
class BatchPrefillResult:
    row_logits: list[torch.Tensor]  # per row: [logits_rows[b], vocab] float32
    cache: list[BatchLayerCache] | None
    state: BatchState

    def row_result(self, b: int) -> PrefillResult:
        """Row ``b`` as a single-prompt :class:`PrefillResult` (its logits and, with a cache, its own KV
        cache), ready for :meth:`PlanExecutor.continue_greedy`."""
        cache = [c.split()[b] for c in self.cache] if self.cache is not None else None
        rows = self.row_logits[b]
        result = PrefillResult(rows[-1], cache, [], 0)
        result.row_logits = rows
        return result


def _slots(row: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """Each packed token's index within its row (tokens are row-contiguous) and the longest row."""
    counts = torch.bincount(row, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(row.shape[0], device=row.device) - starts[row], int(counts.max()) if rows else 0


def _batch_prefill_layer(
    ex: PlanExecutor, layer: int, state: BatchState, pruned: dict[Module, frozenset[Group]]
) -> tuple[BatchState, BatchLayerCache]:
    spec, parts = ex.spec, ex.adapter.layers[layer]
    B = state.rows
    q_idx = PlanExecutor._rows(state.groups, pruned[Module.Q])
    kv_idx = PlanExecutor._rows(state.groups, pruned[Module.KV])
    mlp_idx = PlanExecutor._rows(state.groups, pruned[Module.MLP])
    h = state.hidden
    dev = h.device
    x = parts.attn_norm(h)
    cos, sin = ex.adapter.rope(state.positions)
    xk = _pick(x, kv_idx)
    k = apply_rope(ex._heads(parts.k_proj(xk), spec.num_kv_heads), _pick(cos, kv_idx), _pick(sin, kv_idx))
    v = ex._heads(parts.v_proj(xk), spec.num_kv_heads)
    kv_row, kv_pos = _pick(state.row, kv_idx), _pick(state.positions, kv_idx)
    last = torch.full((B,), -1, dtype=torch.long, device=dev).scatter_reduce(0, state.row, state.positions, "amax")
    cache = BatchLayerCache(k, v, kv_row, [int(p) + 1 for p in last.tolist()])

    q_row, q_pos = _pick(state.row, q_idx), _pick(state.positions, q_idx)
    if q_row.numel():
        q = apply_rope(ex._heads(parts.q_proj(_pick(x, q_idx)), spec.num_heads), _pick(cos, q_idx), _pick(sin, q_idx))
        q_slot, mq = _slots(q_row, B)
        Q = q.new_zeros(B, spec.num_heads, mq, spec.head_dim)
        Q[q_row, :, q_slot] = q.transpose(0, 1)
        pos_q = torch.full((B, mq), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)  # padding sees all
        pos_q[q_row, q_slot] = q_pos
        if kv_row.numel():
            kv_slot, mk = _slots(kv_row, B)
            K = k.new_zeros(B, spec.num_kv_heads, mk, spec.head_dim)
            V = v.new_zeros(B, spec.num_kv_heads, mk, spec.head_dim)
            K[kv_row, :, kv_slot] = k.transpose(0, 1)
            V[kv_row, :, kv_slot] = v.transpose(0, 1)
            pos_k = torch.full((B, mk), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)  # padding: unseen
            pos_k[kv_row, kv_slot] = kv_pos
            allowed = pos_q.unsqueeze(2) >= pos_k.unsqueeze(1)  # [B, mq, mk]
            empty = ~allowed.any(dim=2)
            # a row with no visible key (padding of a row without K/V, or a real query before every key):
            # let it see slot 0 to keep softmax finite, then zero its output as the single-prompt path does
            allowed = allowed | (empty.unsqueeze(2) & (torch.arange(mk, device=dev) == 0))
            attn = F.scaled_dot_product_attention(
                Q, K, V, attn_mask=allowed.unsqueeze(1), scale=parts.scaling,
                enable_gqa=spec.num_kv_heads != spec.num_heads,
            )
            if bool(empty.any()):
                attn = attn.masked_fill(empty.view(B, 1, mq, 1), 0.0)
            out = attn[q_row, :, q_slot]  # [T_q, heads, head_dim]
        else:
            out = q.new_zeros(q_row.shape[0], spec.num_heads, spec.head_dim)
        o = parts.o_proj(out.reshape(q_row.shape[0], spec.q_dim))
        h = h + o if q_idx is None else h.index_add(0, q_idx, o)
    n_mlp = state.num_tokens if mlp_idx is None else int(mlp_idx.shape[0])
    if n_mlp:
        y = ex._mlp(parts, parts.mlp_norm(_pick(h, mlp_idx)))
        h = h + y if mlp_idx is None else h.index_add(0, mlp_idx, y)
    return BatchState(h, state.positions, state.groups, state.row, B), cache


def initial_batch_state(ex: PlanExecutor, samples: Sequence[Sample]) -> BatchState:
    """The packed entry state of several prompts (each with positions from 0)."""
    parts = [ex.initial_state(s) for s in samples]
    dev = parts[0].hidden.device
    return BatchState(
        hidden=torch.cat([p.hidden for p in parts]),
        positions=torch.cat([p.positions for p in parts]),
        groups=torch.cat([p.groups.to(dev) for p in parts]),
        row=torch.cat([torch.full((p.num_tokens,), b, dtype=torch.long, device=dev) for b, p in enumerate(parts)]),
        rows=len(parts),
    )


@torch.no_grad()
def prefill_batch(
    ex: PlanExecutor,
    samples: Sequence[Sample],
    ops: Iterable[Operation] = (),
    *,
    with_cache: bool = False,
    logits_rows: Sequence[int] | None = None,
    start: tuple[int, BatchState] | None = None,
    start_cache: Sequence[BatchLayerCache] | None = None,
    keep_states: Sequence[int] = (),
    states_out: dict[int, BatchState] | None = None,
) -> BatchPrefillResult:
    """Prefill several prompts in one forward under pruned GSOP ``ops`` (no token policy).

    The same computation as :meth:`PlanExecutor.prefill` on each prompt alone, row by row, up to float
    summation order (attention runs padded and masked over the batch; projections and MLPs on the packed
    tokens). ``logits_rows[b]`` of each row's last tokens get logits. ``start``/``start_cache``/
    ``keep_states``/``states_out`` resume from and keep packed states as the single-prompt prefill does.
    """
    if not samples:
        raise ValueError("prefill_batch needs at least one sample")
    logits_rows = list(logits_rows) if logits_rows is not None else [1] * len(samples)
    table = pruned_by_layer(ops, ex._num_layers)
    first, state = start if start is not None else (0, initial_batch_state(ex, samples))
    cache: list[BatchLayerCache] | None = [] if with_cache else None
    if cache is not None and first != 0:
        if start_cache is None or len(start_cache) != first:
            raise ValueError(f"resuming at layer {first} with a KV cache needs the caches of layers 0..{first - 1}")
        cache = list(start_cache)
    for layer in range(first, ex._num_layers):
        if states_out is not None and layer in keep_states:
            states_out[layer] = state
        state, layer_cache = _batch_prefill_layer(ex, layer, state, table[layer])
        if cache is not None:
            cache.append(layer_cache)
    counts = torch.bincount(state.row, minlength=state.rows)
    ends = torch.cumsum(counts, 0).tolist()
    picks = [torch.arange(e - n, e, device=state.hidden.device) for e, n in zip(ends, logits_rows, strict=True)]
    logits = ex.adapter.lm_head(ex.adapter.final_norm(state.hidden[torch.cat(picks)])).float()
    return BatchPrefillResult(list(torch.split(logits, logits_rows)), cache, state)
