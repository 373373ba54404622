"""Activation samples: the training-time buffer, the files they are saved in, and their reader.

Format of ``activation_samples/<source>/`` (``source`` is ``mined`` for the mine stage and
``training`` for samples collected during training):

- ``samples.safetensors`` with, for ``D`` features and up to ``M = max_samples_per_feature``
  samples each, best first:
  ``values [F, M] float32`` (activation; 0 where no sample), ``rows [F, M] int64`` (store row of
  the activating token; -1 where no sample), ``contexts [F, M, C] int32`` (token ids around it;
  -1 padding), ``token_index [F, M] int32`` (where the activating token sits in its context);
  mined samples also carry ``context_acts [F, M, C] float16``, the feature's activation on every
  token of the context.
- ``meta.json``: sizes, threshold, tokens seen, the store and the tokenizer directory.

The mine stage adds:

- ``quantile_samples.safetensors``: the same tensors for ``quantile_bands x samples_per_band``
  contexts per feature drawn at random from all its firings, lowest activation first, and
  ``band [F, R] int64`` (0 = the lowest quantile band of the feature's activations; -1 = none). They
  show the feature's weaker, often less specific, firings below its top contexts.
- ``features.safetensors``: ``fire_count [F]``, ``log10_frequency [F]`` (-inf: never fired),
  ``max_activation [F]``, ``histogram [F, histogram_bins]`` (firings per activation bin, bins evenly
  from 0 to the feature's max), and the decoder direction's direct effect on the logits:
  ``promoted_ids/promoted_scores [F, K]`` and ``suppressed_ids/suppressed_scores [F, K]``
  (see ``mtc.unembedding``: ``W_dec[f] / target_scale`` through the final norm's weight and W_U).

``ActivationSampleAnalyzer`` reads it and shows contexts as text with the activating token marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from mtc.models import load_tokenizer
from mtc.results import atomic_write_bytes, atomic_write_json, read_json, read_tensors

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
    def update(
        self, acts_BF: torch.Tensor, rows_B: torch.Tensor, keys_BF: torch.Tensor | None = None
    ) -> None:
        acts = acts_BF.float().cpu()
        fired = acts > self.threshold
        rank = (acts if keys_BF is None else keys_BF.float().cpu()).masked_fill(~fired, -1.0)
        m = min(self.values.shape[1], acts.shape[0])
        keys, idx = rank.topk(m, dim=0)  # [m, F]
        keys, idx = keys.T, idx.T  # [F, m]
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
        """The samples with their token contexts (``context_size`` tokens, the activating one near the
        end)."""
        ctx = tokens_SC.shape[1]
        crow, token_index = context_rows(self.rows, ctx, context_size)
        flat = tokens_SC.reshape(-1)
        contexts = np.where(crow >= 0, flat[np.maximum(crow, 0)], -1).astype(np.int32)
        return {
            "values": self.values.clamp_min(0.0).contiguous(),
            "rows": self.rows.contiguous(),
            "contexts": torch.from_numpy(contexts),
            "token_index": token_index,
        }

    def save(
        self, directory: str | Path, tokens_SC: np.ndarray, context_size: int, meta: dict[str, Any]
    ) -> Path:
        """Write ``samples.safetensors`` and ``meta.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / SAMPLES_FILE, save_tensors(self.tensors(tokens_SC, context_size)))
        D, M = self.rows.shape
        atomic_write_json(
            directory / META_FILE,
            {
                "dict_size": D,
                "max_samples_per_feature": M,
                "sample_context_size": context_size,
                "sample_activation_threshold": self.threshold,
                "n_tokens_seen": self.n_tokens_seen,
                **meta,
            },
        )
        return directory


def context_rows(rows_DM: torch.Tensor, ctx: int, context_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Store rows [F, M, C] of the context around each sample's row (-1: none), within its window:
    the activating token sits ``context_size // 4`` tokens from the end when the window allows;
    and its index in the context [F, M]."""
    after = context_size // 4
    rows = rows_DM.numpy()
    seq, pos = np.maximum(rows, 0) // ctx, np.maximum(rows, 0) % ctx
    start = np.clip(pos - (context_size - 1 - after), 0, None)
    offsets = start[..., None] + np.arange(context_size)  # [F, M, C]
    valid = (offsets < ctx) & (offsets <= pos[..., None] + after) & (rows[..., None] >= 0)
    crow = np.where(valid, seq[..., None] * ctx + offsets, -1)
    return crow, torch.from_numpy((pos - start).astype(np.int32) * (rows >= 0))


class ActivationSampleAnalyzer:
    """Reads an ``activation_samples/<source>/`` directory and shows contexts as text."""

    def __init__(self, directory: str | Path, tokenizer: Any = None):
        self.dir = Path(directory)
        self.meta = read_json(self.dir / META_FILE)
        t = read_tensors(self.dir / SAMPLES_FILE)
        self.values, self.rows, self.contexts, self.token_index = (
            t["values"],
            t["rows"],
            t["contexts"],
            t["token_index"],
        )
        self.context_acts = t.get("context_acts")
        self.quantile = (
            read_tensors(self.dir / QUANTILE_FILE) if (self.dir / QUANTILE_FILE).is_file() else None
        )
        self.feature_info = (
            read_tensors(self.dir / FEATURES_FILE) if (self.dir / FEATURES_FILE).is_file() else None
        )
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

    def samples(
        self, feature: int, n: int | None = None, marker: tuple[str, str] = ("«", "»")
    ) -> list[dict[str, Any]]:
        """Top-activating contexts as text, best first."""
        t = {
            "values": self.values,
            "rows": self.rows,
            "contexts": self.contexts,
            "token_index": self.token_index,
        }
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

    def _decode(
        self, t: dict[str, torch.Tensor], feature: int, n: int | None, marker: tuple[str, str]
    ) -> list[dict[str, Any]]:
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
            after = self.tokenizer.decode(ids[i + 1 :][valid[i + 1 :]].tolist())
            sample = {
                "activation": float(t["values"][feature, j]),
                "row": int(t["rows"][feature, j]),
                "token": token,
                "text": f"{before}{marker[0]}{token}{marker[1]}{after}",
                "token_ids": ids[valid].tolist(),
                "token_index": i,
            }
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
