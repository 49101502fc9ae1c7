"""`prune-export sweep`: its report against `eval` of the same options, agreement, resume, plots, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import assert_clean_error, run
from PIL import Image

from exporter.adapters import load_spec
from prune_core.ops import Group, Module, Operation
from prune_core.plan import Plan
from prune_core.spec import GroupSizes, ModelSpec

NEW_TOKENS = 3
#: Sweep options and, per configuration name, the `eval` options that evaluate the same configuration.
SWEEP = ["--budgets", "1,0.7", "--autoprune-tokens", "4", "--keep-schedule", "1:16", "--keep-schedule", "1:2",
         "--config", "autoprune:4:original", "--config", "gsop:0.7+fixed:1:8", "--config", "autoprune:4+gsop:0.7"]
EVAL_OPTIONS = {
    "dense": [],
    "gsop-1": ["--plan", "PLAN", "--budget", "1"],
    "gsop-0.7": ["--plan", "PLAN", "--budget", "0.7"],
    "autoprune-4": ["--autoprune-tokens", "4"],
    "fixed-1x16": ["--keep-schedule", "1:16"],
    "fixed-1x2": ["--keep-schedule", "1:2"],
    "autoprune-4-original": ["--autoprune-tokens", "4", "--autoprune-positions", "original"],
    "gsop-0.7+fixed-1x8": ["--plan", "PLAN", "--budget", "0.7", "--keep-schedule", "1:8"],
    "gsop-0.7+autoprune-4": ["--plan", "PLAN", "--budget", "0.7", "--autoprune-tokens", "4"],
}


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A plan on the tiny model whose steps prune most of the image tokens' work in layers 1-3."""
    spec = load_spec(tiny_model)
    steps = [[Operation(layer, group, module) for group in (Group.IMG_REST, Group.IMG_KEY) for module in Module]
             for layer in (3, 2, 1)]  # fmt: skip
    path = tmp_path_factory.mktemp("sweep-plan") / "plan.json"
    Plan.new(spec, GroupSizes.for_prompt(spec, 4, 12), steps).save(path)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_data: Path, plan_file: Path) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "report"
    code, text = run("sweep", tiny_model, "--data", demo_data, "--out", out, "--plan", plan_file, *SWEEP,
                     "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    assert code == 0, text
    assert "9 configuration(s) evaluated, 0 kept" in text
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _assert_png(path: Path) -> None:
    """A PNG that decodes, of a plot's size, with a drawing on it (not one flat colour)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 400 and img.height >= 300
        pixels = np.asarray(img.convert("L"))
    assert len(np.unique(pixels)) > 20  # axes, labels, lines


def test_report_rows_equal_eval_of_the_same_options(sweep: Path, tiny_model: Path, demo_data: Path,
                                                    plan_file: Path) -> None:
    rows = {row["name"]: row for row in _report(sweep)["configs"]}
    assert list(rows) == list(EVAL_OPTIONS)
    for name, options in EVAL_OPTIONS.items():
        options = [str(plan_file) if o == "PLAN" else o for o in options]
        code, out = run("eval", tiny_model, "--data", demo_data, *options, "--max-new-tokens", NEW_TOKENS, "--json")
        assert code == 0, out
        ev, row = json.loads(out), rows[name]
        for key in ("samples", "accuracy", "agreement", "flops_ratio", "mean_flops_ratio",
                    "mean_visual_tokens_per_layer"):  # fmt: skip
            assert row[key] == ev[key], (name, key)
        assert row["mean_first_token_kl"] == pytest.approx(ev["mean_first_token_kl"], abs=1e-9)
        assert row["pruned_flops_per_sample"] == ev["pruned_flops"] / ev["samples"]
        retention = None if not rows["dense"]["accuracy"] else ev["accuracy"] / rows["dense"]["accuracy"]
        assert row["retention"] == retention


def test_agreement_is_one_for_dense_and_for_plans_that_prune_nothing(sweep: Path) -> None:
    rows = {row["name"]: row for row in _report(sweep)["configs"]}
    # dense, the plan at budget 1 (no step) and a schedule that keeps all 16 visual tokens prune nothing
    for name in ("dense", "gsop-1", "fixed-1x16"):
        assert rows[name]["agreement"] == 1.0, name
    assert rows["dense"]["mean_first_token_kl"] == rows["gsop-1"]["mean_first_token_kl"] == 0.0
    assert rows["fixed-1x16"]["mean_first_token_kl"] < 1e-7  # the same tokens through TopK: rounding only
    assert rows["fixed-1x16"]["flops_ratio"] == 1.0
    # keeping 2 of 16 visual tokens after layer 1, and the plan's first step, change answers
    for name in ("fixed-1x2", "gsop-0.7"):
        assert rows[name]["flops_ratio"] < 0.9
        assert rows[name]["agreement"] < 1.0, name
        assert rows[name]["mean_first_token_kl"] > 1e-5, name


def test_agreement_counts_answers_identical_to_huggingface_greedy_answers(sweep: Path, tiny_model: Path,
                                                                          demo_data: Path) -> None:
    """The dense answers agreement compares with are HuggingFace's greedy answers; agreement is their share."""
    from calib.data import load_rows
    from exporter.adapters import load_adapter

    adapter = load_adapter(tiny_model)
    hf = {}
    for row in load_rows(demo_data):
        tokens = adapter.tokenize(row.load_image(), row.question)
        ids = adapter.model.generate(input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values,
                                     max_new_tokens=NEW_TOKENS, do_sample=False)[0, tokens.input_ids.shape[0]:]  # fmt: skip
        hf[row.line] = adapter.decode([int(i) for i in ids if int(i) not in adapter.eos_token_ids])
    # The sweep's dense answers, which every agreement compares with, are HuggingFace's own greedy answers
    # (an independent reference, not dense compared with itself).
    dense = json.loads((sweep / "configs" / "dense.json").read_text())["eval"]["results"]
    assert [s["prediction"] for s in dense] == [hf[s["line"]] for s in dense]
    assert all(s["agrees"] for s in dense)
    for name in ("fixed-1x2", "autoprune-4", "gsop-0.7"):
        samples = json.loads((sweep / "configs" / f"{name}.json").read_text())["eval"]["results"]
        same = [s["prediction"] == hf[s["line"]] for s in samples]
        assert [s["agrees"] for s in samples] == same
        assert _report(sweep)["configs"][list(EVAL_OPTIONS).index(name)]["agreement"] == sum(same) / len(same)


def test_report_files_and_plots(sweep: Path) -> None:
    report = _report(sweep)
    assert report["plots"] == ["fidelity.png", "ladder.png", "visual_tokens.png"]
    for name in report["plots"]:
        _assert_png(sweep / name)
    md = (sweep / "report.md").read_text()
    for name in EVAL_OPTIONS:
        assert f"| {name} |" in md
    for name in report["plots"]:
        assert f"]({name})" in md
    assert report["ladder"]["flops_ratio"][0] == 1.0 and len(report["ladder"]["flops_ratio"]) == 4
    assert list(report["autoprune_curves"]) == ["autoprune-4", "autoprune-4-original", "gsop-0.7+autoprune-4"]
    curves = report["autoprune_curves"]["autoprune-4"]
    assert len(curves) == 4 and all(c["visual_tokens_per_layer"][0] == 16 for c in curves)
    assert [c["series"] for c in report["configs"]] == [
        "dense", "gsop", "gsop", "autoprune", "fixed", "fixed", "autoprune-original", "gsop+fixed", "gsop+autoprune"]


def test_plan_show_plot_draws_the_ladder(plan_file: Path, tmp_path: Path) -> None:
    code, out = run("plan", "show", plan_file, "--budget", "0.7", "--plot", tmp_path / "ladder.png")
    assert code == 0, out
    _assert_png(tmp_path / "ladder.png")
    assert_clean_error(*run("plan", "show", plan_file, "--plot", tmp_path / "ladder.svg"), "ending in .png")


def test_an_interrupted_sweep_resumes_without_redoing_finished_configurations(
        sweep: Path, tiny_model: Path, demo_data: Path, plan_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import calib.evaluate

    real = calib.evaluate.evaluate
    calls: list[str] = []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append("run")
        return real(*args, **kwargs)

    out = tmp_path / "report"
    args = ["sweep", tiny_model, "--data", demo_data, "--out", out, "--plan", plan_file, *SWEEP,
            "--max-new-tokens", NEW_TOKENS]  # fmt: skip
    monkeypatch.setattr(calib.evaluate, "evaluate", interrupted)
    from click.testing import CliRunner

    from prune_export.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and "interrupted: 3 finished configuration(s) are kept" in result.output
    assert sorted(p.stem for p in (out / "configs").glob("*.json")) == ["dense", "gsop-0.7", "gsop-1"]
    assert not (out / "report.json").exists()
    calls.clear()
    monkeypatch.setattr(calib.evaluate, "evaluate", lambda *a, **k: (calls.append("run"), real(*a, **k))[1])
    code, text = run(*args)
    assert code == 0, text
    assert len(calls) == 6  # autoprune-4, fixed-1x16, fixed-1x2 and the three --config ones
    assert "kept 3 finished configuration(s)" in text and "6 configuration(s) evaluated, 3 kept" in text
    resumed, whole = _report(out)["configs"], _report(sweep)["configs"]
    for a, b in zip(resumed, whole, strict=True):
        for key in ("name", "accuracy", "agreement", "flops_ratio", "mean_visual_tokens_per_layer"):
            assert a[key] == b[key], (a["name"], key)
    calls.clear()
    code, text = run(*args)
    assert code == 0 and calls == [] and "0 configuration(s) evaluated, 9 kept" in text


def test_a_report_directory_of_other_inputs_is_refused(sweep: Path, tiny_model: Path, demo_data: Path,
                                                       plan_file: Path) -> None:
    code, out = run("sweep", tiny_model, "--data", demo_data, "--out", sweep, "--plan", plan_file, *SWEEP,
                    "--max-new-tokens", NEW_TOKENS + 1)  # fmt: skip
    assert_clean_error(code, out, "differs in max_new_tokens")


def test_bad_input_is_one_line(tiny_model: Path, demo_data: Path, plan_file: Path, tmp_path: Path) -> None:
    base = ["sweep", tiny_model, "--data", demo_data, "--out", tmp_path / "r"]
    assert_clean_error(*run(*base, "--config", "magic:3"), "unknown method 'magic'")
    assert_clean_error(*run(*base, "--config", "autoprune:4+fixed:1:8"), "one plan and one token policy at most")
    assert_clean_error(*run(*base, "--config", "dense+autoprune:4"), "dense combines with nothing")
    assert_clean_error(*run(*base, "--config", "autoprune:4:shuffled"), "must be renumbered or original")
    assert_clean_error(*run(*base, "--config", "gsop:0.5:original", "--plan", plan_file), "has one value")
    assert_clean_error(*run(*base, "--config", "autoprune:4@int4"), "use @int8 or @int8-weights")
    assert_clean_error(*run(*base, "--autoprune-tokens", "4", "--autoprune-positions", "kept"),
                       "kept is not one of renumbered, original")
    assert_clean_error(*run(*base, "--quantize", "int8"), "pass --calib CALIB.jsonl")
    assert_clean_error(*run(*base, "--autoprune-tokens", "4", "--calib", demo_data), "drop --calib")
    assert_clean_error(*run(*base, "--quantize", "int8-weights", "--dtype", "fp16"), "--dtype fp32")
    assert_clean_error(*run(*base, "--plan", plan_file, "--budgets", "0.5,1.5"), "(0, 1]")
    assert_clean_error(*run(*base, "--plan", plan_file, "--budgets", "0"), "(0, 1]")
    assert_clean_error(*run(*base, "--budgets", "0.5"), "need --plan")
    assert_clean_error(*run(*base, "--plan", plan_file, "--budgets", "half"), "comma-separated list of numbers")
    assert_clean_error(*run(*base, "--autoprune-tokens", "0"), "must be > 0")
    assert_clean_error(*run(*base), "nothing to compare with dense")
    other = ModelSpec("llava", 4, 64, 128, 4, 2, 16, 400, 16, 56, 14, 3, 32)
    foreign = tmp_path / "foreign.json"
    Plan.new(other, GroupSizes.for_prompt(other, 4, 12), [[Operation(1, Group.IMG_REST, Module.Q)]]).save(foreign)
    assert_clean_error(*run(*base, "--plan", foreign, "--budgets", "0.9"), "search a plan for this model")
    assert not (tmp_path / "r").exists()  # nothing written before the options were checked


def test_latency_builds_every_configuration_and_times_it_against_dense(tiny_model: Path, demo_data: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["sweep", tiny_model, "--data", demo_data, "--out", out, "--autoprune-tokens", "4", "--latency",
            "--skip-check", "--rounds", 2, "--warmup", 0, "--limit", 2, "--max-new-tokens", 2]  # fmt: skip
    code, text = run(*args)
    assert code == 0, text
    report = _report(out)
    assert report["plots"][:2] == ["fidelity.png", "latency.png"]
    _assert_png(out / "latency.png")
    rows = {row["name"]: row for row in report["configs"]}
    assert rows["dense"]["latency"]["ttft_ratio"] == 1.0
    ap = rows["autoprune-4"]["latency"]
    assert ap["ttft_ms"] > 0 and ap["ttft_ratio"] == pytest.approx(ap["ttft_ms"] / rows["dense"]["latency"]["ttft_ms"])
    assert ap["flops_ratio"] < 1.0  # the pruned graph does less work on the timed prompt
    tokens = {name: json.loads((out / "builds" / name / "manifest.json").read_text())["plan"]["tokens"]
              for name in rows}  # fmt: skip
    assert tokens["dense"] is None and tokens["autoprune-4"]["tokens"] == 4
    code, text = run(*args)
    assert code == 0 and "0 built" in text and "kept the latency measured before" in text
    assert "kept the build" in text
    code, text = run(*args, "--threads", 1)
    assert code == 0 and "0 built" in text and "timing again: threads differ" in text, text
    checked = [a for a in args if a != "--skip-check"]  # a checked sweep does not take unchecked builds
    code, text = run(*checked)
    assert code == 0 and "2 built" in text, text
    assert text.count("its check was skipped, and this sweep checks its builds") == 2
    assert all(json.loads((out / "builds" / name / "manifest.json").read_text())["check"]["status"] == "passed"
               for name in rows)  # fmt: skip
