"""The run-directory contract of the seed: ``results/{model_type}/{layer}/{step_count}/{name}/``.

A run directory holds ``config.json`` (the full config; ``completed_at`` in ISO 8601 once the run
has finished and everything else is on disk), ``dictionary.safetensors`` + ``dictionary.json``,
``checkpoints/``, ``training_log.jsonl``, ``metrics.json`` (evaluate) and ``activation_samples/``.
Every file is written to a temporary name and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtc.errors import CheckpointError, ConfigError, LockedError

# Every name in a run directory, here only.
CONFIG_FILE = "config.json"  # the full config; ``completed_at`` once the run has finished
WEIGHTS_FILE = "dictionary.safetensors"
DICTIONARY_FILE = "dictionary.json"  # the dictionary's shape and settings (MatryoshkaBatchTopK.cfg)
LOG_FILE = "training_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"  # step_{n}/ with the weights, the optimizer and CHECKPOINT_STATE
CHECKPOINT_STATE = "state.json"
METRICS_FILE = "metrics.json"  # evaluate
FREQUENCY_FILE = "feature_frequency.safetensors"  # evaluate
PLOTS_DIR = "plots"  # evaluate: DVC plot data
SAMPLES_DIR = "activation_samples"
TRAINING_SAMPLES_DIR = f"{SAMPLES_DIR}/training"  # collected while training
MINED_SAMPLES_DIR = f"{SAMPLES_DIR}/mined"  # the mine stage
BROWSER_DIR = "browser"
SETS_DIR = "sets"  # results/sets/{model_type}/{set name}/: what a transcoder set gives across layers
SET_PLOT_FILE = "fvu_by_layer.json"  # DVC plot data: held-out FVU per layer
REPLACEMENT_FILE = "replacement.json"  # mtc replacement-set: every MLP replaced at once
REPLACEMENT_PLOT_FILE = "replacement_by_layer.json"  # DVC plot data: held-out FVU per layer (sets and CLTs)


def run_dir_path(
    model_type: str, layer: int | str, steps: int, name: str | None = None, root: str | Path = "results"
) -> Path:
    """``root/model_type/layer/steps[/name]``: the seed's layout plus the dictionary's name."""
    path = Path(root) / model_type / str(layer) / str(steps)
    return path / name if name else path


def run_dir_of(d: Any, results_root: str | Path = "results", create: bool = False) -> Path:
    """Where dictionary config ``d`` (a ``DictionaryConfig``) keeps its run. ``{layer}`` is the
    source layer, for a cross-layer transcoder too: dvc.yaml templates the same path from the
    entry's ``layer`` (it cannot compute anything else); the name keeps dictionaries that share
    model, layer and steps apart. ``create``: made with the seed's ``create_run_dir``."""
    place = (d.model_type or "model", d.layer, d.steps, d.name, results_root)
    return create_run_dir(*place) if create else run_dir_path(*place)


def set_dir_of(model_type: str, set_name: str, results_root: str | Path = "results") -> Path:
    """``results/sets/{model_type}/{set_name}``: beside the runs, not among them, so that a DVC stage
    can read every run of ``results/{model_type}`` and write here."""
    return Path(results_root) / SETS_DIR / model_type / set_name


def create_run_dir(
    model_type: str, layer: int | str, steps: int, name: str | None = None, root: str | Path = "results"
) -> Path:
    """The seed's results writer: ``run_dir_path(...)``, created (training calls it)."""
    path = run_dir_path(model_type, layer, steps, name, root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: readers see the
    old file or the new one, never half of one. On failure (a full disk) the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def how_to_rewrite(path: Path) -> str:
    """What to run to write ``path`` (a file of a run directory) again: the stage that writes it."""
    where = path.as_posix()
    if f"/{CHECKPOINTS_DIR}/" in where:
        return "delete that checkpoint directory: training resumes from the one before (or starts over)"
    if f"/{MINED_SAMPLES_DIR}/" in where:
        name = path.parents[2].name
        return f"mine again (mtc mine {name}, or dvc repro -f mine@{name})"
    if path.name in (METRICS_FILE, FREQUENCY_FILE):
        name = path.parent.name
        return f"evaluate again (mtc evaluate {name}, or dvc repro -f evaluate@{name})"
    run_dir = path.parents[2] if f"/{TRAINING_SAMPLES_DIR}/" in where else path.parent
    name = run_dir.name
    return f"delete {run_dir} and train again (mtc train {name}, or dvc repro -f train@{name})"


def damaged(path: Path, what: str) -> CheckpointError:
    """The one-line error for a run directory's file that is missing or cannot be read."""
    return CheckpointError(f"{path}: {what}; {how_to_rewrite(path)}")


def _check_present(path: Path) -> None:
    if not path.is_file():
        raise damaged(path, "missing")


def read_json(path: str | Path) -> Any:
    """A JSON file of a run directory; a missing or damaged one (truncated by a copy, a full disk
    elsewhere, a hand edit) ends in one line naming it and what to run."""
    path = Path(path)
    _check_present(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"damaged or truncated, not JSON ({e})") from None


def read_tensors(path: str | Path, device: Any = "cpu") -> dict[str, Any]:
    """A safetensors file of a run directory (tensors only, never pickled code); a missing or
    damaged one ends in one line naming it and what to run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_present(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise damaged(path, f"damaged or truncated, not safetensors ({e})") from None


def write_config(run_dir: str | Path, config: dict[str, Any], completed: bool = False) -> None:
    data = dict(config)
    data.pop("completed_at", None)
    if completed:
        data["completed_at"] = datetime.now(timezone.utc).isoformat()
    atomic_write_json(Path(run_dir) / CONFIG_FILE, data)


def completed_at(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return read_json(path).get("completed_at")


def finished_run_record(run_dir: Path) -> dict:
    """The config record of the finished run in ``run_dir`` (one line naming the problem otherwise)."""
    config = run_dir / CONFIG_FILE
    train = f"mtc train {run_dir.name}, or dvc repro train@{run_dir.name}"
    if not config.is_file():
        raise ConfigError(f"{run_dir}: no run here (no {CONFIG_FILE}); train it first ({train})")
    record = read_json(config)
    if not isinstance(record, dict):
        raise damaged(config, "not a config record")
    if not record.get("completed_at"):
        raise ConfigError(
            f"{run_dir}: the run has not finished (no completed_at in {CONFIG_FILE}); "
            f"finish it first ({train}: it resumes from its last checkpoint)"
        )
    return record


# ----------------------------------------------------------------------------- whole output directories
def check_output_dir(path: str | Path, is_earlier_output: Callable[[Path], bool], what: str) -> None:
    """Refuse ``path`` as the directory ``what`` (e.g. "mtc browse") writes unless it is new, empty, or
    an earlier output of ``what`` (``is_earlier_output``): what is replaced was written by mtc."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: a file is there; {what} writes a directory: give a new path")
    if path.is_dir() and any(path.iterdir()) and not is_earlier_output(path):
        raise ConfigError(
            f"{path}: a directory holding other files; {what} replaces only its own earlier output "
            "or an empty directory: give a new path"
        )


@contextmanager
def swapped_in_dir(path: str | Path) -> Iterator[Path]:
    """A fresh directory beside ``path`` to write into; when the block ends without error it is renamed
    to ``path`` (an earlier directory there, which the caller has checked with ``check_output_dir``,
    is moved aside first and then removed), so ``path`` holds the old output or the new one whole,
    never a mix. On error the fresh directory is removed and ``path`` is left as it was. One writer at
    a time in ``path``'s folder (a lock on the folder itself: no file is left beside the output), so
    what an earlier, killed writer left beside it is known to be abandoned: its half-written directory
    is removed, and an earlier output it had moved aside but not yet replaced is put back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_locked(path.parent):
        _finish_interrupted_swaps(path)
        new = _unused_name_beside(path, "tmp")
        new.mkdir()
        try:
            yield new
            old = _move_aside(path)
            try:
                new.rename(path)
            except BaseException:
                if old is not None:
                    old.rename(path)
                raise
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # what is left is swept by the next writer


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (released by the OS when its holder dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"{folder}: another mtc process is writing an output here; wait for it"
            raise LockedError(message) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _finish_interrupted_swaps(path: Path) -> None:
    """Clean up after writers of ``path`` killed mid-swap (the caller holds ``path``'s lock)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+\.[0-9a-f]{{8}}\.(tmp|old)")
    leftovers = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    olds = sorted((p for p in leftovers if p.name.endswith(".old")), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists() and not path.is_symlink():
        olds.pop().rename(path)  # killed between moving the earlier output aside and renaming the new in
    for leftover in [p for p in leftovers if p.name.endswith(".tmp")] + olds:
        shutil.rmtree(leftover, ignore_errors=True)


def _move_aside(path: Path) -> Path | None:
    """Rename the directory ``path`` to an unused hidden name beside it and return that name (None
    when there is none; a link goes, what it points to stays)."""
    if path.is_symlink():
        path.unlink()
        return None
    if not path.is_dir():
        return None  # nothing there (check_output_dir refuses a file)
    old = _unused_name_beside(path, "old")
    path.rename(old)
    return old


def _unused_name_beside(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")
