"""ONNX export of baked prefill graphs and of the vision graph, run in ONNX Runtime against the executor."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from helpers import SQUARE_QUESTION, random_image
from helpers.ort_session import cpu_session

from exporter.baked import BakedPrefill
from exporter.executor import FixedKeepPolicy, PlanExecutor
from exporter.onnx_export import export_prefill, export_vision
from exporter.sample import prepare_sample
from graph_passes.census import census
from graph_passes.tensorrt_lint import lint_tensorrt
from prune_core.cost import prefill_flops
from prune_core.errors import BuildError
from prune_core.ops import Group, Module, Operation

G, M = Group, Module
#: Key and rest pruned apart before the stage (in-graph key TopK + layout split, tie-broken selection),
#: both image groups pruned together after it.
COMBINED_OPS = frozenset(
    {
        Operation(0, G.IMG_REST, M.MLP), Operation(1, G.IMG_REST, M.KV), Operation(1, G.IMG_KEY, M.MLP),
        Operation(3, G.IMG_KEY, M.Q), Operation(3, G.IMG_REST, M.Q), Operation(3, G.IMG_KEY, M.KV),
        Operation(3, G.IMG_REST, M.KV),
    }
)  # fmt: skip
PLANS = {"keep": (frozenset(), {1: 8, 2: 3}), "combined": (COMBINED_OPS, {1: 6})}
#: Two prompts with different question lengths and images, both run by one exported graph.
PROMPTS = [
    (0, SQUARE_QUESTION),
    (5, "How many dogs are there in this picture, and where are they?"),
]


def _feeds(sample) -> dict[str, np.ndarray]:
    names = ["sys_embeds", "image_embeds", "text_embeds", "cls_attention"]
    return dict(zip(names, (x.numpy() for x in BakedPrefill.inputs_from_sample(sample)), strict=True))


@pytest.fixture(scope="module")
def samples(tiny_adapter):
    out = [prepare_sample(tiny_adapter, random_image(seed), q) for seed, q in PROMPTS]
    assert out[0].num_tokens != out[1].num_tokens
    return out


@pytest.fixture(scope="module")
def exported(tiny_adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {
        name: export_prefill(tiny_adapter, ops, keep, folder / f"{name}.onnx")
        for name, (ops, keep) in PLANS.items()
    }


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_exported_prefill_matches_executor_in_onnxruntime(plan: str, exported, tiny_adapter, samples) -> None:
    ops, keep = PLANS[plan]
    report = exported[plan]
    sess = cpu_session(report.path)
    executor = PlanExecutor(tiny_adapter)
    for sample in samples:  # one graph, two sequence lengths and images: no re-export
        ref = executor.prefill(sample, ops, FixedKeepPolicy(keep))
        out = sess.run(None, _feeds(sample))
        assert out[0].shape == (1, tiny_adapter.spec.vocab_size)
        assert np.abs(out[0][0] - ref.logits.numpy()).max() <= 1e-4
        assert int(out[0][0].argmax()) == int(ref.logits.argmax())
        assert ref.cache is not None
        for layer, cache in enumerate(ref.cache):  # cache rows are in layout order: sort by position
            order = np.argsort(out[3 + 3 * layer][0])
            np.testing.assert_allclose(out[1 + 3 * layer][0][:, order], cache.keys.numpy(), atol=1e-4)
            np.testing.assert_allclose(out[2 + 3 * layer][0][:, order], cache.values.numpy(), atol=1e-4)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_exported_graph_is_static_and_loadable(plan: str, exported) -> None:
    report = exported[plan]
    model = onnx.load(str(report.path))
    assert model.ir_version <= 13
    assert report.external_data is None and not report.path.with_name(report.path.name + ".data").exists()
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonZero", "Compress", "Unique", "Loop", "If"}
    assert "TopK" in ops  # token selection in-graph
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert dims["sys_embeds"][1] == "sys_len" and dims["text_embeds"][1] == "text_len"
    assert isinstance(dims["image_embeds"][1], int)
    assert report.seconds > 0


def test_exported_flops_equal_the_cost_model(exported, tiny_adapter, samples) -> None:
    spec = tiny_adapter.spec
    ops, keep = PLANS["combined"]
    lm_head = 2 * spec.hidden_size * spec.vocab_size  # one row; the cost model leaves the LM head out
    for sample in samples:
        ref = PlanExecutor(tiny_adapter).prefill(sample, ops, FixedKeepPolicy(keep))
        expected = prefill_flops(spec, ref.group_sizes_per_layer, ops)
        shapes = {k: list(v.shape) for k, v in _feeds(sample).items()}
        graph = census(exported["combined"].path, shapes)
        assert abs(graph.matmul_flops - expected) <= 0.01 * expected
        assert graph.matmul_flops - lm_head == expected == ref.flops
        dense = prefill_flops(spec, sample.sizes)
        assert graph.matmul_flops < dense  # pruned work is absent from the graph, not masked


def test_exported_graph_passes_the_tensorrt_lint(exported) -> None:
    for report in exported.values():
        assert lint_tensorrt(ir.load(str(report.path))) == []


def test_vision_graph_matches_adapter_with_dynamic_batch(tiny_adapter, tmp_path) -> None:
    report = export_vision(tiny_adapter, tmp_path / "vision.onnx")
    assert onnx.load(str(report.path)).ir_version <= 13
    sess = cpu_session(report.path)
    pixels = torch.cat([tiny_adapter.tokenize(random_image(s), "?").pixel_values for s in (1, 2, 3)])
    for batch in (pixels[:1], pixels):
        ref = tiny_adapter.vision(batch)
        features, cls = sess.run(None, {"pixel_values": batch.numpy()})
        assert features.shape == tuple(ref.features.shape)
        np.testing.assert_allclose(features, ref.features.numpy(), atol=1e-4)
        np.testing.assert_allclose(cls, ref.cls_attention.numpy(), atol=1e-5)


def test_export_refuses_a_dtype_other_than_the_models(tiny_adapter, tmp_path) -> None:
    with pytest.raises(BuildError, match="dtype"):
        export_prefill(tiny_adapter, (), None, tmp_path / "x.onnx", dtype="fp16")
