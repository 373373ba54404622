"""What each feature fires on, from the stored token ids (the model is never rerun).

Format of ``activation_samples/<source>/`` (``source`` is ``mined`` for the mine stage and
``training`` for samples collected during training):

- ``samples.safetensors`` with, for ``D`` features and up to ``M = max_samples_per_feature``
  samples each, best first:
  ``values [D, M] float32`` (activation; 0 where no sample), ``rows [D, M] int64`` (store row of
  the activating token; -1 where no sample), ``contexts [D, M, C] int32`` (token ids around it;
  -1 padding), ``token_index [D, M] int32`` (where the activating token sits in its context);
  mined samples also carry ``context_acts [D, M, C] float16``, the feature's activation on every
  token of the context.
- ``meta.json``: sizes, threshold, tokens seen, the store and the tokenizer directory.

The mine stage adds:

- ``quantile_samples.safetensors``: the same tensors for ``quantile_bands x samples_per_band``
  contexts per feature drawn at random from all its firings, lowest activation first, and
  ``band [D, R] int64`` (0 = the lowest quantile band of the feature's activations; -1 = none). They
  show the feature's weaker, often less specific, firings below its top contexts.
- ``features.safetensors``: ``fire_count [D]``, ``log10_frequency [D]`` (-inf: never fired),
  ``max_activation [D]``, ``histogram [D, histogram_bins]`` (firings per activation bin, bins evenly
  from 0 to the feature's max), and the decoder direction's direct effect on the logits:
  ``promoted_ids/promoted_scores [D, K]`` and ``suppressed_ids/suppressed_scores [D, K]``
  (see ``mtc.unembedding``: ``W_dec[f] / target_scale`` through the final norm's weight and W_U).

``ActivationSampleAnalyzer`` reads it and shows contexts as text with the activating token marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from mtc import progress
from mtc.config import MineConfig, PipelineConfig
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.metrics import log10_frequency
from mtc.models import load_tokenizer, resolve_device
from mtc.results import atomic_write_bytes, atomic_write_json, read_json
from mtc.store import ActivationStore

SAMPLES_FILE = "samples.safetensors"
QUANTILE_FILE = "quantile_samples.safetensors"
FEATURES_FILE = "features.safetensors"
META_FILE = "meta.json"


class TopActivations:
    """Keeps, per feature, the ``max_samples`` firings (above ``threshold``) that rank highest:
    by activation, or by ``keys`` given to ``update`` (random keys give a uniform random sample)."""

    def __init__(self, dict_size: int, max_samples: int, threshold: float):
        self.values = torch.full((dict_size, max_samples), -1.0)
        self.keys = torch.full((dict_size, max_samples), -1.0)
        self.rows = torch.full((dict_size, max_samples), -1, dtype=torch.long)
        self.threshold = threshold
        self.n_tokens_seen = 0

    @torch.no_grad()
    def update(self, acts_BF: torch.Tensor, rows_B: torch.Tensor, keys_BF: torch.Tensor | None = None) -> None:
        acts = acts_BF.float().cpu()
        fired = acts > self.threshold
        rank = (acts if keys_BF is None else keys_BF.float().cpu()).masked_fill(~fired, -1.0)
        m = min(self.values.shape[1], acts.shape[0])
        keys, idx = rank.topk(m, dim=0)                                   # [m, D]
        keys, idx = keys.T, idx.T                                         # [D, m]
        valid = keys >= 0
        vals = acts.T.gather(1, idx).masked_fill(~valid, -1.0)
        rows = rows_B.cpu()[idx].masked_fill(~valid, -1)
        # A row already kept for a feature (seen again in a later epoch) is not added twice.
        dup = (rows[:, :, None] == self.rows[:, None, :]).any(dim=2) & (rows >= 0)
        keys = keys.masked_fill(dup, -1.0)
        all_keys = torch.cat([self.keys, keys], dim=1)
        best, order = all_keys.topk(self.values.shape[1], dim=1)
        kept = best >= 0
        self.keys = best
        self.values = torch.cat([self.values, vals], dim=1).gather(1, order).masked_fill(~kept, -1.0)
        self.rows = torch.cat([self.rows, rows], dim=1).gather(1, order).masked_fill(~kept, -1)
        self.n_tokens_seen += acts.shape[0]

    def tensors(self, tokens_SC: np.ndarray, context_size: int) -> dict[str, torch.Tensor]:
        """The samples with their token contexts (``context_size`` tokens, the activating one near the end)."""
        ctx = tokens_SC.shape[1]
        crow, token_index = context_rows(self.rows, ctx, context_size)
        flat = tokens_SC.reshape(-1)
        contexts = np.where(crow >= 0, flat[np.maximum(crow, 0)], -1).astype(np.int32)
        return {"values": self.values.clamp_min(0.0).contiguous(), "rows": self.rows.contiguous(),
                "contexts": torch.from_numpy(contexts), "token_index": token_index}

    def save(self, directory: str | Path, tokens_SC: np.ndarray, context_size: int, meta: dict[str, Any]) -> Path:
        """Write ``samples.safetensors`` and ``meta.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / SAMPLES_FILE, save_tensors(self.tensors(tokens_SC, context_size)))
        D, M = self.rows.shape
        atomic_write_json(directory / META_FILE, {
            "dict_size": D, "max_samples_per_feature": M, "sample_context_size": context_size,
            "sample_activation_threshold": self.threshold, "n_tokens_seen": self.n_tokens_seen, **meta})
        return directory


def context_rows(rows_DM: torch.Tensor, ctx: int, context_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Store rows [D, M, C] of the context around each sample's row (-1: none), within its window:
    the activating token sits ``context_size // 4`` tokens from the end when the window allows;
    and its index in the context [D, M]."""
    after = context_size // 4
    rows = rows_DM.numpy()
    seq, pos = np.maximum(rows, 0) // ctx, np.maximum(rows, 0) % ctx
    start = np.clip(pos - (context_size - 1 - after), 0, None)
    offsets = start[..., None] + np.arange(context_size)                      # [D, M, C]
    valid = (offsets < ctx) & (offsets <= pos[..., None] + after) & (rows[..., None] >= 0)
    crow = np.where(valid, seq[..., None] * ctx + offsets, -1)
    return crow, torch.from_numpy((pos - start).astype(np.int32) * (rows >= 0))


class ContextActivations:
    """Gathers a feature's activation on every token of its sample contexts, batch by batch."""

    def __init__(self, crow_DMC: np.ndarray):
        self.crow = torch.from_numpy(crow_DMC).reshape(-1)
        self.feature = torch.arange(crow_DMC.shape[0]).repeat_interleave(crow_DMC.shape[1] * crow_DMC.shape[2])
        self.acts = torch.zeros(self.crow.shape[0])
        self.shape = crow_DMC.shape

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


@torch.no_grad()
def logit_effects(dictionary: MatryoshkaBatchTopK, unembedding: Any, k: int, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """The ``k`` tokens each decoder direction promotes and suppresses most through the unembedding."""
    W = (dictionary.W_dec / dictionary.target_scale).detach().float().cpu()
    k = min(k, unembedding.W_U.shape[1])
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("promoted", "suppressed")}
    for start in range(0, W.shape[0], chunk):
        scores = unembedding.scores(W[start:start + chunk])                   # [chunk, vocab]
        parts["promoted"].append(scores.topk(k, dim=1))
        parts["suppressed"].append(scores.topk(k, dim=1, largest=False))
    out = {}
    for name, results in parts.items():
        out[f"{name}_scores"] = torch.cat([r.values for r in results])
        out[f"{name}_ids"] = torch.cat([r.indices for r in results])
    return out


@torch.no_grad()
def mine(dictionary: MatryoshkaBatchTopK, store: ActivationStore, layer: int, site: str, cfg: MineConfig,
         out_dir: str | Path, tokenizer_dir: str | Path, unembedding: Any = None) -> Path:
    """Two passes over the held-out rows: the first keeps each feature's top-activating and random
    firings, fire counts and largest activation; the second fills in activation histograms and the
    feature's activation on every token of the kept contexts. Then the decoder's logit effects."""
    device = resolve_device(cfg.device)
    dictionary = dictionary.to(device).eval()
    D = dictionary.dict_size
    top = TopActivations(D, cfg.max_samples_per_feature, cfg.sample_activation_threshold)
    random = TopActivations(D, cfg.quantile_bands * cfg.samples_per_band, 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    fire_count = torch.zeros(D, dtype=torch.long)
    max_act = torch.zeros(D)
    n_rows = store.n_rows - store.n_train_rows
    keys = [(layer, site)]
    with progress.bar("mine", total=n_rows, unit="tok") as advance:
        for (x,), rows in store.iter_holdout(keys, cfg.batch_size):
            acts = dictionary.encode(x.to(device)).cpu()
            top.update(acts, rows)
            random.update(acts, rows, torch.rand(acts.shape, generator=gen))
            fire_count += (acts > 0).sum(dim=0)
            max_act = torch.maximum(max_act, acts.max(dim=0).values)
            advance(int(rows.numel()))
    order, band = quantile_bands(random.values, cfg.quantile_bands)
    for name in ("values", "rows", "keys"):
        setattr(random, name, getattr(random, name).gather(1, order))
    tokens = store.tokens()
    top_t, random_t = top.tensors(tokens, cfg.sample_context_size), random.tensors(tokens, cfg.sample_context_size)
    top_ctx = ContextActivations(context_rows(top.rows, store.context_size, cfg.sample_context_size)[0])
    random_ctx = ContextActivations(context_rows(random.rows, store.context_size, cfg.sample_context_size)[0])
    bins = cfg.histogram_bins
    histogram = torch.zeros(D * bins, dtype=torch.long)
    with progress.bar("mine: contexts and histograms", total=n_rows, unit="tok") as advance:
        for (x,), rows in store.iter_holdout(keys, cfg.batch_size):
            acts = dictionary.encode(x.to(device)).cpu()
            top_ctx.update(acts, rows)
            random_ctx.update(acts, rows)
            tok, feat = torch.nonzero(acts > 0, as_tuple=True)
            b = (acts[tok, feat] / max_act[feat] * bins).long().clamp(0, bins - 1)
            histogram += torch.bincount(feat * bins + b, minlength=D * bins)
            advance(int(rows.numel()))
    n_tokens = top.n_tokens_seen
    features = {"fire_count": fire_count, "log10_frequency": log10_frequency(fire_count, n_tokens),
                "max_activation": max_act, "histogram": histogram.reshape(D, bins)}
    if unembedding is not None:
        features.update(logit_effects(dictionary, unembedding, cfg.n_logit_tokens))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / SAMPLES_FILE, save_tensors({**top_t, "context_acts": top_ctx.tensor()}))
    atomic_write_bytes(out_dir / QUANTILE_FILE, save_tensors({**random_t, "context_acts": random_ctx.tensor(),
                                                               "band": band.contiguous()}))
    atomic_write_bytes(out_dir / FEATURES_FILE, save_tensors({k: v.contiguous() for k, v in features.items()}))
    atomic_write_json(out_dir / META_FILE, {
        "dict_size": D, "max_samples_per_feature": cfg.max_samples_per_feature,
        "sample_context_size": cfg.sample_context_size, "sample_activation_threshold": cfg.sample_activation_threshold,
        "n_tokens_seen": n_tokens, "quantile_bands": cfg.quantile_bands, "samples_per_band": cfg.samples_per_band,
        "histogram_bins": bins, "n_logit_tokens": cfg.n_logit_tokens if unembedding is not None else 0,
        "group_sizes": list(dictionary.group_sizes), "fired_features": int((fire_count > 0).sum()),
        "source": "mine (held-out rows)", "store": str(store.dir), "tokenizer_dir": str(tokenizer_dir),
        "logit_effects": getattr(unembedding, "description", None)})
    return out_dir


def mine_run(cfg: PipelineConfig, name: str) -> Path:
    from mtc.unembedding import load_unembedding

    d = cfg.dictionary(name)
    run_dir = d.run_dir(cfg.results_root)
    dictionary = MatryoshkaBatchTopK.load(run_dir)
    store = ActivationStore(cfg.store_dir)
    return mine(dictionary, store, d.layer, d.source_site, cfg.mine, run_dir / "activation_samples" / "mined",
                cfg.model_dir, load_unembedding(cfg.model_dir))


class ActivationSampleAnalyzer:
    """Reads an ``activation_samples/<source>/`` directory and shows contexts as text."""

    def __init__(self, directory: str | Path, tokenizer: Any = None):
        self.dir = Path(directory)
        self.meta = read_json(self.dir / META_FILE)
        t = load_file(str(self.dir / SAMPLES_FILE))
        self.values, self.rows, self.contexts, self.token_index = t["values"], t["rows"], t["contexts"], t["token_index"]
        self.context_acts = t.get("context_acts")
        self.quantile = load_file(str(self.dir / QUANTILE_FILE)) if (self.dir / QUANTILE_FILE).is_file() else None
        self.feature_info = load_file(str(self.dir / FEATURES_FILE)) if (self.dir / FEATURES_FILE).is_file() else None
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.meta["tokenizer_dir"])
        return self._tokenizer

    def features(self, min_samples: int = 1) -> list[int]:
        """Features with at least ``min_samples`` samples, strongest top activation first."""
        counts = (self.rows >= 0).sum(dim=1)
        ids = torch.nonzero(counts >= min_samples).flatten()
        return ids[self.values[ids, 0].argsort(descending=True)].tolist()

    def samples(self, feature: int, n: int | None = None, marker: tuple[str, str] = ("«", "»")) -> list[dict[str, Any]]:
        """Top-activating contexts as text, best first."""
        t = {"values": self.values, "rows": self.rows, "contexts": self.contexts, "token_index": self.token_index}
        if self.context_acts is not None:
            t["context_acts"] = self.context_acts
        return self._decode(t, feature, n, marker)

    def quantile_samples(self, feature: int, marker: tuple[str, str] = ("«", "»")) -> list[dict[str, Any]]:
        """Random contexts from every activation quantile band, lowest first (each with its ``band``)."""
        if self.quantile is None:
            return []
        out = self._decode(self.quantile, feature, None, marker)
        for s, b in zip(out, self.quantile["band"][feature].tolist()):
            s["band"] = b
        return out

    def _decode(self, t: dict[str, torch.Tensor], feature: int, n: int | None, marker: tuple[str, str]) -> list[dict[str, Any]]:
        out = []
        M = t["rows"].shape[1]
        for j in range(M if n is None else min(n, M)):
            if t["rows"][feature, j] < 0:
                break
            ids = t["contexts"][feature, j]
            i = int(t["token_index"][feature, j])
            valid = ids >= 0
            before = self.tokenizer.decode(ids[:i][valid[:i]].tolist())
            token = self.tokenizer.decode([int(ids[i])])
            after = self.tokenizer.decode(ids[i + 1:][valid[i + 1:]].tolist())
            sample = {"activation": float(t["values"][feature, j]), "row": int(t["rows"][feature, j]),
                      "token": token, "text": f"{before}{marker[0]}{token}{marker[1]}{after}",
                      "token_ids": ids[valid].tolist(), "token_index": i}
            if "context_acts" in t:
                sample["token_acts"] = t["context_acts"][feature, j][valid].float().tolist()
            out.append(sample)
        return out

    def logit_effects(self, feature: int) -> dict[str, list[tuple[str, float]]]:
        """Tokens the feature's decoder direction promotes and suppresses most (empty when not mined)."""
        info = self.feature_info or {}
        out = {}
        for name in ("promoted", "suppressed"):
            if f"{name}_ids" not in info:
                out[name] = []
                continue
            ids, scores = info[f"{name}_ids"][feature].tolist(), info[f"{name}_scores"][feature].tolist()
            out[name] = [(self.tokenizer.decode([i]), s) for i, s in zip(ids, scores)]
        return out

    def show(self, feature: int, n: int = 5) -> str:
        lines = [f"feature {feature}:"]
        if self.feature_info is not None:
            count = int(self.feature_info["fire_count"][feature])
            lines[0] += f"  fires on {count} of {self.meta['n_tokens_seen']} held-out tokens"
        for s in self.samples(feature, n):
            lines.append(f"  {s['activation']:7.3f}  {s['text']!r}")
        tail = self.quantile_samples(feature)
        if tail:
            lines.append("  random firings, lowest quantile band first:")
            for s in tail:
                lines.append(f"  {s['activation']:7.3f}  (band {s['band']})  {s['text']!r}")
        effects = self.logit_effects(feature)
        for name in ("promoted", "suppressed"):
            if effects[name]:
                lines.append(f"  {name}: " + ", ".join(repr(tok) for tok, _ in effects[name]))
        return "\n".join(lines)
