"""AutoPrune baked into the prefill (exporter.baked.AutoPruneBake) against the executor's AutoPrunePolicy.

The model (built once per module): 6 decoder layers, 112 px images -> 64 visual tokens. AutoPrune at
``T = 16`` keeps ``N0 = 40`` tokens after layer 0 and recycles dropped ones after layers 1..4. ``x0 = 3``
puts the curve's knee inside 6 layers and ``gamma = 8`` spreads the three prompts' ``I1`` (about 0.008,
0.039 and 0.058 bits) over ``k`` = 0.34, 0.09 and 0 (none at a half grid step), so each prompt reads a
different schedule-table row, all from one graph.

The executor runs AutoPrune with ``mode="table"`` (what every graph does). Graph caches are in layout order;
they are compared with the executor's sorted by position (a stable sort: merged tokens keep their place
after the kept tokens that share their position).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from helpers import PROMPTS, random_image
from helpers.ort_session import cpu_session
from torch import nn

from exporter.adapters import load_adapter
from exporter.autoprune_policy import AutoPrunePolicy
from exporter.baked import AutoPruneBake, BakedPrefill, _count
from exporter.demo import build_demo_model
from exporter.executor import PlanExecutor, PrefillResult
from exporter.onnx_export import OnnxFromPlan
from exporter.sample import prepare_sample
from graph_passes import census, lint_tensorrt
from graph_passes.tensorrt_parser import parser_findings
from prune_core.autoprune import recycle, recycle_tokens, steepness
from prune_core.errors import BuildError
from prune_core.ops import Group, Module, Operation
from prune_core.plan import AutoPruneSection

G, M = Group, Module
LAYERS, VISUAL = 6, 64
SECTION = AutoPruneSection(tokens=16, x0=3.0, gamma=8.0)  # renumbered positions, recycling on
#: The TensorRT split graphs are exported with the other position mode, so both reach ONNX Runtime.
TRT_SECTION = AutoPruneSection(tokens=16, x0=3.0, gamma=8.0, positions="original")
INPUTS = ("sys_embeds", "image_embeds", "text_embeds", "cls_attention")

#: GSOP ops that prune both image groups together after AutoPrune's first selection (one mixed image block).
COMBINED_OPS = frozenset(
    {
        Operation(2, G.IMG_KEY, M.MLP), Operation(2, G.IMG_REST, M.MLP),
        Operation(3, G.IMG_KEY, M.Q), Operation(3, G.IMG_REST, M.Q),
    }
)  # fmt: skip
#: Plus ops at layer 0 that prune img_rest alone (before the first selection: the key/rest layout split),
#: and every image token's K/V at layer 4 (text attention to them is 0 there: scores tie, lower index wins).
COMBINED_SPLIT_OPS = COMBINED_OPS | {
    Operation(0, G.IMG_REST, M.MLP),
    Operation(0, G.IMG_REST, M.Q),
    Operation(4, G.IMG_KEY, M.KV),
    Operation(4, G.IMG_REST, M.KV),
}


def _section(positions: str, recycle_on: bool) -> AutoPruneSection:
    return SECTION.model_copy(update={"positions": positions, "recycle": recycle_on})


def _bake(section: AutoPruneSection, score_dtype: torch.dtype = torch.float64) -> AutoPruneBake:
    return AutoPruneBake.for_model(section, LAYERS, VISUAL, score_dtype=score_dtype)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):
    folder = build_demo_model(
        tmp_path_factory.mktemp("ap64") / "m64", "tiny", seed=0, image_size=112, layers=LAYERS
    )
    adapter = load_adapter(folder)
    assert (adapter.spec.num_layers, adapter.spec.visual_tokens) == (LAYERS, VISUAL)
    return adapter


@pytest.fixture(scope="module")
def samples(adapter):
    out = [prepare_sample(adapter, random_image(seed), question) for seed, question in PROMPTS]
    assert len({s.num_tokens for s in out}) == len(out)
    return out


@pytest.fixture(scope="module")
def executor(adapter) -> PlanExecutor:
    return PlanExecutor(adapter)


def _reference(executor: PlanExecutor, sample, section: AutoPruneSection, ops=()) -> PrefillResult:
    policy = AutoPrunePolicy(section, executor.spec, mode="table")
    return executor.prefill(sample, ops, policy)


def _torch_outputs(module: BakedPrefill, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    assert len(out) == len(module.output_names)
    return dict(zip(module.output_names, out, strict=True))


def _np(out: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _feeds(sample) -> dict[str, np.ndarray]:
    return dict(
        zip(INPUTS, (x.float().numpy() for x in BakedPrefill.inputs_from_sample(sample)), strict=True)
    )


def _check_against(out: dict[str, np.ndarray], ref: PrefillResult, atol: float) -> None:
    """Logits, every layer's cache (sorted by position, stable) and the schedule row against the executor."""
    assert ref.cache is not None
    logits = np.asarray(out["logits"])[0]
    assert np.abs(logits.astype(np.float64) - ref.logits.double().numpy()).max() <= atol
    assert int(logits.argmax()) == int(ref.logits.argmax())
    assert len(ref.cache) == LAYERS
    for layer, cache in enumerate(ref.cache):
        pos = np.asarray(out[f"present.{layer}.position"])[0]
        order = np.argsort(pos, kind="stable")
        keys = np.asarray(out[f"present.{layer}.key"])[0][:, order]
        values = np.asarray(out[f"present.{layer}.value"])[0][:, order]
        assert keys.shape == tuple(cache.keys.shape), (
            f"layer {layer}: {keys.shape} vs {tuple(cache.keys.shape)}"
        )
        assert int(pos.max()) + 1 == cache.next_position, f"layer {layer}"
        np.testing.assert_allclose(keys, cache.keys.numpy(), rtol=0, atol=atol, err_msg=f"layer {layer} keys")
        np.testing.assert_allclose(
            values, cache.values.numpy(), rtol=0, atol=atol, err_msg=f"layer {layer} values"
        )
    decision = ref.policy.decision
    assert [int(x) for x in np.asarray(out["autoprune.keep"])] == list(decision.schedule.keep)
    assert [int(x) for x in np.asarray(out["autoprune.merged"])] == list(decision.schedule.merged)
    assert float(np.asarray(out["autoprune.complexity"]).reshape(-1)[0]) == pytest.approx(
        decision.i1, abs=1e-6
    )


# -- eager BakedPrefill vs the executor ----------------------------------------------------------------------


@pytest.mark.parametrize("recycle_on", [True, False], ids=["recycle", "no-recycle"])
@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_eager_autoprune_matches_executor(
    positions: str, recycle_on: bool, adapter, executor, samples
) -> None:
    section = _section(positions, recycle_on)
    module = BakedPrefill(adapter, autoprune=_bake(section)).eval()
    assert module.positions == positions
    rows = set()
    for sample in samples:
        ref = _reference(executor, sample, section)
        out = _torch_outputs(module, BakedPrefill.inputs_from_sample(sample))
        assert out["logits"].shape == (1, adapter.spec.vocab_size)
        assert (out["logits"][0] - ref.logits).abs().max() <= 1e-5
        _check_against(_np(out), ref, atol=1e-5)
        decision = ref.policy.decision
        rows.add(tuple(decision.schedule.keep))
        # Really pruned: N0 after layer 0, then the row's counts (plus merged tokens when recycling).
        assert ref.visual_tokens_per_layer[:2] == [VISUAL, 40]
        merged = decision.schedule.merged if recycle_on else (0,) * (LAYERS - 1)
        expect = [k + c for k, c in zip(decision.schedule.keep, merged, strict=True)][: LAYERS - 2]
        assert ref.visual_tokens_per_layer[2:] == expect
    assert len(rows) >= 2, rows  # one module, prompts on different schedule rows


@pytest.mark.parametrize("ops", [COMBINED_OPS, COMBINED_SPLIT_OPS], ids=["both-groups", "layer0-split"])
def test_eager_autoprune_with_gsop_ops_matches_executor(ops, adapter, executor, samples) -> None:
    module = BakedPrefill(adapter, ops, autoprune=_bake(SECTION)).eval()
    assert module.split_key == (ops == COMBINED_SPLIT_OPS)
    for sample in samples:
        ref = _reference(executor, sample, SECTION, ops)
        alone = _reference(executor, sample, SECTION)
        assert ref.flops < alone.flops  # the ops removed work on top of AutoPrune
        out = _torch_outputs(module, BakedPrefill.inputs_from_sample(sample))
        _check_against(_np(out), ref, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2, 4])
@pytest.mark.parametrize("group", [G.IMG_KEY, G.IMG_REST])
def test_pruning_one_image_group_after_the_first_selection_is_refused(
    layer: int, group: Group, adapter
) -> None:
    with pytest.raises(BuildError, match=f"layer {layer} prunes mlp"):
        BakedPrefill(adapter, {Operation(layer, group, M.MLP)}, autoprune=_bake(SECTION))
    # Before AutoPrune's first selection (layer 0) one group alone is fine: the layout splits key from rest.
    assert BakedPrefill(adapter, {Operation(0, group, M.MLP)}, autoprune=_bake(SECTION)).split_key


@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_head_and_tail_reproduce_the_full_prefill_exactly(positions: str, adapter, samples) -> None:
    section = _section(positions, True)
    bake = _bake(section)
    full, head, tail = (
        BakedPrefill(adapter, autoprune=bake, part=p).eval() for p in ("full", "head", "tail")
    )
    assert tail.input_names == [*BakedPrefill.TAIL_STATE, "keep_counts", "merged_counts"]
    for sample in samples:
        inputs = BakedPrefill.inputs_from_sample(sample)
        ref = _torch_outputs(full, inputs)
        first = _torch_outputs(head, inputs)
        i1 = float(first["autoprune.complexity"][0])
        row = bake.table.lookup(steepness(i1, section.k0, section.gamma))
        keep = torch.tensor(row.keep, dtype=torch.int64)
        merged = torch.tensor(row.merged, dtype=torch.int64)
        second = _torch_outputs(tail, (*(first[name] for name in BakedPrefill.TAIL_STATE), keep, merged))
        assert torch.equal(keep, ref["autoprune.keep"]) and torch.equal(merged, ref["autoprune.merged"])
        assert torch.equal(first["autoprune.complexity"], ref["autoprune.complexity"])
        assert torch.equal(second["logits"], ref["logits"])
        for layer in range(LAYERS):
            part = first if layer < 2 else second
            for kind in ("key", "value", "position"):
                name = f"present.{layer}.{kind}"
                assert torch.equal(part[name], ref[name]), name


# -- recycling: the graph clusters as the executor does --------------------------------------------------------


class _Recycle(nn.Module):
    """``recycle_tokens`` as ``AutoPruneBake`` runs it: the candidate and cluster counts are run-time values."""

    def forward(
        self, hidden: torch.Tensor, n_candidates: torch.Tensor, n_clusters: torch.Tensor
    ) -> torch.Tensor:
        n = _count(n_candidates, hidden.shape[0])
        c = _count(torch.minimum(n_clusters, n_candidates), n)
        return recycle_tokens(hidden.index_select(0, torch.arange(n)), c)


@pytest.fixture(scope="module")
def recycle_graphs(tmp_path_factory: pytest.TempPathFactory):
    """ONNX Runtime sessions of the exported ``recycle_tokens``, by (dtype, hidden size), exported once each."""
    folder = tmp_path_factory.mktemp("recycle_onnx")
    sessions: dict[tuple[torch.dtype, int], ort.InferenceSession] = {}

    def get(dtype: torch.dtype, dim: int) -> ort.InferenceSession:
        if (dtype, dim) not in sessions:
            path = folder / f"recycle_{str(dtype).split('.')[-1]}_{dim}.onnx"
            args = (torch.randn(40, dim, dtype=dtype), torch.tensor(13), torch.tensor(2))
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    _Recycle(), args, dynamo=True, input_names=["hidden", "n_candidates", "n_clusters"],
                    output_names=["merged"], dynamic_shapes=({0: torch.export.Dim("n", min=1, max=64)}, None, None),
                    opset_version=18, optimize=True, verbose=False,
                )  # fmt: skip
            program.save(str(path), external_data=False)
            sessions[dtype, dim] = cpu_session(path)
        return sessions[dtype, dim]

    return get


def _tie_candidates(dim: int) -> dict[str, torch.Tensor]:
    """Candidates whose densities, distances and centre scores tie exactly (ties break by index)."""
    gen = torch.Generator().manual_seed(dim)
    dup = torch.randn(12, dim, generator=gen, dtype=torch.float64)
    dup[1] = dup[0]
    dup[3] = dup[4] = dup[5] = dup[2]
    grid = torch.zeros(14, dim, dtype=torch.float64)
    grid[:, :2] = torch.tensor([[i % 4, i // 4] for i in range(14)], dtype=torch.float64)
    return {
        "line": torch.arange(10, dtype=torch.float64).unsqueeze(1).repeat(1, dim),  # equal gaps
        "grid": grid,  # a lattice: many equal distances
        "simplex": 3 * torch.eye(dim, dtype=torch.float64),  # every distance equal
        "same": torch.ones(6, dim, dtype=torch.float64),  # one point six times
        "duplicates": dup,
        "single": dup[:1],
    }


def _cluster_counts(n: int) -> list[int]:
    return sorted({0, 1, 2, n // 2, n - 1, n} & set(range(n + 1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_exported_recycle_tokens_clusters_as_the_executor_on_ties(dtype: torch.dtype, recycle_graphs) -> None:
    """The traced ``recycle_tokens`` on ONNX Runtime against the eager one (float64: the executor's ``recycle``).

    Eager and graph spell the distances and the cluster sums differently (cdist and MatMul vs. written out,
    see ``prune_core.autoprune``), so the last bits may differ; any other clustering moves a merged token far.
    """
    dim = 4  # sqrt(4) is exact in every dtype
    sess = recycle_graphs(dtype, dim)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, hidden in _tie_candidates(dim).items():
        n = hidden.shape[0]
        x = hidden.to(dtype)
        for clusters in _cluster_counts(n):
            (got,) = sess.run(
                None, {"hidden": x.numpy(), "n_candidates": np.array(n), "n_clusters": np.array(clusters)}
            )
            if dtype == torch.float64:  # every row a candidate (equal scores), as the executor calls it
                expected = recycle(x, torch.ones(n, dtype=dtype), n_candidates=n, n_clusters=clusters)
            else:
                expected = recycle_tokens(x, clusters)
            assert got.shape == tuple(expected.shape) == (clusters, dim), (name, clusters)
            np.testing.assert_allclose(
                got, expected.numpy(), rtol=0, atol=atol, err_msg=f"{name}, c={clusters}"
            )


def test_exported_recycle_tokens_float64_ties_at_a_non_square_hidden_size(recycle_graphs) -> None:
    """sqrt(3) must stay float64 in the graph: rounded to float32 it splits the exact tie of points 0 and 9."""
    hidden = torch.arange(10, dtype=torch.float64).unsqueeze(1).repeat(1, 3)  # centres: 0..8, or 1..9?
    (got,) = recycle_graphs(torch.float64, 3).run(
        None, {"hidden": hidden.numpy(), "n_candidates": np.array(10), "n_clusters": np.array(9)}
    )
    # Points 0 and 9 tie as the least dense; the lower index wins a centre, so 9 joins centre 8 (hand-computed).
    expected = np.array([[float(i)] * 3 for i in range(8)] + [[8.5] * 3])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(recycle_tokens(hidden, 9).numpy(), expected, rtol=0, atol=1e-12)  # the executor's


# -- ONNX: one full graph, three prompts ---------------------------------------------------------------------


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def full_graph(adapter, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("ap_onnx") / "prefill.onnx"
    return OnnxFromPlan(adapter, autoprune=_bake(SECTION))(path)


def test_onnx_autoprune_graph_matches_executor_on_three_prompts(full_graph, executor, samples) -> None:
    model = onnx.load(str(full_graph.path))
    assert not {n.op_type for n in model.graph.node} & {"NonZero", "Compress", "Unique", "Loop", "If"}
    sess = cpu_session(full_graph.path)
    rows = []
    for sample in samples:  # one graph: three prompt lengths, images and schedule rows, no re-export
        ref = _reference(executor, sample, SECTION)
        out = _run(sess, _feeds(sample))
        _check_against(out, ref, atol=1e-4)
        rows.append(tuple(int(x) for x in out["autoprune.keep"]))
    assert len(set(rows)) >= 2, rows


def test_onnx_autoprune_census_flops_equal_the_executors(full_graph, adapter, executor, samples) -> None:
    spec = adapter.spec
    lm_head = 2 * spec.hidden_size * spec.vocab_size  # the graph's one logits row; the executor leaves it out
    seen = set()
    for sample in samples:
        ref = _reference(executor, sample, SECTION)
        graph = census(full_graph.path, input_values=_feeds(sample))
        assert not graph.uncounted
        assert abs(graph.matmul_flops - lm_head - ref.flops) <= 0.01 * ref.flops
        assert graph.matmul_flops - lm_head == ref.flops
        seen.add(ref.flops)
    assert len(seen) == len(samples)  # prompt-dependent work, counted from one graph


def test_every_topk_asks_for_at_least_one(full_graph, samples, tmp_path: Path) -> None:
    """ONNX requires a positive K (OpenVINO refuses K = 0), and a layer can merge 0 tokens or have 0 neighbours.

    Seen two ways: the graph proves every K >= 1 (value ranges, no recorded input bounds needed), and every K
    the three prompts reach, read as extra graph outputs, is at least 1.
    """
    assert [f for f in parser_findings(ir.load(str(full_graph.path))) if f.op_type == "TopK"] == []
    model = onnx.load(str(full_graph.path))
    ks = list(dict.fromkeys(n.input[1] for n in model.graph.node if n.op_type == "TopK"))
    assert len(ks) >= 10
    model.graph.output.extend(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.INT64, None) for k in ks)
    onnx.save(model, str(tmp_path / "ks.onnx"))
    sess = cpu_session(tmp_path / "ks.onnx")
    reached = set()
    for sample in samples:
        out = _run(sess, _feeds(sample))
        reached |= {int(out[k].reshape(-1)[0]) for k in ks}
    assert min(reached) >= 1, sorted(reached)
    assert 1 in reached  # a count of 0 was asked for: the pad made it K = 1


# -- the TensorRT target: head + host lookup + tail ----------------------------------------------------------


@pytest.fixture(scope="module")
def split_graphs(adapter, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ap_trt")
    bake = _bake(TRT_SECTION, torch.float32)
    return {
        part: OnnxFromPlan(adapter, autoprune=bake, part=part)(folder / f"{part}.onnx")
        for part in ("head", "tail")
    }


def _graph_inputs_upstream(graph: ir.Graph, value: ir.Value) -> set[str]:
    """Names of the graph inputs that ``value`` is computed from."""
    inputs = {v.name for v in graph.inputs}
    seen: set[int] = set()
    found: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.name in inputs:
            found.add(v.name)
        node = v.producer()
        if node is not None:
            stack.extend(node.inputs)
    return found


def test_split_graphs_pass_the_tensorrt_lint(split_graphs) -> None:
    for part, report in split_graphs.items():
        model = ir.load(str(report.path))
        assert lint_tensorrt(model) == [], part
        assert not {n.op_type for n in model.graph} & {"NonZero", "Compress", "Unique"}, part
    tail = ir.load(str(split_graphs["tail"].path))
    by_name = {v.name: v for v in tail.graph.inputs}
    for name in ("keep_counts", "merged_counts"):
        assert by_name[name].dtype == ir.DataType.INT64
        assert by_name[name].shape is not None and list(by_name[name].shape) == [LAYERS - 1]
    # The run-time TopKs (at least one per selection after layers 1..L-2) take their K from keep_counts.
    topk_sources = [
        _graph_inputs_upstream(tail.graph, n.inputs[1]) for n in tail.graph if n.op_type == "TopK"
    ]
    from_keep = [s for s in topk_sources if "keep_counts" in s]
    assert len(from_keep) >= LAYERS - 2, topk_sources
    head = onnx.load(str(split_graphs["head"].path))
    assert [i.name for i in head.graph.input] == list(INPUTS)
    assert "autoprune.complexity" in [o.name for o in head.graph.output]


def test_split_graphs_match_executor_through_the_host_lookup(split_graphs, executor, samples) -> None:
    head, tail = cpu_session(split_graphs["head"].path), cpu_session(split_graphs["tail"].path)
    table = _bake(TRT_SECTION, torch.float32).table
    rows = []
    for sample in samples:
        ref = _reference(executor, sample, TRT_SECTION)
        first = _run(head, _feeds(sample))
        i1 = float(first["autoprune.complexity"].reshape(-1)[0])
        assert first["autoprune.complexity"].dtype == np.float32
        assert math.isclose(i1, ref.policy.decision.i1, abs_tol=1e-5)
        row = table.lookup(steepness(i1, TRT_SECTION.k0, TRT_SECTION.gamma))
        keep, merged = np.asarray(row.keep, dtype=np.int64), np.asarray(row.merged, dtype=np.int64)
        second = _run(tail, {**{k: first[k] for k in BakedPrefill.TAIL_STATE}, "keep_counts": keep,
                             "merged_counts": merged})  # fmt: skip
        out = {**first, **second, "autoprune.keep": keep, "autoprune.merged": merged}
        _check_against(out, ref, atol=1e-4)
        rows.append(tuple(row.keep))
    assert len(set(rows)) >= 2, rows
