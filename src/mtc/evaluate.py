"""The evaluate stage: held-out FVU per Matryoshka prefix, L0 and dead features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtc import progress
from mtc.config import EvaluateConfig, PipelineConfig
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.metrics import FVUAccumulator, fvu_summary
from mtc.models import resolve_device
from mtc.results import METRICS_FILE, atomic_write_json
from mtc.store import ActivationStore


@torch.no_grad()
def evaluate(dictionary: MatryoshkaBatchTopK, store: ActivationStore, source: tuple[int, str],
             target: tuple[int, str], cfg: EvaluateConfig) -> dict[str, Any]:
    """Metrics of ``dictionary`` on the store's held-out rows (never trained on)."""
    device = resolve_device(cfg.device)
    dictionary = dictionary.to(device).eval()
    n_groups = len(dictionary.group_sizes)
    fvu = FVUAccumulator(n_groups)
    fired = torch.zeros(dictionary.dict_size, dtype=torch.long, device=device)
    active_total, n_tokens = 0, 0
    keys = [source] if source == target else [source, target]
    with progress.bar("evaluate", total=store.n_rows - store.n_train_rows, unit="tok") as advance:
        for xs, rows in store.iter_holdout(keys, cfg.batch_size):
            x, y = xs[0].to(device), xs[-1].to(device)
            acts = dictionary.encode(x)
            fvu.update(y, [dictionary.decode(acts, g) for g in range(1, n_groups + 1)])
            active = acts > 0
            fired += active.sum(dim=0)
            active_total += int(active.sum())
            n_tokens += x.shape[0]
            advance(int(rows.numel()))
    fvus = fvu.fvus()
    dead = int((fired == 0).sum())
    return {
        "fvu_per_prefix": fvus, **fvu_summary(fvus),
        "explained_variance_per_prefix": [1 - f for f in fvus],
        "l0": active_total / max(1, n_tokens),
        "dead_features": dead, "dead_fraction": dead / dictionary.dict_size,
        "prefix_sizes": list(dictionary.boundaries), "n_tokens": n_tokens,
    }


def evaluate_run(cfg: PipelineConfig, name: str) -> Path:
    d = cfg.dictionary(name)
    run_dir = d.run_dir(cfg.results_root)
    metrics = evaluate(MatryoshkaBatchTopK.load(run_dir), ActivationStore(cfg.store_dir),
                       (d.layer, d.source_site), (d.resolved_target_layer, d.target_site), cfg.evaluate)
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    return run_dir / METRICS_FILE
