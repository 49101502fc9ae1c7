"""One prompt made ready for the decoder: embeddings, token groups, positions and the [CLS] attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prune_core.ops import GROUPS, Group
from prune_core.spec import DEFAULT_KEY_FRACTION, GroupSizes

from .adapters.base import VLMAdapter

GROUP_INDEX: dict[Group, int] = {g: i for i, g in enumerate(GROUPS)}


def group_sizes_of(groups: torch.Tensor) -> GroupSizes:
    """Token count per group of a tensor of :data:`GROUP_INDEX` values."""
    counts = torch.bincount(groups.cpu(), minlength=len(GROUPS)).tolist()
    return GroupSizes(*(int(c) for c in counts))


@dataclass(frozen=True)
class Sample:
    """Decoder inputs of one image + prompt.

    ``groups[i]`` is the :data:`GROUP_INDEX` of token ``i``; visual tokens are the contiguous span
    ``[image_start, image_end)``; ``img_key`` are the top ``key_fraction`` of them by [CLS] attention.
    """

    input_ids: torch.Tensor  # [n] int64
    embeds: torch.Tensor  # [n, hidden]
    groups: torch.Tensor  # [n] int64
    image_start: int
    image_end: int
    cls_attention: torch.Tensor  # [visual_tokens] float32

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def sizes(self) -> GroupSizes:
        return group_sizes_of(self.groups)


def key_token_mask(cls_attention: torch.Tensor, num_key: int) -> torch.Tensor:
    """Boolean mask of the ``num_key`` visual tokens with the highest [CLS] attention (ties: lower index)."""
    order = torch.argsort(cls_attention.float(), descending=True, stable=True)
    mask = torch.zeros_like(cls_attention, dtype=torch.bool)
    mask[order[:num_key]] = True
    return mask


def build_sample(
    adapter: VLMAdapter,
    input_ids: torch.Tensor,
    image_start: int,
    image_end: int,
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    key_fraction: float = DEFAULT_KEY_FRACTION,
) -> Sample:
    """Merge projected image features into the token embeddings and label every token's group."""
    with torch.no_grad():
        embeds = adapter.embed_tokens(input_ids).clone()
        embeds[image_start:image_end] = features.to(embeds.dtype)
    n = int(input_ids.shape[0])
    groups = torch.full((n,), GROUP_INDEX[Group.TXT], dtype=torch.long)
    groups[:image_start] = GROUP_INDEX[Group.SYS]
    # The key share of this image's visual tokens (an any-resolution image may give fewer than the most).
    key = key_token_mask(cls_attention.cpu(), adapter.spec.key_tokens(key_fraction, image_end - image_start))
    groups[image_start:image_end] = torch.where(
        key, GROUP_INDEX[Group.IMG_KEY], GROUP_INDEX[Group.IMG_REST]
    )
    return Sample(input_ids.cpu(), embeds, groups.to(embeds.device), image_start, image_end, cls_attention.float())


def prepare_sample(
    adapter: VLMAdapter, image: Any, question: str, key_fraction: float = DEFAULT_KEY_FRACTION
) -> Sample:
    """Tokenise, run the vision tower and build the decoder inputs of one image + question."""
    tokens = adapter.tokenize(image, question)
    vision = adapter.vision(tokens.pixel_values, tokens.image_sizes)
    return build_sample(
        adapter,
        tokens.input_ids,
        tokens.image_start,
        tokens.image_end,
        vision.features[0],
        vision.cls_attention[0],
        key_fraction,
    )
