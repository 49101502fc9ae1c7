"""Fixtures of the calib tests: a tiny 8-layer LLaVA-like spec and its prompt layout (built in code)."""

from __future__ import annotations

import pytest

from prune_core.spec import GroupSizes, ModelSpec


@pytest.fixture
def spec() -> ModelSpec:
    return ModelSpec(family="llava", num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4,
                     num_kv_heads=2, head_dim=16, vocab_size=100, visual_tokens=16, image_size=56,
                     patch_size=14, vision_layers=2, vision_hidden_size=32)


@pytest.fixture
def layout(spec: ModelSpec) -> GroupSizes:
    return GroupSizes.for_prompt(spec, 4, 8)
