"""The Matryoshka BatchTopK cross-layer transcoder (CLT).

At every layer i of ``n_layers`` consecutive layers, ``dict_size`` features read the residual
stream before the MLP (``resid_mid``) and write to the MLP output (``mlp_out``) of every layer
j >= i: encoder ``W_enc[i]`` [d, F], decoder ``W_dec[i]`` [F, L - i, d] (circuit-tracer's layout),
one output bias per layer. Layer j's output is the sum, over i <= j, of layer i's codes times
``W_dec[i][:, j - i]``, plus ``b_dec[j]``.

Each layer's features are cut into the same nested groups as a ``MatryoshkaBatchTopK``: prefix g
is groups 0..g of *every* layer, and the loss is the mean over prefixes of the sum over target
layers of that layer's normalised MSE, plus the auxiliary loss for dead features. Each layer
keeps its own BatchTopK budget (``top_k`` codes per token and layer, on average over the batch).

Training touches only what fired: the encoder matmuls are the one dense part; each code writes
its decoder's ``(L - i) * d`` values, and the backward reads back only those (a sampled product
for the codes' gradients, a sparse product for the decoders'), so a step costs the L encoder
matmuls plus O(L0 * L * d) per token instead of O(F * L^2 * d). It reuses the transcoder's
sparse pieces (``batch_topk_pairs``, ``_SparsePreActs``, ``_FeatureOrder``, ``aux_loss``);
``dense_reference_loss`` is the straightforward computation that the tests hold it to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_tensors
from torch import nn

from mtc.config import INPUT_NORMS
from mtc.dictionary import (
    AuxGradients,
    SparseCodes,
    TrainOutput,
    _csr,
    _FeatureOrder,
    _grad_buffer,
    _row_offsets,
    _SparsePreActs,
    _workspace,
    aux_loss,
    aux_row_step,
    batch_topk_pairs,
    batch_topk_threshold,
)
from mtc.errors import in_brief
from mtc.results import DICTIONARY_FILE, WEIGHTS_FILE

DECODER_INITS = ("random", "own_layer")
TOPK_SCOPES = ("layer", "shared")


@dataclass(frozen=True)
class CLTShape:
    """What a CLT is beyond its weights (saved as ``dictionary.json``)."""

    d_model: int
    n_layers: int
    group_sizes: tuple[int, ...]
    top_k: int  # codes per token and layer
    top_k_aux: int = 512
    aux_penalty: float = 1 / 32
    n_batches_to_dead: int = 5
    threshold_momentum: float = 0.01
    input_norm: str = "token"
    decoder_init: str = "random"
    first_layer: int = 0  # the model layer of source layer 0
    kind: str = "clt"
    topk_scope: str = "layer"
    """``layer``: each layer's BatchTopK keeps ``top_k * B`` codes of its own; ``shared``: one
    BatchTopK over every layer's features keeps ``top_k * L * B`` (layers compete for the budget)."""
    aux_budget: float | None = None  # each layer's auxiliary loss's cost bound (None: every row)

    def __post_init__(self):
        if not self.group_sizes or any(g <= 0 for g in self.group_sizes):
            raise ValueError(f"group_sizes must be positive, got {list(self.group_sizes)}")
        if not 0 < self.top_k < sum(self.group_sizes):
            raise ValueError(f"top_k must be in [1, {sum(self.group_sizes)}), got {self.top_k}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {self.n_layers}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.decoder_init not in DECODER_INITS:
            raise ValueError(f"decoder_init must be one of {DECODER_INITS}, got {self.decoder_init!r}")
        if self.kind != "clt":
            raise ValueError(f"kind must be 'clt', got {self.kind!r}")
        if self.topk_scope not in TOPK_SCOPES:
            raise ValueError(f"topk_scope must be one of {TOPK_SCOPES}, got {self.topk_scope!r}")


class _CrossLayerPrefixLoss(torch.autograd.Function):
    """Every prefix's summed-over-layers MSE from sparse codes: ([n_groups], last residual).

    The residual [G, B, L * d] of prefix g is ``initial`` (b_dec - target, all layers side by
    side) plus the contributions of groups 0..g of every source layer; source layer i's codes
    write columns ``i * d ..`` (its targets i .. L-1) with one ``embedding_bag`` per (group, layer).
    The backward mirrors ``dictionary._PrefixLoss`` per source layer, on the strided view of the
    gradients that its decoder reaches.
    Inputs after ``initial`` and ``plan``: the L code tensors, then the L decoders."""

    @staticmethod
    def forward(ctx, initial, plan, scratch, *vals_and_decoders):
        L = len(plan)
        vals, W_decs = vals_and_decoders[:L], vals_and_decoders[L:]
        G = len(plan[0]["ptr"]) - 1
        B, LD = initial.shape
        d = LD // L
        residuals = _workspace("residuals", (G, B, LD), initial.dtype, initial.device, scratch)
        for g in range(G):
            residuals[g].copy_(initial if g == 0 else residuals[g - 1])
            for i, p in enumerate(plan):
                a, b = p["ptr"][g], p["ptr"][g + 1]
                if a == b:
                    continue
                contrib = F.embedding_bag(
                    p["feats"][a:b],
                    W_decs[i].detach().view(W_decs[i].shape[0], -1),
                    p["crow"][g * B : (g + 1) * B] - a,
                    mode="sum",
                    per_sample_weights=vals[i].detach()[a:b],
                )
                residuals[g][:, i * d :].add_(contrib)
        ctx.save_for_backward(*vals, *W_decs)
        ctx.plan, ctx.residuals, ctx.scratch, ctx.d = plan, residuals, scratch, d
        running = residuals[G - 1]
        ctx.mark_non_differentiable(running)
        mse = torch.linalg.vector_norm(residuals, dim=(1, 2)).square() / (B * d)
        return mse, running

    @staticmethod
    def backward(ctx, grad_mse, _):
        saved = ctx.saved_tensors
        L = len(ctx.plan)
        vals, W_decs = saved[:L], saved[L:]
        grads, d = ctx.residuals, ctx.d
        G, B, LD = grads.shape
        scale = grad_mse * (2 / (B * d))
        for g in reversed(range(G)):  # group g's gradient: prefix g's and every longer prefix's
            grads[g].mul_(scale[g])
            if g + 1 < G:
                grads[g].add_(grads[g + 1])
        grad_vals, grad_decs = [], []
        for i, p in enumerate(ctx.plan):
            W = W_decs[i].detach().view(W_decs[i].shape[0], -1)  # [F, (L - i) d]
            # Both sparse products below want contiguous rows and would each copy this strided
            # view (row stride L * d) on their own: copy it once.
            reached = _workspace("reached", (G * B, LD - i * d), grads.dtype, grads.device, ctx.scratch)
            reached.view(G, B, -1).copy_(grads[:, :, i * d :])
            pattern = _csr(p["crow"], p["feats"], vals[i].detach(), (G * B, W.shape[0]))
            grad_vals.append(torch.sparse.sampled_addmm(pattern, reached, W.t(), beta=0).values())
            out = _grad_buffer(W_decs[i], f"grad_W_dec_{i}", ctx.scratch).view(W.shape)
            grad_decs.append(
                p["by_feat"].sums(p["bags"], vals[i].detach(), reached, out).view(W_decs[i].shape)
            )
        grad_initial = grads[0] if ctx.needs_input_grad[0] else None
        return (grad_initial, None, None, *grad_vals, *grad_decs)


class MatryoshkaCLT(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_layers: int,
        group_sizes: list[int],
        top_k: int,
        *,
        top_k_aux: int = 512,
        aux_penalty: float = 1 / 32,
        n_batches_to_dead: int = 5,
        threshold_momentum: float = 0.01,
        input_norm: str = "token",
        decoder_init: str = "random",
        first_layer: int = 0,
        kind: str = "clt",
        topk_scope: str = "layer",
        aux_budget: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.shape = CLTShape(
            d_model,
            n_layers,
            tuple(group_sizes),
            top_k,
            top_k_aux,
            aux_penalty,
            n_batches_to_dead,
            threshold_momentum,
            input_norm,
            decoder_init,
            first_layer,
            kind,
            topk_scope,
            aux_budget,
        )
        L, d, Fn = n_layers, d_model, sum(group_sizes)
        self.n_layers, self.d_model, self.dict_size, self.top_k = L, d, Fn, top_k
        self.group_sizes = list(group_sizes)
        self.boundaries = [sum(group_sizes[: i + 1]) for i in range(len(group_sizes))]
        gen = torch.Generator().manual_seed(seed)
        # Per layer, as separate parameters: a gradient for one layer's slice of a stacked tensor
        # would cost a zero-filled copy of the whole stack.
        self.W_encT = nn.ParameterList(
            [nn.Parameter(F.normalize(torch.randn(Fn, d, generator=gen), dim=1)) for _ in range(L)]
        )
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(Fn)) for _ in range(L)])
        self.W_dec = nn.ParameterList([nn.Parameter(self._initial_decoder(L - i, gen)) for i in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.register_buffer("threshold", torch.zeros(L))
        self.register_buffer("source_scale", torch.ones(L))
        self.register_buffer("target_scale", torch.ones(L))
        self.register_buffer("source_mean", torch.zeros(L, d))
        self.register_buffer("inactive_batches", torch.zeros(L, Fn, dtype=torch.long))
        self._scratch: list[dict[tuple, torch.Tensor]] = [{} for _ in range(L + 1)]  # per layer, + shared
        self._aux_gradients = [  # each layer's auxiliary loss trains its own-layer decoder slice
            AuxGradients(self.W_encT[i], self.b_enc[i], self.W_dec[i], lambda W: W[:, 0]) for i in range(L)
        ]

    def _initial_decoder(self, n_targets: int, gen: torch.Generator) -> torch.Tensor:
        """[F, n_targets, d], each feature's whole decoder of unit norm: a random direction over
        all its targets, or (``own_layer``) a random direction at its own layer and zero beyond."""
        W = torch.randn(self.dict_size, n_targets, self.d_model, generator=gen)
        if self.shape.decoder_init == "own_layer":
            W[:, 1:] = 0
        return W / W.flatten(1).norm(dim=1)[:, None, None]

    @property
    def layers(self) -> list[int]:
        """The model layers it reads and writes."""
        return list(range(self.shape.first_layer, self.shape.first_layer + self.n_layers))

    # ------------------------------------------------------------------ inference on raw activations
    def _source_scale(self, i: int, x_BD: torch.Tensor) -> torch.Tensor:
        if self.shape.input_norm == "token":
            return torch.rsqrt(x_BD.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12))
        return self.source_scale[i]

    def _normalised_source(self, i: int, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(-self.source_mean[i], x_BD, self._source_scale(i, x_BD))

    def pre_acts(self, i: int, x_BD: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations [B, F] of layer i's features on raw ``resid_mid`` rows of layer i."""
        return torch.relu(self._normalised_source(i, x_BD) @ self.W_encT[i].t() + self.b_enc[i])

    def encode(self, i: int, x_BD: torch.Tensor) -> torch.Tensor:
        """Codes [B, F] of layer i's features, with layer i's learned threshold."""
        pre = self.pre_acts(i, x_BD)
        return pre * (pre > self.threshold[i])

    def decode(self, i: int, acts_BF: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
        """What layer i's codes add to the raw outputs of layers i .. L-1: [B, L - i, d] (no bias;
        ``output_bias`` is added once per layer)."""
        end = self.dict_size if n_groups is None else self.boundaries[n_groups - 1]
        W = self.W_dec[i][:end].flatten(1)
        out = (acts_BF[:, :end] @ W).view(acts_BF.shape[0], self.n_layers - i, self.d_model)
        return out / self.target_scale[i:, None]

    def output_bias(self) -> torch.Tensor:
        """[L, d]: the raw output bias of every layer."""
        return self.b_dec / self.target_scale[:, None]

    def forward(self, x_BLD: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
        """Raw ``mlp_out`` [B, L, d] of every layer from raw ``resid_mid`` [B, L, d] of every layer."""
        out = self.output_bias().expand(x_BLD.shape[0], -1, -1).clone()
        for i in range(self.n_layers):
            out[:, i:] += self.decode(i, self.encode(i, x_BLD[:, i]), n_groups)
        return out

    # ------------------------------------------------------------------ training (normalised space)
    def _targets(self, y_BLD: torch.Tensor) -> torch.Tensor:
        return y_BLD * self.target_scale[:, None]

    def training_forward(
        self, x_BLD: torch.Tensor, y_BLD: torch.Tensor, matmul_dtype: torch.dtype = torch.float32
    ) -> TrainOutput:
        """Loss on a batch of raw ``resid_mid`` / ``mlp_out`` rows of every layer ([B, L, d] each);
        updates the thresholds and dead counters. ``codes`` has one row per (token, layer)."""
        B, L = x_BLD.shape[0], self.n_layers
        plan, vals, fired_rows = [], [], []
        xs = [self._normalised_source(i, x_BLD[:, i]) for i in range(L)]
        for i, (rows, feats, pre_vals) in enumerate(self._select(xs, matmul_dtype)):
            by_feat = _FeatureOrder.of(feats, self.dict_size)
            vals.append(
                _SparsePreActs.apply(
                    self.W_encT[i], self.b_enc[i], xs[i], pre_vals, rows, feats, by_feat, self._scratch[i]
                )
            )
            plan.append(self._decoder_plan(rows, feats, by_feat, B))
            fired_rows.append(rows * L + i)
        initial = (self.b_dec - self._targets(y_BLD)).view(B, L * self.d_model)
        prefix_mse, residual = _CrossLayerPrefixLoss.apply(
            initial, plan, self._scratch[L], *vals, *self.W_dec
        )
        residual = residual.view(B, L, self.d_model)
        aux = sum(
            (
                aux_loss(
                    xs[i],
                    self.W_encT[i],
                    self.b_enc[i],
                    self.W_dec[i],
                    self.dead_features(i),
                    residual[:, i],
                    self.shape.top_k_aux,
                    self.shape.aux_penalty,
                    self.shape.aux_budget,
                    self._aux_gradients[i],
                )
                for i in range(L)
            ),
            residual.new_zeros(()),
        )
        codes = SparseCodes(
            torch.cat(fired_rows),
            torch.cat([p["feats"] for p in plan]),
            torch.cat([v.detach() for v in vals]),
            (B * L, self.dict_size),
        )
        self._update_stats(plan, vals)
        return TrainOutput(prefix_mse.mean() + aux, prefix_mse.detach(), aux.detach(), codes)

    @torch.no_grad()
    def _select(self, xs: list[torch.Tensor], matmul_dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """Each layer's (rows, features, pre-activations) of the batch's codes, sorted by group then
        row: a BatchTopK per layer, or one over all layers' features side by side (``shared``)."""
        B, L, Fn = xs[0].shape[0], self.n_layers, self.dict_size
        gen = self._generator(xs[0].device)

        def mm(i: int, out: torch.Tensor) -> torch.Tensor:
            return torch.mm(xs[i].to(matmul_dtype), self.W_encT[i].t().to(matmul_dtype), out=out)

        if self.shape.topk_scope == "layer":
            work = _workspace("mm", (B, Fn), matmul_dtype, xs[0].device, self._scratch[L])
            return [
                batch_topk_pairs(mm(i, work), self.b_enc[i].detach(), self.top_k * B, self.boundaries, gen)
                for i in range(L)
            ]
        work = _workspace("mm_all", (B, L * Fn), matmul_dtype, xs[0].device, self._scratch[L])
        part = _workspace("mm", (B, Fn), matmul_dtype, xs[0].device, self._scratch[L])
        for i in range(L):
            work[:, i * Fn : (i + 1) * Fn] = mm(i, part)
        bias = torch.cat([b.detach() for b in self.b_enc])
        boundaries = [i * Fn + b for i in range(L) for b in self.boundaries]  # (layer, group) blocks
        rows, feats, pre = batch_topk_pairs(work, bias, self.top_k * L * B, boundaries, gen)
        starts = torch.searchsorted(feats, torch.arange(L + 1, device=feats.device) * Fn).tolist()
        return [
            (rows[a:b], feats[a:b] - i * Fn, pre[a:b]) for i, (a, b) in enumerate(zip(starts, starts[1:]))
        ]

    def _decoder_plan(self, rows, feats, by_feat, B: int) -> dict[str, Any]:
        """Where one layer's codes go in ``_CrossLayerPrefixLoss``: per group, its slice of the
        triples (``ptr``); each triple's (group, row) bag and the bags' CSR row pointers."""
        group = torch.bucketize(feats, feats.new_tensor(self.boundaries), right=True)
        ptr = [0, *torch.bincount(group, minlength=len(self.boundaries)).cumsum(0).tolist()]
        bags = rows + group * B
        G = len(self.boundaries)
        return {
            "feats": feats,
            "ptr": ptr,
            "bags": bags,
            "crow": _row_offsets(bags, G * B + 1),
            "by_feat": by_feat,
        }

    def dense_reference_loss(
        self, x_BLD: torch.Tensor, y_BLD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, prefix_mse) of ``training_forward`` the straightforward way (tests only)."""
        L, d = self.n_layers, self.d_model
        y = self._targets(y_BLD)
        pres = [self.pre_acts(i, x_BLD[:, i]) for i in range(L)]
        if self.shape.topk_scope == "shared":
            t = batch_topk_threshold(torch.cat(pres, dim=1).detach(), self.top_k * L)
            acts = [pre * (pre >= t) for pre in pres]
        else:
            acts = [pre * (pre >= batch_topk_threshold(pre.detach(), self.top_k)) for pre in pres]
        prefix_mse, recon = [], self.b_dec.expand_as(y)
        start = 0
        for end in self.boundaries:
            parts = [torch.zeros_like(y[:, :i]) for i in range(L)]
            for i in range(L):
                add = (acts[i][:, start:end] @ self.W_dec[i][start:end].flatten(1)).view(-1, L - i, d)
                recon = recon + torch.cat([parts[i], add], dim=1)
            prefix_mse.append((recon - y).pow(2).sum(dim=(1, 2)).mean() / d)
            start = end
        loss = torch.stack(prefix_mse).mean()
        residual = (y - recon).detach()  # what the live features miss (b_dec included)
        for i in range(L):
            dead = self.dead_features(i)
            if dead.numel() and self.shape.aux_penalty:
                step = aux_row_step(len(x_BLD), dead.numel(), self.dict_size, self.shape.aux_budget)
                x = self._normalised_source(i, x_BLD[::step, i])
                pre = torch.relu(x @ self.W_encT[i].t() + self.b_enc[i])
                values, idx = pre[:, dead].topk(min(self.shape.top_k_aux, dead.numel()), dim=1)
                aux_acts = torch.zeros_like(pre).scatter(1, dead[idx], values)
                error = aux_acts @ self.W_dec[i][:, 0] - residual[::step, i]
                loss = loss + self.shape.aux_penalty * error.pow(2).mean()
        return loss, torch.stack(prefix_mse).detach()

    def dead_features(self, i: int) -> torch.Tensor:
        """Indices of layer i's features silent for ``n_batches_to_dead`` batches."""
        return torch.nonzero(self.inactive_batches[i] >= self.shape.n_batches_to_dead).flatten()

    def n_dead(self) -> int:
        return int((self.inactive_batches >= self.shape.n_batches_to_dead).sum())

    def _generator(self, device: torch.device) -> torch.Generator:
        # Only speeds up the threshold search (the result does not depend on it); not saved.
        if getattr(self, "_gen", None) is None or self._gen.device != device:
            self._gen = torch.Generator(device).manual_seed(0)
        return self._gen

    @torch.no_grad()
    def _update_stats(self, plan: list[dict[str, Any]], vals: list[torch.Tensor]) -> None:
        """Dead counters per layer; each layer's threshold follows the smallest code it kept (the
        smallest over all layers with a shared budget: one threshold for all)."""
        smallest = [v.detach().min() if v.numel() else None for v in vals]
        if self.shape.topk_scope == "shared":
            kept = [t for t in smallest if t is not None]
            smallest = [torch.stack(kept).min() if kept else None] * self.n_layers
        m = self.shape.threshold_momentum
        for i, p in enumerate(plan):
            fired = torch.bincount(p["feats"], minlength=self.dict_size) > 0
            self.inactive_batches[i].add_(1).masked_fill_(fired, 0)
            if smallest[i] is not None:
                first = self.threshold[i] == 0  # start the average at the first value, not at 0
                self.threshold[i] = smallest[i] if first else (1 - m) * self.threshold[i] + m * smallest[i]

    @torch.no_grad()
    def calibrate_threshold(self, sources: Iterable[torch.Tensor]) -> list[float]:
        """Each layer's threshold so that ``top_k`` of its codes per token clear it on average over
        the rows of ``sources`` (batches of raw ``resid_mid`` [B, L, d]); see
        ``MatryoshkaBatchTopK.calibrate_threshold``."""
        candidates: list[list[torch.Tensor]] = [[] for _ in range(self.n_layers)]
        n_rows = 0
        for x in sources:
            x = x.to(self.b_dec.device, self.b_dec.dtype)
            for i in range(self.n_layers):
                pre = self.pre_acts(i, x[:, i]).flatten()
                candidates[i].append(
                    pre.topk(min(2 * self.top_k * x.shape[0], pre.numel()), sorted=False).values
                )
            n_rows += x.shape[0]
        if not n_rows:
            return self.threshold.tolist()
        if self.shape.topk_scope == "shared":  # one threshold: top_k * L codes per token over all layers
            values = torch.cat([c for layer in candidates for c in layer])
            kth = values.topk(
                min(self.top_k * self.n_layers * n_rows, values.numel()), sorted=False
            ).values.min()
            self.threshold.fill_(float(kth.clamp_min(torch.finfo(kth.dtype).tiny)))
            return self.threshold.tolist()
        for i in range(self.n_layers):
            values = torch.cat(candidates[i])
            kth = values.topk(min(self.top_k * n_rows, values.numel()), sorted=False).values.min()
            self.threshold[i] = kth.clamp_min(torch.finfo(kth.dtype).tiny)
        return self.threshold.tolist()

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop each feature's decoder gradient along its (whole, all-layer) decoder."""
        for W in self.W_dec:
            if W.grad is not None:
                w, g = W.flatten(1), W.grad.view(W.shape[0], -1)
                g.addcmul_(torch.einsum("fd,fd->f", g, w)[:, None], w, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for W in self.W_dec:
            W.div_(torch.linalg.vector_norm(W.flatten(1), dim=1).clamp_min(1e-8)[:, None, None])

    @torch.no_grad()
    def set_scales(self, source_mean_norms: list[float], target_mean_norms: list[float]) -> None:
        """Scale so that each layer's normalised activations have mean norm sqrt(d)."""
        root = math.sqrt(self.d_model)
        self.source_scale.copy_(root / torch.tensor(source_mean_norms))
        self.target_scale.copy_(root / torch.tensor(target_mean_norms))

    @torch.no_grad()
    def init_means(self, x_BLD: torch.Tensor, y_BLD: torch.Tensor) -> None:
        """Centre each layer's encoder on its source's mean and start b_dec at the targets' means
        (normalised, from a first batch), so the initial loss is about one per layer."""
        for i in range(self.n_layers):
            x = x_BLD[:, i]
            self.source_mean[i] = (x * self._source_scale(i, x)).mean(dim=0)
        self.b_dec.copy_(self._targets(y_BLD).mean(dim=0))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, weights_file: str = WEIGHTS_FILE) -> None:
        from mtc.results import atomic_write_bytes, atomic_write_text

        directory = Path(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / weights_file, save_tensors(tensors))
        atomic_write_text(directory / DICTIONARY_FILE, json.dumps(dataclasses.asdict(self.shape), indent=2))

    @classmethod
    def load(
        cls, directory: str | Path, weights_file: str = WEIGHTS_FILE, device: str | torch.device = "cpu"
    ):
        """The CLT saved in ``directory``; a missing, damaged or mismatched file ends in one line."""
        from mtc.results import damaged, read_json, read_tensors

        directory = Path(directory)
        shape: dict[str, Any] = read_json(directory / DICTIONARY_FILE)
        tensors = read_tensors(directory / weights_file, device)
        try:
            model = cls(**shape)
            model.load_state_dict(tensors)
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:
            raise damaged(
                directory / weights_file, f"does not match {DICTIONARY_FILE} ({in_brief(e)})"
            ) from None
        return model.to(device)


def is_clt_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved CLT (its ``dictionary.json`` says kind ``clt``)."""
    try:
        return json.loads((Path(directory) / DICTIONARY_FILE).read_text()).get("kind") == "clt"
    except (OSError, ValueError, AttributeError):
        return False
