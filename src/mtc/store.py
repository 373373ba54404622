"""The activation store: one zarr array per model / layer / site, token ids beside them.

Layout of a store directory (``data/activations/{model.type}/``)::

    tokens.zarr               int32  [n_sequences, context_size]   token ids, BOS first
    L{layer}/{site}.zarr      uint16 [n_tokens, d_model]           one row per token (row = seq * ctx + pos)

Row ``r`` of every site array is the token ``tokens[r // ctx, r % ctx]``. Arrays are chunked by
whole rows (``chunk_rows`` tokens x ``d_model``) and zstd-compressed, so reading any row range
touches only the chunks it needs. zarr 3 has no bfloat16 data type: bfloat16 values are stored as
their raw 16 bits in a uint16 array (attr ``encoding: bfloat16-bits``) and viewed back as
bfloat16 on read. float16/float32 stores use zarr's own dtypes.

Every array's attrs hold the provenance (model, revision, dataset, split, context size, BOS,
dtype, token counts, held-out windows), the site's mean L2 norm, and ``complete: true`` once all
rows are written. The last ``n_holdout_sequences`` windows are held out from training.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

FORMAT_VERSION = 1
_NUMPY_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


class StoreError(RuntimeError):
    """A missing, incomplete or mismatched activation store."""


def site_path(store_dir: str | Path, layer: int, site: str) -> Path:
    return Path(store_dir) / f"L{layer}" / f"{site}.zarr"


def tokens_path(store_dir: str | Path) -> Path:
    return Path(store_dir) / "tokens.zarr"


def encode(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations -> the numpy array stored for ``dtype`` (bfloat16 as its raw bits)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy array -> float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


# ------------------------------------------------------------------------------ writing
class StoreWriter:
    """Writes token ids and the activations of several (layer, site)s, one whole chunk at a time.

    After every chunk, ``progress.json`` (written whole, then renamed) records the rows on disk and
    the norm sums so far. A writer opened on a directory whose progress matches the same provenance
    and sites resumes after its last whole chunk (``rows_written``); anything else starts afresh.
    """

    PROGRESS = "progress.json"

    def __init__(self, store_dir: str | Path, provenance: dict[str, Any], tokens: np.ndarray,
                 sites: list[tuple[int, str]], d_model: int, dtype: str, chunk_rows: int):
        self.dir = Path(store_dir)
        self.dtype = dtype
        n_seq, ctx = tokens.shape
        self.ctx = ctx
        self.n_rows = n_seq * ctx
        # Whole windows per chunk, so a chunk never splits a context.
        self.chunk_rows = max(1, chunk_rows // ctx) * ctx
        self.provenance = {**provenance, "format_version": FORMAT_VERSION, "dtype": dtype,
                           "encoding": "bfloat16-bits" if dtype == "bfloat16" else dtype,
                           "chunk_rows": self.chunk_rows}
        self.skip_bos = bool(provenance.get("prepend_bos"))
        self.keys = [tuple(k) for k in sites]
        self.identity = {"provenance": self.provenance, "sites": [list(k) for k in self.keys], "d_model": d_model}
        progress = self._read_progress()
        if progress is not None and progress["identity"] == json.loads(json.dumps(self.identity)):
            self.arrays = {k: zarr.open_array(str(site_path(self.dir, *k)), mode="r+") for k in self.keys}
            self.rows_written = progress["rows_written"]
            self.norm_sum = dict(zip(self.keys, progress["norm_sum"]))
            self.norm_count = dict(zip(self.keys, progress["norm_count"]))
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._create(tokens, d_model)
            self.rows_written = 0
            self.norm_sum = {k: 0.0 for k in self.keys}
            self.norm_count = {k: 0 for k in self.keys}
            self._write_progress()
        self.buffers: dict[tuple[int, str], list[torch.Tensor]] = {k: [] for k in self.keys}
        self.rows_buffered = 0

    def _create(self, tokens: np.ndarray, d_model: int) -> None:
        tok = zarr.create_array(store=str(tokens_path(self.dir)), shape=tokens.shape,
                                chunks=(self.chunk_rows // self.ctx, self.ctx), dtype="int32",
                                compressors=ZstdCodec(level=3), overwrite=True,
                                attributes={**self.provenance, "complete": False})
        tok[:] = tokens
        tok.attrs["complete"] = True
        self.arrays = {}
        for layer, site in self.keys:
            self.arrays[(layer, site)] = zarr.create_array(
                store=str(site_path(self.dir, layer, site)), shape=(self.n_rows, d_model),
                chunks=(self.chunk_rows, d_model), dtype=_NUMPY_DTYPE[self.dtype],
                compressors=ZstdCodec(level=3), overwrite=True,
                attributes={**self.provenance, "layer": layer, "site": site, "complete": False})

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / self.PROGRESS).read_text())
        except (OSError, ValueError):
            return None

    def _write_progress(self) -> None:
        from mtc.results import atomic_write_json

        atomic_write_json(self.dir / self.PROGRESS, {
            "identity": self.identity, "rows_written": self.rows_written,
            "norm_sum": [self.norm_sum[k] for k in self.keys], "norm_count": [self.norm_count[k] for k in self.keys]})

    @property
    def first_window(self) -> int:
        """The first window not on disk yet: where a resumed extraction starts."""
        return self.rows_written // self.ctx

    def add(self, acts: dict[tuple[int, str], torch.Tensor], skip_windows: int = 0) -> None:
        """Append activations [B, T, d] of the next windows of every site, dropping the first
        ``skip_windows`` of them (already on disk from before a resume)."""
        for key, x in acts.items():
            x = x[skip_windows:].detach().float().cpu()
            self.buffers[key].append(x.reshape(-1, x.shape[-1]))
        self.rows_buffered += (next(iter(acts.values())).shape[0] - skip_windows) * self.ctx
        while self.rows_buffered >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, n: int) -> None:
        start = self.rows_written
        keep = torch.ones(n, dtype=torch.bool)
        if self.skip_bos:  # BOS rows are left out of the norm statistics
            keep = torch.arange(start, start + n) % self.ctx != 0
        for key, parts in self.buffers.items():
            block = torch.cat(parts)
            self.arrays[key][start:start + n] = encode(block[:n], self.dtype)
            self.norm_sum[key] += block[:n][keep].norm(dim=-1).double().sum().item()
            self.norm_count[key] += int(keep.sum())
            self.buffers[key] = [block[n:]] if block.shape[0] > n else []
        self.rows_written += n
        self.rows_buffered -= n
        self._write_progress()  # only after the chunk is on disk

    def close(self) -> None:
        if self.rows_buffered:
            self._flush(self.rows_buffered)
        if self.rows_written != self.n_rows:
            raise StoreError(f"{self.dir}: wrote {self.rows_written} rows, expected {self.n_rows}")
        for key, arr in self.arrays.items():
            arr.attrs.update({"mean_norm": self.norm_sum[key] / max(1, self.norm_count[key]), "complete": True})
        (self.dir / self.PROGRESS).unlink()


# ------------------------------------------------------------------------------ reading
@dataclass
class SiteArray:
    """One (layer, site) of a store, read as float32 rows."""

    array: Any
    layer: int
    site: str

    @property
    def attrs(self) -> dict[str, Any]:
        return self.array.attrs.asdict()

    @property
    def d_model(self) -> int:
        return self.array.shape[1]

    @property
    def mean_norm(self) -> float:
        return float(self.attrs["mean_norm"])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return decode(self.array[start:stop], self.attrs["dtype"])


class ActivationStore:
    """Read side of a store directory."""

    def __init__(self, store_dir: str | Path):
        self.dir = Path(store_dir)
        path = tokens_path(self.dir)
        if not path.exists():
            raise StoreError(f"{self.dir}: no activation store here (tokens.zarr missing); run the extract stage")
        self.tokens_array = zarr.open_array(str(path), mode="r")
        self.provenance = self.tokens_array.attrs.asdict()
        if not self.provenance.get("complete"):
            raise StoreError(f"{path}: store is incomplete (extraction did not finish); re-run extract")
        self.n_sequences, self.context_size = self.tokens_array.shape
        self.n_rows = self.n_sequences * self.context_size
        self.chunk_rows = int(self.provenance["chunk_rows"])
        self.n_holdout_sequences = int(self.provenance["n_holdout_sequences"])
        self.skip_bos = bool(self.provenance.get("prepend_bos"))
        self._sites: dict[tuple[int, str], SiteArray] = {}

    @property
    def n_train_rows(self) -> int:
        return (self.n_sequences - self.n_holdout_sequences) * self.context_size

    def tokens(self) -> np.ndarray:
        return self.tokens_array[:]

    def site(self, layer: int, site: str) -> SiteArray:
        key = (layer, site)
        if key not in self._sites:
            path = site_path(self.dir, layer, site)
            if not path.exists():
                have = sorted(str(p.relative_to(self.dir)) for p in self.dir.glob("L*/*.zarr"))
                raise StoreError(f"{path}: not in the store (has: {', '.join(have) or 'nothing'}); "
                                 "add the layer/site to extract.layers/extract.sites and re-run extract")
            arr = zarr.open_array(str(path), mode="r")
            if not arr.attrs.get("complete"):
                raise StoreError(f"{path}: incomplete (extraction did not finish); re-run extract")
            self._sites[key] = SiteArray(arr, layer, site)
        return self._sites[key]

    def keep_mask(self, start: int, stop: int) -> torch.Tensor:
        """Rows in [start, stop) worth training on: all but the BOS position of each window."""
        pos = torch.arange(start, stop) % self.context_size
        return pos != 0 if self.skip_bos else torch.ones(stop - start, dtype=torch.bool)

    def chunk_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """[start, stop) cut at chunk boundaries."""
        first = start // self.chunk_rows * self.chunk_rows
        return [(max(a, start), min(a + self.chunk_rows, stop)) for a in range(first, stop, self.chunk_rows)]

    def read(self, keys: list[tuple[int, str]], start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Rows [start, stop) of each site (BOS rows dropped) and their row indices."""
        keep = self.keep_mask(start, stop)
        rows = torch.arange(start, stop)[keep]
        return [self.site(*k).rows(start, stop)[keep] for k in keys], rows

    def iter_holdout(self, keys: list[tuple[int, str]], batch_rows: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Held-out rows in order, in batches of about ``batch_rows``."""
        for start in range(self.n_train_rows, self.n_rows, batch_rows):
            yield self.read(keys, start, min(start + batch_rows, self.n_rows))

    def iter_training_batches(self, keys: list[tuple[int, str]], batch_size: int, seed: int,
                              shuffle_chunks: int = 16) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Endless shuffled batches of training rows: ([x_B_d per key], rows_B).

        Each epoch visits the training chunks in a seeded random order, ``shuffle_chunks`` at a
        time, and shuffles rows across those chunks; the carry-over between windows keeps every
        row used once per epoch. Memory is O(shuffle_chunks x chunk_rows).
        """
        ranges = self.chunk_ranges(0, self.n_train_rows)
        n_usable = sum(int(self.keep_mask(a, b).sum()) for a, b in ranges)
        if n_usable < batch_size:
            raise StoreError(f"batch_size: {batch_size} is larger than the {n_usable} training rows in {self.dir}; "
                             "lower batch_size or extract more tokens")
        gen = torch.Generator().manual_seed(seed)
        carry: tuple[list[torch.Tensor], torch.Tensor] | None = None
        while True:
            order = torch.randperm(len(ranges), generator=gen).tolist()
            for w in range(0, len(order), shuffle_chunks):
                parts = [self.read(keys, *ranges[i]) for i in order[w:w + shuffle_chunks]]
                if carry is not None:
                    parts.append(carry)
                xs = [torch.cat([p[0][j] for p in parts]) for j in range(len(keys))]
                rows = torch.cat([p[1] for p in parts])
                perm = torch.randperm(rows.shape[0], generator=gen)
                xs, rows = [x[perm] for x in xs], rows[perm]
                n_full = rows.shape[0] // batch_size * batch_size
                for b in range(0, n_full, batch_size):
                    yield [x[b:b + batch_size] for x in xs], rows[b:b + batch_size]
                carry = ([x[n_full:] for x in xs], rows[n_full:])


class Prefetcher:
    """Runs ``iterator`` in a background thread, ``depth`` items ahead (zarr decompression and
    decoding release the GIL, so reading overlaps training). Use as a context manager: leaving it
    stops and joins the thread, so no reader is left running in C code at interpreter exit."""

    _DONE = object()

    def __init__(self, iterator: Iterator, depth: int = 2):
        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._iterator:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as e:  # re-raised in the consumer
            self._put(e)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def check_provenance(store: ActivationStore, expected: dict[str, Any]) -> None:
    """Raise naming every field where the store differs from what params ask."""
    diffs = [f"{k}: store has {store.provenance.get(k)!r}, params ask {v!r}"
             for k, v in expected.items() if store.provenance.get(k) != v]
    if diffs:
        raise StoreError(f"{store.dir}: store does not match params ({'; '.join(diffs)}); re-run extract")
