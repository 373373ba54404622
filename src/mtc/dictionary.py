"""The Matryoshka BatchTopK dictionary: a transcoder (source site -> target site) or an SAE.

Features are one dictionary cut into nested groups: prefix ``i`` is features
``0 .. sum(group_sizes[:i+1])``, and every prefix is trained to reconstruct the target on its own,
so the dictionary can be truncated at any group boundary. Inputs and targets are scaled by
factors stored with the dictionary (mean norm -> sqrt(d)); ``encode``/``decode``/``forward`` take
and give raw activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_tensors
from torch import nn

from mtc.config import INPUT_NORMS
from mtc.errors import in_brief
from mtc.results import DICTIONARY_FILE, WEIGHTS_FILE


class SparseCodes(NamedTuple):
    """The batch's non-zero codes as (row, feature, value) triples, sorted by group, then row."""

    rows: torch.Tensor  # [nnz] int64
    feats: torch.Tensor  # [nnz] int64
    vals: torch.Tensor  # [nnz] float, > 0
    shape: tuple[int, int]  # (B, D)

    def dense(self) -> torch.Tensor:
        out = self.vals.new_zeros(self.shape)
        out[self.rows, self.feats] = self.vals
        return out

    def l0(self) -> float:
        return self.vals.numel() / self.shape[0]


class TrainOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean prefix MSE + aux
    prefix_mse: torch.Tensor  # [n_groups] normalised-space MSE of each prefix
    aux_loss: torch.Tensor  # scalar
    codes: SparseCodes  # the batch-top-k codes

    @property
    def acts_BF(self) -> torch.Tensor:
        """Dense [B, F] codes (a B x F tensor: only for logging and tests)."""
        return self.codes.dense()


def batch_topk_threshold(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Smallest value among the ``k * B`` largest entries of ``pre_BF`` (the dense reference)."""
    return pre_BF.flatten().topk(k * pre_BF.shape[0], sorted=False).values.min()


_SHARED_WORKSPACE: dict[tuple, torch.Tensor] = {}


def ridge_solution(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W [d_in, d_out] minimising ||x W - y||^2 + ridge * (mean eigenvalue of x'x) * ||W||^2, from
    x'x and x'y (solved in float64, so a batch barely larger than d_in still solves stably)."""
    gram = xtx.double().clone()
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    return torch.linalg.solve(gram, xty.double())


def _workspace(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    store: dict[tuple, torch.Tensor] = _SHARED_WORKSPACE,
) -> torch.Tensor:
    """A scratch buffer reused from step to step (uninitialised). A fresh B x F tensor every step
    costs page faults on CPU: about 60 ms per 200 MB here, an eighth of the encoder matmul. Buffers
    that outlive a call (saved for backward) live in their dictionary's own ``store``."""
    numel = math.prod(shape)
    buf = store.get((name, dtype, device))
    if buf is None or buf.numel() < numel:
        buf = store[(name, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def batch_topk_pairs(
    mm_BF: torch.Tensor,
    bias_F: torch.Tensor,
    n: int,
    boundaries: list[int],
    generator: torch.Generator | None = None,
    threshold_of: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, features, values) of the ``n`` largest entries of ``pre = mm_BF + bias_F``, less
    those <= 0, sorted by group (``boundaries``), then row, then feature.

    Exact, without a top-k over all B x D values and without materialising ``pre``: a random
    sample of the entries gives a value ``t`` that about 1.3 n entries exceed; when at least n do
    (checked, else ``t`` is lowered), the n largest are all among them, and a top-k over those few
    candidates finds the threshold. Costs two passes over ``mm_BF`` (compare, nonzero), one group's
    columns at a time, which yields the pairs already in order. ``threshold_of(candidates, n)``, when
    given, replaces that last top-k (data-parallel training takes the n-th largest over all ranks).
    """
    B, D = mm_BF.shape
    n_sample = min(B * D, 1 << 16)
    sample = torch.randint(B * D, (n_sample,), generator=generator, device=mm_BF.device)
    rank = min(n_sample, int(1.3 * n * n_sample / (B * D)) + 64)
    t = (mm_BF.view(-1)[sample].to(bias_F.dtype) + bias_F[sample % D]).topk(rank, sorted=False).values.min()
    for attempt in range(4):
        bound = (t - bias_F).to(mm_BF.dtype)  # mm >= t - bias  <=>  pre >= t
        pairs = nonzero_by_group(
            lambda a, b: torch.ge(
                mm_BF[:, a:b], bound[a:b], out=_workspace("mask", (B, b - a), torch.bool, mm_BF.device)
            ),
            boundaries,
        )
        if pairs.shape[0] >= n:
            break
        # rare (a sample far off): lower the bound, in the end to -inf (every entry)
        t = t - (t.abs() + 1) * 4 if attempt < 2 else t.new_tensor(float("-inf"))
    rows, feats = pairs.unbind(1)
    flat = mm_BF.reshape(-1).index_select(0, rows * D + feats)  # 3x faster than mm_BF[rows, feats]
    cand = flat.to(bias_F.dtype) + bias_F.index_select(0, feats)
    keep = cand > 0
    if threshold_of is not None:
        keep &= cand >= threshold_of(cand, n)
    elif cand.numel() > n:  # exactly n: ties at the threshold (common in bf16) are broken arbitrarily
        top = torch.zeros_like(keep)
        top[cand.topk(n, sorted=False).indices] = True
        keep &= top
    kept = keep.nonzero().squeeze(1)
    return rows[kept], feats[kept], cand[kept]


def nonzero_by_group(mask_of: Callable[[int, int], torch.Tensor], boundaries: list[int]) -> torch.Tensor:
    """(row, feature) pairs [n, 2] where ``mask_of(start, end)`` (a group's [B, end - start] columns)
    is true, sorted by group, then row, then feature: one group's columns at a time."""
    parts = []
    for a, b in zip([0, *boundaries], boundaries):
        pairs = mask_of(a, b).nonzero()
        pairs[:, 1] += a
        parts.append(pairs)
    return torch.cat(parts)


def _row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """embedding_bag offsets of sorted bag ids ``rows`` (empty bags allowed): where each starts."""
    return torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))


class _FeatureOrder(NamedTuple):
    """The triples' order by feature (``perm``) and the row pointers ``crow`` of the [F, n] sparse
    matrix whose row f holds feature f's triples (where each feature's run starts in that order,
    then the count). The encoder's and the decoder's weight gradients are that matrix times a
    dense one."""

    perm: torch.Tensor
    crow: torch.Tensor

    @classmethod
    def of(cls, feats: torch.Tensor, dict_size: int) -> "_FeatureOrder":
        sorted_feats, perm = torch.sort(feats)
        return cls(perm, _row_offsets(sorted_feats, dict_size + 1))

    def sums(
        self, cols: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out[f] = sum of weights[i] * dense[cols[i]]`` over feature f's triples i, as one sparse
        (CSR) times dense product written into ``out`` (MKL's on CPU: faster than an
        ``embedding_bag``, and no fresh [F, d] tensor)."""
        A = _csr(self.crow, cols[self.perm], weights[self.perm], (len(self.crow) - 1, dense.shape[0]))
        return torch.addmm(out, A, dense, beta=0, out=out)


def _csr(
    crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A sparse CSR matrix (rows' column indices ascending, as built here), without torch's
    invariant checks and its one-time "CSR support is in beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _grad_buffer(param: torch.Tensor, name: str, scratch: dict | None) -> torch.Tensor:
    """Where a backward writes ``param``'s gradient. When ``param.grad`` is None (the optimizer
    freed it), autograd adopts the result as ``param.grad``: a buffer reused from step to step
    then serves as the gradient itself, costing no memory and sparing a fresh tensor's page
    faults (10 ms for 38 MB here). So a gradient tensor kept from an earlier step is overwritten
    by the next backward. When ``param.grad`` exists, autograd adds the result into it, and the
    result must not be that same memory: a fresh tensor."""
    if scratch is None or param.grad is not None:
        return torch.empty_like(param)
    return _workspace(name, param.shape, param.dtype, param.device, scratch)


class _SparsePreActs(torch.autograd.Function):
    """``pre[rows, feats]`` of ``pre = x @ W_encT.T + b_enc``, given those values (``pre_vals``),
    computed outside autograd.

    The backward touches only the gathered entries: the gradient of ``W_encT`` [F, d_in] is, for
    each feature, a weighted sum of the rows of ``x`` that selected it (a sparse product,
    O(nnz * d)), instead of the dense ``x.T @ grad_pre`` (O(B * d * D)).
    """

    @staticmethod
    def forward(ctx, W_encT, b_enc, x, pre_vals, rows, feats, by_feat, scratch):
        ctx.save_for_backward(x, rows, feats)
        ctx.W_encT, ctx.by_feat, ctx.scratch = W_encT, by_feat, scratch
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, grad):
        x, rows, feats = ctx.saved_tensors
        grad_WT = ctx.by_feat.sums(rows, grad, x, _grad_buffer(ctx.W_encT, "grad_W_enc", ctx.scratch))
        grad_b = torch.zeros(ctx.W_encT.shape[0], dtype=grad.dtype, device=grad.device).index_add_(
            0, feats, grad
        )
        return grad_WT, grad_b, None, None, None, None, None, None


class _PrefixLoss(torch.autograd.Function):
    """MSE of every prefix's reconstruction from sparse codes: ([n_groups], last residual).

    Prefix g's residual (reconstruction - target) is ``initial`` (b_dec - target) plus the
    contributions of groups 0..g. ``ptr`` splits the (row, feature, value) triples, sorted by group
    then row (then feature), into groups; the forward adds one ``embedding_bag`` per group (a
    weighted sum of decoder rows per token) to a running residual, kept for the backward in
    ``scratch`` (a dictionary's reused buffers) or a fresh tensor when None. The backward is sparse
    too: the gradient reaching group g's contributions is the sum over the prefixes that hold it
    (built in place of the saved residuals, so backward runs once); the codes' gradient is one dot
    product per triple (a sampled dense product over the (group, row) x feature pattern), and
    W_dec's gradient is, per feature, a weighted sum of those gradients over the tokens that used it.
    """

    @staticmethod
    def forward(ctx, vals, W_dec, initial, rows, feats, by_feat, ptr, scratch):
        G, (B, d) = len(ptr) - 1, initial.shape
        residuals = (
            initial.new_empty(G, B, d)
            if scratch is None
            else _workspace("residuals", (G, B, d), initial.dtype, initial.device, scratch)
        )
        bags = rows.clone()  # (group, row) -> one bag of the [G * B] stacked residuals
        for g in range(1, G):
            bags[ptr[g] : ptr[g + 1]] += g * B
        crow = _row_offsets(bags, G * B + 1)
        running, weights, codes = initial, W_dec.detach(), vals.detach()  # detached: the forward-only kernel
        for g in range(G):
            a, b = ptr[g], ptr[g + 1]
            contrib = F.embedding_bag(
                feats[a:b], weights, crow[g * B : (g + 1) * B] - a, mode="sum", per_sample_weights=codes[a:b]
            )
            running = torch.add(running, contrib, out=residuals[g])
        ctx.save_for_backward(vals, W_dec, feats, bags, crow, residuals)
        ctx.W_dec, ctx.by_feat, ctx.scratch = W_dec, by_feat, scratch
        ctx.mark_non_differentiable(running)
        mse = torch.linalg.vector_norm(residuals, dim=(1, 2)).square() / (B * d)
        return mse, running

    @staticmethod
    def backward(ctx, grad_mse, _):
        vals, W_dec, feats, bags, crow, grads = ctx.saved_tensors  # grads: the residuals
        G, B, d = grads.shape
        scale = grad_mse * (2 / (B * d))
        for g in reversed(range(G)):  # group g's gradient: prefix g's and every longer prefix's
            grads[g].mul_(scale[g])
            if g + 1 < G:
                grads[g].add_(grads[g + 1])
        stacked = grads.view(G * B, d)
        pattern = _csr(crow, feats, vals.detach(), (G * B, W_dec.shape[0]))
        grad_vals = torch.sparse.sampled_addmm(pattern, stacked, W_dec.detach().t(), beta=0).values()
        grad_W = ctx.by_feat.sums(
            bags, vals.detach(), stacked, _grad_buffer(ctx.W_dec, "grad_W_dec", ctx.scratch)
        )
        grad_initial = grads[0] if ctx.needs_input_grad[2] else None  # b_dec's, through autograd
        return grad_vals, grad_W, grad_initial, None, None, None, None, None


def aux_row_step(n_rows: int, n_dead: int, dict_size: int, budget: float | None) -> int:
    """Every how many rows of a batch the auxiliary loss reads. Its five dense products over R rows
    and the ``n_dead`` columns cost ``5 R n_dead / (n_rows dict_size)`` of the encoder matmul; R is
    as many evenly spaced rows as keep that within ``budget``: every row while few features are
    dead, about 3 % of them at budget 0.15 once the whole dictionary is. ``None``: every row."""
    if n_dead == 0 or budget is None:
        return 1
    rows = max(1, math.floor(budget * n_rows * dict_size / (5 * n_dead)))
    return -(-n_rows // min(rows, n_rows))


class _AuxLoss(torch.autograd.Function):
    """``penalty * mean((codes @ W_dec[dead] + residual)^2)``, ``codes`` the top ``k_aux`` of
    ``relu(x @ W_encT[dead].T + b_enc[dead])`` per row, with the five dense products written out.

    The gradients of the dead rows are small ([n_dead, d]); autograd would widen each to a
    zero-filled copy of its whole parameter and add that to the gradient the main loss already
    produced (four full passes over two matrices, more than the products themselves). Instead the
    backward leaves them in ``AuxGradients``, which adds them in place into the accumulated
    gradients once autograd has finished with each parameter."""

    @staticmethod
    def forward(ctx, W_encT, b_enc, W_dec, x, residual, dead, k_aux, penalty, pending):
        W_enc_dead, W_dec_dead = W_encT.index_select(0, dead), pending.dec_view(W_dec).index_select(0, dead)
        pre = torch.addmm(b_enc[dead], x, W_enc_dead.t()).relu_()  # [R, n_dead]
        if k_aux < dead.numel():
            top = pre.topk(k_aux, dim=1, sorted=False)
            pre = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
        error = torch.addmm(residual, pre, W_dec_dead)
        ctx.save_for_backward(x, W_dec_dead, pre, error, dead)
        ctx.penalty, ctx.pending = penalty, pending
        return penalty * error.pow(2).mean()

    @staticmethod
    def backward(ctx, grad):
        x, W_dec_dead, codes, error, dead = ctx.saved_tensors
        grad_error = error * (grad * ctx.penalty * 2 / error.numel())
        grad_pre = (grad_error @ W_dec_dead.t()).mul_(codes > 0)
        ctx.pending.add(dead, grad_pre.t() @ x, grad_pre.sum(0), codes.t() @ grad_error)
        return None, None, None, None, None, None, None, None, None


class AuxGradients:
    """Hands the auxiliary loss's gradients of the dead rows to one dictionary's (or one CLT
    layer's) parameters: each is added into ``param.grad`` right after autograd accumulates it (a
    post-accumulate hook), so nothing depends on the order of the backward. ``dec_view`` picks the
    decoder rows the auxiliary loss trains (a CLT's own-layer slice)."""

    def __init__(self, W_encT: nn.Parameter, b_enc: nn.Parameter, W_dec: nn.Parameter, dec_view=None):
        self.dec_view = dec_view or (lambda W: W)
        self.waiting: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param, slot in ((W_encT, 0), (b_enc, 1), (W_dec, 2)):
            param.register_post_accumulate_grad_hook(lambda p, slot=slot: self._apply(p, slot))

    def add(self, dead, grad_W_enc, grad_b_enc, grad_W_dec) -> None:
        for slot, g in enumerate((grad_W_enc, grad_b_enc, grad_W_dec)):
            self.waiting.setdefault(slot, []).append((dead, g))

    def _apply(self, param: torch.Tensor, slot: int) -> None:
        for dead, g in self.waiting.pop(slot, []):
            target = self.dec_view(param.grad) if slot == 2 else param.grad
            g = g.to(target.dtype)
            if target.dim() == 1 or not target.is_contiguous():  # b_enc; a CLT's decoder slice
                target.index_add_(0, dead, g)
                continue
            # A [F, n_dead] selection matrix times the rows: MKL's sparse product, several times
            # faster here than index_add_'s scatter over an expanded [n_dead, d] index.
            n = dead.numel()
            starts = torch.zeros(len(target) + 1, dtype=torch.long, device=dead.device)
            starts[dead + 1] = 1
            cols = torch.arange(n, device=dead.device)
            select = _csr(starts.cumsum_(0), cols, g.new_ones(n), (len(target), n))
            torch.addmm(target, select, g, out=target)


def aux_loss(
    x_BD: torch.Tensor,
    W_encT: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    dead: torch.Tensor,
    residual_BD: torch.Tensor,
    k_aux: int,
    penalty: float,
    budget: float | None,
    gradients: AuxGradients,
) -> torch.Tensor:
    """The auxiliary loss that revives dead features: reconstruct what the live features miss
    (``-residual_BD``) with each token's top ``k_aux`` dead features (``dead``: their indices).
    Dense over the dead features alone, on evenly spaced rows of the batch (``aux_row_step``):
    batches come shuffled, so the mean over those rows estimates the mean over the batch, at a
    cost bounded by ``budget`` (a share of one encoder matmul) whatever the dead count; every row
    when ``budget`` is None (the default) or covers them all (``budget >= 5 n_dead / F``). Its
    gradients reach the parameters through ``gradients`` (see ``_AuxLoss``). Shared by every
    dictionary kind (a cross-layer transcoder calls it per layer). ``x_BD`` must not need a
    gradient."""
    if dead.numel() == 0 or penalty == 0:
        return residual_BD.new_zeros(())
    if x_BD.requires_grad:
        raise ValueError("aux_loss: the source rows must not need a gradient (it would be dropped)")
    step = aux_row_step(x_BD.shape[0], dead.numel(), W_encT.shape[0], budget)
    x, residual = x_BD[::step], residual_BD.detach()[::step]
    return _AuxLoss.apply(W_encT, b_enc, W_dec, x, residual, dead, k_aux, penalty, gradients)


def _save_W_enc_input_major(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "W_enc"] = state_dict.pop(prefix + "W_encT").t()


def _load_W_enc_input_major(module, state_dict, prefix, *args) -> None:
    if prefix + "W_enc" in state_dict:
        state_dict[prefix + "W_encT"] = state_dict.pop(prefix + "W_enc").t()


ACTIVATIONS = ("batchtopk", "topk", "jumprelu", "relu")


@dataclass(frozen=True)
class DictionaryShape:
    """What a dictionary is, beyond its weights (saved beside them as ``dictionary.json``): widths,
    Matryoshka groups, sparsity, the source scaling, and the training settings its own code reads."""

    d_in: int
    d_out: int
    group_sizes: tuple[int, ...]
    top_k: int
    top_k_aux: int = 512
    aux_penalty: float = 1 / 32
    n_batches_to_dead: int = 5
    threshold_momentum: float = 0.01
    kind: str = "transcoder"
    input_norm: str = "token"
    skip_connection: bool = False
    activation: str = "batchtopk"
    """How codes are chosen at inference. ``batchtopk`` (what mtc trains): one threshold for every
    feature; ``topk``: the ``top_k`` largest per token; ``jumprelu``: a threshold per feature;
    ``relu``: every positive pre-activation. The last three are for dictionaries trained elsewhere
    (``mtc import``); only ``batchtopk`` trains."""
    aux_budget: float | None = None
    """The auxiliary loss's cost as a share of one encoder matmul (``aux_row_step``; None: every row)."""

    def __post_init__(self):
        if not self.group_sizes or any(g <= 0 for g in self.group_sizes):
            raise ValueError(f"group_sizes must be positive, got {list(self.group_sizes)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        dict_size = sum(self.group_sizes)
        if self.activation in ("batchtopk", "topk") and not 0 < self.top_k < dict_size:
            raise ValueError(f"top_k must be in [1, {dict_size}), got {self.top_k}")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise ValueError("an SAE reconstructs its input: d_in must equal d_out")
        if self.kind == "sae" and self.skip_connection:
            raise ValueError(
                "an SAE with a skip connection would learn the identity: skip_connection is for transcoders"
            )
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")


class MatryoshkaBatchTopK(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        group_sizes: list[int],
        top_k: int,
        *,
        top_k_aux: int = 512,
        aux_penalty: float = 1 / 32,
        n_batches_to_dead: int = 5,
        threshold_momentum: float = 0.01,
        kind: str = "transcoder",
        input_norm: str = "token",
        skip_connection: bool = False,
        activation: str = "batchtopk",
        aux_budget: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.shape = DictionaryShape(
            d_in,
            d_out,
            tuple(group_sizes),
            top_k,
            top_k_aux,
            aux_penalty,
            n_batches_to_dead,
            threshold_momentum,
            kind,
            input_norm,
            skip_connection,
            activation,
            aux_budget,
        )
        dict_size = sum(group_sizes)
        self.group_sizes = list(group_sizes)
        self.boundaries = [sum(group_sizes[: i + 1]) for i in range(len(group_sizes))]
        self.dict_size = dict_size
        self.top_k = top_k
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(dict_size, d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [F, d_out], unit rows
        # Encoder starts as the decoder's transpose (for an SAE) or a random direction set (transcoder).
        W_enc = W_dec.T.clone() if kind == "sae" else torch.randn(d_in, dict_size, generator=gen)
        W_enc = W_enc / W_enc.norm(dim=0, keepdim=True)
        # Stored feature-major, [F, d_in]: the sparse encoder gradient comes out in that layout, and
        # a transposed gradient would cost the optimizer a copy of the whole matrix every step (7 %
        # of a step at the GPT-2 shape). ``W_enc`` [d_in, F] is a view, and the name in state dicts.
        self.W_encT = nn.Parameter(W_enc.T.contiguous())
        self.register_state_dict_post_hook(_save_W_enc_input_major)
        self.register_load_state_dict_pre_hook(_load_W_enc_input_major)
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        # A transcoder's optional linear path from the normalised source to the target, beside the
        # features ("skip transcoders"): the MLP's linear part no longer costs features.
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if skip_connection else None
        # One inference threshold (per feature for a JumpReLU dictionary trained elsewhere).
        self.register_buffer(
            "threshold", torch.zeros(dict_size) if activation == "jumprelu" else torch.tensor(0.0)
        )
        self.register_buffer("source_scale", torch.tensor(1.0))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("inactive_batches", torch.zeros(dict_size, dtype=torch.long))
        # Mean of the normalised source, subtracted before encoding so features see deviations
        # from the mean rather than all firing on it (the role b_dec plays in a classic SAE).
        self.register_buffer("source_mean", torch.zeros(d_in))
        self._scratch: dict[tuple, torch.Tensor] = {}  # training buffers reused from step to step
        self._aux_gradients = AuxGradients(self.W_encT, self.b_enc, self.W_dec)

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder [d_in, F] (a view of the feature-major parameter ``W_encT``)."""
        return self.W_encT.t()

    # ------------------------------------------------------------------ inference on raw activations
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations [B, F] of raw source activations."""
        return torch.relu(self._normalised_source(x_BD) @ self.W_enc + self.b_enc)

    @property
    def _per_token_output(self) -> bool:
        """An SAE with per-token input scaling reconstructs the scaled row: its output is scaled
        back by that row's own norm."""
        return self.shape.input_norm == "token" and self.shape.kind == "sae"

    def _row_scale(self, x_BD: torch.Tensor) -> torch.Tensor:
        """[B, 1]: 1 / RMS of each row (each row scaled to norm sqrt(d))."""
        return torch.rsqrt(x_BD.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12))

    def _source_scale(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Each row's own 1 / RMS ([B, 1]), or the one global scale."""
        return self._row_scale(x_BD) if self.shape.input_norm == "token" else self.source_scale

    def _scaled_source(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD * self._source_scale(x_BD)

    def _scaled_target(self, x_BD: torch.Tensor, y_BD: torch.Tensor) -> torch.Tensor:
        """The training target in normalised space."""
        return self._scaled_source(x_BD) if self._per_token_output else y_BD * self.target_scale

    def _normalised_source(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(-self.source_mean, x_BD, self._source_scale(x_BD))  # one pass over x

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Codes [B, F] with the learned threshold: each token encodes on its own."""
        pre = self.pre_acts(x_BD)
        if self.shape.activation == "topk":
            values, features = pre.topk(self.top_k, dim=1)
            return torch.zeros_like(pre).scatter_(1, features, values)
        return pre * (pre > self.threshold)

    def decode(
        self, acts_BF: torch.Tensor, n_groups: int | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw target reconstruction from the first ``n_groups`` groups (all by default).
        ``source``: the raw rows that were encoded, which an SAE with per-token input scaling needs
        to scale its output back (ignored otherwise)."""
        end = self.dict_size if n_groups is None else self.boundaries[n_groups - 1]
        recon = acts_BF[:, :end] @ self.W_dec[:end] + self.b_dec
        if self.W_skip is not None:
            if source is None:
                raise ValueError(
                    "this transcoder has a skip connection: decode needs source=the encoded rows"
                )
            recon = recon + self._skip(self._normalised_source(source))
        if self._per_token_output:
            if source is None:
                raise ValueError(
                    "this SAE scales each token by its own norm: decode needs source=the encoded rows"
                )
            return recon / self._row_scale(source)
        return recon / self.target_scale

    def forward(self, x_BD: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
        return self.decode(self.encode(x_BD), n_groups, source=x_BD)

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

    def prefix_losses(
        self, codes: SparseCodes, vals: torch.Tensor, y_BD: torch.Tensor, by_feat: _FeatureOrder | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MSE of every prefix's reconstruction of the normalised target ``y_BD``;
        the full dictionary's residual), from the codes ``vals`` at ``codes``' (row, feature) pairs,
        which must be sorted by group, then row (``by_feat``: their order by feature, if already
        known). Equal to the dense computation; touches only the codes. The residuals saved for the
        backward are reused by the next call: run the backward before then."""
        group = torch.bucketize(codes.feats, codes.feats.new_tensor(self.boundaries), right=True)
        ptr = [0, *torch.bincount(group, minlength=len(self.boundaries)).cumsum(0).tolist()]
        by_feat = _FeatureOrder.of(codes.feats, self.dict_size) if by_feat is None else by_feat
        initial = self.b_dec - y_BD
        return _PrefixLoss.apply(
            vals, self.W_dec, initial, codes.rows, codes.feats, by_feat, ptr, self._scratch
        )

    def training_forward(
        self, x_BD: torch.Tensor, y_BD: torch.Tensor, matmul_dtype: torch.dtype = torch.float32
    ) -> TrainOutput:
        """Loss on a batch of raw source/target rows; updates the threshold and dead counters.

        Only the encoder matmul is dense. BatchTopK keeps k*B of the B*D pre-activations; the
        decoder, the encoder's gradient and the auxiliary loss work on those entries alone
        (``tests/test_dictionary.py`` checks the loss and every gradient against the dense step).
        ``matmul_dtype=torch.bfloat16`` runs that matmul (and the selection) in bf16; weights,
        gradients and everything else stay float32.
        """
        if self.shape.activation != "batchtopk":
            raise ValueError(f"only batchtopk dictionaries train; this one is {self.shape.activation}")
        B = x_BD.shape[0]
        x = self._normalised_source(x_BD)
        with torch.no_grad():  # the one dense product; b_enc is added only where it is needed
            mm = torch.mm(
                x.to(matmul_dtype),
                self.W_enc.to(matmul_dtype),
                out=_workspace("mm", (B, self.dict_size), matmul_dtype, x.device),
            )
        rows, feats, pre_vals = self._select(mm)
        by_feat = _FeatureOrder.of(feats, self.dict_size)
        vals = _SparsePreActs.apply(self.W_encT, self.b_enc, x, pre_vals, rows, feats, by_feat, self._scratch)
        codes = SparseCodes(rows, feats, vals.detach(), (B, self.dict_size))
        target = self._scaled_target(x_BD, y_BD) - self._skip(x)  # what the features reconstruct
        prefix_mse, residual = self.prefix_losses(codes, vals, target, by_feat)
        aux = self._aux_loss(x, residual)
        self._update_stats(codes)
        return TrainOutput(prefix_mse.mean() + aux, prefix_mse.detach(), aux.detach(), codes)

    def dense_reference_loss(
        self, x_BD: torch.Tensor, y_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, prefix_mse) of ``training_forward`` computed the straightforward way: dense
        codes, one dense decode per group, dense autograd. For tests and benchmarks only."""
        y = self._scaled_target(x_BD, y_BD) - self._skip(self._normalised_source(x_BD))
        pre = self.pre_acts(x_BD)
        acts = pre * (pre >= batch_topk_threshold(pre.detach(), self.top_k))
        prefix_mse = torch.stack([(r - y).pow(2).mean() for r in self.prefix_reconstructions_dense(acts)])
        loss = prefix_mse.mean()
        dead = self.dead_features()
        if dead.numel() and self.shape.aux_penalty:
            step = aux_row_step(len(pre), dead.numel(), self.dict_size, self.shape.aux_budget)
            pre, residual = pre[::step], (y - acts @ self.W_dec - self.b_dec).detach()[::step]
            values, idx = pre[:, dead].topk(min(self.shape.top_k_aux, dead.numel()), dim=1)
            aux_acts = torch.zeros_like(pre).scatter(1, dead[idx], values)
            loss = loss + self.shape.aux_penalty * (aux_acts @ self.W_dec - residual).pow(2).mean()
        return loss, prefix_mse.detach()

    def _skip(self, x_normalised: torch.Tensor) -> torch.Tensor | float:
        """The skip connection's part of the normalised target (0 without one)."""
        return 0.0 if self.W_skip is None else x_normalised @ self.W_skip

    def dead_features(self) -> torch.Tensor:
        """Indices of the features that have not fired for ``n_batches_to_dead`` batches."""
        return torch.nonzero(self.inactive_batches >= self.shape.n_batches_to_dead).flatten()

    def n_dead(self) -> int:
        return int(self.dead_features().numel())

    def _select(self, mm_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's top ``k * B`` codes (rows, features, values); see ``batch_topk_pairs``."""
        return batch_topk_pairs(
            mm_BF,
            self.b_enc.detach(),
            self.top_k * mm_BF.shape[0],
            self.boundaries,
            self._sample_generator(mm_BF.device),
        )

    def _sample_generator(self, device: torch.device) -> torch.Generator:
        # Only speeds up the threshold search (the result does not depend on it); not saved.
        if getattr(self, "_generator", None) is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(0)
        return self._generator

    def _aux_loss(self, x_BD: torch.Tensor, residual_BD: torch.Tensor) -> torch.Tensor:
        return aux_loss(
            x_BD,
            self.W_encT,
            self.b_enc,
            self.W_dec,
            self.dead_features(),
            residual_BD,
            self.shape.top_k_aux,
            self.shape.aux_penalty,
            self.shape.aux_budget,
            self._aux_gradients,
        )

    @torch.no_grad()
    def _update_stats(self, codes: SparseCodes) -> None:
        fired, smallest = self._batch_stats(codes)
        self.inactive_batches.add_(1).masked_fill_(fired, 0)
        if torch.isfinite(smallest):
            m = self.shape.threshold_momentum
            if self.threshold == 0:  # first batch: start the average at its value, not at 0
                self.threshold.copy_(smallest)
            else:
                self.threshold.mul_(1 - m).add_(m * smallest)

    @torch.no_grad()
    def calibrate_threshold(self, sources: Iterable[torch.Tensor]) -> float:
        """Set the inference threshold so that ``top_k`` codes per row clear it on average over the
        rows of ``sources`` (batches of raw source rows): the (k * N)-th largest pre-activation over
        all N rows, BatchTopK's own threshold over one very large batch. The moving average learned
        in training lags behind the batch thresholds as they drift, so inference L0 fell short of
        k (37 for 46). Returns the threshold."""
        candidates, n_rows = [], 0
        for x in sources:
            pre = self.pre_acts(x.to(self.W_dec.device, self.W_dec.dtype))
            # a batch holds about k * B of the global top k * N: keep twice that as candidates
            candidates.append(
                pre.flatten().topk(min(2 * self.top_k * x.shape[0], pre.numel()), sorted=False).values
            )
            n_rows += x.shape[0]
        if n_rows:
            values = torch.cat(candidates)
            kth = values.topk(min(self.top_k * n_rows, values.numel()), sorted=False).values.min()
            self.threshold.copy_(kth.clamp_min(torch.finfo(kth.dtype).tiny))  # codes are > threshold > 0
        return float(self.threshold)

    def _batch_stats(self, codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor]:
        """(which features fired [F] bool, the smallest code or inf) of this batch; data-parallel
        training reduces them over every rank's share."""
        fired = torch.bincount(codes.feats, minlength=self.dict_size) > 0
        smallest = codes.vals.min() if codes.vals.numel() else codes.vals.new_tensor(float("inf"))
        return fired, smallest

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (it would only change its norm)."""
        if self.W_dec.grad is not None:
            parallel = torch.einsum("fd,fd->f", self.W_dec.grad, self.W_dec)
            self.W_dec.grad.addcmul_(parallel[:, None], self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def set_scales(self, source_mean_norm: float, target_mean_norm: float) -> None:
        """Scale so that normalised activations have mean norm sqrt(width)."""
        self.source_scale.fill_(math.sqrt(self.shape.d_in) / source_mean_norm)
        self.target_scale.fill_(math.sqrt(self.shape.d_out) / target_mean_norm)

    @torch.no_grad()
    def init_means(self, x_BD: torch.Tensor, y_BD: torch.Tensor) -> None:
        """Centre the encoder on the source's mean and start b_dec at the target's mean
        (normalised, from a first batch), so the initial FVU is about 1. A skip connection starts
        at the batch's least-squares linear map: the features then learn only what is not linear,
        instead of waiting for Adam to grow a dense [d_in, d_out] matrix from zero."""
        rows = self._sum_over_ranks(torch.tensor(float(x_BD.shape[0]), device=x_BD.device))
        self.source_mean.copy_(self._sum_over_ranks(self._scaled_source(x_BD).sum(dim=0)) / rows)
        target = self._scaled_target(x_BD, y_BD)
        self.b_dec.copy_(self._sum_over_ranks(target.sum(dim=0)) / rows)
        if self.W_skip is not None:
            x, y = self._normalised_source(x_BD).double(), (target - self.b_dec).double()
            xtx, xty = self._sum_over_ranks(x.T @ x), self._sum_over_ranks(x.T @ y)
            self.W_skip.copy_(ridge_solution(xtx, xty))

    @torch.no_grad()
    def init_features_from_rows(
        self, x_NB: torch.Tensor, y_NB: torch.Tensor, quantile_rows: int = 4096
    ) -> None:
        """Start feature i at training row i (after ``init_means``; ``dict_size`` rows, the same on
        every rank): its encoder at the row's normalised, centred source direction, its decoder at
        what b_dec and the skip connection leave of the row's target, and its bias at minus the
        pre-activation that its top k/F share of (the first ``quantile_rows`` of) these rows
        exceeds. So every feature starts firing, on rows like its own, with small codes (the
        excess over that boundary). Random directions pair each input direction with an unrelated
        output: a transcoder's features then add noise until Adam has turned them, which at lr
        3e-4 takes most of a short run (docs/quality.md)."""
        if x_NB.shape[0] != self.dict_size:
            raise ValueError(f"one row per feature: got {x_NB.shape[0]} rows for {self.dict_size} features")
        x = self._normalised_source(x_NB)
        residual = self._scaled_target(x_NB, y_NB) - self.b_dec - self._skip(x)
        self.W_encT.copy_(F.normalize(x, dim=1))
        self.W_dec.copy_(F.normalize(residual, dim=1))
        pre = x[:quantile_rows] @ self.W_enc
        share = max(1, round(pre.shape[0] * self.top_k / self.dict_size))
        self.b_enc.copy_(-pre.topk(share, dim=0).values[-1])

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over data-parallel ranks (one process: itself)."""
        return t

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
        """The dictionary saved in ``directory``; a missing, damaged or mismatched file ends in one
        line naming it (``CheckpointError``)."""
        from mtc.results import damaged, read_json, read_tensors

        directory = Path(directory)
        shape: dict[str, Any] = read_json(directory / DICTIONARY_FILE)
        tensors = read_tensors(directory / weights_file, device)
        try:
            shape.setdefault("input_norm", "global")  # saved before per-token scaling existed
            model = cls(**shape)
            model.load_state_dict(tensors)
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:  # a hand-edited shape, say
            raise damaged(
                directory / weights_file, f"does not match {DICTIONARY_FILE} ({in_brief(e)})"
            ) from None
        return model.to(device)


def load_finished_run(run_dir: str | Path) -> tuple[dict[str, Any], MatryoshkaBatchTopK]:
    """The config record and the dictionary of the finished run in ``run_dir`` (what evaluate, mine
    and export read): a missing, unfinished or damaged run ends in one line naming what to run."""
    from mtc.results import finished_run_record

    return finished_run_record(Path(run_dir)), MatryoshkaBatchTopK.load(run_dir)
