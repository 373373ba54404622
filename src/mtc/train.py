"""The training loop: shuffled batches from the store into one or many dictionaries.

Reads the activation store only, never the model. With several dictionaries (``mode: multi``)
each batch is read once and fed to all of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtc import distributed, locks, progress
from mtc.clt import MatryoshkaCLT
from mtc.config import ConfigError, DictionaryConfig
from mtc.data_parallel import DataParallel, follower_results_root
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import CheckpointError, in_brief
from mtc.models import resolve_device
from mtc.results import (
    CHECKPOINT_STATE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOG_FILE,
    TRAINING_SAMPLES_DIR,
    WEIGHTS_FILE,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    completed_at,
    damaged,
    read_json,
    read_tensors,
    run_dir_of,
    write_config,
)
from mtc.samples import TopActivations
from mtc.store import ActivationStore, Prefetcher

LOG_EVERY = 10


@dataclass
class Run:
    """One dictionary being trained, with its optimizer and run directory."""

    cfg: DictionaryConfig
    run_dir: Path
    model: MatryoshkaBatchTopK | MatryoshkaCLT
    optimizer: torch.optim.Optimizer
    samples: TopActivations | None
    wandb_run: Any = None
    step_seconds: list[float] = field(default_factory=list)  # since the last log line
    init_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # one (source, target) row per feature
    target_norm_limit: float | torch.Tensor | None = (
        None  # rows with a larger target norm are left out (outlier_norm_ratio)
    )
    dropped_rows: int = 0  # left out since the start of this process

    def usable(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The rows to train on (a boolean mask), or None when every row is usable. A
        cross-layer transcoder's row ([L, d] per token) is left out when any layer's target is."""
        if self.target_norm_limit is None:
            return None
        # "not over", so that a NaN row stays in and stops training instead of vanishing
        over = torch.linalg.vector_norm(y, dim=-1) > self.target_norm_limit
        keep = ~(over if over.dim() == 1 else over.any(dim=1))
        return None if bool(keep.all()) else keep

    def batch(self, by_key: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) rows of this dictionary from a batch of store arrays: [B, d] each, or a
        cross-layer transcoder's [B, L, d] (every layer's resid_mid, every layer's mlp_out)."""
        keys = self.cfg.keys()
        if not self.cfg.is_clt:
            return by_key[keys[0]], by_key[keys[1]]
        return (
            torch.stack([by_key[k] for k in keys[0::2]], dim=1),
            torch.stack([by_key[k] for k in keys[1::2]], dim=1),
        )


def _config_record(cfg: DictionaryConfig, store: ActivationStore) -> dict[str, Any]:
    return {
        **cfg.to_dict(),
        "store": str(store.dir),
        "store_provenance": {k: v for k, v in store.provenance.items() if k != "complete"},
    }


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(d):
        return {k: v for k, v in d.items() if k not in ("completed_at", "store")}

    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a ``step_N.tmp`` left by a crash is not one)."""
    found = [p for p in (run_dir / CHECKPOINTS_DIR).glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    return sorted((p for p in found if (p / CHECKPOINT_STATE).is_file()), key=lambda p: int(p.name[5:]))


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = _checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _truncate_log(run_dir: Path, step: int) -> None:
    """After a resume, drop log lines of steps that will be trained again."""
    path = run_dir / LOG_FILE
    if path.is_file():
        kept = [record for record in _log_records(path) if record["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def _log_records(path: Path) -> list[dict[str, Any]]:
    """The training log's records. A last line that is not one was torn by a kill mid-write: it is
    dropped (its step is trained again). A damaged line before the last is refused, in one line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = [_log_record(line) for line in lines]
    if records and records[-1] is None:
        records.pop()  # torn
    if None in records:
        raise damaged(path, f"line {records.index(None) + 1} is not a log record")
    return records


def _log_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def check_against_store(cfg: DictionaryConfig, store: ActivationStore) -> None:
    """What params can only be checked against the store: before anything is written."""
    src, *_ = [store.site(*key) for key in cfg.keys()]
    if cfg.act_size is not None and cfg.act_size != src.d_model:
        raise ConfigError(
            f"dictionaries.{cfg.name}.act_size: {cfg.act_size} does not match the store's "
            f"{cfg.source_site} width {src.d_model}"
        )
    if cfg.batch_size > store.n_usable_train_rows:
        raise ConfigError(
            f"dictionaries.{cfg.name}.batch_size: got {cfg.batch_size}; the store has only "
            f"{store.n_usable_train_rows} training rows (lower it, or extract more tokens)"
        )


def _start_run(
    cfg: DictionaryConfig, store: ActivationStore, results_root: Path, device: torch.device
) -> tuple[Run, int]:
    run_dir = run_dir_of(cfg, results_root)
    record = _config_record(cfg, store)
    start_step = 0
    model = _new_model(cfg, store)
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.adam_beta2)
    if (run_dir / CONFIG_FILE).is_file():
        old = read_json(run_dir / CONFIG_FILE)
        ckpt = _latest_checkpoint(run_dir)
        if _same_config(old, record) and ckpt is not None:
            # An interrupted run of this very config: resume from its last checkpoint.
            start_step = _resume(model, optimizer, ckpt, device)
            _truncate_log(run_dir, start_step)
        else:  # an unfinished run of another config, or one with nothing saved yet: start over
            shutil.rmtree(run_dir)
    run_dir_of(cfg, results_root, create=True)
    (run_dir / CHECKPOINTS_DIR).mkdir(exist_ok=True)  # a DVC output even when no step saves
    write_config(run_dir, record, completed=False)
    samples = None
    if cfg.save_activation_samples:
        samples = TopActivations(cfg.dict_size, cfg.max_samples_per_feature, cfg.sample_activation_threshold)
    run = Run(cfg, run_dir, model, optimizer, samples, _start_wandb(cfg, record))
    if cfg.outlier_norm_ratio is not None:
        target_norms = torch.tensor([store.site(*k).mean_norm for k in cfg.keys()[1::2]], device=device)
        run.target_norm_limit = cfg.outlier_norm_ratio * (target_norms if cfg.is_clt else target_norms[0])
    return run, start_step


def _new_model(cfg: DictionaryConfig, store: ActivationStore) -> MatryoshkaBatchTopK | MatryoshkaCLT:
    """A fresh dictionary for ``cfg``, its scales set from the store's mean norms."""
    norms = [store.site(*k).mean_norm for k in cfg.keys()]
    common = dict(
        top_k_aux=cfg.top_k_aux,
        aux_penalty=cfg.aux_penalty,
        aux_budget=cfg.aux_budget,
        n_batches_to_dead=cfg.n_batches_to_dead,
        threshold_momentum=cfg.threshold_momentum,
        input_norm=cfg.input_norm,
        seed=cfg.seed,
    )
    if cfg.is_clt:
        if distributed.from_env().active:
            raise ConfigError(f"clt.{cfg.name}: cross-layer transcoders train in one process (not torchrun)")
        model = MatryoshkaCLT(
            store.site(*cfg.keys()[0]).d_model,
            len(cfg.layers),
            cfg.group_sizes,
            cfg.k,
            decoder_init=cfg.decoder_init,
            topk_scope=cfg.topk_scope,
            first_layer=cfg.layers[0],
            **common,
        )
        model.set_scales(norms[0::2], norms[1::2])
        return model
    src, tgt = (store.site(*k) for k in cfg.keys())
    model_cls = DataParallel if distributed.from_env().active else MatryoshkaBatchTopK
    model = model_cls(
        src.d_model,
        tgt.d_model,
        cfg.group_sizes,
        cfg.k,
        kind=cfg.kind,
        skip_connection=cfg.has_skip,
        **common,
    )
    model.set_scales(src.mean_norm, tgt.mean_norm)
    return model


def make_optimizer(model: MatryoshkaBatchTopK, lr: float, beta2: float = 0.999) -> torch.optim.Optimizer:
    # fused: one pass over each parameter per step (CPU and CUDA), same maths as the default loop
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.0, fused=True)


def _resume(
    model: MatryoshkaBatchTopK, optimizer: torch.optim.Optimizer, ckpt: Path, device: torch.device
) -> int:
    """Load a checkpoint: tensors only (safetensors, and torch.load with weights_only=True, which
    refuses pickled code). Returns the step it was saved at."""
    try:
        model.load_state_dict(read_tensors(ckpt / WEIGHTS_FILE, device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        return int(read_json(ckpt / CHECKPOINT_STATE)["step"])
    except CheckpointError:
        raise  # a missing or damaged file: read_tensors / read_json name it and what to do
    except Exception as e:  # unpickling refusals and shape mismatches alike
        raise CheckpointError(
            f"{ckpt}: cannot resume from it ({in_brief(e, 160)}); "
            "only tensors are ever loaded; delete the checkpoint to start over"
        ) from None


WANDB_INIT_SECONDS = 10
"""How long wandb may take to reach its server before the run logs offline instead."""

_wandb_offline_because: str | None = None  # the server did not answer once: later runs go offline at once
_said: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(f"warning: {line}", file=sys.stderr)


def _start_wandb(cfg: DictionaryConfig, record: dict[str, Any]):
    """The dictionary's wandb run, or None. Tracking never stops or slows training: without
    credentials it is off; a server that does not answer within ``WANDB_INIT_SECONDS`` makes it log
    offline (``wandb sync`` uploads it later). Either is said once, in one line."""
    global _wandb_offline_because
    if cfg.wandb_project is None:
        return None
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"):
        _say_once(
            "wandb tracking is off: wandb_project is set but WANDB_API_KEY is not "
            "(set it, or WANDB_MODE=offline to log locally)"
        )
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"dictionaries.{cfg.name}.wandb_project: wandb is not installed (pip install wandb)"
        ) from None
    init = dict(project=cfg.wandb_project, name=cfg.name, config=record, reinit="create_new")
    if _wandb_offline_because is None:
        try:
            return wandb.init(**init, settings=wandb.Settings(init_timeout=WANDB_INIT_SECONDS))
        except Exception as e:  # CommError, UsageError ...: whatever it is, training goes on
            _wandb_offline_because = in_brief(e)
    try:
        run = wandb.init(**init, mode="offline")
    except Exception as e:
        _say_once(f"wandb tracking is off: it cannot start ({in_brief(e)})")
        return None
    _say_once(
        f"wandb cannot reach its server ({_wandb_offline_because}); logging offline to "
        f"{Path(run.dir).parent} (upload it later with `wandb sync`)"
    )
    return run


def _checkpoint(run: Run, step: int) -> None:
    ckpt = run.run_dir / CHECKPOINTS_DIR / f"step_{step}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save(tmp)
    buffer = io.BytesIO()  # serialised in memory: a full disk then fails as an OSError on write
    torch.save(run.optimizer.state_dict(), buffer)
    atomic_write_bytes(tmp / "optimizer.pt", buffer.getvalue())
    atomic_write_json(tmp / CHECKPOINT_STATE, {"step": step})
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)
    # Keep only the newest checkpoint besides this one: they are for resuming, not for history.
    for old in _checkpoints(run.run_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _log(run: Run, step: int, out, clock: dict[str, float]) -> dict[str, Any]:
    record = {
        "step": step,
        "loss": float(out.loss.detach()),
        "aux_loss": float(out.aux_loss),
        "prefix_mse": [round(float(v), 6) for v in out.prefix_mse],
        "l0": out.codes.l0(),
        "dead_features": run.model.n_dead(),
        "threshold": float(run.model.threshold.mean()),  # a cross-layer transcoder's: over its layers
        "seconds": round(time.time() - clock["start"], 2),
        # median wall time of one optimizer step (forward, backward, update) since the last line
        "step_seconds": round(statistics.median(run.step_seconds), 4) if run.step_seconds else None,
        # time spent waiting for the store reader since the start (~0: training never starved)
        "data_wait_seconds": round(clock["data_wait"], 3),
        # rows left out by outlier_norm_ratio since this process started
        "dropped_rows": run.dropped_rows,
    }
    run.step_seconds.clear()
    with open(run.run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.wandb_run is not None:
        run.wandb_run.log(record, step=step)
    return record


def train(
    cfgs: list[DictionaryConfig],
    store: ActivationStore | str | Path,
    results_root: str | Path = "results",
    tokenizer_dir: str | Path | None = None,
) -> list[Path]:
    """Train every dictionary in ``cfgs`` from one pass over the store; returns their run dirs."""
    if not cfgs:
        raise ConfigError("dictionaries: nothing to train")
    first = cfgs[0]
    for c in cfgs[1:]:
        for key in ("batch_size", "steps", "seed", "shuffle_chunks"):
            if getattr(c, key) != getattr(first, key):
                raise ConfigError(
                    f"dictionaries.{c.name}.{key}: {getattr(c, key)} differs from {first.name}'s "
                    f"{getattr(first, key)}; multi mode feeds every dictionary the same batches"
                )
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    for c in cfgs:
        check_against_store(c, store)
    dist = distributed.from_env()
    if dist.active:  # torchrun: data-parallel, rank 0 writes the results (see mtc.distributed)
        distributed.check_batch_size(first.batch_size, first.name)
        results_root, cfgs = follower_results_root(results_root, cfgs)
    with contextlib.ExitStack() as held:
        for c in cfgs:  # a second writer of the same run directory fails fast
            held.enter_context(locks.exclusive(run_dir_of(c, results_root)))
        todo = [c for c in cfgs if not _already_finished(c, store, Path(results_root))]
        if todo:
            _train(todo, store, Path(results_root), tokenizer_dir)
    if dist.rank != 0:
        shutil.rmtree(results_root, ignore_errors=True)
        return []
    return [run_dir_of(c, results_root) for c in cfgs]


def _already_finished(cfg: DictionaryConfig, store: ActivationStore, results_root: Path) -> bool:
    """A finished run of this very config is kept as it is (DVC removes outputs it wants redone)."""
    run_dir = run_dir_of(cfg, results_root)
    if not completed_at(run_dir) or not (run_dir / WEIGHTS_FILE).is_file():
        return False
    if not _same_config(read_json(run_dir / CONFIG_FILE), _config_record(cfg, store)):
        raise ConfigError(
            f"{run_dir}: holds a finished run with a different config; "
            "rename the dictionary or remove that directory"
        )
    print(f"{run_dir}: already finished with this config; delete it to train again", file=sys.stderr)
    return True


def _train(
    cfgs: list[DictionaryConfig], store: ActivationStore, results_root: Path, tokenizer_dir: str | Path | None
) -> list[Path]:
    first = cfgs[0]
    device = resolve_device(first.device)
    started = [_start_run(c, store, results_root, device) for c in cfgs]
    runs = [r for r, _ in started]
    start_step = min(s for _, s in started)
    if any(s != start_step for _, s in started):
        raise ConfigError(
            "checkpoints of the dictionaries trained together are at different steps; train them separately"
        )
    keys = sorted({k for r in runs for k in r.cfg.keys()})
    batches = Prefetcher(
        store.iter_training_batches(keys, first.batch_size, first.seed, first.shuffle_chunks)
    )
    with (
        batches,
        progress.bar(f"train {', '.join(c.name for c in cfgs)}", total=first.steps, unit="steps") as advance,
    ):
        for _ in range(start_step):  # same data order after a resume
            next(batches)
        if start_step == 0:
            for run in runs:
                run.init_rows = _feature_init_rows(run, store, device)
        clock = {"start": time.time(), "data_wait": 0.0}
        advance(start_step)
        for step in range(start_step + 1, first.steps + 1):
            t = time.time()
            xs, rows = distributed.shard_batch(*next(batches))
            clock["data_wait"] += time.time() - t
            by_key = {k: x.to(device, non_blocking=True) for k, x in zip(keys, xs)}
            info = {}
            for run in runs:
                record = _train_step(run, by_key, rows, step, clock)
                info = record or info
            advance(1, **({"loss": info["loss"], "l0": info["l0"]} if info and len(runs) == 1 else {}))

    for run in runs:
        _finish(run, store, tokenizer_dir)
    return [r.run_dir for r in runs]


def _train_step(
    run: Run, by_key: dict, rows: torch.Tensor, step: int, clock: dict[str, float]
) -> dict[str, Any] | None:
    """One optimizer step of one dictionary; returns the log record on logging steps."""
    started = time.perf_counter()
    x, y = run.batch(by_key)
    keep = run.usable(x, y)
    if keep is not None:
        run.dropped_rows += int((~keep).sum())
        x, y, rows = x[keep], y[keep], rows[keep]
    if step == 1:
        run.model.init_means(x, y)
        if run.init_rows is not None:
            run.model.init_features_from_rows(*run.init_rows)
            run.init_rows = None
    out = run.model.training_forward(x, y, getattr(torch, run.cfg.matmul_dtype))
    if not torch.isfinite(out.loss):  # before the update: the weights stay good
        raise FloatingPointError(
            f"{run.cfg.name}: loss is {float(out.loss.detach())} at step {step}; "
            f"the last good checkpoint is kept in {run.run_dir / CHECKPOINTS_DIR}"
        )
    out.loss.backward()
    if distributed.from_env().active:
        distributed.average_gradients(run.model)
    run.model.remove_parallel_grad()
    if run.cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.model.normalize_decoder()
    run.step_seconds.append(time.perf_counter() - started)
    if run.samples is not None and step % run.cfg.sample_collection_freq == 0:
        run.samples.update(out.acts_BF, rows)
    record = None
    if step % LOG_EVERY == 0 or step == run.cfg.steps:
        record = _log(run, step, out, clock)
    if step % run.cfg.save_every == 0 and step < run.cfg.steps:
        _checkpoint(run, step)
    return record


def _feature_init_rows(
    run: Run, store: ActivationStore, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``dict_size`` training rows (source, target) for ``feature_init: data``, from a seeded stream
    of their own: every data-parallel rank reads the same rows, so every rank starts alike."""
    if not run.cfg.init_from_data:
        return None
    keys = sorted(set(run.cfg.keys()))  # an SAE reads one site
    source, target = (keys.index(k) for k in run.cfg.keys())
    batch = min(run.cfg.dict_size, store.n_usable_train_rows)
    batches = store.iter_training_batches(keys, batch, run.cfg.seed + 2, run.cfg.shuffle_chunks)
    xs, ys, have = [], [], 0
    while have < run.cfg.dict_size:
        part = next(batches)[0]
        x, y = part[source], part[target]
        keep = run.usable(x, y)  # an outlier row would start a feature that no other row uses
        if keep is not None:
            x, y = x[keep], y[keep]
        xs.append(x), ys.append(y)
        have += x.shape[0]
    x, y = torch.cat(xs)[: run.cfg.dict_size], torch.cat(ys)[: run.cfg.dict_size]
    return x.to(device), y.to(device)


def _calibrate(run: Run, store: ActivationStore) -> None:
    """Set the inference threshold on ``calibration_rows`` training rows (never held-out ones)."""
    rows = run.cfg.calibration_rows
    if rows == 0:
        return
    batch = min(rows, run.cfg.batch_size)
    sources = run.cfg.keys()[0::2] if run.cfg.is_clt else run.cfg.keys()[:1]
    batches = store.iter_training_batches(sources, batch, run.cfg.seed + 1, run.cfg.shuffle_chunks)
    stack = (lambda xs: torch.stack(xs, dim=1)) if run.cfg.is_clt else (lambda xs: xs[0])
    run.model.calibrate_threshold(stack(next(batches)[0]) for _ in range(max(1, rows // batch)))


def _finish(run: Run, store: ActivationStore, tokenizer_dir: str | Path | None) -> None:
    _calibrate(run, store)
    run.model.save(run.run_dir)
    samples_dir = run.run_dir / TRAINING_SAMPLES_DIR
    if run.samples is not None:
        run.samples.save(
            samples_dir,
            store.tokens(),
            run.cfg.sample_context_size,
            {
                "source": "training batches",
                "store": str(store.dir),
                "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None,
            },
        )
    else:
        samples_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            samples_dir / "meta.json",
            {"source": "training batches", "collected": False, "why": "save_activation_samples is false"},
        )
    if run.wandb_run is not None:
        run.wandb_run.finish()
    # Everything else is on disk; only now is the run marked finished.
    record = read_json(run.run_dir / CONFIG_FILE)
    write_config(run.run_dir, record, completed=True)
