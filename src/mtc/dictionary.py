"""The Matryoshka BatchTopK dictionary: a transcoder (source site -> target site) or an SAE.

Features are one dictionary cut into nested groups: prefix ``i`` is features
``0 .. sum(group_sizes[:i+1])``, and every prefix is trained to reconstruct the target on its own,
so the dictionary can be truncated at any group boundary. Inputs and targets are scaled by
factors stored with the dictionary (mean norm -> sqrt(d)); ``encode``/``decode``/``forward`` take
and give raw activations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "dictionary.safetensors"
CONFIG_FILE = "dictionary.json"


class TrainOutput(NamedTuple):
    loss: torch.Tensor            # scalar: mean prefix MSE + aux
    prefix_mse: torch.Tensor      # [n_groups] normalised-space MSE of each prefix
    aux_loss: torch.Tensor        # scalar
    acts_BF: torch.Tensor         # [B, D] batch-top-k codes
    recon_BD: torch.Tensor        # [B, d_out] full reconstruction, normalised space


def batch_topk_threshold(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Smallest value among the ``k * B`` largest entries of ``pre_BF`` (exact).

    A global top-k over B x D values is slow, so take each row's top ``4k`` as candidates. A row
    whose candidates all reach the resulting threshold may hold more values above it (tokens with
    outsized activations do), so such rows join the candidates whole; adding candidates can only
    raise the threshold, so every other row's values above it are already among its candidates.
    """
    n = k * pre_BF.shape[0]
    m = min(pre_BF.shape[1], 4 * k)
    candidates = pre_BF.topk(m, dim=1, sorted=False).values
    threshold = candidates.flatten().topk(n, sorted=False).values.min()
    if m < pre_BF.shape[1]:
        full = candidates.min(dim=1).values >= threshold
        if bool(full.any()):
            pool = torch.cat([candidates[~full].flatten(), pre_BF[full].flatten()])
            threshold = pool.topk(n, sorted=False).values.min()
    return threshold


def _weighted_row_sums(feats: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, W: torch.Tensor,
                       n_rows: int) -> torch.Tensor:
    """out[r] = sum of vals[i] * W[feats[i]] over entries i with rows[i] == r; ``rows`` sorted.

    One ``embedding_bag``: never materialises the [nnz, d] gathered rows, and its backward gives
    the gradients of ``W`` (index-add) and ``vals`` (dot products) sparsely.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(feats, W, offsets, mode="sum", per_sample_weights=vals)


class MatryoshkaBatchTopK(nn.Module):
    def __init__(self, d_in: int, d_out: int, group_sizes: list[int], top_k: int, *,
                 top_k_aux: int = 512, aux_penalty: float = 1 / 32, n_batches_to_dead: int = 5,
                 threshold_momentum: float = 0.01, kind: str = "transcoder", seed: int = 0):
        super().__init__()
        if not group_sizes or any(g <= 0 for g in group_sizes):
            raise ValueError(f"group_sizes must be positive, got {group_sizes}")
        dict_size = sum(group_sizes)
        if not 0 < top_k < dict_size:
            raise ValueError(f"top_k must be in [1, {dict_size}), got {top_k}")
        if kind == "sae" and d_in != d_out:
            raise ValueError("an SAE reconstructs its input: d_in must equal d_out")
        self.cfg = dict(d_in=d_in, d_out=d_out, group_sizes=list(group_sizes), top_k=top_k, top_k_aux=top_k_aux,
                        aux_penalty=aux_penalty, n_batches_to_dead=n_batches_to_dead,
                        threshold_momentum=threshold_momentum, kind=kind)
        self.group_sizes = list(group_sizes)
        self.boundaries = [sum(group_sizes[:i + 1]) for i in range(len(group_sizes))]
        self.dict_size = dict_size
        self.top_k = top_k
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(dict_size, d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                      # [D, d_out], unit rows
        # Encoder starts as the decoder's transpose (for an SAE) or a random direction set (transcoder).
        W_enc = W_dec.T.clone() if kind == "sae" else torch.randn(d_in, dict_size, generator=gen)
        W_enc = W_enc / W_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)                      # [d_in, D]
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("source_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("inactive_batches", torch.zeros(dict_size, dtype=torch.long))
        # Mean of the normalised source, subtracted before encoding so features see deviations
        # from the mean rather than all firing on it (the role b_dec plays in a classic SAE).
        self.register_buffer("source_mean", torch.zeros(d_in))

    # ------------------------------------------------------------------ inference on raw activations
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations [B, D] of raw source activations."""
        return torch.relu((x_BD * self.source_scale - self.source_mean) @ self.W_enc + self.b_enc)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Codes [B, D] with the learned threshold: each token encodes on its own."""
        pre = self.pre_acts(x_BD)
        return pre * (pre > self.threshold)

    def decode(self, acts_BF: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
        """Raw target reconstruction from the first ``n_groups`` groups (all by default)."""
        end = self.dict_size if n_groups is None else self.boundaries[n_groups - 1]
        return (acts_BF[:, :end] @ self.W_dec[:end] + self.b_dec) / self.target_scale

    def forward(self, x_BD: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
        return self.decode(self.encode(x_BD), n_groups)

    # ------------------------------------------------------------------ training (normalised space)
    def prefix_reconstructions_dense(self, acts_BF: torch.Tensor) -> list[torch.Tensor]:
        """Normalised reconstruction of every prefix from dense codes, group by group (reference)."""
        out, recon = [], self.b_dec.expand(acts_BF.shape[0], -1)
        start = 0
        for end in self.boundaries:
            recon = recon + acts_BF[:, start:end] @ self.W_dec[start:end]
            out.append(recon)
            start = end
        return out

    def prefix_reconstructions(self, pre_BF: torch.Tensor, active_BF: torch.Tensor) -> list[torch.Tensor]:
        """Same as ``prefix_reconstructions_dense(pre_BF * active_BF)``, touching only active codes.

        Active (row, feature) pairs are sorted by group, then row; each group's contribution is one
        ``embedding_bag`` (a weighted sum of decoder rows per token), added to the running prefix.
        """
        B = pre_BF.shape[0]
        rows, feats = active_BF.nonzero(as_tuple=True)
        group = torch.bucketize(feats, self._boundaries_tensor(feats.device), right=True)
        order = torch.argsort(group * B + rows)
        rows, feats, group = rows[order], feats[order], group[order]
        vals = pre_BF[rows, feats]
        ptr = torch.searchsorted(group, torch.arange(len(self.boundaries) + 1, device=group.device)).tolist()
        out, recon, start = [], self.b_dec.expand(B, -1), 0
        for g, end in enumerate(self.boundaries):
            a, b = ptr[g], ptr[g + 1]
            recon = recon + _weighted_row_sums(feats[a:b] - start, rows[a:b], vals[a:b], self.W_dec[start:end], B)
            out.append(recon)
            start = end
        return out

    def _boundaries_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.boundaries, device=device)

    def training_forward(self, x_BD: torch.Tensor, y_BD: torch.Tensor) -> TrainOutput:
        """Loss on a batch of raw source/target rows; updates the threshold and dead counters."""
        y = y_BD * self.target_scale
        pre = self.pre_acts(x_BD)
        threshold = batch_topk_threshold(pre.detach(), self.top_k)
        active = (pre.detach() >= threshold) & (pre.detach() > 0)
        recons = self.prefix_reconstructions(pre, active)
        prefix_mse = torch.stack([(r - y).pow(2).mean() for r in recons])
        aux = self.aux_loss(pre, y - recons[-1].detach())
        acts = pre.detach() * active
        self._update_stats(acts)
        return TrainOutput(prefix_mse.mean() + aux, prefix_mse.detach(), aux.detach(), acts, recons[-1].detach())

    def aux_loss(self, pre_BF: torch.Tensor, residual_BD: torch.Tensor) -> torch.Tensor:
        """Reconstruct what the live features miss with each token's top ``top_k_aux`` dead ones."""
        dead = torch.nonzero(self.inactive_batches >= self.cfg["n_batches_to_dead"]).flatten()
        if dead.numel() == 0 or self.cfg["aux_penalty"] == 0:
            return pre_BF.new_zeros(())
        B = pre_BF.shape[0]
        k_aux = min(self.cfg["top_k_aux"], dead.numel())
        values, idx = pre_BF[:, dead].topk(k_aux, dim=1)                      # [B, k_aux]
        rows = torch.arange(B, device=pre_BF.device).repeat_interleave(k_aux)
        recon = _weighted_row_sums(dead[idx].flatten(), rows, values.flatten(), self.W_dec, B)
        return self.cfg["aux_penalty"] * (recon - residual_BD).pow(2).mean()

    @torch.no_grad()
    def _update_stats(self, acts_BF: torch.Tensor) -> None:
        fired = (acts_BF > 0).any(dim=0)
        self.inactive_batches.add_(1).masked_fill_(fired, 0)
        positive = acts_BF[acts_BF > 0]
        if positive.numel():
            m = self.cfg["threshold_momentum"]
            if self.threshold == 0:  # first batch: start the average at its value, not at 0
                self.threshold.copy_(positive.min())
            else:
                self.threshold.mul_(1 - m).add_(m * positive.min())

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (it would only change its norm)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def set_scales(self, source_mean_norm: float, target_mean_norm: float) -> None:
        """Scale so that normalised activations have mean norm sqrt(width)."""
        self.source_scale.fill_(math.sqrt(self.cfg["d_in"]) / source_mean_norm)
        self.target_scale.fill_(math.sqrt(self.cfg["d_out"]) / target_mean_norm)

    @torch.no_grad()
    def init_means(self, x_BD: torch.Tensor, y_BD: torch.Tensor) -> None:
        """Centre the encoder on the source's mean and start b_dec at the target's mean
        (normalised, from a first batch), so the initial FVU is about 1."""
        self.source_mean.copy_((x_BD * self.source_scale).mean(dim=0))
        self.b_dec.copy_((y_BD * self.target_scale).mean(dim=0))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, weights_file: str = WEIGHTS_FILE) -> None:
        from mtc.results import atomic_write_bytes, atomic_write_text

        directory = Path(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / weights_file, save_tensors(tensors))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(self.cfg, indent=2))

    @classmethod
    def load(cls, directory: str | Path, weights_file: str = WEIGHTS_FILE, device: str | torch.device = "cpu"):
        directory = Path(directory)
        cfg: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
        model = cls(cfg.pop("d_in"), cfg.pop("d_out"), cfg.pop("group_sizes"), cfg.pop("top_k"), **cfg)
        model.load_state_dict(load_file(str(directory / weights_file), device=str(device)))
        return model.to(device)
