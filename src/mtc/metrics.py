"""Reconstruction and sparsity metrics: small pure functions and a streaming accumulator."""

from __future__ import annotations

import torch


def compute_fvu(target_BD: torch.Tensor, recon_BD: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum |t - r|^2 / sum |t - mean(t)|^2 (scale-invariant)."""
    t, r = target_BD.detach().double(), recon_BD.detach().double()
    return float((t - r).pow(2).sum() / (t - t.mean(dim=0)).pow(2).sum())


def mean_l0(fire_counts_F: torch.Tensor, n_tokens: int) -> float:
    """Mean number of active features per token, from how often each feature fired (training logs
    the same number for its batches: ``SparseCodes.l0``)."""
    return int(fire_counts_F.sum()) / max(1, n_tokens)


def fvu_summary(fvus: list[float]) -> dict[str, float]:
    """The seed's fvu_min / fvu_mean / fvu_max over prefixes."""
    return {"fvu_min": min(fvus), "fvu_mean": sum(fvus) / len(fvus), "fvu_max": max(fvus)}


class FVUAccumulator:
    """FVU of several reconstructions of one target, over batches streamed in (float64 sums)."""

    def __init__(self, n_recons: int):
        self.sse = [0.0] * n_recons
        self.n = 0
        self.sum = None
        self.sum_sq = 0.0

    def update(self, target_BD: torch.Tensor, recons: list[torch.Tensor]) -> None:
        t = target_BD.double()
        for i, r in enumerate(recons):
            self.sse[i] += float((t - r.double()).pow(2).sum())
        s = t.sum(dim=0)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq += float(t.pow(2).sum())
        self.n += t.shape[0]

    def fvus(self) -> list[float]:
        total_var = self.sum_sq - float(self.sum.pow(2).sum()) / self.n
        return [sse / total_var for sse in self.sse]


# ----------------------------------------------------------------------------- spliced loss
def ce_loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """Share of the loss an ablation costs that the dictionary gives back:
    (CE_ablated - CE_spliced) / (CE_ablated - CE_clean); 1 = as good as the model, 0 = as bad as the
    ablation."""
    if ablated == clean:  # the ablation costs nothing: nothing to recover
        return float("nan")
    return (ablated - spliced) / (ablated - clean)


# ----------------------------------------------------------------------------- feature statistics
DENSE_FREQUENCY = 0.1
"""A feature firing on more than this share of tokens counts as dense."""


def log10_frequency(fire_counts_F: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """log10 of each feature's firing frequency; -inf for features that never fired."""
    return torch.log10(fire_counts_F.double() / max(1, n_tokens)).float()


def per_group_counts(flags_F: torch.Tensor, group_sizes: list[int]) -> list[int]:
    """How many flagged features each Matryoshka group holds."""
    return [int(part.sum()) for part in torch.split(flags_F, group_sizes)]
