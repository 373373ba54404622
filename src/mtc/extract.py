"""The extract stage: run the model once over the text and write the activation store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mtc import locks, models, progress
from mtc.config import PipelineConfig
from mtc.data import dataset_label, iter_texts, pack_tokens
from mtc.store import StoreWriter

PROVENANCE_FILE = "mtc_provenance.json"


def prepare(cfg: PipelineConfig) -> Path:
    """The prepare_model stage: write ``model.name`` as a local model directory."""
    out = cfg.model_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    source = models.prepare_model(cfg.model.name, out, cfg.model.revision)
    (out / PROVENANCE_FILE).write_text(json.dumps(source, indent=2))
    return out


def model_provenance(cfg: PipelineConfig) -> dict[str, Any]:
    path = cfg.model_dir / PROVENANCE_FILE
    source = json.loads(path.read_text()) if path.is_file() else {}
    return {"model_name": cfg.model.name, "model_type": cfg.model.type, "model_revision": cfg.model.revision,
            "model_source": source.get("source", "unknown")}


def store_provenance(cfg: PipelineConfig, bos_token_id: int | None) -> dict[str, Any]:
    """What a store was made from; a store is reused only when these match the params."""
    d = cfg.dataset
    return {**model_provenance(cfg), "model_dtype": cfg.model.dtype,
            "dataset_path": d.path, "dataset_label": dataset_label(d), "dataset_split": d.split,
            "dataset_text_field": d.text_field, "context_size": d.context_size, "prepend_bos": d.prepend_bos,
            "bos_token_id": bos_token_id if d.prepend_bos else None,
            "n_tokens": d.n_sequences * d.context_size, "n_sequences": d.n_sequences,
            "n_holdout_sequences": d.n_holdout_sequences}


def extract(cfg: PipelineConfig, store_dir: str | Path | None = None) -> Path:
    store_dir = Path(store_dir or cfg.store_dir)
    tokenizer = models.load_tokenizer(cfg.model_dir)
    tokens = pack_tokens(iter_texts(cfg.dataset), tokenizer, cfg.dataset)  # too little text fails here
    with locks.exclusive(store_dir):  # a second extraction into the same store fails fast
        return _extract(cfg, store_dir, tokenizer, tokens)


def _extract(cfg: PipelineConfig, store_dir: Path, tokenizer, tokens) -> Path:
    arch = models.read_architecture(cfg.model_dir)
    bridge = models.load_bridge(cfg.model_dir, cfg.model.dtype, cfg.model.device)
    wanted = [(layer, site) for layer in cfg.extract.layers for site in cfg.extract.sites]
    provenance = store_provenance(cfg, tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                  else tokenizer.eos_token_id)

    # Build the store beside its final place and move it in only when complete. An interrupted
    # extraction of the same params resumes after its last whole chunk; batches keep their
    # boundaries (a resume re-runs the batch holding that chunk boundary), so the result is
    # bit-identical to an uninterrupted run.
    tmp_dir = store_dir.with_name(store_dir.name + ".partial")
    writer = StoreWriter(tmp_dir, provenance, tokens, wanted, arch.d_model, cfg.extract.dtype, cfg.extract.chunk_rows)
    device = models.resolve_device(cfg.model.device)
    batch = cfg.extract.batch_size
    first = writer.first_window
    with progress.bar(f"extract {len(wanted)} site(s)", total=tokens.size, unit="tok") as advance:
        advance(first * tokens.shape[1])
        for start in range(first - first % batch, tokens.shape[0], batch):
            ids = torch.from_numpy(tokens[start:start + batch]).long().to(device)
            writer.add(models.run_sites(bridge, ids, wanted), skip_windows=max(0, first - start))
            advance(ids.numel() - max(0, first - start) * tokens.shape[1])
    writer.close()
    shutil.rmtree(store_dir, ignore_errors=True)
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.rename(store_dir)
    return store_dir
