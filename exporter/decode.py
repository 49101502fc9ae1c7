"""The graphs a build needs besides vision and prefill to answer a question: token embedding and decode.

:class:`EmbedTokens` maps prompt token ids to the decoder's input embeddings, so that a runtime needs only
the tokenizer, the pixels and the graphs: the prefill's ``sys_embeds`` / ``text_embeds`` come from it.

:class:`DecodeStep` runs one generated token (batch 1) through every decoder layer. Decode steps are never
pruned (docs/methods.md): the new token gives K/V at every layer and attends to whatever that layer kept
in the prefill. Each layer has its own cache length and its own positions, exactly as the prefill graph
emits them (``present.l.key/value/position``), so the caches of a pruned prefill feed it as they are:

* inputs: ``input_ids [1, 1]`` (int64), then per layer ``l``: ``past.l.key`` and ``past.l.value``
  ``[1, kv_heads, n_l, head_dim]`` (post-RoPE) and ``past.l.position [1, n_l]`` (int64);
* outputs: ``logits [1, vocab]`` (float32), then per layer ``present.l.key/value [1, kv_heads, n_l + 1,
  head_dim]`` and ``present.l.position [1, n_l + 1]``: the past with the new token appended.

The new token's position at layer ``l`` is ``max(past.l.position) + 1``: the executor's
``next_position + step`` (the text, never pruned, holds the largest position of every layer, also with
renumbered positions, where each layer has its own numbering). ``n_l`` is a dynamic dimension per layer
(``past_len_l``), so one graph serves every schedule AutoPrune may pick.
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
        return x.reshape(x.shape[0], heads, self.spec.head_dim).transpose(0, 1)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The caches stay 4-D ``[1, kv_heads, n, hd]`` from input to output: indexing away the batch axis
        # (a Gather) and adding it back (an Unsqueeze) would each copy every layer's cache at every step,
        # which cost more than the step's matmuls on CPU. Only the Concat that appends the new token copies.
        spec = self.spec
        h = self.adapter.embed_tokens(input_ids.reshape(1))  # [1, hidden]
        kvh, rep, hd = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
        outputs: list[torch.Tensor] = []
        for layer, parts in enumerate(self.adapter.layers):
            past_k, past_v, past_pos = past[3 * layer : 3 * layer + 3]
            position = past_pos.max().reshape(1) + 1
            cos, sin = self.adapter.rope(position)
            x = parts.attn_norm(h)
            q = apply_rope(self._heads(parts.q_proj(x), spec.num_heads), cos, sin)  # [heads, 1, hd]
            k = apply_rope(self._heads(parts.k_proj(x), kvh), cos, sin)  # [kv_heads, 1, hd]
            v = self._heads(parts.v_proj(x), kvh)
            keys = torch.cat([past_k, k.to(past_k.dtype).unsqueeze(0)], dim=2)  # [1, kv_heads, n + 1, hd]
            values = torch.cat([past_v, v.to(past_v.dtype).unsqueeze(0)], dim=2)
            outputs += [keys, values, torch.cat([past_pos, position.reshape(1, 1)], dim=1)]
            # Every cached token is earlier than the new one: no mask. Grouped heads: [1, kv_heads, rep, hd]
            # against [1, kv_heads, hd, n + 1], without repeating K/V.
            q4 = q.reshape(1, kvh, rep, hd)
            scores = torch.matmul(q4, keys.transpose(2, 3)).float() * parts.scaling
            probs = torch.softmax(scores, dim=-1)
            attn = torch.matmul(probs.to(values.dtype), values)  # [1, kv_heads, rep, hd]
            h = h + parts.o_proj(attn.reshape(1, spec.q_dim))
            y = parts.mlp_norm(h)
            h = h + parts.down_proj(parts.act(parts.gate_proj(y)) * parts.up_proj(y))
        logits = self.adapter.lm_head(self.adapter.final_norm(h)).float()
        return (logits, *outputs)
