"""KL fine-tuning of a replacement model: a transcoder set or a cross-layer transcoder, trained
further through the model itself so that the model with *every* MLP replaced at once predicts what
the clean model predicts.

Training from the store fits each layer's MLP output on clean inputs; in the replacement model each
layer's input holds the errors of every replaced layer before it, and those compound (docs/clt.md).
This stage runs the model (unlike training): per step, a clean pass and a replaced pass over a few
training windows, and the loss

    KL(clean || replaced) per scored token  +  mse_coefficient * mean over layers of FVU_l,

where FVU_l compares layer l's replacement output with the model's own MLP output *at the same
replaced input* (the hook sees both), normalised by that output's variance: the term that keeps each
layer a transcoder of its MLP, so that attribution graphs' error nodes stay small, while the KL
aligns the layers with each other. Only the dictionaries' parameters move (the model is frozen;
thresholds stay). Gradients reach every layer's dictionary through the later layers of the model.

The KL's gradient is taken a few rows of logits at a time (``kl_and_gradient``), so memory is bounded
by the hidden states, not by ``[tokens, vocab]`` logits. Only the full dictionary is fine-tuned: its
Matryoshka prefixes are measured after, not trained for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtc import progress
from mtc.config import PipelineConfig
from mtc.errors import ConfigError
from mtc.readout import Readout, rows_per_piece
from mtc.replacement import LayerReplacement, replacement_hooks
from mtc.spliced import bos_masks, hidden_run


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 200
    lr: float = 1e-4
    windows_per_step: int = 4
    mse_coefficient: float = 1.0
    """Weight of the layers' mean FVU (on the replaced model's own MLP outputs) beside the KL."""
    seed: int = 0

    def __post_init__(self):
        for name, ok in (
            ("steps", self.steps >= 1),
            ("lr", 0 < self.lr < 1),
            ("windows_per_step", self.windows_per_step >= 1),
            ("mse_coefficient", self.mse_coefficient >= 0 and math.isfinite(self.mse_coefficient)),
        ):
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(self, name)!r}")


def kl_and_gradient(
    readout: Readout, clean_ND: torch.Tensor, replaced_ND: torch.Tensor, budget: int | None = None
) -> tuple[float, torch.Tensor]:
    """(sum over rows of KL(softmax(clean logits) || softmax(replaced logits)), its gradient with
    respect to the replaced hidden rows [N, d]); the logits of a few rows exist at a time (at most
    ``budget`` elements, ``mtc.readout.LOGITS_BUDGET`` by default)."""
    grad = torch.empty_like(replaced_ND)
    total = 0.0
    step = rows_per_piece(readout.vocab, budget)
    for start in range(0, clean_ND.shape[0], step):
        rows = slice(start, start + step)
        with torch.no_grad():
            log_p = torch.log_softmax(readout(clean_ND[rows]).float(), dim=-1)
        with torch.enable_grad():
            h = replaced_ND[rows].detach().requires_grad_()
            log_q = torch.log_softmax(readout(h).float(), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum()
            (grad[rows],) = torch.autograd.grad(kl, h)
        total += float(kl.detach())
    return total, grad


class _OwnOutputs:
    """Hooks' record of each replaced layer's (replacement output, the model's own MLP output at
    the same input) over the replaced positions, for the FVU term."""

    def __init__(self):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fvu(self) -> torch.Tensor:
        per_layer = [
            (new - own).pow(2).sum() / (own - own.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
            for new, own in self.pairs
        ]
        return torch.stack(per_layer).mean()


def finetune_step(
    bridge: Any,
    readout: Readout,
    replacement: LayerReplacement,
    tokens_BT: torch.Tensor,
    *,
    skip_bos: bool,
    mse_coefficient: float,
) -> dict[str, float]:
    """One step's forward passes and backward (gradients accumulate in the dictionaries'
    parameters); returns the step's KL per scored token and mean FVU."""
    keep_BT, scored_BT = bos_masks(tokens_BT, skip_bos)
    with torch.no_grad():
        clean_ND = hidden_run(bridge, tokens_BT, readout)[:, :-1][scored_BT]
    own = _OwnOutputs()

    def record(new_BTD: torch.Tensor, own_BTD: torch.Tensor) -> None:
        own.pairs.append((new_BTD[~keep_BT], own_BTD[~keep_BT].detach()))

    replacement.start()
    hooks = replacement_hooks(replacement, keep_BT, record)
    with torch.enable_grad():
        replaced_ND = hidden_run(bridge, tokens_BT, readout, hooks)[:, :-1][scored_BT]
        n = clean_ND.shape[0]
        kl_sum, grad_ND = kl_and_gradient(readout, clean_ND, replaced_ND.detach())
        fvu = own.fvu()
        torch.autograd.backward([replaced_ND, mse_coefficient * fvu], [grad_ND / n, None])
    return {"kl": kl_sum / n, "fvu_mean": float(fvu.detach())}


def finetune(
    bridge: Any,
    replacement: LayerReplacement,
    parameters: list[torch.nn.Parameter],
    windows_ST: torch.Tensor,
    settings: FinetuneSettings,
    *,
    skip_bos: bool,
) -> list[dict[str, Any]]:
    """Fine-tune ``parameters`` (the replacement's dictionaries') for ``settings.steps`` steps of
    ``settings.windows_per_step`` windows drawn from ``windows_ST`` (token ids, the store's training
    windows). Returns the log: a row per step."""
    bridge.requires_grad_(False)
    device = next(bridge.parameters()).device
    readout = Readout(bridge)
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    rows = []
    with progress.bar("KL fine-tuning", total=settings.steps, unit="steps") as advance:
        for step in range(settings.steps):
            started = time.perf_counter()
            pick = torch.randint(windows_ST.shape[0], (settings.windows_per_step,), generator=gen)
            optimizer.zero_grad(set_to_none=True)
            row = finetune_step(
                bridge,
                readout,
                replacement,
                windows_ST[pick].to(device).long(),
                skip_bos=skip_bos,
                mse_coefficient=settings.mse_coefficient,
            )
            optimizer.step()
            row = {"step": step + 1, **row, "seconds": time.perf_counter() - started}
            rows.append(row)
            advance(1)
    return rows


LOG_FILE = "finetune_log.jsonl"
SUMMARY_FILE = "finetune.json"
HEADLINE = ("fvu_mean", "ce_replaced", "kl", "top1_agreement", "ce_recovered_vs_zero", "ce_recovered_vs_mean")


def _is_finetune_output(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file()


def finetune_replacement(
    cfg: PipelineConfig, store: Any, clt_name: str | None, settings: FinetuneSettings, out: Path
) -> Path:
    """``mtc finetune``: the transcoder set of ``cfg`` (``clt_name`` None) or its CLT ``clt_name``,
    KL fine-tuned on the store's training windows, written whole into ``out``: the fine-tuned run
    directories (the CLT's in ``out`` itself, the set's in ``out/{layer}``: ``mtc evaluate``,
    ``mtc export`` read them like trained ones), ``finetune_log.jsonl`` (a row per step),
    ``replacement.json`` (the fine-tuned replacement model, measured as ``mtc replacement-set``
    measures a set) and ``finetune.json`` (the settings, and the headline metrics before and after)."""
    from mtc.clt import MatryoshkaCLT
    from mtc.models import load_bridge
    from mtc.pipeline import resolve_run
    from mtc.replacement import (
        CLTReplacement,
        SetReplacement,
        clt_replacement_metrics,
        set_dictionaries,
        set_replacement_metrics,
    )
    from mtc.results import (
        REPLACEMENT_FILE,
        atomic_write_json,
        atomic_write_text,
        check_output_dir,
        finished_run_record,
        run_dir_of,
        swapped_in_dir,
        write_config,
    )

    check_output_dir(out, _is_finetune_output, "mtc finetune")
    if clt_name is None:
        dictionaries = set_dictionaries(cfg)
        sources = {
            layer: run_dir_of(cfg.dictionary(cfg.transcoder_set.member(layer)), cfg.results_root)
            for layer in dictionaries
        }
        modules = torch.nn.ModuleList(dictionaries.values())

        def measure() -> dict[str, Any]:
            return set_replacement_metrics(cfg, store, dictionaries)

    else:
        if clt_name not in cfg.clts:
            raise ConfigError(
                f"clt.{clt_name}: no such entry in params.yaml (entries: {', '.join(cfg.clts) or 'none'})"
            )
        d, run_dir = resolve_run(cfg, clt_name)
        finished_run_record(run_dir)
        clt = MatryoshkaCLT.load(run_dir).eval()
        sources, modules = {None: run_dir}, clt

        def measure() -> dict[str, Any]:
            return clt_replacement_metrics(cfg, store, clt)

    before = measure()
    bridge = load_bridge(cfg.model_dir, "float32", cfg.evaluate.device)
    device = next(bridge.parameters()).device
    modules.to(device).train()
    replacement = SetReplacement(dictionaries) if clt_name is None else CLTReplacement(clt)
    training = torch.from_numpy(store.tokens(0, store.n_sequences - store.n_holdout_sequences)).long()
    started = time.perf_counter()
    log = finetune(
        bridge, replacement, list(modules.parameters()), training, settings, skip_bos=store.skip_bos
    )
    seconds = time.perf_counter() - started
    modules.cpu().eval()
    del bridge
    after = measure()
    with swapped_in_dir(out) as tmp:
        for layer, source in sources.items():
            run_dir = tmp if layer is None else tmp / str(layer)
            run_dir.mkdir(exist_ok=True)
            module = clt if layer is None else dictionaries[layer]
            module.save(run_dir)
            record = finished_run_record(source)
            write_config(run_dir, {**record, "kl_finetune": dataclasses.asdict(settings)}, completed=True)
        atomic_write_text(tmp / LOG_FILE, "".join(json.dumps(row) + "\n" for row in log))
        atomic_write_json(tmp / REPLACEMENT_FILE, after)
        atomic_write_json(
            tmp / SUMMARY_FILE,
            {
                "settings": dataclasses.asdict(settings),
                "from": {str(k): str(v) for k, v in sources.items()},
                "seconds": seconds,
                "before": {k: before.get(k) for k in HEADLINE},
                "after": {k: after.get(k) for k in HEADLINE},
            },
        )
    return out / SUMMARY_FILE
