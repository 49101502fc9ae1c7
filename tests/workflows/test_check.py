"""prune-export check BUILD_DIR: a finished build's check run again, on the graphs as they are now."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.cli import run
from onnx import numpy_helper

from prune_export.workflows.build import BuildSettings, build
from prune_export.workflows.selection import PlanChoice


@pytest.fixture(scope="module")
def built(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("check") / "dense"
    build(tiny_model, out, PlanChoice(), BuildSettings(provider="cpu"), lambda message: None)
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _check(*args: object) -> tuple[int, str]:
    return run("check", *args)


def test_a_fresh_build_passes_again_and_nothing_in_it_changes(built: Path) -> None:
    before = _digests(built)
    code, output = _check(built, "--provider", "cpu", "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    manifest = json.loads((built / "manifest.json").read_text())
    assert report["status"] == "passed" and report["same_generation"] is True
    assert [o["name"] for o in report["outputs"]] == [o["name"] for o in manifest["check"]["outputs"]]
    assert all(o["max_abs_diff"] <= o["tolerance"] for o in report["outputs"] if o["name"] != "census_flops_relative")
    assert _digests(built) == before


def test_a_damaged_weight_fails_naming_the_outputs(built: Path, tmp_path: Path) -> None:
    """The LM head's weight scaled on a quarter of its rows: a clear error, not a near tie."""
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    model = onnx.load(str(damaged / "prefill.onnx"))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight).copy()
    values.flat[: values.size // 4] *= 3.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(damaged / "prefill.onnx"))
    before = _digests(damaged)
    code, output = _check(damaged, "--provider", "cpu")
    assert code == 1
    assert "prefill.onnx has sha256" in output and "checking the graphs as they are now" in output
    assert "the graphs do not match the PyTorch executor" in output
    assert "  logits: max abs diff" in output and "FAILED" in output
    assert "Traceback" not in output
    assert _digests(damaged) == before


def test_a_missing_model_folder_is_one_line(built: Path, tmp_path: Path) -> None:
    code, output = _check(built, "--model", tmp_path / "absent")
    assert code == 1 and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1
    assert "pass --model MODEL_DIR" in output


# -- the near-tie rule of quantized builds ---------------------------------------------------------------------
def _flip(logits: list[float], output: str = "generate", prompt: int = 0, step: int = 3):
    from prune_export.workflows.check import _Flip

    return _Flip(output, prompt, step, np.asarray(logits, dtype=np.float64))


def test_a_true_near_tie_passes_against_the_error_where_tokens_agree() -> None:
    from prune_export.workflows.check import classify_flips

    (flip,) = classify_flips([_flip([0.0, 5.00, 5.03, 1.0])], agree_errors=[0.01, 0.02], quantized=True)
    assert flip.near_tie and flip.gap == pytest.approx(0.03) and flip.bound == pytest.approx(0.04)


def test_a_clear_flip_is_not_a_near_tie_whatever_the_error_at_the_flip() -> None:
    """The old rule measured the error on the flipped step itself, where a flip makes it at least half the gap,
    so every flip passed. The bound now comes from the steps where the tokens agree."""
    from prune_export.workflows.check import classify_flips

    rng = np.random.default_rng(0)
    shuffled = rng.permutation(rng.standard_normal(400) * 3)  # a logits vector with an ordinary top-2 gap
    flips = classify_flips([_flip(list(shuffled)), _flip([0.0, 4.0, 5.0])], agree_errors=[0.01], quantized=True)
    assert [f.near_tie for f in flips] == [False, False]
    assert flips[1].gap == pytest.approx(1.0) and flips[1].bound == pytest.approx(0.02)


def test_without_an_agreeing_step_nothing_is_a_near_tie_and_float_builds_have_none() -> None:
    from prune_export.workflows.check import classify_flips

    assert not classify_flips([_flip([5.0, 5.0 + 1e-9])], agree_errors=[], quantized=True)[0].near_tie
    (flip,) = classify_flips([_flip([5.0, 5.0 + 1e-9])], agree_errors=[1.0], quantized=False)
    assert not flip.near_tie and flip.bound is None


def test_a_damaged_int8_scale_fails_the_check_naming_the_flip(tiny_model: Path, tmp_path: Path) -> None:
    """An int8-weights build whose LM-head scales are damaged for two tokens (one scaled by 1000, one by
    -1000, so one of them wins every step by far): `check` fails it, naming the outputs and the steps where
    the greedy token left the executor's; none of those flips is a near tie."""
    out = tmp_path / "int8"
    build(tiny_model, out, PlanChoice(), BuildSettings(provider="cpu", quantize="int8-weights"), lambda m: None)
    for graph in ("prefill.onnx", "decode.onnx"):
        model = onnx.load(str(out / graph))
        inits = {t.name: t for t in model.graph.initializer}
        weight = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8),
                     key=lambda t: int(np.prod(t.dims)))  # the LM head's, the largest  # fmt: skip
        dequantize = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight.name)
        scale = inits[dequantize.input[1]]
        values = numpy_helper.to_array(scale).copy()
        values.flat[1] *= 1000.0
        values.flat[2] *= -1000.0
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))
        onnx.save(model, str(out / graph))
    code, output = _check(out, "--provider", "cpu", "--json")
    assert code == 1, output
    report = json.loads(output[output.index("{"): output.rindex("}") + 1])
    flips = [f for f in report["token_flips"] if not f["near_tie"]]
    assert report["status"] == "failed" and flips, report["token_flips"]
    assert {f["output"] for f in flips} == {"logits", "generate"}
    assert all(f["bound"] is not None and f["gap"] > f["bound"] for f in flips)
    assert "flipped at step" in output and "not a near tie" in output


def test_more_near_ties_than_the_cap_fail() -> None:
    from prune_export.workflows.check import MAX_NEAR_TIES, classify_flips, token_verdict

    near = [_flip([0.0, 5.0, 5.01], output=out, prompt=p, step=0) for p in (0, 1) for out in ("logits", "generate")]
    flips = classify_flips(near, agree_errors=[0.05], quantized=True)
    assert all(f.near_tie for f in flips) and len(flips) > MAX_NEAR_TIES == 2
    assert token_verdict(flips) == (True, True, 4, False)  # each decision a near tie, but too many of them
    assert token_verdict(flips[:2]) == (True, True, 2, True)  # at the cap: passes
    hard = classify_flips([_flip([0.0, 4.0, 5.0], output="logits")], agree_errors=[0.05], quantized=True)
    assert token_verdict(hard) == (False, True, 0, True)


def test_a_decode_graph_that_lets_padding_into_attention_fails_the_check(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check decodes its two prompts (different lengths) as one padded batch and holds each row to the
    prompt's step alone: a decode graph exported without the padding mask passes every batch-1 output and
    fails there."""
    import torch

    import exporter.decode
    from prune_core.errors import BuildError

    class NoPaddingMask:
        def __getattr__(self, name: str) -> object:
            return getattr(torch, name)

        @staticmethod
        def where(condition: torch.Tensor, *values: object) -> torch.Tensor:
            return torch.zeros(condition.shape)  # every slot attended, padding included

    monkeypatch.setattr(exporter.decode, "torch", NoPaddingMask())
    with pytest.raises(BuildError) as err:
        build(tiny_model, tmp_path / "nomask", PlanChoice(), BuildSettings(provider="cpu"), lambda message: None)
    message = str(err.value)
    assert "decode.batched_logits: max abs diff" in message, message
    assert "logits: max abs diff" not in message.replace("batched_logits", "")  # batch 1 is still right
