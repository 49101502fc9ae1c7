"""The graphs a build needs besides vision and prefill to answer a question: token embedding and decode.

:class:`EmbedTokens` maps prompt token ids to the decoder's input embeddings, so that a runtime needs only
the tokenizer, the pixels and the graphs: the prefill's ``sys_embeds`` / ``text_embeds`` come from it.

:class:`DecodeStep` runs one generated token of each of ``B`` sequences through every decoder layer. Decode
steps are never pruned (docs/methods.md): the new token gives K/V at every layer and attends to whatever
that layer kept in the prefill. Each layer has its own cache length and its own positions, exactly as the
prefill graph emits them (``present.l.key/value/position``), so the caches of a pruned prefill feed it as
they are:

* inputs: ``input_ids [B, 1]`` (int64), then per layer ``l``: ``past.l.key`` and ``past.l.value``
  ``[B, kv_heads, n_l, head_dim]`` (post-RoPE) and ``past.l.position [B, n_l]`` (int64);
* outputs: ``logits [B, vocab]`` (float32), then per layer ``present.l.key/value [B, kv_heads, n_l + 1,
  head_dim]`` and ``present.l.position [B, n_l + 1]``: the past with the new token appended.

**Batches of sequences of different lengths.** Sequences that share a step hold different numbers of
tokens at each layer (their prompts differ, and AutoPrune keeps a different count per request and per
layer). A batch pads every layer's cache on the left to its longest sequence and marks the padding with
position ``-1``: a slot whose position is negative is masked out of attention (an additive ``-inf``, so
its softmax weight is exactly 0) and never counts as the sequence's last position. Padding can sit at any
slot, since keys are stored after RoPE and attention has no order of its own; the batching runtime
(:mod:`engines.batching`) keeps each sequence's tokens contiguous at the right. A batch of one sequence
without padding adds a mask of zeros: the step computes what it computed before batches existed.

The new token's position at layer ``l`` is ``max(past.l.position) + 1`` of its own row: the executor's
``next_position + step`` (the text, never pruned, holds the largest position of every layer, also with
renumbered positions, where each layer has its own numbering). ``n_l`` is a dynamic dimension per layer
(``past_len_l``) and ``B`` one more (``decode_batch``), so one graph serves every schedule AutoPrune may
pick and every batch up to the build's ``--max-batch``.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters.base import VLMAdapter
from .executor import apply_rope

KV_KINDS = ("key", "value", "position")


def past_names(num_layers: int, prefix: str = "past") -> list[str]:
    """``prefix.l.key``, ``prefix.l.value``, ``prefix.l.position`` for every layer, in graph order."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in KV_KINDS]


class EmbedTokens(nn.Module):
    """``input_ids [1, n] (int64) -> inputs_embeds [1, n, hidden]``: the decoder's token embedding."""

    input_names = ["input_ids"]
    output_names = ["inputs_embeds"]

    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed_tokens(input_ids[0]).unsqueeze(0)


class DecodeStep(nn.Module):
    """One greedy decoding step over per-layer caches of different lengths (see the module docstring)."""

    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.spec = adapter.spec

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *past_names(self.spec.num_layers)]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *past_names(self.spec.num_layers, "present")]

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.reshape(x.shape[0], heads, self.spec.head_dim).transpose(0, 1)  # [heads, B, hd]

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The caches stay 4-D ``[B, kv_heads, n, hd]`` from input to output: only the Concat that appends
        # the new token copies them (a Gather/Unsqueeze pair around them would copy every layer's cache at
        # every step, which cost more than the step's matmuls on CPU).
        spec = self.spec
        batch = input_ids.shape[0]
        h = self.adapter.embed_tokens(input_ids.reshape(batch))  # [B, hidden]
        kvh, rep, hd = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
        outputs: list[torch.Tensor] = []
        for layer, parts in enumerate(self.adapter.layers):
            past_k, past_v, past_pos = past[3 * layer : 3 * layer + 3]
            position = past_pos.max(dim=1).values + 1  # [B]: padding (-1) is never a row's largest
            cos, sin = self.adapter.rope(position)  # [B, hd]
            x = parts.attn_norm(h)
            q = apply_rope(self._heads(parts.q_proj(x), spec.num_heads), cos, sin)  # [heads, B, hd]
            k = apply_rope(self._heads(parts.k_proj(x), kvh), cos, sin)  # [kv_heads, B, hd]
            v = self._heads(parts.v_proj(x), kvh)
            new_k = k.transpose(0, 1).unsqueeze(2).to(past_k.dtype)  # [B, kv_heads, 1, hd]
            new_v = v.transpose(0, 1).unsqueeze(2).to(past_v.dtype)
            keys = torch.cat([past_k, new_k], dim=2)  # [B, kv_heads, n + 1, hd]
            values = torch.cat([past_v, new_v], dim=2)
            positions = torch.cat([past_pos, position.reshape(batch, 1)], dim=1)  # [B, n + 1]
            outputs += [keys, values, positions]
            # Every cached token is earlier than the new one: only the padding is masked. Grouped heads:
            # [B, kv_heads, rep, hd] against [B, kv_heads, hd, n + 1], without repeating K/V.
            q4 = q.transpose(0, 1).reshape(batch, kvh, rep, hd)
            padding = torch.where(positions >= 0, 0.0, float("-inf")).to(torch.float32)  # [B, n + 1]
            scores = torch.matmul(q4, keys.transpose(2, 3)).float() * parts.scaling + padding[:, None, None, :]
            probs = torch.softmax(scores, dim=-1)
            attn = torch.matmul(probs.to(values.dtype), values)  # [B, kv_heads, rep, hd]
            h = h + parts.o_proj(attn.reshape(batch, spec.q_dim))
            y = parts.mlp_norm(h)
            h = h + parts.down_proj(parts.act(parts.gate_proj(y)) * parts.up_proj(y))
        logits = self.adapter.lm_head(self.adapter.final_norm(h)).float()
        return (logits, *outputs)
