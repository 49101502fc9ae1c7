"""``--device`` and ``--dtype``: clear errors where CUDA is absent; the executor in bf16 against HF in bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import SQUARE_QUESTION, random_image

from exporter.adapters import load_adapter
from exporter.executor import FixedKeepPolicy, PlanExecutor
from exporter.sample import prepare_sample
from prune_core.device import DeviceError, resolve_device, torch_dtype
from prune_export.cli import main

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _one_line_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_device_names() -> None:
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"
    for bad in ("gpu", "cuda:x", "cuda0", "tpu"):
        with pytest.raises(DeviceError, match="is not a device; use cpu, cuda or cuda:N"):
            resolve_device(bad)
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp16") is torch.float16
    with pytest.raises(DeviceError, match="is not one of fp32, fp16, bf16"):
        torch_dtype("int8")


@no_cuda
def test_cuda_without_cuda_is_one_line_everywhere(tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    message = "CUDA is not available"
    _one_line_error(["eval", str(tiny_model), "--data", str(demo_data), "--device", "cuda"], message)
    _one_line_error(["search", str(tiny_model), "--calib", str(demo_data), "--out", str(tmp_path / "p.json"),
                     "--device", "cuda:0"], message)  # fmt: skip
    _one_line_error(["build", str(tiny_model), "--out", str(tmp_path / "b"), "--device", "cuda"], message)
    assert not (tmp_path / "b").exists() and not (tmp_path / "p.json").exists()


def test_executor_in_bf16_follows_hf_in_bf16(tiny_model: Path) -> None:
    """The dense executor in bf16 against HuggingFace's forward of the same bf16 weights (independent code)."""
    adapter = load_adapter(tiny_model, dtype=torch.bfloat16)
    fp32 = PlanExecutor(load_adapter(tiny_model))
    executor = PlanExecutor(adapter)
    for seed, question in enumerate([SQUARE_QUESTION, "How many dogs are there, and where?"]):
        image = random_image(seed)
        tokens = adapter.tokenize(image, question)
        with torch.no_grad():
            hf = adapter.model(input_ids=tokens.input_ids[None], pixel_values=tokens.pixel_values).logits[0, -1].float()
        ours = executor.prefill(prepare_sample(adapter, image, question)).logits.float()
        assert ours.dtype == torch.float32 and hf.dtype == torch.float32
        scale = float(hf.abs().max())
        # bf16 keeps 8 bits of mantissa: both sides round differently, so a few bf16 ulps of the logit scale
        assert float((ours - hf).abs().max()) <= 0.05 * scale
        reference = fp32.prefill(prepare_sample(fp32.adapter, image, question)).logits
        assert float((ours - reference).abs().max()) <= 0.05 * scale  # and close to fp32, not just to HF


def test_token_schedules_are_the_same_in_every_dtype(tiny_model: Path) -> None:
    """Pruning decisions are counts, not precision: a fixed schedule keeps the same tokens per layer."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        adapter = load_adapter(tiny_model, dtype=dtype)
        sample = prepare_sample(adapter, random_image(0), SQUARE_QUESTION)
        result = PlanExecutor(adapter).prefill(sample, frozenset(), FixedKeepPolicy.from_stages([(1, 6), (3, 2)]))
        assert result.visual_tokens_per_layer == [16, 16, 6, 6]  # stage (L, N): N tokens enter the layers after L


def test_eval_and_search_run_in_bf16(tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", str(tiny_model), "--data", str(demo_data), "--dtype", "bf16",
                                       "--keep-schedule", "1:6", "--max-new-tokens", "4", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{"):])
    assert doc["dtype"] == "bf16" and doc["device"] == "cpu" and doc["samples"] == 4
    plan = tmp_path / "plan.json"
    args = ["search", str(tiny_model), "--calib", str(demo_data), "--out", str(plan), "--metric", "kl",
            "--steps", "2", "--tolerance", "0.5", "--key-danger-layers", "1"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads(plan.read_text())["steps"]
    # the journal records the precision: an fp32 search cannot resume a bf16 journal
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 1 and "dtype" in result.output, result.output
