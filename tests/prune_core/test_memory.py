"""Peak-memory estimates made before loading (prune_core.memory), against independent counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from prune_core import memory
from prune_core.errors import PruneExportError


def test_the_parameter_count_comes_from_the_headers_alone(tiny_model: Path) -> None:
    """The headers' count equals the numel of every tensor the file really holds."""
    tensors = {}
    for path in sorted(tiny_model.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert memory.model_parameters(tiny_model) == sum(t.numel() for t in tensors.values()) > 0


def test_a_folder_without_safetensors_is_not_estimated(tmp_path: Path) -> None:
    assert memory.model_parameters(tmp_path) is None and memory.load_bytes(tmp_path, "fp32") is None


def test_load_estimates_follow_the_precision(tiny_model: Path) -> None:
    params = memory.model_parameters(tiny_model)
    assert memory.load_bytes(tiny_model, "fp32") == int(params * 4 * memory.OVERHEAD + memory.BASE_BYTES)
    assert memory.load_bytes(tiny_model, "bf16") == memory.load_bytes(tiny_model, "fp16") == int(
        params * 2 * memory.OVERHEAD + memory.BASE_BYTES
    )


def test_the_environment_caps_what_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNE_EXPORT_MEMORY_GB", "1.5")
    assert memory.available_bytes() == int(1.5 * (1 << 30))
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs about 2\.0 GiB of memory and 1\.5 GiB is available; do less"):
        memory.check_fits("this", 2 << 30, "do less")
    memory.check_fits("this", 1 << 30, "do less")  # fits: nothing raised
    monkeypatch.setenv("PRUNE_EXPORT_MEMORY_GB", "lots")
    with pytest.raises(PruneExportError, match="is not a number of GiB"):
        memory.available_bytes()


def test_without_the_override_it_reads_memavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRUNE_EXPORT_MEMORY_GB", raising=False)
    text = Path("/proc/meminfo").read_text()
    line = next(line for line in text.splitlines() if line.startswith("MemAvailable:"))
    assert abs(memory.available_bytes() - int(line.split()[1]) * 1024) < (256 << 20)  # it moves a little
