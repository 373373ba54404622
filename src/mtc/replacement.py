"""The replacement model: the model with every MLP output replaced at once.

Each replaced layer's MLP output is what a ``LayerReplacement`` makes of that layer's resid_mid *in
the replaced model*, so the errors of earlier layers reach the inputs of later ones and compound. A
transcoder set (one transcoder per layer) and a cross-layer transcoder (``mtc.clt``) are measured
alike, against the clean model and against ablating every MLP they replace (zeros, or the mean
``mlp_out`` of the store's training rows). Per replacement: next-token CE, KL(clean || replaced)
per token, top-1 agreement with the clean model, and, for the dictionaries, CE loss recovered.

With ``skip_bos`` the BOS position keeps the model's own MLP outputs and is not scored (as in
``mtc.spliced``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from mtc import progress
from mtc.clt import MatryoshkaCLT
from mtc.config import PipelineConfig
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.metrics import FVUAccumulator, ce_loss_recovered
from mtc.models import hook_name
from mtc.readout import Readout
from mtc.spliced import bos_masks, hidden_run, loss_sums

ZERO, MEAN = "zero_ablation", "mean_ablation"
"""The names of the ablations that CE loss recovered is measured against."""

DEFAULT_N_SEQUENCES = 32
"""Held-out windows measured when ``evaluate.n_ce_sequences`` is 0."""


class LayerReplacement(Protocol):
    layers: list[int]
    """The model layers whose MLP output it replaces, ascending."""

    def start(self) -> None:
        """Called before each forward pass (a CLT resets its accumulators)."""

    def mlp_out(self, layer: int, resid_mid_BTD: torch.Tensor) -> torch.Tensor:
        """The replacement mlp_out [B, T, d] at ``layer``, given that layer's resid_mid [B, T, d] in
        the replaced model; called once per layer per forward pass, in ascending layer order."""


class SetReplacement:
    """A transcoder set: layer l's transcoder maps resid_mid at l to mlp_out at l (its first
    ``n_groups`` groups; all by default)."""

    def __init__(self, dictionaries: dict[int, MatryoshkaBatchTopK], n_groups: int | None = None):
        self.dictionaries = dictionaries
        self.layers = sorted(dictionaries)
        self.n_groups = n_groups

    def start(self) -> None:
        pass

    def mlp_out(self, layer: int, resid_mid_BTD: torch.Tensor) -> torch.Tensor:
        B, T, d = resid_mid_BTD.shape
        out = self.dictionaries[layer](resid_mid_BTD.reshape(B * T, d).float(), self.n_groups)
        return out.reshape(B, T, -1)


class CLTReplacement:
    """A cross-layer transcoder (its first ``n_groups`` groups at every layer): layer l's features
    read resid_mid at l and add to the outputs of l and every later layer, so each pass accumulates
    the outputs as it goes (reset by ``start``)."""

    def __init__(self, clt: MatryoshkaCLT, n_groups: int | None = None):
        self.clt, self.layers, self.n_groups = clt, clt.layers, n_groups
        self._decoded: list[torch.Tensor] = []

    def start(self) -> None:
        self._decoded = []

    def mlp_out(self, layer: int, resid_mid_BTD: torch.Tensor) -> torch.Tensor:
        B, T, d = resid_mid_BTD.shape
        i = layer - self.layers[0]
        codes = self.clt.encode(i, resid_mid_BTD.reshape(B * T, d).float())
        self._decoded.append(self.clt.decode(i, codes, self.n_groups))  # [B * T, L - i, d]
        # Out of place (KL fine-tuning differentiates through it), bias first, then sources in order.
        out = self.clt.output_bias()[i].expand(B * T, -1)
        for source, decoded in enumerate(self._decoded):
            out = out + decoded[:, i - source]
        return out.reshape(B, T, d)


class ZeroAblation:
    """Every MLP of ``layers`` outputs zeros."""

    def __init__(self, layers: list[int]):
        self.layers = sorted(layers)

    def start(self) -> None:
        pass

    def mlp_out(self, layer: int, resid_mid_BTD: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(resid_mid_BTD)


class MeanAblation:
    """The MLP of each layer in ``means`` outputs that layer's mean mlp_out [d] at every position."""

    def __init__(self, means: dict[int, torch.Tensor]):
        self.means = means
        self.layers = sorted(means)

    def start(self) -> None:
        pass

    def mlp_out(self, layer: int, resid_mid_BTD: torch.Tensor) -> torch.Tensor:
        return self.means[layer].to(resid_mid_BTD).expand_as(resid_mid_BTD)


def replacement_hooks(
    r: LayerReplacement,
    keep_BT: torch.Tensor,
    record: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[tuple[str, Any]]:
    """Forward hooks that replace mlp_out at every layer of ``r`` by ``r.mlp_out`` of the resid_mid
    seen in the same pass; positions where ``keep_BT`` is True keep the model's own output.
    ``record``, if given, is called at every layer with (the replacement's output, the model's own
    MLP output at the same input), both [B, T, d].

    TransformerBridge's ``hook_resid_mid`` is the MLP norm's input: the residual stream after
    attention, holding the replaced MLP outputs of the layers before."""
    resid_mid: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            resid_mid[layer] = x
            return x

        return hook

    def replace(layer: int):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            new = r.mlp_out(layer, resid_mid.pop(layer)).to(x.dtype)
            if record is not None:
                record(new, x)
            return torch.where(keep_BT[..., None], x, new)

        return hook

    hooks = []
    for layer in r.layers:
        hooks += [
            (hook_name("resid_mid", layer), capture(layer)),
            (hook_name("mlp_out", layer), replace(layer)),
        ]
    return hooks


@torch.no_grad()
def replacement_metrics(
    bridge: Any,
    windows_ST: torch.Tensor,
    replacements: dict[str, LayerReplacement],
    *,
    batch_size: int,
    skip_bos: bool,
    logits_budget: int | None = None,
) -> dict[str, Any]:
    """Clean CE, and per replacement: CE, KL(clean || replaced) and top-1 agreement per scored token
    on ``windows_ST`` (token ids), plus CE loss recovered against ``zero_ablation`` and
    ``mean_ablation`` (when those are among ``replacements``) for every other replacement. The logits
    exist a few rows at a time (at most ``logits_budget`` elements; ``mtc.readout``)."""
    device = next(bridge.parameters()).device
    readout = Readout(bridge)
    ce_clean, n_scored = 0.0, 0
    sums = {name: {"ce": 0.0, "kl": 0.0, "top1_agreement": 0} for name in replacements}
    with progress.bar("replacement model", total=windows_ST.shape[0], unit="windows") as advance:
        for tokens in windows_ST.split(batch_size):
            tokens = tokens.to(device).long()
            keep_BT, scored_BT = bos_masks(tokens, skip_bos)
            targets_N = tokens[:, 1:][scored_BT]
            clean_ND = hidden_run(bridge, tokens, readout)[:, :-1][scored_BT]
            replaced = {}
            for name, r in replacements.items():
                r.start()
                hooks = replacement_hooks(r, keep_BT)
                replaced[name] = hidden_run(bridge, tokens, readout, hooks)[:, :-1][scored_BT]
            clean, batch = loss_sums(
                readout, clean_ND, replaced, targets_N, top1=True, logits_budget=logits_budget
            )
            ce_clean += clean
            for name, s in batch.items():
                for key, value in s.items():
                    sums[name][key] += value
            n_scored += targets_N.numel()
            advance(tokens.shape[0])
    ce_clean /= n_scored
    per = {name: {k: v / n_scored for k, v in s.items()} for name, s in sums.items()}
    for name, m in per.items():
        for ablation, key in ((ZERO, "ce_recovered_vs_zero"), (MEAN, "ce_recovered_vs_mean")):
            if ablation in per and name not in (ZERO, MEAN):
                m[key] = ce_loss_recovered(ce_clean, m["ce"], per[ablation]["ce"])
    return {
        "ce_clean": ce_clean,
        "n_sequences": int(windows_ST.shape[0]),
        "n_tokens": n_scored,
        "replacements": per,
    }


def mean_training_rows(store: Any, keys: list[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
    """The mean [d] of each (layer, site) over the store's training rows (BOS rows left out), read
    one chunk at a time."""
    sums = dict.fromkeys(keys, 0.0)
    n = 0
    for start, stop in store.chunk_ranges(0, store.n_train_rows):
        xs, rows = store.read(keys, start, stop)
        for key, x in zip(keys, xs):
            sums[key] = sums[key] + x.double().sum(dim=0)
        n += rows.numel()
    return {key: (s / n).float() for key, s in sums.items()}


@torch.no_grad()
def open_loop_fvu(
    store: Any, layers: list[int], reconstruct: Callable[[torch.Tensor], torch.Tensor], batch_rows: int
) -> list[float]:
    """Held-out FVU of every layer's mlp_out, each layer's input the clean resid_mid from the
    store: ``reconstruct`` maps resid_mid [B, L, d] of ``layers`` to their mlp_out [B, L, d]."""
    keys = [(layer, site) for layer in layers for site in ("resid_mid", "mlp_out")]
    fvu = [FVUAccumulator(1) for _ in layers]
    for xs, _ in store.iter_holdout(keys, batch_rows):
        x, y = torch.stack(xs[0::2], dim=1), torch.stack(xs[1::2], dim=1)
        recon = reconstruct(x)
        for i, acc in enumerate(fvu):
            acc.update(y[:, i], [recon[:, i]])
    return [acc.fvus()[0] for acc in fvu]


def _measure(
    cfg: PipelineConfig,
    store: Any,
    layers: list[int],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    prefixes: Callable[[torch.device], dict[str, LayerReplacement]],
) -> dict[str, Any]:
    """(a) held-out FVU per layer, (b) the replacement model at every prefix against ablating the
    same MLPs; the headline keys (``fvu_mean``, ``ce_replaced``, ``kl``, ``top1_agreement``,
    ``ce_recovered_vs_zero`` / ``_vs_mean``) are the full dictionary's, the same for sets and CLTs."""
    from mtc.evaluate import heldout_windows
    from mtc.models import load_bridge, read_architecture

    n_model_layers = read_architecture(cfg.model_dir).n_layers  # one line if the model is missing
    e = cfg.evaluate
    fvus = open_loop_fvu(store, layers, reconstruct, e.batch_size)
    means = mean_training_rows(store, [(layer, "mlp_out") for layer in layers])
    bridge = load_bridge(cfg.model_dir, e.dtype, e.device)
    device = next(bridge.parameters()).device
    replacements: dict[str, LayerReplacement] = {
        ZERO: ZeroAblation(layers),
        MEAN: MeanAblation({layer: means[layer, "mlp_out"].to(device) for layer, _ in means}),
        **prefixes(device),
    }
    windows = heldout_windows(store, min(e.n_ce_sequences or DEFAULT_N_SEQUENCES, store.n_holdout_sequences))
    result = replacement_metrics(
        bridge, windows, replacements, batch_size=e.ce_batch_size, skip_bos=store.skip_bos
    )
    full = result["replacements"][list(replacements)[-1]]
    return {
        "layers": layers,
        "n_model_layers": n_model_layers,
        "fvu_mean": sum(fvus) / len(fvus),
        "fvu_max": max(fvus),
        "fvu_per_layer": fvus,
        "ce_replaced": full["ce"],
        "kl": full["kl"],
        "top1_agreement": full["top1_agreement"],
        "ce_recovered_vs_zero": full.get("ce_recovered_vs_zero"),
        "ce_recovered_vs_mean": full.get("ce_recovered_vs_mean"),
        **result,
    }


def set_dictionaries(cfg: PipelineConfig) -> dict[int, MatryoshkaBatchTopK]:
    """Every layer's finished transcoder of ``cfg.transcoder_set`` (one line if the set is empty,
    a member is not a resid_mid -> mlp_out transcoder of its layer, or is not trained)."""
    from mtc.dictionary import load_finished_run
    from mtc.results import run_dir_of

    the_set = cfg.transcoder_set
    if the_set is None or not the_set.layers:
        raise ConfigError("transcoder_set.layers: lists none, so there is no replacement model to measure")
    layers = sorted(the_set.layers)
    for layer in layers:
        d = cfg.dictionary(the_set.member(layer))
        if (d.source_site, d.target_site, d.resolved_target_layer) != ("resid_mid", "mlp_out", layer):
            raise ConfigError(
                f"transcoder_set.dictionary: the replacement model needs resid_mid -> mlp_out transcoders "
                f"of one layer; layer {layer}'s reads {d.source_site} and writes {d.target_site} at layer "
                f"{d.resolved_target_layer}"
            )
    return {
        layer: load_finished_run(run_dir_of(cfg.dictionary(the_set.member(layer)), cfg.results_root))[
            1
        ].eval()
        for layer in layers
    }


def set_replacement_metrics(
    cfg: PipelineConfig, store: Any, dictionaries: dict[int, MatryoshkaBatchTopK] | None = None
) -> dict[str, Any]:
    """The replacement model of ``cfg.transcoder_set`` (or of ``dictionaries``, one transcoder per
    layer): every layer's transcoder in place of its MLP at once, at every Matryoshka prefix
    (``prefix_g``: each transcoder's first g groups), against ablating the same MLPs; on
    ``evaluate.n_ce_sequences`` held-out windows (32 when 0)."""
    if dictionaries is None:
        dictionaries = set_dictionaries(cfg)
    layers = sorted(dictionaries)
    n_groups = {len(d.group_sizes) for d in dictionaries.values()}
    if len(n_groups) != 1:
        raise ConfigError(
            f"transcoder_set: its transcoders have different numbers of groups ({sorted(n_groups)}); "
            "retrain them with the set's current dictionary settings"
        )
    G = n_groups.pop()

    def reconstruct(x_BLD: torch.Tensor) -> torch.Tensor:
        return torch.stack([dictionaries[layer](x_BLD[:, i]) for i, layer in enumerate(layers)], dim=1)

    def prefixes(device: torch.device) -> dict[str, LayerReplacement]:
        on_device = {layer: d.to(device) for layer, d in dictionaries.items()}
        return {f"prefix_{g}": SetReplacement(on_device, g) for g in range(1, G + 1)}

    name = cfg.transcoder_set.name if cfg.transcoder_set else "set"
    return {"set": name, **_measure(cfg, store, layers, reconstruct, prefixes)}


def clt_replacement_metrics(cfg: PipelineConfig, store: Any, clt: MatryoshkaCLT) -> dict[str, Any]:
    """The replacement model of a cross-layer transcoder, measured as ``set_replacement_metrics``
    measures a set (prefix g: the first g groups of every layer)."""

    def prefixes(device: torch.device) -> dict[str, LayerReplacement]:
        on_device = clt.to(device)
        return {f"prefix_{g}": CLTReplacement(on_device, g) for g in range(1, len(clt.group_sizes) + 1)}

    return _measure(cfg, store, clt.layers, clt.eval(), prefixes)


def replace_set(cfg: PipelineConfig, store: Any) -> Path:
    """DVC stage ``replace_set`` / ``mtc replacement-set``: the set's replacement model into
    ``results/sets/{model}/{set}/replacement.json`` (a DVC metric) and ``fvu_by_layer`` plot rows
    beside it; with no set, a file that says so (the stage runs in every pipeline)."""
    from mtc.evaluate import finite
    from mtc.results import REPLACEMENT_FILE, REPLACEMENT_PLOT_FILE, atomic_write_json, set_dir_of

    the_set = cfg.transcoder_set
    out = set_dir_of(cfg.model.type, the_set.name if the_set else "none", cfg.results_root)
    metrics = set_replacement_metrics(cfg, store) if the_set and the_set.layers else {"layers": []}
    rows = [
        {"layer": layer, "fvu": f} for layer, f in zip(metrics["layers"], metrics.get("fvu_per_layer", []))
    ]
    atomic_write_json(out / REPLACEMENT_PLOT_FILE, rows)
    atomic_write_json(out / REPLACEMENT_FILE, finite(metrics))
    return out / REPLACEMENT_FILE


def evaluate_clt_run(cfg: PipelineConfig, run_dir: Path, store: Any) -> Path:
    """The evaluate stage of a cross-layer transcoder: ``metrics.json`` (held-out FVU per layer,
    L0, the replacement model as for a set) and ``plots/fvu_by_layer.json``."""
    from mtc.clt import MatryoshkaCLT
    from mtc.evaluate import finite
    from mtc.results import (
        METRICS_FILE,
        PLOTS_DIR,
        REPLACEMENT_PLOT_FILE,
        atomic_write_json,
        finished_run_record,
    )

    finished_run_record(run_dir)  # a missing or unfinished run: one line naming what to run
    clt = MatryoshkaCLT.load(run_dir)
    metrics = clt_replacement_metrics(cfg, store, clt)
    rows = [{"layer": layer, "fvu": f} for layer, f in zip(metrics["layers"], metrics["fvu_per_layer"])]
    atomic_write_json(run_dir / PLOTS_DIR / REPLACEMENT_PLOT_FILE, rows)
    atomic_write_json(run_dir / METRICS_FILE, finite(metrics))
    return run_dir / METRICS_FILE


def replacement_table(metrics: dict[str, Any]) -> str:
    """``replacement_metrics``'s result as a short text table, one row per replacement."""
    columns = {
        "ce": "CE",
        "kl": "KL",
        "top1_agreement": "top-1",
        "ce_recovered_vs_zero": "rec. vs 0",
        "ce_recovered_vs_mean": "rec. vs mean",
    }
    lines = [
        f"clean CE {metrics['ce_clean']:.4f} on {metrics['n_tokens']} tokens",
        f"{'replacement':<16}" + "".join(f"{c:>13}" for c in columns.values()),
    ]
    for name, m in metrics["replacements"].items():
        lines.append(f"{name:<16}" + "".join(f"{m[c]:>13.4f}" if c in m else f"{'-':>13}" for c in columns))
    return "\n".join(lines)
