"""BakedPrefill (a static plan baked into a traceable prefill) against the PlanExecutor, in PyTorch."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import DOGS_QUESTION, SQUARE_QUESTION, random_image

from exporter.adapters import load_adapter
from exporter.baked import BakedPrefill, plan_layout
from exporter.executor import FixedKeepPolicy, PlanExecutor, PrefillResult
from exporter.sample import prepare_sample
from prune_core.errors import BuildError
from prune_core.ops import PRUNABLE_GROUPS, Group, Module, Operation, all_operations

G, M = Group, Module
QUESTIONS = [SQUARE_QUESTION, DOGS_QUESTION]

#: q/kv/mlp of both image groups at several layers; key and rest pruned apart (needs the key split).
GSOP_OPS = frozenset(
    {
        Operation(1, G.IMG_REST, M.Q), Operation(1, G.IMG_REST, M.KV), Operation(1, G.IMG_KEY, M.MLP),
        Operation(2, G.IMG_KEY, M.MLP), Operation(2, G.IMG_REST, M.MLP), Operation(2, G.IMG_REST, M.KV),
        Operation(3, G.IMG_KEY, M.KV), Operation(3, G.IMG_REST, M.Q), Operation(3, G.IMG_KEY, M.Q),
    }
)  # fmt: skip
KEEP = {1: 8, 2: 3}
#: Ops before the stage split key from rest; img_rest gives no K/V at the stage layer, so rest tokens score
#: 0 and the extra kept ones are chosen by the tie rule (lower original index). After the stage both image
#: groups are pruned together.
COMBINED_OPS = frozenset(
    {
        Operation(0, G.IMG_REST, M.MLP), Operation(1, G.IMG_REST, M.KV),
        Operation(3, G.IMG_KEY, M.Q), Operation(3, G.IMG_REST, M.Q),
    }
)  # fmt: skip
COMBINED_KEEP = {1: 6}

PLANS = {
    "empty": (frozenset(), None),
    "gsop": (GSOP_OPS, None),
    "keep": (frozenset(), KEEP),
    "combined": (COMBINED_OPS, COMBINED_KEEP),
    "keep_none_left": (frozenset({Operation(0, G.IMG_REST, M.KV)}), {0: 0}),
    # A stage keeping more than there are is no stage: key and rest may still be pruned apart up to layer 2.
    "keep_more_than_there_are": (frozenset({Operation(2, G.IMG_REST, M.MLP)}), {1: 100, 2: 5}),
}


@pytest.fixture(scope="module")
def samples(tiny_adapter):
    return [prepare_sample(tiny_adapter, random_image(seed), q) for seed, q in enumerate(QUESTIONS)]


def _run(module: BakedPrefill, sample) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return module(*module.inputs_from_sample(sample))


def _check_cache(out: tuple[torch.Tensor, ...], ref: PrefillResult, atol: float = 1e-5) -> None:
    """Each layer's cache holds the executor's tokens (ours in layout order: compare sorted by position)."""
    assert ref.cache is not None
    for layer, cache in enumerate(ref.cache):
        keys, values, pos = out[1 + 3 * layer][0], out[2 + 3 * layer][0], out[3 + 3 * layer][0]
        order = torch.argsort(pos)
        assert keys.shape[1] == cache.keys.shape[1], (
            f"layer {layer}: {keys.shape[1]} vs {cache.keys.shape[1]} K/V rows"
        )
        assert int(pos.max()) + 1 == cache.next_position
        assert torch.allclose(keys[:, order], cache.keys, atol=atol)
        assert torch.allclose(values[:, order], cache.values, atol=atol)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_baked_prefill_matches_executor(plan: str, tiny_adapter, samples) -> None:
    ops, keep = PLANS[plan]
    module = BakedPrefill(tiny_adapter, ops, keep).eval()
    executor = PlanExecutor(tiny_adapter)
    for sample in samples:
        ref = executor.prefill(sample, ops, FixedKeepPolicy(keep) if keep else None)
        out = _run(module, sample)
        assert out[0].shape == (1, tiny_adapter.spec.vocab_size)
        assert (out[0][0] - ref.logits).abs().max() <= 1e-5
        _check_cache(out, ref)


def test_layouts_split_key_tokens_only_when_needed(tiny_adapter) -> None:
    spec = tiny_adapter.spec
    key = spec.key_tokens()

    def layout(ops, keep=None):
        return plan_layout(spec.num_layers, spec.visual_tokens, key, ops, keep)

    assert layout(())[0] is False
    both = {Operation(2, g, M.KV) for g in PRUNABLE_GROUPS}
    assert layout(both)[0] is False  # both image groups together: one image block
    assert layout(GSOP_OPS)[0] is True
    split, layers = layout(COMBINED_OPS, COMBINED_KEEP)
    assert split and [b.name for b in layers[1].blocks] == ["sys", "img_key", "img_rest", "txt"]
    assert [b.name for b in layers[2].blocks] == ["sys", "img", "txt"] and layers[2].visual_count == 6
    # A stage that keeps nothing removes the image block; one that keeps everything is no stage.
    assert [b.name for b in layout((), {0: 0})[1][1].blocks] == ["sys", "txt"]
    assert layout((), {0: spec.visual_tokens})[1][0].keep_after is None


def test_random_plans_match_executor(tiny_adapter, samples) -> None:
    executor = PlanExecutor(tiny_adapter)
    rng = random.Random(0)
    candidates = all_operations(tiny_adapter.spec.num_layers, PRUNABLE_GROUPS)
    for size in (1, 5, 12, len(candidates)):
        ops = frozenset(rng.sample(candidates, size))
        out = _run(BakedPrefill(tiny_adapter, ops).eval(), samples[1])
        ref = executor.prefill(samples[1], ops)
        assert (out[0][0] - ref.logits).abs().max() <= 1e-5, sorted(ops)
        _check_cache(out, ref)


def test_gqa_model_matches_executor(tiny_gqa_model) -> None:
    adapter = load_adapter(tiny_gqa_model)
    sample = prepare_sample(adapter, random_image(7), QUESTIONS[1])
    for ops, keep in (PLANS["gsop"], PLANS["combined"]):
        out = _run(BakedPrefill(adapter, ops, keep).eval(), sample)
        ref = PlanExecutor(adapter).prefill(sample, ops, FixedKeepPolicy(keep) if keep else None)
        assert (out[0][0] - ref.logits).abs().max() <= 1e-5
        _check_cache(out, ref)


def test_plans_that_cannot_be_baked_are_refused(tiny_adapter) -> None:
    with pytest.raises(BuildError, match="after a token-selection stage"):
        BakedPrefill(tiny_adapter, {Operation(2, G.IMG_REST, M.MLP)}, {1: 5})
    with pytest.raises(BuildError, match="only img_key and img_rest"):
        BakedPrefill(tiny_adapter, {Operation(1, G.TXT, M.MLP)})
    with pytest.raises(BuildError, match="outside the model's layers"):
        BakedPrefill(tiny_adapter, (), {9: 3})
