from __future__ import annotations

import torch

from mtc.metrics import FVUAccumulator, compute_fvu, fvu_summary, mean_l0


def test_fvu_is_zero_for_perfect_and_one_for_the_mean_predictor():
    t = torch.randn(100, 8) + 3
    assert compute_fvu(t, t) == 0
    assert abs(compute_fvu(t, t.mean(dim=0).expand_as(t)) - 1) < 1e-12
    r = t + torch.randn_like(t)
    assert abs(compute_fvu(5 * t + 1, 5 * r + 1) - compute_fvu(t, r)) < 1e-6, "invariant to scale and shift"


def test_streamed_fvu_equals_the_direct_computation():
    t = torch.randn(300, 6) * 2 + 1
    r1, r2 = t + 0.1 * torch.randn_like(t), t + torch.randn_like(t)
    acc = FVUAccumulator(2)
    for i in range(0, 300, 64):
        acc.update(t[i : i + 64], [r1[i : i + 64], r2[i : i + 64]])
    f = acc.fvus()
    assert abs(f[0] - compute_fvu(t, r1)) < 1e-9 and abs(f[1] - compute_fvu(t, r2)) < 1e-9


def test_l0_and_summary():
    acts = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert mean_l0((acts > 0).sum(dim=0), n_tokens=2) == 1.5
    assert fvu_summary([0.5, 0.2, 0.3]) == {"fvu_min": 0.2, "fvu_mean": (0.5 + 0.2 + 0.3) / 3, "fvu_max": 0.5}
