"""Top-activating contexts per feature, from the stored token ids (the model is never rerun).

Format of ``activation_samples/<source>/`` (``source`` is ``mined`` for the mine stage and
``training`` for samples collected during training):

- ``samples.safetensors`` with, for ``D`` features and up to ``M = max_samples_per_feature``
  samples each, best first:
  ``values [D, M] float32`` (activation; 0 where no sample), ``rows [D, M] int64`` (store row of
  the activating token; -1 where no sample), ``contexts [D, M, C] int32`` (token ids around it;
  -1 padding), ``token_index [D, M] int32`` (where the activating token sits in its context).
- ``meta.json``: sizes, threshold, tokens seen, the store and the tokenizer directory.

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
from mtc.models import load_tokenizer, resolve_device
from mtc.results import atomic_write_bytes, atomic_write_json, read_json
from mtc.store import ActivationStore

SAMPLES_FILE = "samples.safetensors"
META_FILE = "meta.json"


class TopActivations:
    """Keeps the ``max_samples`` highest activations (above ``threshold``) of every feature."""

    def __init__(self, dict_size: int, max_samples: int, threshold: float):
        self.values = torch.full((dict_size, max_samples), -1.0)
        self.rows = torch.full((dict_size, max_samples), -1, dtype=torch.long)
        self.threshold = threshold
        self.n_tokens_seen = 0

    @torch.no_grad()
    def update(self, acts_BF: torch.Tensor, rows_B: torch.Tensor) -> None:
        m = min(self.values.shape[1], acts_BF.shape[0])
        vals, idx = acts_BF.float().cpu().topk(m, dim=0)            # [m, D]
        vals = vals.T.masked_fill(vals.T <= self.threshold, -1.0)    # [D, m]
        rows = rows_B.cpu()[idx.T].masked_fill(vals <= self.threshold, -1)
        # A row already kept for a feature (seen again in a later epoch) is not added twice.
        dup = (rows[:, :, None] == self.rows[:, None, :]).any(dim=2) & (rows >= 0)
        vals = vals.masked_fill(dup, -1.0)
        all_vals = torch.cat([self.values, vals], dim=1)
        all_rows = torch.cat([self.rows, rows], dim=1)
        best, order = all_vals.topk(self.values.shape[1], dim=1)
        self.values, self.rows = best, all_rows.gather(1, order).masked_fill(best <= self.threshold, -1)
        self.n_tokens_seen += acts_BF.shape[0]

    def save(self, directory: str | Path, tokens_SC: np.ndarray, context_size: int, meta: dict[str, Any]) -> Path:
        """Write samples with their token contexts (``context_size`` tokens, the activating one
        near the end) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ctx = tokens_SC.shape[1]
        after = context_size // 4
        D, M = self.rows.shape
        rows = self.rows.numpy()
        seq, pos = np.maximum(rows, 0) // ctx, np.maximum(rows, 0) % ctx
        start = np.clip(pos - (context_size - 1 - after), 0, None)
        offsets = start[..., None] + np.arange(context_size)                 # [D, M, C]
        valid = (offsets < ctx) & (offsets <= pos[..., None] + after) & (rows[..., None] >= 0)
        contexts = np.where(valid, tokens_SC[seq[..., None], np.minimum(offsets, ctx - 1)], -1).astype(np.int32)
        values = self.values.clamp_min(0.0)
        atomic_write_bytes(directory / SAMPLES_FILE, save_tensors({
            "values": values.contiguous(), "rows": self.rows.contiguous(), "contexts": torch.from_numpy(contexts),
            "token_index": torch.from_numpy((pos - start).astype(np.int32) * (rows >= 0))}))
        atomic_write_json(directory / META_FILE, {
            "dict_size": D, "max_samples_per_feature": M, "sample_context_size": context_size,
            "sample_activation_threshold": self.threshold, "n_tokens_seen": self.n_tokens_seen, **meta})
        return directory


@torch.no_grad()
def mine(dictionary: MatryoshkaBatchTopK, store: ActivationStore, layer: int, site: str, cfg: MineConfig,
         out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """Encode the held-out rows and keep each feature's top-activating contexts."""
    device = resolve_device(cfg.device)
    dictionary = dictionary.to(device).eval()
    top = TopActivations(dictionary.dict_size, cfg.max_samples_per_feature, cfg.sample_activation_threshold)
    n_rows = store.n_rows - store.n_train_rows
    with progress.bar("mine", total=n_rows, unit="tok") as advance:
        for (x,), rows in store.iter_holdout([(layer, site)], cfg.batch_size):
            top.update(dictionary.encode(x.to(device)), rows)
            advance(int(rows.numel()))
    return top.save(out_dir, store.tokens(), cfg.sample_context_size,
                    {"source": "mine (held-out rows)", "store": str(store.dir), "tokenizer_dir": str(tokenizer_dir)})


def mine_run(cfg: PipelineConfig, name: str) -> Path:
    d = cfg.dictionary(name)
    run_dir = d.run_dir(cfg.results_root)
    dictionary = MatryoshkaBatchTopK.load(run_dir)
    store = ActivationStore(cfg.store_dir)
    return mine(dictionary, store, d.layer, d.source_site, cfg.mine, run_dir / "activation_samples" / "mined",
                cfg.model_dir)


class ActivationSampleAnalyzer:
    """Reads an ``activation_samples/<source>/`` directory and shows contexts as text."""

    def __init__(self, directory: str | Path, tokenizer: Any = None):
        self.dir = Path(directory)
        self.meta = read_json(self.dir / META_FILE)
        t = load_file(str(self.dir / SAMPLES_FILE))
        self.values, self.rows, self.contexts, self.token_index = t["values"], t["rows"], t["contexts"], t["token_index"]
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
        out = []
        for j in range(self.rows.shape[1] if n is None else min(n, self.rows.shape[1])):
            if self.rows[feature, j] < 0:
                break
            ids = self.contexts[feature, j]
            i = int(self.token_index[feature, j])
            valid = ids >= 0
            before = self.tokenizer.decode(ids[:i][valid[:i]].tolist())
            token = self.tokenizer.decode([int(ids[i])])
            after = self.tokenizer.decode(ids[i + 1:][valid[i + 1:]].tolist())
            out.append({"activation": float(self.values[feature, j]), "row": int(self.rows[feature, j]),
                        "token": token, "text": f"{before}{marker[0]}{token}{marker[1]}{after}"})
        return out

    def show(self, feature: int, n: int = 5) -> str:
        lines = [f"feature {feature}:"]
        for s in self.samples(feature, n):
            lines.append(f"  {s['activation']:7.3f}  {s['text']!r}")
        return "\n".join(lines)
