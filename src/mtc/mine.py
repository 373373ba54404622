"""The mine stage: what each feature fires on, from the stored token ids (the model is never rerun).

Writes ``activation_samples/mined/`` in the format described in ``mtc.samples``: top and quantile
contexts per feature, firing histograms and frequencies, and each decoder direction's direct effect on
the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from mtc import progress
from mtc.config import DictionaryConfig, MineConfig, PipelineConfig
from mtc.dictionary import MatryoshkaBatchTopK, load_finished_run
from mtc.metrics import log10_frequency
from mtc.models import resolve_device
from mtc.readout import rows_per_piece
from mtc.results import MINED_SAMPLES_DIR, atomic_write_bytes, atomic_write_json
from mtc.samples import FEATURES_FILE, META_FILE, QUANTILE_FILE, SAMPLES_FILE, TopActivations, context_rows
from mtc.store import ActivationStore


class ContextActivations:
    """Gathers a feature's activation on every token of its sample contexts, batch by batch."""

    def __init__(self, crow_FMC: np.ndarray):
        self.crow = torch.from_numpy(crow_FMC).reshape(-1)
        self.feature = torch.arange(crow_FMC.shape[0]).repeat_interleave(
            crow_FMC.shape[1] * crow_FMC.shape[2]
        )
        self.acts = torch.zeros(self.crow.shape[0])
        self.shape = crow_FMC.shape

    def update(self, acts_BF: torch.Tensor, rows_B: torch.Tensor) -> None:
        """``rows_B``: the sorted store rows of this batch (BOS rows are absent and stay 0)."""
        inside = (self.crow >= rows_B[0]) & (self.crow <= rows_B[-1])
        where = torch.nonzero(inside).flatten()
        i = torch.searchsorted(rows_B, self.crow[where]).clamp_max(rows_B.numel() - 1)
        hit = rows_B[i] == self.crow[where]
        where, i = where[hit], i[hit]
        self.acts[where] = acts_BF[i, self.feature[where]].float().cpu()

    def tensor(self) -> torch.Tensor:
        return self.acts.reshape(self.shape).half()


def quantile_bands(values_DR: torch.Tensor, n_bands: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each feature's random samples by activation (lowest first) and give each its quantile
    band: the i-th of n samples is in band ``floor(i * n_bands / n)``. Returns the order and bands."""
    order = values_DR.masked_fill(values_DR < 0, float("inf")).argsort(dim=1)
    n = (values_DR >= 0).sum(dim=1, keepdim=True)
    i = torch.arange(values_DR.shape[1])[None, :]
    band = torch.where(i < n, i * n_bands // n.clamp_min(1), -1)
    return order, band


VOCAB_PIECE = 8192
"""Tokens scored at a time by ``logit_effects``: pieces of [features, tokens] small enough for the
matmul to reuse what it reads (one feature at a time against the whole vocabulary would read all of
W_U per few features)."""


@torch.no_grad()
def logit_effects(
    dictionary: MatryoshkaBatchTopK, unembedding: Any, k: int, logits_budget: int | None = None
) -> dict[str, torch.Tensor]:
    """The ``k`` tokens each decoder direction promotes and suppresses most through the unembedding,
    scored in pieces of ``VOCAB_PIECE`` tokens by as many features as ``logits_budget`` elements
    allow (``mtc.readout.LOGITS_BUDGET``), keeping only the top ``k`` of what each piece adds."""
    W = (dictionary.W_dec / dictionary.target_scale).detach().float().cpu()
    vocab = unembedding.W_U.shape[1]
    k, cols = min(k, vocab), min(vocab, VOCAB_PIECE)
    rows = rows_per_piece(cols, logits_budget)
    parts: dict[str, list[torch.Tensor]] = {
        f"{n}_{w}": [] for n in ("promoted", "suppressed") for w in ("scores", "ids")
    }
    for start in range(0, W.shape[0], rows):
        best: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {True: None, False: None}
        for first in range(0, vocab, cols):
            scores = unembedding.scores(W[start : start + rows], slice(first, first + cols))
            for largest in (True, False):
                best[largest] = _top_k(best[largest], scores, first, k, largest)
        for name, largest in (("promoted", True), ("suppressed", False)):
            parts[f"{name}_scores"].append(best[largest][0])
            parts[f"{name}_ids"].append(best[largest][1])
    return {name: torch.cat(values) for name, values in parts.items()}


def _top_k(kept, scores_NC: torch.Tensor, first: int, k: int, largest: bool):
    """(values, token ids) [N, k] of the top ``k`` of ``kept`` and the scores of tokens ``first`` ..."""
    top = scores_NC.topk(min(k, scores_NC.shape[1]), dim=1, largest=largest)
    values, ids = top.values, top.indices + first
    if kept is not None:
        values, ids = torch.cat([kept[0], values], dim=1), torch.cat([kept[1], ids], dim=1)
        top = values.topk(k, dim=1, largest=largest)
        values, ids = top.values, ids.gather(1, top.indices)
    return values, ids


@torch.no_grad()
def mine(
    dictionary: MatryoshkaBatchTopK,
    store: ActivationStore,
    layer: int,
    site: str,
    cfg: MineConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    unembedding: Any = None,
) -> Path:
    """Two passes over the held-out rows: the first keeps each feature's top-activating and random
    firings, fire counts and largest activation; the second fills in activation histograms and the
    feature's activation on every token of the kept contexts. Then the decoder's logit effects."""
    device = resolve_device(cfg.device)
    dictionary = dictionary.to(device).eval()

    def held_out_codes(label: str):
        with progress.bar(label, total=store.n_rows - store.n_train_rows, unit="tok") as advance:
            for (x,), rows in store.iter_holdout([(layer, site)], cfg.batch_size):
                yield dictionary.encode(x.to(device)).cpu(), rows
                advance(int(rows.numel()))

    top, random, fire_count, max_act = _first_pass(held_out_codes("mine"), dictionary.dict_size, cfg)
    order, band = quantile_bands(random.values, cfg.quantile_bands)
    for name in ("values", "rows", "keys"):
        setattr(random, name, getattr(random, name).gather(1, order))
    top_ctx, random_ctx = (
        ContextActivations(context_rows(kept.rows, store.context_size, cfg.sample_context_size)[0])
        for kept in (top, random)
    )
    histogram = _second_pass(
        held_out_codes("mine: contexts and histograms"), (top_ctx, random_ctx), max_act, cfg.histogram_bins
    )
    features = {
        "fire_count": fire_count,
        "log10_frequency": log10_frequency(fire_count, top.n_tokens_seen),
        "max_activation": max_act,
        "histogram": histogram,
    }
    if unembedding is not None:
        features.update(logit_effects(dictionary, unembedding, cfg.n_logit_tokens))
    tokens = store.tokens()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        out_dir / SAMPLES_FILE,
        save_tensors({**top.tensors(tokens, cfg.sample_context_size), "context_acts": top_ctx.tensor()}),
    )
    quantile = {**random.tensors(tokens, cfg.sample_context_size), "context_acts": random_ctx.tensor()}
    atomic_write_bytes(out_dir / QUANTILE_FILE, save_tensors({**quantile, "band": band.contiguous()}))
    atomic_write_bytes(
        out_dir / FEATURES_FILE, save_tensors({k: v.contiguous() for k, v in features.items()})
    )
    atomic_write_json(
        out_dir / META_FILE,
        {
            "dict_size": dictionary.dict_size,
            "max_samples_per_feature": cfg.max_samples_per_feature,
            "sample_context_size": cfg.sample_context_size,
            "sample_activation_threshold": cfg.sample_activation_threshold,
            "n_tokens_seen": top.n_tokens_seen,
            "quantile_bands": cfg.quantile_bands,
            "samples_per_band": cfg.samples_per_band,
            "histogram_bins": cfg.histogram_bins,
            "n_logit_tokens": cfg.n_logit_tokens if unembedding is not None else 0,
            "group_sizes": list(dictionary.group_sizes),
            "fired_features": int((fire_count > 0).sum()),
            "source": "mine (held-out rows)",
            "store": str(store.dir),
            "tokenizer_dir": str(tokenizer_dir),
            "logit_effects": getattr(unembedding, "description", None),
        },
    )
    return out_dir


def _first_pass(codes, F: int, cfg: MineConfig):
    """Top and random firings of each feature, its fire count and largest activation."""
    top = TopActivations(F, cfg.max_samples_per_feature, cfg.sample_activation_threshold)
    random = TopActivations(F, cfg.quantile_bands * cfg.samples_per_band, 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    fire_count, max_act = torch.zeros(F, dtype=torch.long), torch.zeros(F)
    for acts_BF, rows in codes:
        top.update(acts_BF, rows)
        random.update(acts_BF, rows, torch.rand(acts_BF.shape, generator=gen))
        fire_count += (acts_BF > 0).sum(dim=0)
        max_act = torch.maximum(max_act, acts_BF.max(dim=0).values)
    return top, random, fire_count, max_act


def _second_pass(codes, contexts, max_act: torch.Tensor, bins: int) -> torch.Tensor:
    """Fill the kept contexts' activations; returns each feature's histogram [F, bins] of its
    activations (bins evenly from 0 to its largest)."""
    F = max_act.numel()
    histogram = torch.zeros(F * bins, dtype=torch.long)
    for acts_BF, rows in codes:
        for ctx in contexts:
            ctx.update(acts_BF, rows)
        tok, feat = torch.nonzero(acts_BF > 0, as_tuple=True)
        b = (acts_BF[tok, feat] / max_act[feat] * bins).long().clamp(0, bins - 1)
        histogram += torch.bincount(feat * bins + b, minlength=F * bins)
    return histogram.reshape(F, bins)


def mine_run(cfg: PipelineConfig, d: DictionaryConfig, run_dir: Path, store: ActivationStore) -> Path:
    """The mine stage for dictionary ``d`` in ``run_dir``, on ``store`` (opened and checked by the
    caller)."""
    from mtc.unembedding import load_unembedding

    _, dictionary = load_finished_run(run_dir)
    return mine(
        dictionary,
        store,
        d.layer,
        d.source_site,
        cfg.mine,
        run_dir / MINED_SAMPLES_DIR,
        cfg.model_dir,
        load_unembedding(cfg.model_dir),
    )
