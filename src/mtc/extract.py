"""The extract stage: run the model once over the text and write the activation store."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from mtc import distributed, locks, model_check, models, progress
from mtc.config import PipelineConfig
from mtc.data import iter_pieces, pack_tokens, sample_text
from mtc.provenance import store_provenance
from mtc.store import StoreWriter

TOKENIZER_SAMPLE_CHARS = 4096
"""How much of the dataset's text the tokenizer must read back before extraction."""


def extract(cfg: PipelineConfig, store_dir: str | Path | None = None) -> Path:
    """Write the store for ``cfg``. Under ``torchrun`` every rank runs this: rank 0 creates the
    store and each rank fills a disjoint block of its shards (see ``StoreWriter``)."""
    store_dir = Path(store_dir or cfg.store_dir)
    arch = models.read_architecture(cfg.model_dir)  # refuses a missing model: "run prepare_model"
    tokenizer = models.load_tokenizer(cfg.model_dir)
    sample, pieces = sample_text(iter_pieces(cfg.dataset), TOKENIZER_SAMPLE_CHARS)
    models.check_tokenizer(tokenizer, sample, cfg.model_dir)  # refuses one that cannot read the text
    tokens = pack_tokens(pieces, tokenizer, cfg.dataset)  # too little text fails here
    dist = distributed.from_env()
    # A second extraction into the same store fails fast (rank 0 holds the lock for the job).
    with locks.exclusive(store_dir) if dist.rank == 0 else contextlib.nullcontext():
        return _extract(cfg, store_dir, arch, tokenizer, tokens, dist)


def _extract(
    cfg: PipelineConfig,
    store_dir: Path,
    arch: models.Architecture,
    tokenizer,
    tokens,
    dist: distributed.Context,
) -> Path:
    device = dist.device(cfg.model.device)
    wanted = [(layer, site) for layer in cfg.extract.layers for site in cfg.extract.sites]
    # Nothing is written until the wrapper gives the model's own activations on the first batch.
    first_batch = torch.from_numpy(tokens[: cfg.extract.batch_size]).long().to(device)
    bridge, errors = model_check.checked_bridge(
        cfg.model_dir,
        models.load_hf_model(cfg.model_dir, cfg.model.dtype),
        arch,
        first_batch,
        wanted,
        cfg.model.dtype,
        device,
    )
    progress.note(
        f"wrapper check on the first batch: largest relative error {max(errors.values()):.1e} "
        f"(logits and {len(errors) - 1} site(s) against the model's own forward)"
    )
    provenance = store_provenance(
        cfg, tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )

    # Build the store beside its final place and move it in only when complete. An interrupted
    # extraction of the same params resumes: shards already on disk are kept. Batches always start
    # at multiples of batch_size (a resumed or parallel run recomputes the batch that straddles a
    # shard boundary), so every row comes from the same forward pass as in one uninterrupted run
    # and the store is bit-identical.
    tmp_dir = store_dir.with_name(store_dir.name + ".partial")
    writer = StoreWriter(
        tmp_dir,
        provenance,
        tokens,
        wanted,
        arch.d_model,
        cfg.extract.dtype,
        cfg.extract.chunk_rows,
        shard_rows=cfg.extract.shard_rows,
        rank=dist.rank,
        world_size=dist.world_size,
        barrier=dist.barrier,
    )
    batch = cfg.extract.batch_size
    label = f"extract {len(wanted)} site(s)" + (
        f" [rank {dist.rank}/{dist.world_size}]" if dist.world_size > 1 else ""
    )
    with writer, progress.bar(label, total=writer.rows_todo, unit="tok") as advance:
        fill(writer, bridge, tokens, wanted, batch, device, advance)
        writer.close()
    if dist.rank == 0:
        shutil.rmtree(store_dir, ignore_errors=True)
        store_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.rename(store_dir)
    dist.barrier()  # every rank returns once the store is in place
    return store_dir


def fill(
    writer: StoreWriter,
    bridge,
    tokens,
    wanted: list[tuple[int, str]],
    batch: int,
    device,
    advance=lambda n: None,
) -> None:
    """Run the model over the windows ``writer`` still needs and hand it the activations; the
    writer's thread compresses and writes while the next batch runs."""
    for first, stop in writer.todo_windows():
        for start in range(first - first % batch, stop, batch):
            ids = torch.from_numpy(tokens[start : start + batch]).long().to(device)
            writer.add(models.run_sites(bridge, ids, wanted), at_window=start)
            advance((min(start + batch, stop) - max(start, first)) * tokens.shape[1])
