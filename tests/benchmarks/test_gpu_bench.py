"""The prepared GPU benchmark's ``--smoke`` mode: the same code on CPU with the tiny preset, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_smoke_writes_json_and_tables(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu-bench.json").read_text())
    prefill, decode = doc["prefill"], doc["decode"]
    names = list(prefill["configs"])
    assert names[0] == "dense" and len(names) == 4
    assert [n.split("-")[0] for n in names] == ["dense", "gsop", "autoprune", "combined"]
    for name, entry in prefill["configs"].items():
        # the baked module (what the ONNX graph is exported from) against the executor, per configuration
        check = entry["baked_vs_executor"]
        assert check["same_greedy_token"] and check["same_kv_lengths"], name
        assert check["max_abs_logit_diff"] < 1e-4, name
        assert entry["flops_speedup"] == pytest.approx(prefill["configs"]["dense"]["flops"] / entry["flops"])
        if name != "dense":
            assert entry["flops_ratio"] < 1.0
    combined = prefill["configs"][names[3]]
    assert combined["plan_ops"] > 0 and "autoprune" in combined  # GSOP operations and AutoPrune together
    assert {f"{e}/{n}" for e in ("executor", "baked") for n in names} <= set(prefill["eager"])
    assert all(c["same_tokens_as_executor"] for c in decode["configs"].values())
    assert set(decode["configs"]) == set(names)
    assert decode["configs"][names[1]]["kv_tokens"] < decode["configs"]["dense"]["kv_tokens"]
    table = (tmp_path / "gpu-bench.md").read_text()
    assert "## Prefill" in table and "## Decode" in table and all(n in table for n in names)
    assert prefill["environment"]["torch"] and doc["wall_s"] > 0
