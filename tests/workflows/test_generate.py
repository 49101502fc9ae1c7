"""Answers through a build's graphs (embed, vision, prefill, decode) against the PyTorch executor's generate.

One 6-layer tiny model with 64 visual tokens; one build per plan kind (dense, GSOP, fixed schedule,
AutoPrune single and split, GSOP + AutoPrune), made once for the module. Every build answers three prompts
(different images, question lengths and AutoPrune complexities, hence schedule rows) through
:class:`engines.generate.GenerationRunner`; the reference is :meth:`PlanExecutor.generate` on the adapter's
own tokenisation, which shares no code with the runtime's prompt, embedding or decode path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import PROMPTS, on_targets, plan_kinds, random_image
from helpers.cli import assert_clean_error, run
from PIL import Image

from engines.generate import GenerationError, GenerationRunner
from exporter.adapters import load_adapter
from exporter.autoprune_policy import AutoPrunePolicy
from exporter.demo import build_demo_model
from exporter.executor import FixedKeepPolicy, PlanExecutor
from exporter.sample import prepare_sample
from prune_core.manifest import Manifest
from prune_core.ops import Group, Module, Operation
from prune_core.plan import AutoPruneSection, FixedScheduleSection
from prune_export.workflows.build import BuildSettings, build
from prune_export.workflows.selection import PlanChoice

G, M = Group, Module
LAYERS, VISUAL, NEW_TOKENS = 6, 64, 8
SECTION = AutoPruneSection(tokens=16, x0=3.0, gamma=8.0)  # renumbered positions, recycling on
GSOP_OPS = frozenset(
    {
        Operation(2, G.IMG_KEY, M.MLP), Operation(2, G.IMG_REST, M.MLP),
        Operation(3, G.IMG_KEY, M.Q), Operation(3, G.IMG_REST, M.Q),
        Operation(4, G.IMG_KEY, M.KV), Operation(4, G.IMG_REST, M.KV),
    }
)  # fmt: skip
SPLIT = {"autoprune-split": SECTION.model_copy(update={"positions": "original"})}  # built for TensorRT
#: dense, gsop, fixed, autoprune, autoprune-split, combined: (plan, target)
KINDS = on_targets(
    plan_kinds(SECTION, gsop=GSOP_OPS, fixed=[(1, 24), (3, 8)], split=SPLIT,
               combined=GSOP_OPS - {Operation(4, G.IMG_KEY, M.KV), Operation(4, G.IMG_REST, M.KV)}),
    tensorrt=SPLIT,
)  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("gen") / "m64", "tiny", seed=0, image_size=112, layers=LAYERS)


@pytest.fixture(scope="module")
def adapter(model: Path):
    adapter = load_adapter(model)
    assert (adapter.spec.num_layers, adapter.spec.visual_tokens) == (LAYERS, VISUAL)
    return adapter


@pytest.fixture(scope="module")
def builds(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-builds")
    out = {}
    for name, (choice, target) in KINDS.items():
        out[name] = root / name
        manifest = build(model, out[name], choice, BuildSettings(target=target), lambda message: None)
        assert manifest.check.status == "passed" and manifest.check.same_generation
    return out


def _policy(choice: PlanChoice, spec):
    if isinstance(choice.tokens, AutoPruneSection):
        return AutoPrunePolicy(choice.tokens, spec, mode="table")
    if isinstance(choice.tokens, FixedScheduleSection):
        return FixedKeepPolicy.from_stages([tuple(s) for s in choice.tokens.stages], choice.tokens.positions)
    return None


@pytest.mark.parametrize("kind", list(KINDS))
def test_answers_through_the_graphs_equal_the_executor(kind: str, builds, adapter) -> None:
    choice, target = KINDS[kind]
    executor = PlanExecutor(adapter)
    schedules = set()
    with GenerationRunner(builds[kind], provider="cpu") as runner:
        assert runner.manifest.prefill_layout == ("split" if target == "tensorrt" else "single")
        for seed, question in PROMPTS:
            got = runner.generate(random_image(seed), question, NEW_TOKENS, keep_logits=True)
            sample = prepare_sample(adapter, random_image(seed), question)
            ref = executor.generate(sample, choice.ops, _policy(choice, adapter.spec), max_new_tokens=NEW_TOKENS)
            assert got.token_ids == ref.token_ids, (seed, question)
            assert got.text == ref.text
            assert len(got.step_logits) == len(ref.step_logits) == len(ref.token_ids) + (len(ref.token_ids) < NEW_TOKENS)
            for mine, theirs in zip(got.step_logits, ref.step_logits, strict=True):
                assert np.abs(mine - theirs.numpy()).max() <= 1e-4
            assert got.stats.prompt_tokens == sample.num_tokens
            assert got.stats.new_tokens == len(ref.token_ids)
            # The caches the prefill handed to the decode steps: each layer as long as the executor's.
            grown = len(ref.token_ids) - (len(ref.token_ids) == NEW_TOKENS)  # the executor's decode steps
            assert got.stats.kv_tokens_per_layer == [int(c.keys.shape[1]) - grown for c in ref.prefill.cache]
            if isinstance(choice.tokens, AutoPruneSection):
                out = runner.prefill_runner.infer(runner.prefill_feeds(runner.prompt(random_image(seed), question)))
                schedules.add(tuple(int(k) for k in out["autoprune.keep"]))
                decision = ref.prefill.policy.decision
                assert list(out["autoprune.keep"]) == list(decision.schedule.keep)
                assert got.stats.autoprune["keep"] == list(decision.schedule.keep)
                assert got.stats.autoprune["merged"] == list(decision.schedule.merged)
                assert got.stats.autoprune["i1"] == pytest.approx(decision.i1, rel=1e-5)
    if kind != "dense" and kind != "gsop":
        assert min(got.stats.kv_tokens_per_layer) < max(got.stats.kv_tokens_per_layer)  # really pruned
    if isinstance(choice.tokens, AutoPruneSection):
        assert len(schedules) >= 2, schedules  # one graph, prompts on different schedule rows


def test_streaming_gives_the_same_text(builds) -> None:
    with GenerationRunner(builds["autoprune"], provider="cpu") as runner:
        for seed, question in PROMPTS[:2]:
            pieces = list(runner.stream(random_image(seed), question, NEW_TOKENS))
            answer = runner.generate(random_image(seed), question, NEW_TOKENS)
            assert "".join(pieces) == answer.text
            assert len(pieces) >= 2  # streamed, not one piece at the end


def test_eos_stops_generation(builds, tmp_path: Path) -> None:
    """Declare a token of a greedy answer an EOS token: the answer stops right before it."""
    copy = tmp_path / "eos"
    shutil.copytree(builds["autoprune"], copy)
    with GenerationRunner(copy, provider="cpu") as runner:
        answers = [(seed, q, runner.generate(random_image(seed), q, NEW_TOKENS).token_ids) for seed, q in PROMPTS]
    # The first answer with a token that did not occur before it, as late as possible (random weights repeat).
    seed, question, full, stop = max(
        ((seed, q, ids, i) for seed, q, ids in answers for i in range(len(ids)) if ids[i] not in ids[:i]),
        key=lambda row: row[3],
    )
    assert len(full) == NEW_TOKENS and stop >= 1, answers
    doc = json.loads((copy / "manifest.json").read_text())
    doc["generation"]["eos_token_ids"] = [full[stop]]
    (copy / "manifest.json").write_text(json.dumps(doc))
    with GenerationRunner(copy, provider="cpu") as runner:
        answer = runner.generate(random_image(seed), question, NEW_TOKENS)
        assert answer.token_ids == full[:stop]
        assert answer.stats.new_tokens == stop and len(answer.stats.decode_ms) == stop
        feeds = runner.prefill_feeds(runner.prompt(random_image(seed), question))
        assert list(runner.token_ids(feeds, NEW_TOKENS, stop_at_eos=False)) == full


def test_a_copied_build_runs_without_the_model_folder(builds, model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "build"
    shutil.copytree(builds["autoprune"], copy)
    with GenerationRunner(builds["autoprune"], provider="cpu") as runner:
        expected = runner.generate(random_image(1), PROMPTS[1][1], NEW_TOKENS)
    hidden = model.with_name(model.name + ".hidden")
    model.rename(hidden)
    try:
        with GenerationRunner(copy, provider="cpu") as runner:
            answer = runner.generate(random_image(1), PROMPTS[1][1], NEW_TOKENS)
    finally:
        hidden.rename(model)
    assert answer.token_ids == expected.token_ids and answer.text == expected.text


def test_bad_generation_input_is_refused(builds) -> None:
    with GenerationRunner(builds["dense"], provider="cpu") as runner:
        with pytest.raises(GenerationError, match="question is empty"):
            runner.generate(random_image(0), "  ", 4)
        with pytest.raises(GenerationError, match="max_new_tokens must be >= 1"):
            runner.generate(random_image(0), "What?", 0)


# -- CLI: run, eval BUILD_DIR, bench --generate ----------------------------------------------------------
@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    random_image(1).save(path)
    return path


def test_run_prints_the_answer_and_its_timings(builds, image_file: Path) -> None:
    with GenerationRunner(builds["autoprune"], provider="cpu") as runner:
        expected = runner.generate(random_image(1), PROMPTS[1][1], NEW_TOKENS)
    code, out = run("run", builds["autoprune"], "--image", image_file, "--question", PROMPTS[1][1],
                    "--max-new-tokens", NEW_TOKENS, "--json")  # fmt: skip
    assert code == 0, out
    doc = json.loads(out)
    assert doc["answer"] == expected.text and doc["new_tokens"] == len(expected.token_ids)
    assert doc["prompt_tokens"] == expected.stats.prompt_tokens
    assert doc["kv_tokens_per_layer"] == expected.stats.kv_tokens_per_layer
    assert doc["provider"] == "CPUExecutionProvider" and doc["ttft_ms"] > 0 and doc["decode_ms_per_token"] > 0
    code, plain = run("run", builds["autoprune"], "--image", image_file, "--question", PROMPTS[1][1],
                      "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    code_s, streamed = run("run", builds["autoprune"], "--image", image_file, "--question", PROMPTS[1][1],
                           "--max-new-tokens", NEW_TOKENS, "--stream")  # fmt: skip
    assert code == code_s == 0 and plain == streamed == expected.text + "\n"


def test_eval_of_a_build_answers_like_the_executor(builds, model: Path, demo_data: Path, tmp_path: Path) -> None:
    """The build's answers and FLOPs against ``eval MODEL_DIR`` with the same token policy (the executor)."""
    data = demo_data
    code, out = run("eval", builds["fixed"], "--data", data, "--json", "--max-new-tokens", 4,
                    "--samples-out", tmp_path / "build.jsonl")  # fmt: skip
    assert code == 0, out
    got = json.loads(out)
    code, out = run("eval", model, "--data", data, "--json", "--max-new-tokens", 4, "--keep-schedule", "1:24,3:8",
                    "--samples-out", tmp_path / "model.jsonl")  # fmt: skip
    assert code == 0, out
    ref = json.loads(out)
    assert got["engine"] == "onnxruntime" and got["provider"] == "CPUExecutionProvider"
    assert got["samples"] == ref["samples"] == 4 and got["accuracy"] == ref["accuracy"]
    assert got["dense_flops"] == ref["dense_flops"]
    assert abs(got["pruned_flops"] - ref["pruned_flops"]) <= 0.01 * ref["pruned_flops"]  # counted from the graph
    assert got["mean_visual_tokens_per_layer"] == ref["mean_visual_tokens_per_layer"]
    rows = [json.loads(line) for line in (tmp_path / "build.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "model.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in ref_rows]
    # agreement with the dense model: by default the executor of the model folder the manifest names
    assert got["reference"] == f"dense executor of {Path(model).resolve()}"
    assert got["agreement"] == ref["agreement"]
    assert [r["agrees"] for r in rows] == [r["agrees"] for r in ref_rows]
    assert got["mean_first_token_kl"] == pytest.approx(ref["mean_first_token_kl"], rel=1e-3, abs=1e-7)
    # ... or a dense build: its graphs give the same dense answers
    code, out = run("eval", builds["fixed"], "--data", data, "--json", "--max-new-tokens", 4,
                    "--reference", builds["dense"])  # fmt: skip
    via_build = json.loads(out)
    assert via_build["reference"] == f"dense build {builds['dense']}" and via_build["agreement"] == ref["agreement"]
    code, out = run("eval", builds["dense"], "--data", data, "--json", "--max-new-tokens", 4)
    dense = json.loads(out)
    assert dense["agreement"] == 1.0 and dense["mean_first_token_kl"] < 1e-6  # graphs vs executor: rounding only
    code, out = run("eval", builds["fixed"], "--data", data, "--json", "--max-new-tokens", 4, "--no-reference")
    assert json.loads(out)["agreement"] is None
    assert_clean_error(*run("eval", builds["fixed"], "--data", data, "--reference", builds["gsop"]),
                       "pruned or quantized build")  # fmt: skip
    code, out = run("eval", builds["fixed"], "--data", data, "--autoprune-tokens", 8)
    assert_clean_error(code, out, "--autoprune-tokens cannot change it")
    # Decoded three rows at a time by the batching scheduler: the same rows, answers and figures.
    code, out = run("eval", builds["fixed"], "--data", data, "--json", "--max-new-tokens", 4, "--batch-size", 3,
                    "--samples-out", tmp_path / "batched.jsonl")  # fmt: skip
    assert code == 0, out
    batched = json.loads(out)
    for key in ("samples", "accuracy", "dense_flops", "pruned_flops", "agreement", "mean_visual_tokens_per_layer"):
        assert batched[key] == got[key], key
    assert batched["mean_first_token_kl"] == pytest.approx(got["mean_first_token_kl"], rel=1e-6, abs=1e-9)
    batched_rows = [json.loads(line) for line in (tmp_path / "batched.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in batched_rows] == [r["prediction"] for r in rows]
    assert [r["line"] for r in batched_rows] == [r["line"] for r in rows]
    assert_clean_error(*run("eval", builds["fixed"], "--data", data, "--batch-size", 99),
                       "--batch-size must be between 1 and the build's decode batch bound 16")  # fmt: skip
    assert_clean_error(*run("eval", model, "--data", data, "--batch-size", 2), "build it first to batch")


#: Prompts of different lengths and images (AutoPrune: different schedule rows), decoded together.
BATCH_PROMPTS = [*PROMPTS, (5, "Describe everything you can see in this picture, please."), (6, "What?")]


@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_answers_equal_batch_one_answers(kind: str, builds) -> None:
    """Five prompts through the continuous-batching scheduler, three sequences per decode step (requests
    join as others finish): each answer equals the batch-1 runtime's token for token (fp32). AutoPrune
    sequences hold different KV counts per request and per layer in one batch."""
    items = [(random_image(seed), question) for seed, question in BATCH_PROMPTS]
    with GenerationRunner(builds[kind], provider="cpu") as runner:
        alone = [runner.generate(image, question, NEW_TOKENS) for image, question in items]
        together = runner.generate_batch(items, NEW_TOKENS, batch_size=3)
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert [a.text for a in together] == [a.text for a in alone]
    assert [a.stats.kv_tokens_per_layer for a in together] == [a.stats.kv_tokens_per_layer for a in alone]
    if isinstance(KINDS[kind][0].tokens, AutoPruneSection):
        assert len({tuple(a.stats.kv_tokens_per_layer) for a in together}) >= 3
        assert len({a.stats.autoprune["keep"][-1] for a in together}) >= 2  # different schedule rows


def test_bench_generate_times_both_builds(builds) -> None:
    code, out = run("bench", builds["autoprune"], "--baseline", builds["dense"], "--generate", 4, "--runs", 2,
                    "--warmup", 0, "--json")  # fmt: skip
    assert code == 0, out
    doc = json.loads(out)
    for key in ("dense_ttft_ms", "pruned_ttft_ms", "ttft_speedup", "dense_decode_ms_per_token",
                "pruned_decode_ms_per_token", "prefill_flops_speedup"):  # fmt: skip
        assert doc[key] > 0, key
    assert doc["ttft_speedup"] == pytest.approx(doc["dense_ttft_ms"] / doc["pruned_ttft_ms"])
    assert doc["new_tokens"] == 4 and doc["rounds"] == 2
    assert sum(doc["pruned_kv_tokens"]) < sum(doc["dense_kv_tokens"])
    assert doc["prefill_flops_speedup"] > 1.2  # the pruned graph really counts fewer matmul FLOPs


def test_run_refuses_bad_input_in_one_line(builds, image_file: Path, tmp_path: Path, demo_data: Path) -> None:
    def run_on(build: Path, **options: object) -> tuple[int, str]:
        args = {"--image": image_file, "--question": "What is it?", **options}
        return run("run", build, *[x for item in args.items() for x in item])

    assert_clean_error(*run_on(tmp_path), "not a build directory")
    assert_clean_error(*run_on(tmp_path / "absent"), "does not exist")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert_clean_error(*run_on(builds["dense"], **{"--image": not_image}), "cannot read image")
    assert_clean_error(*run_on(builds["dense"], **{"--image": tmp_path / "missing.png"}), "does not exist")
    assert_clean_error(*run_on(builds["dense"], **{"--question": "   "}), "question is empty")
    bomb = tmp_path / "bomb.png"  # a few KB that declare 200 megapixels: refused from the header, not decoded
    Image.new("1", (20000, 10000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    assert_clean_error(*run_on(builds["dense"], **{"--image": bomb}), "20000 x 10000 = 200,000,000 pixels, more than the limit")
    code, _ = run_on(builds["dense"], **{"--image": bomb, "--max-image-pixels": 300_000_000, "--max-new-tokens": 1})
    assert code == 0  # the limit is the user's to raise
    assert_clean_error(*run_on(builds["dense"], **{"--question": "caf\udce9?"}), "not UTF-8 text (byte 0xe9 at position 3)")
    assert_clean_error(*run_on(builds["dense"], **{"--question": "word " * 5000}), "more than the build's bound of 4096")
    code, output = run_on(builds["dense"], **{"--max-new-tokens": 0})  # click's own range check, as every command's
    assert code == 2 and "0 is not in the range x>=1" in output and "Traceback" not in output
    bound = Manifest.load(builds["dense"]).generation["max_new_tokens"]
    assert_clean_error(*run_on(builds["dense"], **{"--max-new-tokens": bound + 1}), f"the build's bound {bound}")
    assert_clean_error(*run("eval", builds["dense"], "--data", demo_data, "--no-reference",
                            "--max-new-tokens", bound + 1), f"the build's bound {bound}")
    broken = tmp_path / "broken"
    shutil.copytree(builds["dense"], broken)
    (broken / "decode.onnx").unlink()
    assert_clean_error(*run_on(broken), "decode.onnx is missing")
    shutil.rmtree(broken)
    shutil.copytree(builds["dense"], broken)
    data = (broken / "prefill.onnx").read_bytes()
    (broken / "prefill.onnx").write_bytes(data[: len(data) // 2])
    assert_clean_error(*run_on(broken), "prefill.onnx is truncated")
    (broken / "prefill.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert_clean_error(*run_on(broken), "prefill.onnx has sha256")


def test_grouped_query_attention_decodes_like_the_executor(tiny_gqa_model: Path, tmp_path: Path) -> None:
    """Two KV heads for four query heads: the decode graph's grouped attention against the executor's."""
    adapter = load_adapter(tiny_gqa_model)
    assert adapter.spec.num_kv_heads < adapter.spec.num_heads
    out = tmp_path / "gqa"
    choice = PlanChoice(tokens=AutoPruneSection(tokens=4))
    manifest = build(tiny_gqa_model, out, choice, BuildSettings(), lambda message: None)
    assert manifest.check.same_generation
    executor = PlanExecutor(adapter)
    with GenerationRunner(out, provider="cpu") as runner:
        for seed, question in PROMPTS[:2]:
            got = runner.generate(random_image(seed), question, NEW_TOKENS)
            ref = executor.generate(prepare_sample(adapter, random_image(seed), question), (),
                                    _policy(choice, adapter.spec), max_new_tokens=NEW_TOKENS)  # fmt: skip
            assert got.token_ids == ref.token_ids


def test_eval_of_an_autoprune_build_reports_the_graphs_decisions(builds, model: Path, demo_data: Path) -> None:
    """Per-sample AutoPrune decisions read from the graph equal the executor's in table mode."""
    code, out = run("eval", builds["autoprune"], "--data", demo_data, "--json", "--max-new-tokens", 2,
                    "--samples-out", builds["autoprune"].parent / "ap-rows.jsonl")  # fmt: skip
    assert code == 0, out
    code, out = run("eval", model, "--data", demo_data, "--json", "--max-new-tokens", 2, "--autoprune-tokens", 16,
                    "--autoprune-x0", 3, "--autoprune-gamma", 8, "--autoprune-mode", "table",
                    "--samples-out", builds["autoprune"].parent / "ap-ref.jsonl")  # fmt: skip
    assert code == 0, out
    rows = [json.loads(x) for x in (builds["autoprune"].parent / "ap-rows.jsonl").read_text().splitlines()]
    refs = [json.loads(x) for x in (builds["autoprune"].parent / "ap-ref.jsonl").read_text().splitlines()]
    assert len(rows) == len(refs) == 4
    for row, ref in zip(rows, refs, strict=True):
        got, want = row["token_decision"], ref["token_decision"]
        assert (got["keep"], got["merged"], got["n0"]) == (want["keep"], want["merged"], want["n0"])
        assert got["i1"] == pytest.approx(want["i1"], rel=1e-5) and got["k"] == pytest.approx(want["k"], rel=1e-4)
        assert row["prediction"] == ref["prediction"]
        assert row["visual_tokens_per_layer"] == ref["visual_tokens_per_layer"]
