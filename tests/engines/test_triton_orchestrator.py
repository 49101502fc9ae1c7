"""The orchestrator model's host-side rules against prune-export's own (it cannot import prune-export)."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from engines.triton.repository import MODELS_DIR
from prune_core.autoprune import ScheduleTable
from prune_core.prompt import TextPieces


@pytest.fixture(scope="module")
def orchestrator() -> types.ModuleType:
    """``models/orchestrator.py`` imported with a stand-in ``triton_python_backend_utils`` (only in Triton)."""
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    try:
        spec = importlib.util.spec_from_file_location("orchestrator_under_test", MODELS_DIR / "orchestrator.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils")
        else:
            sys.modules["triton_python_backend_utils"] = saved
    return module


@pytest.mark.parametrize("k0,k_step,gamma", [(0.5, 0.05, 8.0), (1.0, 0.1, 2.5), (0.35, 0.025, 1.0)])
def test_schedule_row_matches_the_build_runtime(orchestrator, k0: float, k_step: float, gamma: float) -> None:
    table = ScheduleTable.build(tokens=8, num_layers=6, visual_tokens=64, k0=k0, k_step=k_step)
    spec = {"k0": table.k0, "k_step": table.k_step, "gamma": gamma,
            "keep": [list(e.keep) for e in table.entries], "merged": [list(e.merged) for e in table.entries]}  # fmt: skip
    # complexities landing on exact grid halves, on grid points, outside [0, k0] and in between
    values = [(k0 - (i + 0.5) * k_step) / gamma for i in range(len(table.entries))]
    values += [(k0 - i * k_step) / gamma for i in range(len(table.entries))]
    values += list(np.linspace(-1.0, 2 * k0 / gamma + 1.0, 97)) + [0.0, 1e9, -1e9]
    for i1 in values:
        k = max(k0 - gamma * i1, 0.0)
        assert orchestrator.schedule_index(i1, spec) == table.index(k), i1
    with pytest.raises(orchestrator.GraphModelError, match="NaN"):
        orchestrator.schedule_index(math.nan, spec)


def test_text_pieces_join_to_the_whole_answer(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rng = np.random.RandomState(0)
    for _ in range(20):
        ids = [int(i) for i in rng.randint(0, tokenizer.vocab_size, size=12)]
        pieces = TextPieces(tokenizer)
        out = [pieces.add(i) for i in ids] + [pieces.finish()]
        assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True)
        for p in out[:-1]:
            assert not p.endswith("\ufffd")
