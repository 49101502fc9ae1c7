"""No user meets the OOM killer: work that would not fit is refused (or made to fit) before anything loads.

The memory available is capped with PRUNE_EXPORT_MEMORY_GB between the tiny model's estimates, so the
decisions are the ones a 7B model meets on a 24 GB machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import random_image
from helpers.cli import assert_clean_error, run

from prune_core import memory
from prune_core.manifest import Manifest


def _between(low: int, high: int) -> str:
    return str((low + high) / 2 / (1 << 30))


def test_an_fp16_build_whose_fp32_copy_does_not_fit_takes_the_low_memory_path(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, fp16 = memory.load_bytes(tiny_model, "fp32"), memory.load_bytes(tiny_model, "fp16")
    monkeypatch.setenv("PRUNE_EXPORT_MEMORY_GB", _between(fp16, fp32))
    code, output = run("build", tiny_model, "--out", tmp_path / "b", "--dtype", "fp16", "--skip-check")
    assert code == 0, output
    assert "building with --low-memory" in output
    assert Manifest.load(tmp_path / "b").dtype == "fp16"
    # fp32 cannot be built in that memory at all: one line that names the option that fits
    assert_clean_error(*run("build", tiny_model, "--out", tmp_path / "c"),
                       "build with --dtype fp16 --low-memory")  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_work_that_fits_nowhere_is_one_line(tiny_model: Path, demo_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("PRUNE_EXPORT_MEMORY_GB", "0.5")
    assert_clean_error(*run("build", tiny_model, "--out", tmp_path / "b", "--dtype", "fp16"),
                       "build on a machine with more memory")  # fmt: skip
    assert_clean_error(*run("eval", tiny_model, "--data", demo_data), "eval of")
    assert_clean_error(*run("search", tiny_model, "--calib", demo_data, "--out", tmp_path / "p.json"), "search of")


def test_inspect_and_run_of_a_build_too_large_to_run_here(tiny_model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    code, output = run("build", tiny_model, "--out", tmp_path / "b", "--skip-check")
    assert code == 0, output
    monkeypatch.setenv("PRUNE_EXPORT_MEMORY_GB", "0.5")
    assert_clean_error(*run("inspect", tmp_path / "b"), "inspect it with --no-run")
    image = tmp_path / "image.png"
    random_image(0).save(image)
    assert_clean_error(*run("run", tmp_path / "b", "--image", image, "--question", "What?"),
                       "run it on a machine with more memory")  # fmt: skip
