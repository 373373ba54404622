"""The evaluate stage: held-out reconstruction, feature statistics and the spliced loss.

Writes into the run directory:

- ``metrics.json`` (a DVC metric): per-prefix FVU / explained variance, L0, dead and dense features
  per group, and the model's loss with the dictionary spliced in at every prefix (see ``spliced``);
  the scalars without ``_per_prefix`` are the full dictionary's, the headline numbers.
- ``feature_frequency.safetensors``: ``log10_frequency [F]`` (-inf: never fired) and ``fire_count [F]``
  on the held-out tokens (BOS excluded).
- ``plots/*.json`` (DVC plots): FVU, CE loss recovered and KL against the number of features, and the
  histogram of log10 firing frequencies.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from mtc import progress
from mtc.config import DictionaryConfig, EvaluateConfig, PipelineConfig
from mtc.dictionary import MatryoshkaBatchTopK, load_finished_run
from mtc.metrics import (
    DENSE_FREQUENCY,
    FVUAccumulator,
    fvu_summary,
    log10_frequency,
    mean_l0,
    per_group_counts,
)
from mtc.models import read_architecture, resolve_device
from mtc.results import (
    FREQUENCY_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    SET_PLOT_FILE,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    run_dir_of,
    set_dir_of,
)
from mtc.spliced import check_splice_order
from mtc.store import ActivationStore

HISTOGRAM_BIN = 0.25
"""Width of the frequency histogram's bins, in log10 units."""


@torch.no_grad()
def reconstruction(
    dictionary: MatryoshkaBatchTopK,
    store: ActivationStore,
    source: tuple[int, str],
    target: tuple[int, str],
    cfg: EvaluateConfig,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """FVU per prefix, L0 and feature statistics on the store's held-out rows (never trained on).

    Returns the metrics, each feature's fire count [F] and the mean target activation [d]."""
    device = resolve_device(cfg.device)
    dictionary = dictionary.to(device).eval()
    n_groups = len(dictionary.group_sizes)
    fvu = FVUAccumulator(n_groups)
    fired = torch.zeros(dictionary.dict_size, dtype=torch.long, device=device)
    n_tokens = 0
    keys = [source] if source == target else [source, target]
    with progress.bar("evaluate", total=store.n_rows - store.n_train_rows, unit="tok") as advance:
        for xs, rows in store.iter_holdout(keys, cfg.batch_size):
            x, y = xs[0].to(device), xs[-1].to(device)
            acts = dictionary.encode(x)
            fvu.update(y, [dictionary.decode(acts, g, source=x) for g in range(1, n_groups + 1)])
            fired += (acts > 0).sum(dim=0)
            n_tokens += x.shape[0]
            advance(int(rows.numel()))
    fvus = fvu.fvus()
    fired = fired.cpu()
    warnings = prefix_warnings(fvus, dictionary.boundaries)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    metrics = {
        "fvu": fvus[-1],
        "explained_variance": 1 - fvus[-1],
        "fvu_per_prefix": fvus,
        **fvu_summary(fvus),
        "explained_variance_per_prefix": [1 - f for f in fvus],
        "l0": mean_l0(fired, n_tokens),
        **feature_counts(fired, n_tokens, dictionary.group_sizes),
        "prefix_sizes": list(dictionary.boundaries),
        "n_tokens": n_tokens,
        "prefix_fvu_decreasing": not warnings,
        "warnings": warnings,
    }
    return metrics, fired, (fvu.sum / fvu.n).float().cpu()


def prefix_warnings(fvus: list[float], prefix_sizes: list[int]) -> list[str]:
    """A Matryoshka dictionary must reconstruct strictly better with every group it adds: one
    message per prefix that does not."""
    return [
        f"FVU does not decrease from prefix {a} to {b} features ({fa:.4f} -> {fb:.4f}): the added group hurts"
        for (a, fa), (b, fb) in zip(zip(prefix_sizes, fvus), zip(prefix_sizes[1:], fvus[1:]))
        if not fb < fa
    ]


def feature_counts(fire_counts_F: torch.Tensor, n_tokens: int, group_sizes: list[int]) -> dict[str, Any]:
    """Dead (never fired) and dense (fired on more than 10 % of tokens) features, in all and per group."""
    dead = fire_counts_F == 0
    dense = fire_counts_F > DENSE_FREQUENCY * n_tokens
    return {
        "dead_features": int(dead.sum()),
        "dead_fraction": float(dead.float().mean()),
        "dead_per_group": per_group_counts(dead, group_sizes),
        "dense_features": int(dense.sum()),
        "dense_per_group": per_group_counts(dense, group_sizes),
    }


def heldout_windows(store: ActivationStore, n: int) -> torch.Tensor:
    """Token ids [n, T] of the first ``n`` held-out windows."""
    first = store.n_sequences - store.n_holdout_sequences
    return torch.from_numpy(store.tokens(first, first + n)).long()


def spliced_metrics(
    dictionary: MatryoshkaBatchTopK,
    store: ActivationStore,
    mean_target_D: torch.Tensor,
    source: tuple[int, str],
    target: tuple[int, str],
    cfg: EvaluateConfig,
    model_dir: Path,
) -> dict[str, Any]:
    """The spliced-loss metrics on ``cfg.n_ce_sequences`` held-out windows (none when 0)."""
    from mtc.models import load_bridge
    from mtc.spliced import Replacements, spliced_loss

    if cfg.n_ce_sequences == 0:
        return {}
    bridge = load_bridge(model_dir, cfg.dtype, cfg.device)
    device = next(bridge.parameters()).device
    windows = heldout_windows(store, min(cfg.n_ce_sequences, store.n_holdout_sequences))
    result = spliced_loss(
        bridge,
        windows,
        Replacements(dictionary.to(device).eval(), mean_target_D.to(device)),
        source,
        target,
        batch_size=cfg.ce_batch_size,
        skip_bos=store.skip_bos,
    )
    return {
        "ce_clean": result["ce_clean"],
        "ce_spliced": result["ce_spliced_per_prefix"][-1],
        "ce_recovered_vs_zero": result["ce_recovered_vs_zero_per_prefix"][-1],
        "ce_recovered_vs_mean": result["ce_recovered_vs_mean_per_prefix"][-1],
        "kl": result["kl_per_prefix"][-1],
        **result,
    }


def frequency_histogram(log10_freq_F: torch.Tensor) -> list[dict[str, Any]]:
    """Rows for DVC's bar chart: features per log10-frequency bin (labelled by its lower edge), and
    the dead ones. Labels sort alphabetically in frequency order, as the chart sorts them."""
    alive = log10_freq_F[torch.isfinite(log10_freq_F)]
    rows = []
    if alive.numel():
        edges = torch.floor(alive / HISTOGRAM_BIN) * HISTOGRAM_BIN
        for edge in sorted(set(edges.tolist()), reverse=True):
            rows.append({"log10_frequency": f"{edge:+.2f}", "features": int((edges == edge).sum())})
    rows.append({"log10_frequency": "dead", "features": int(log10_freq_F.numel() - alive.numel())})
    return rows


def plot_rows(metrics: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """One file of rows per DVC plot, each against the prefix's number of features."""
    sizes = metrics["prefix_sizes"]

    def against_features(key: str, field: str) -> list[dict[str, Any]]:
        return [{"features": n, field: v} for n, v in zip(sizes, metrics.get(key, []))]

    return {
        "fvu": against_features("fvu_per_prefix", "fvu"),
        "ce_recovered_vs_zero": against_features("ce_recovered_vs_zero_per_prefix", "ce_recovered_vs_zero"),
        "ce_recovered_vs_mean": against_features("ce_recovered_vs_mean_per_prefix", "ce_recovered_vs_mean"),
        "kl": against_features("kl_per_prefix", "kl"),
    }


def evaluate_run(cfg: PipelineConfig, d: DictionaryConfig, run_dir: Path, store: ActivationStore) -> Path:
    """The evaluate stage for dictionary ``d`` in ``run_dir``, on ``store`` (opened and checked by
    the caller)."""
    source, target = (d.layer, d.source_site), (d.resolved_target_layer, d.target_site)
    check_splice_order(source, target, f"dictionaries.{d.name}.target_site")
    if cfg.evaluate.n_ce_sequences:
        read_architecture(cfg.model_dir)  # the spliced loss needs the model: say so before any work
    _, dictionary = load_finished_run(run_dir)
    metrics, fire_counts, mean_target = reconstruction(dictionary, store, source, target, cfg.evaluate)
    metrics.update(
        spliced_metrics(dictionary, store, mean_target, source, target, cfg.evaluate, cfg.model_dir)
    )
    log10_freq = log10_frequency(fire_counts, metrics["n_tokens"])
    atomic_write_bytes(
        run_dir / FREQUENCY_FILE,
        save_tensors(
            {"log10_frequency": log10_freq, "fire_count": fire_counts},
            metadata={"n_tokens": str(metrics["n_tokens"])},
        ),
    )
    plots = {**plot_rows(metrics), "frequency_histogram": frequency_histogram(log10_freq)}
    for plot, rows in plots.items():
        atomic_write_json(run_dir / PLOTS_DIR / f"{plot}.json", rows)
    atomic_write_json(run_dir / METRICS_FILE, finite(metrics))
    return run_dir / METRICS_FILE


def finite(v: Any) -> Any:
    """JSON has no NaN or infinity: such values (e.g. CE recovered when an ablation costs nothing)
    become null, in lists and dicts too."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    return [finite(x) for x in v] if isinstance(v, list) else v


def set_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per evaluated layer of the transcoder set: held-out FVU (full and per prefix), L0,
    dead fraction and, when measured, CE loss recovered vs zero ablation."""
    rows = []
    for layer in cfg.transcoder_set.layers if cfg.transcoder_set else []:
        metrics_file = (
            run_dir_of(cfg.dictionary(cfg.transcoder_set.member(layer)), cfg.results_root) / METRICS_FILE
        )
        if not metrics_file.is_file():
            continue  # not evaluated yet (mtc evaluate, or its evaluate_set stage)
        m = read_json(metrics_file)
        row = {"layer": layer, "fvu": m["fvu"], "l0": m["l0"], "dead_fraction": m["dead_fraction"]}
        row.update({f"fvu_{size}": fvu for size, fvu in zip(m["prefix_sizes"], m["fvu_per_prefix"])})
        if "ce_recovered_vs_zero" in m:
            row["ce_recovered_vs_zero"] = m["ce_recovered_vs_zero"]
        rows.append(row)
    return rows


def summarize_set(cfg: PipelineConfig) -> Path:
    """``results/sets/{model}/{set}/``: ``fvu_by_layer.json`` (DVC plot data) and ``metrics.json``
    (DVC metrics: mean and worst FVU over the layers) from each layer's evaluation."""
    name = cfg.transcoder_set.name if cfg.transcoder_set else "none"
    out = set_dir_of(cfg.model.type, name, cfg.results_root)
    rows = set_rows(cfg)
    fvus = [r["fvu"] for r in rows]
    summary = {
        "layers": len(rows),
        "fvu_mean": sum(fvus) / len(fvus) if fvus else None,
        "fvu_max": max(fvus) if fvus else None,
        "worst_layer": rows[fvus.index(max(fvus))]["layer"] if fvus else None,
    }
    atomic_write_json(out / SET_PLOT_FILE, rows)
    atomic_write_json(out / METRICS_FILE, summary)
    return out
