"""The run-directory contract of the seed: ``results/{model_type}/{layer}/{step_count}/{name}/``.

A run directory holds ``config.json`` (the full config; ``completed_at`` in ISO 8601 once the run
has finished and everything else is on disk), ``dictionary.safetensors`` + ``dictionary.json``,
``checkpoints/``, ``training_log.jsonl``, ``metrics.json`` (evaluate) and ``activation_samples/``.
Every file is written to a temporary name and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def create_run_dir(
    model_type: str, layer: int | str, steps: int, name: str | None = None, root: str | Path = "results"
) -> Path:
    """``root/model_type/layer/steps[/name]``, created."""
    path = Path(root) / model_type / str(layer) / str(steps)
    if name:
        path = path / name
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


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


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
