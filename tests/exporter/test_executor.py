"""The executor against HuggingFace (empty plan) and against the cost model (any plan)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import SQUARE_QUESTION, random_image

from exporter.adapters import load_adapter
from exporter.executor import FixedKeepPolicy, PlanExecutor
from exporter.sample import GROUP_INDEX, prepare_sample
from prune_core.cost import prefill_flops
from prune_core.ops import PRUNABLE_GROUPS, Group, Module, Operation, all_operations

QUESTIONS = [SQUARE_QUESTION, "How many dogs are there in this picture, and where?"]


def _hf_last_logits(adapter, image, question) -> torch.Tensor:
    tokens = adapter.tokenize(image, question)
    with torch.no_grad():
        out = adapter.model(input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values)
    return out.logits[0, -1].float()


@pytest.mark.parametrize("model", ["tiny_model", "tiny_gqa_model"])
def test_empty_plan_reproduces_hf_logits_and_greedy_answer(model: str, request: pytest.FixtureRequest) -> None:
    adapter = load_adapter(request.getfixturevalue(model))
    executor = PlanExecutor(adapter)
    for seed, question in enumerate(QUESTIONS):
        image = random_image(seed)
        sample = prepare_sample(adapter, image, question)
        result = executor.prefill(sample)
        assert (result.logits - _hf_last_logits(adapter, image, question)).abs().max() <= 1e-5
        tokens = adapter.tokenize(image, question)
        hf = adapter.model.generate(
            input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values, max_new_tokens=6, do_sample=False
        )[0, tokens.input_ids.shape[0]:].tolist()
        ours = executor.generate(sample, max_new_tokens=6).token_ids
        assert ours == hf[: len(ours)] and len(ours) in (len(hf), len(hf) - 1)


def test_gqa_model_has_fewer_kv_heads(tiny_gqa_model: Path) -> None:
    adapter = load_adapter(tiny_gqa_model)
    assert adapter.spec.num_kv_heads == 2 < adapter.spec.num_heads
    cache = PlanExecutor(adapter).prefill(prepare_sample(adapter, random_image(0), QUESTIONS[0])).cache
    assert cache is not None and cache[0].keys.shape[0] == 2


def _random_plan(rng: random.Random, num_layers: int, size: int) -> set[Operation]:
    candidates = all_operations(num_layers, PRUNABLE_GROUPS)
    return set(rng.sample(candidates, size))


@pytest.mark.parametrize("model", ["tiny_model", "tiny_gqa_model"])
def test_executed_flops_equal_cost_model_for_random_plans(model: str, request: pytest.FixtureRequest) -> None:
    adapter = load_adapter(request.getfixturevalue(model))
    executor = PlanExecutor(adapter)
    sample = prepare_sample(adapter, random_image(3), QUESTIONS[1])
    rng = random.Random(0)
    n_ops = len(all_operations(adapter.spec.num_layers, PRUNABLE_GROUPS))
    for size in (0, 1, 3, 7, n_ops // 2, n_ops):
        ops = _random_plan(rng, adapter.spec.num_layers, size)
        result = executor.prefill(sample, ops)
        assert result.flops == prefill_flops(adapter.spec, sample.sizes, ops)
        assert torch.isfinite(result.logits).all()


def test_every_image_op_pruned_equals_a_text_only_forward(tiny_adapter) -> None:
    """With all image ops pruned at every layer, image tokens influence nothing: the logits equal a run
    where the image tokens are simply absent (positions of the text kept)."""
    executor = PlanExecutor(tiny_adapter)
    sample = prepare_sample(tiny_adapter, random_image(1), QUESTIONS[0])
    everything = set(all_operations(tiny_adapter.spec.num_layers, PRUNABLE_GROUPS))
    a = executor.prefill(sample, everything).logits
    other = prepare_sample(tiny_adapter, random_image(2), QUESTIONS[0])
    b = executor.prefill(other, everything).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_pruned_kv_tokens_are_absent_from_that_layers_cache(tiny_adapter) -> None:
    executor = PlanExecutor(tiny_adapter)
    sample = prepare_sample(tiny_adapter, random_image(0), QUESTIONS[0])
    ops = {Operation(1, Group.IMG_REST, Module.KV), Operation(2, Group.IMG_KEY, Module.KV)}
    cache = executor.prefill(sample, ops).cache
    sizes = sample.sizes
    assert cache is not None
    assert cache[0].keys.shape[1] == sample.num_tokens
    assert cache[1].keys.shape[1] == sample.num_tokens - sizes.img_rest
    assert cache[2].keys.shape[1] == sample.num_tokens - sizes.img_key
    # Decode steps are not pruned: every layer's cache grows by one per generated token.
    gen = executor.generate(sample, ops, max_new_tokens=4)
    grown = [c.keys.shape[1] for c in gen.prefill.cache]
    steps = len(gen.step_logits) - 1
    assert grown == [cache[i].keys.shape[1] + steps for i in range(len(cache))]


def test_pruned_q_and_mlp_leave_hidden_states_unchanged(tiny_adapter) -> None:
    executor = PlanExecutor(tiny_adapter)
    sample = prepare_sample(tiny_adapter, random_image(0), QUESTIONS[0])
    layer = tiny_adapter.spec.num_layers - 1
    ops = {Operation(layer, g, m) for g in PRUNABLE_GROUPS for m in (Module.Q, Module.MLP)}
    states: dict[int, object] = {}
    result = executor.prefill(sample, ops, keep_states=[layer], states_out=states)
    before, after = states[layer], result.state
    visual = (sample.groups == GROUP_INDEX[Group.IMG_KEY]) | (sample.groups == GROUP_INDEX[Group.IMG_REST])
    assert torch.equal(before.hidden[visual], after.hidden[visual])
    assert not torch.equal(before.hidden[~visual], after.hidden[~visual])


def test_resume_from_a_stored_prefix_state_is_identical(tiny_adapter) -> None:
    executor = PlanExecutor(tiny_adapter)
    sample = prepare_sample(tiny_adapter, random_image(5), QUESTIONS[1])
    states: dict[int, object] = {}
    executor.prefill(sample, keep_states=[2], states_out=states, with_cache=False)
    ops = {Operation(2, Group.IMG_REST, Module.MLP), Operation(3, Group.IMG_REST, Module.KV)}
    full = executor.prefill(sample, ops, with_cache=False)
    resumed = executor.prefill(sample, ops, with_cache=False, start=(2, states[2]))
    assert torch.equal(full.logits, resumed.logits)


@pytest.mark.parametrize("positions", ["original", "renumbered"])
def test_fixed_keep_schedule_drops_visual_tokens_and_counts_flops(tiny_adapter, positions: str) -> None:
    from prune_core.spec import GroupSizes

    executor = PlanExecutor(tiny_adapter)
    sample = prepare_sample(tiny_adapter, random_image(4), QUESTIONS[0])
    policy = FixedKeepPolicy({1: 6, 2: 3}, positions)  # type: ignore[arg-type]
    result = executor.generate(sample, policy=policy, max_new_tokens=3).prefill
    assert result.visual_tokens_per_layer == [16, 16, 6, 3]
    assert result.state is not None and result.state.visual_count() == 3
    # FLOPs equal the cost model applied to the executed per-layer counts.
    s = sample.sizes
    per_layer = [s, s] + [GroupSizes(s.sys, 0, v, s.txt) for v in (6, 3)]
    assert result.flops == prefill_flops(tiny_adapter.spec, per_layer)
    kept = result.state.original_index[(result.state.groups == 1) | (result.state.groups == 2)]
    assert torch.equal(kept, torch.sort(kept).values)  # order preserved
    if positions == "renumbered":
        assert torch.equal(result.state.positions, torch.arange(result.state.num_tokens))
    else:
        assert torch.equal(result.state.positions, result.state.original_index)
