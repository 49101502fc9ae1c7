"""Quantized configurations of `prune-export sweep`: answers through the int8 build's graphs, the answers int8
changed against fp32 and the float logit gap at each flip, checked against HuggingFace's own forward pass
and greedy answers (independent references), and a near-tie rule that must refuse a wide gap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run

NEW_TOKENS = 8


def _hf_logits(adapter, row, prefix: list[int]) -> np.ndarray:
    """HuggingFace's next-token logits after the prompt and ``prefix`` (teacher-forced, no cache)."""
    tokens = adapter.tokenize(row.load_image(), row.question)
    ids = torch.cat([tokens.input_ids, torch.tensor(prefix, dtype=tokens.input_ids.dtype)])[None]
    with torch.no_grad():
        out = adapter.model(input_ids=ids, pixel_values=tokens.pixel_values)
    return out.logits[0, -1].double().numpy()


def _hf_greedy(adapter, row) -> list[int]:
    tokens = adapter.tokenize(row.load_image(), row.question)
    out = adapter.model.generate(input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values,
                                 max_new_tokens=NEW_TOKENS, do_sample=False)[0, tokens.input_ids.shape[0]:]  # fmt: skip
    ids = []
    for i in out.tolist():
        if i in adapter.eos_token_ids:
            break
        ids.append(int(i))
    return ids


@pytest.fixture(scope="module")
def quantized_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_data: Path) -> Path:
    from exporter.demo import build_demo_data

    calib = build_demo_data(tmp_path_factory.mktemp("calib"), samples=4, seed=7)
    out = tmp_path_factory.mktemp("sweep-int8") / "report"
    code, text = run("sweep", tiny_model, "--data", demo_data, "--out", out, "--quantize", "int8",
                     "--calib", calib, "--calib-rows", 4, "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    assert code == 0, text
    assert "answers changed against fp32" in text
    return out


def test_quantized_answers_are_the_builds_and_changes_are_counted_against_huggingface(
        quantized_sweep: Path, tiny_model: Path, demo_data: Path, tiny_adapter) -> None:  # fmt: skip
    from calib.data import load_rows

    report = json.loads((quantized_sweep / "report.json").read_text())
    row = {r["name"]: r for r in report["configs"]}["dense@int8"]
    assert row["answered_by"] == "build on ONNX Runtime" and row["quantize"] == "int8"
    build = quantized_sweep / "builds" / "dense@int8"
    assert json.loads((build / "manifest.json").read_text())["quantization"]["mode"] == "int8"
    # The sweep's answers are the build's, as `eval BUILD_DIR` gives them.
    code, out = run("eval", build, "--data", demo_data, "--max-new-tokens", NEW_TOKENS, "--json")
    assert code == 0, out
    ev = json.loads(out)
    samples = json.loads((quantized_sweep / "configs" / "dense@int8.json").read_text())["eval"]["results"]
    for key in ("accuracy", "agreement", "samples"):
        assert row[key] == ev[key], key
    # "changed" counts the answers that differ from fp32 greedy answers; HuggingFace's generate gives those.
    rows = {r.line: r for r in load_rows(demo_data)}
    hf = {line: tiny_adapter.decode(_hf_greedy(tiny_adapter, r)) for line, r in rows.items()}
    changed = [s["line"] for s in samples if s["prediction"] != hf[s["line"]]]
    twin = row["float_twin"]
    assert twin["rows"] == len(rows) and twin["changed"] == len(changed)
    assert sorted(f["line"] for f in twin["flips"]) == changed
    assert twin["agree_logits_error"]["steps"] > 0 and 0 < twin["agree_logits_error"]["max"] < 1.0
    for flip in twin["flips"]:  # the float gap at each flip, from HuggingFace's own forward pass
        ids = _hf_greedy(tiny_adapter, rows[flip["line"]])
        logits = _hf_logits(tiny_adapter, rows[flip["line"]], ids[: flip["step"]])
        assert flip["float_token_id"] == int(logits.argmax())
        assert flip["float_gap"] == pytest.approx(logits.max() - logits[flip["quantized_token_id"]], abs=1e-4)
    md = (quantized_sweep / "report.md").read_text()
    assert "## Quantized builds against their float twins" in md and "| dense@int8 |" in md
    # Run again: the build and the evaluation are kept.
    code, text = run("sweep", tiny_model, "--data", demo_data, "--out", quantized_sweep, "--quantize", "int8",
                     "--calib", json.loads((quantized_sweep / "sweep.json").read_text())["inputs"]["calib"],
                     "--calib-rows", 4, "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    assert code == 0 and "0 configuration(s) evaluated, 2 kept" in text, text


def test_float_twin_measures_the_gap_at_the_first_flip_and_refuses_a_wide_one(tiny_model: Path, demo_data: Path,
                                                                               tiny_adapter) -> None:
    """Quantized answers made by hand from HuggingFace's logits: one flips to the runner-up token after a step
    with a known logits error (a near tie), one to the least likely token (not a near tie)."""
    from types import SimpleNamespace

    from calib.data import load_rows
    from prune_export.workflows.selection import choose_plan
    from prune_export.workflows.sweep_builds import FloatTwin

    spec, choice = choose_plan(tiny_model)
    twin = FloatTwin(tiny_adapter, choice, spec, NEW_TOKENS)
    rows = load_rows(demo_data)[:2]
    expected = []
    for row, pick in zip(rows, ("runner-up", "last"), strict=True):
        ids = _hf_greedy(tiny_adapter, row)
        assert len(ids) >= 2, "precondition: a greedy answer of two tokens or more"
        first, second = _hf_logits(tiny_adapter, row, []), _hf_logits(tiny_adapter, row, ids[:1])
        order = np.argsort(second)
        other = int(order[-2] if pick == "runner-up" else order[0])
        gap = float(second[order[-1]] - second[other])
        expected.append(gap)
        err = 0.6 * expected[0]  # the logits error at the agreeing step: near tie bound 1.2 x the first gap
        shaken = first.copy()
        shaken[int(np.argsort(first)[0])] += err  # the error lands on the least likely token: argmax unchanged
        forced = second.copy()
        forced[other] = second.max() + 1.0  # the quantized build prefers `other` by 1
        # the first row's build kept every visual token in every layer, as dense does; the second one fewer
        kept = [spec.visual_tokens] * spec.num_layers if pick == "runner-up" else [spec.visual_tokens - 1] * spec.num_layers
        twin.observe(row, [ids[0], other], [shaken.astype(np.float32), forced.astype(np.float32)],
                     SimpleNamespace(visual_tokens_per_layer=kept))
    summary = twin.summary()
    assert summary["rows"] == 2 and summary["changed"] == 2
    for flip, gap in zip(summary["flips"], expected, strict=True):
        assert flip["step"] == 1
        assert flip["float_gap"] == pytest.approx(gap, abs=1e-4)  # HuggingFace's own logits
        assert flip["quantized_gap"] == pytest.approx(1.0, abs=1e-4)
    assert expected[1] > 2 * 0.6 * expected[0]  # precondition: the wide gap lies beyond the bound
    assert summary["near_tie_bound"] == pytest.approx(1.2 * expected[0], abs=1e-4)
    assert summary["near_ties"] == 1  # the runner-up flip is a near tie; the flip to the last token is not
    assert summary["schedules_changed"] == 1 and summary["schedule_changed_lines"] == [rows[1].line]
    assert [f["same_schedule"] for f in summary["flips"]] == [True, False]
