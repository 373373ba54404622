"""What a store was made from: written into its attrs, and compared with the params before reuse."""

from __future__ import annotations

import json
from typing import Any

from mtc.config import PipelineConfig
from mtc.data import dataset_label
from mtc.models import PROVENANCE_FILE


def model_provenance(cfg: PipelineConfig) -> dict[str, Any]:
    path = cfg.model_dir / PROVENANCE_FILE
    source = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "model_name": cfg.model.name,
        "model_type": cfg.model.type,
        "model_revision": cfg.model.revision,
        "model_source": source.get("source", "unknown"),
    }


def store_provenance(cfg: PipelineConfig, bos_token_id: int | None) -> dict[str, Any]:
    """What a store was made from; a store is reused only when these match the params."""
    d = cfg.dataset
    return {
        **model_provenance(cfg),
        "model_dtype": cfg.model.dtype,
        "dataset_path": d.path,
        "dataset_label": dataset_label(d),
        "dataset_split": d.split,
        "dataset_text_field": d.text_field,
        "context_size": d.context_size,
        "prepend_bos": d.prepend_bos,
        "bos_token_id": bos_token_id if d.prepend_bos else None,
        "n_tokens": d.n_sequences * d.context_size,
        "n_sequences": d.n_sequences,
        "n_holdout_sequences": d.n_holdout_sequences,
        "dtype": cfg.extract.dtype,
        **({"dataset_shuffle_seed": d.shuffle_seed} if d.shuffle_seed is not None else {}),
    }
