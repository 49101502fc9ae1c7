"""Label-free fidelity: first-token KL against torch's own KL, and agreement with a reference answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calib.data import DataRow
from calib.evaluate import (
    ReferenceAnswer,
    SampleResult,
    StoredReference,
    compare_answer,
    first_token_logprobs,
    kl_divergence,
)
from prune_core.errors import DataError


def test_first_token_kl_equals_torch_kl_div() -> None:
    gen = torch.Generator().manual_seed(0)
    dense, pruned = torch.randn(50, generator=gen) * 3, torch.randn(50, generator=gen) * 3
    p, q = first_token_logprobs(dense), first_token_logprobs(pruned.numpy())
    assert p.dtype == np.float32
    assert np.allclose(p, torch.log_softmax(dense.double(), -1).numpy(), atol=1e-6)
    # torch: kl_div(input=log Q, target=log P, log_target) = sum P (log P - log Q) = KL(P || Q)
    want = torch.nn.functional.kl_div(torch.from_numpy(q).double(), torch.from_numpy(p).double(), reduction="sum",
                                      log_target=True).item()  # fmt: skip
    assert kl_divergence(p, q) == pytest.approx(want, rel=1e-9)
    assert kl_divergence(p, q) != pytest.approx(kl_divergence(q, p), rel=1e-3)  # direction matters
    assert kl_divergence(p, p) == 0.0
    # hand-computed: P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    two = first_token_logprobs(np.log([0.5, 0.5])), first_token_logprobs(np.log([0.25, 0.75]))
    assert kl_divergence(*two) == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), rel=1e-6)
    with pytest.raises(DataError, match="vocabulary size differs"):
        kl_divergence(p, p[:10])


def test_agreement_is_identity_of_the_answer_text(tmp_path) -> None:
    lp = first_token_logprobs(np.zeros(4))
    result = SampleResult(1, "q", "red", "Red", False, 10, 5, [4])
    compare_answer(result, lp, ReferenceAnswer("red", lp))
    assert result.agrees is False and result.first_token_kl == 0.0  # "Red" != "red": answers differ
    compare_answer(result, lp, ReferenceAnswer("Red", lp))
    assert result.agrees is True
    stored = StoredReference({1: ReferenceAnswer("Red", lp)}, max_new_tokens=4)
    row = DataRow(tmp_path / "x.png", "q", None, 2)
    with pytest.raises(DataError, match="line 2"):
        stored.answer(row)
