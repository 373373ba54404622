"""The activation store: one zarr array per model / layer / site, token ids beside them.

Layout of a store directory (``data/activations/{model.type}/``)::

    tokens.zarr               int32  [n_sequences, context_size]   token ids, BOS first
    L{layer}/{site}.zarr      uint16 [n_tokens, d_model]           one row per token (row = seq * ctx + pos)

Row ``r`` of every site array is the token ``tokens[r // ctx, r % ctx]``. Arrays are chunked by
whole rows (``chunk_rows`` tokens x ``d_model``, whole windows) and sharded (``shard_rows`` rows,
whole chunks, per file: ``c/{shard}/0``); every chunk is zstd-compressed and crc32c-checksummed, so
reading any row range touches only the chunks it needs and a damaged chunk is reported, never
returned. zarr 3 has no bfloat16 data type: bfloat16 values are stored as their raw 16 bits in a
uint16 array (attr ``encoding: bfloat16-bits``) and viewed back as bfloat16 on read.
float16/float32 stores use zarr's own dtypes.

Every array's attrs hold the provenance (model, revision, dataset, split, context size, BOS,
dtype, token counts, held-out windows), the site's mean L2 norm, and ``complete: true`` once all
rows are written. The last ``n_holdout_sequences`` windows are held out from training. A store can
be read from a local directory or from any fsspec URL (``s3://…``, ``gs://…``).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore, WrapperStore

from mtc.errors import StoreError

FORMAT_VERSION = 1
_NUMPY_DTYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


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
def chunk_codecs() -> list:
    """Codecs of every inner chunk: zstd level 1, then a crc32c checksum (chosen by measurement on
    real SmolLM2 activations: see the README's codec table and tests/benchmarks/bench_codecs.py).
    The sharding codec adds its own crc32c over each shard's index."""
    return [ZstdCodec(level=1), Crc32cCodec()]


DEFAULT_SHARD_ROWS = 65536


class StoreWriter:
    """Writes token ids and the activations of several (layer, site)s, one whole shard at a time.

    Arrays are zarr 3 *sharded*: a shard file holds ``shard_rows // chunk_rows`` inner chunks, each
    zstd-compressed and crc32c-checksummed, so a store of a billion tokens is thousands of files, not
    millions. A shard is written whole, by a background thread (compression and disk writes overlap
    the forward pass), then ``progress/shard_NNNNNN.json`` records it with its per-chunk norm sums.
    A writer opened on a directory whose ``progress/identity.json`` matches the same provenance and
    sites resumes: shards with a marker are kept, the rest are (re)written. A shard is never
    partially rewritten, so a kill -9 at any moment loses at most the shards in flight.

    Several processes (torchrun ranks) write one store together: rank 0 creates (or resumes) it,
    ``barrier()``, then every rank takes a disjoint, contiguous block of the shards still to write.
    ``close()`` waits for all ranks; rank 0 then combines the norm sums chunk by chunk in row
    order (the same additions as a single process, so the result is bit-identical) and marks
    the store complete.
    """

    PROGRESS = "progress"

    def __init__(
        self,
        store_dir: str | Path,
        provenance: dict[str, Any],
        tokens: np.ndarray,
        sites: list[tuple[int, str]],
        d_model: int,
        dtype: str,
        chunk_rows: int,
        *,
        shard_rows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        queue_depth: int = 4,
    ):
        self.dir = Path(store_dir)
        self.dtype = dtype
        self.d_model = d_model
        n_seq, ctx = tokens.shape
        self.ctx = ctx
        self.n_rows = n_seq * ctx
        # Whole windows per chunk, so a chunk never splits a context; whole chunks per shard.
        self.chunk_rows = max(1, chunk_rows // ctx) * ctx
        self.shard_rows = max(1, (shard_rows or DEFAULT_SHARD_ROWS) // self.chunk_rows) * self.chunk_rows
        self.n_shards = -(-self.n_rows // self.shard_rows)
        self.provenance = {
            **provenance,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "encoding": "bfloat16-bits" if dtype == "bfloat16" else dtype,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "d_model": d_model,
        }
        if self.chunk_rows * d_model * np.dtype(_NUMPY_DTYPE[dtype]).itemsize > MAX_CHUNK_BYTES:
            raise StoreError(
                f"extract.chunk_rows: {self.chunk_rows} rows of width {d_model} in {dtype} exceed "
                f"{MAX_CHUNK_BYTES >> 30} GiB a chunk, more than a reader allocates; lower chunk_rows"
            )
        self.skip_bos = bool(provenance.get("prepend_bos"))
        self.keys = [tuple(k) for k in sites]
        self.identity = json.loads(
            json.dumps(
                {"provenance": self.provenance, "sites": [list(k) for k in self.keys], "d_model": d_model}
            )
        )
        self.rank, self.world_size = rank, world_size
        self._barrier = barrier or (lambda: None)

        if rank == 0:
            self._open_or_create(tokens)
        self._barrier()  # every rank sees the arrays and the same shard markers from here on
        # every chunk is written, all-zero ones too (zarr skips those by default): a missing shard
        # file is then always damage, which the reader refuses instead of reading zeros
        self.arrays = {
            k: zarr.open_array(str(site_path(self.dir, *k)), mode="r+", config=WRITE_EVERY_CHUNK)
            for k in self.keys
        }
        undone = [s for s in range(self.n_shards) if s not in self._done_shards()]
        self._barrier()  # nobody writes a marker before every rank has listed them
        self.todo = undone[rank * len(undone) // world_size : (rank + 1) * len(undone) // world_size]
        self._todo_set = set(self.todo)
        self._filling: dict[int, tuple[dict, dict, np.ndarray]] = {}
        self._cursor = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- layout and progress
    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of ``shard``."""
        return shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.n_rows)

    def todo_windows(self) -> list[tuple[int, int]]:
        """Window ranges [start, stop) this writer still has to fill, contiguous runs merged."""
        runs: list[list[int]] = []
        for s in self.todo:
            a, b = (r // self.ctx for r in self.shard_range(s))
            if runs and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        return [(a, b) for a, b in runs]

    @property
    def rows_todo(self) -> int:
        return sum(b - a for a, b in (self.shard_range(s) for s in self.todo))

    def _progress_dir(self) -> Path:
        return self.dir / self.PROGRESS

    def _marker(self, shard: int) -> Path:
        return self._progress_dir() / f"shard_{shard:06d}.json"

    def _done_shards(self) -> set[int]:
        return {int(p.stem[6:]) for p in self._progress_dir().glob("shard_*.json")}

    def _open_or_create(self, tokens: np.ndarray) -> None:
        try:
            same = json.loads((self._progress_dir() / "identity.json").read_text()) == self.identity
        except (OSError, ValueError):
            same = False
        if same:
            return  # resume: arrays exist, markers say which shards are on disk
        shutil.rmtree(self.dir, ignore_errors=True)
        tok = zarr.create_array(
            store=str(tokens_path(self.dir)),
            shape=tokens.shape,
            chunks=(self.chunk_rows // self.ctx, self.ctx),
            shards=(self.shard_rows // self.ctx, self.ctx),
            dtype="int32",
            compressors=chunk_codecs(),
            overwrite=True,
            attributes={**self.provenance, "complete": False},
            config=WRITE_EVERY_CHUNK,
        )
        tok[:] = tokens
        for layer, site in self.keys:
            zarr.create_array(
                store=str(site_path(self.dir, layer, site)),
                shape=(self.n_rows, self.d_model),
                chunks=(self.chunk_rows, self.d_model),
                shards=(self.shard_rows, self.d_model),
                dtype=_NUMPY_DTYPE[self.dtype],
                compressors=chunk_codecs(),
                overwrite=True,
                attributes={**self.provenance, "layer": layer, "site": site, "complete": False},
            )
        from mtc.results import atomic_write_json

        atomic_write_json(self._progress_dir() / "identity.json", self.identity)  # last: the store is usable

    # -------------------------------------------------------------- adding rows
    @property
    def first_window(self) -> int:
        """The first window of the first shard still to write (where a resumed extraction starts)."""
        runs = self.todo_windows()
        return runs[0][0] if runs else self.n_rows // self.ctx

    def add(self, acts: dict[tuple[int, str], torch.Tensor], at_window: int | None = None) -> None:
        """Activations [B, T, d] of every site for windows ``at_window .. at_window + B`` (by default
        right after the previous ``add``). Rows outside this writer's shards are ignored, so a
        caller can run whole batches that straddle shard boundaries."""
        self._raise_if_failed()
        start_window = self._cursor if at_window is None else at_window
        n_windows = next(iter(acts.values())).shape[0]
        self._cursor = start_window + n_windows
        r0, r1 = start_window * self.ctx, (start_window + n_windows) * self.ctx
        for s in range(r0 // self.shard_rows, min(self.n_shards, -(-r1 // self.shard_rows))):
            if s not in self._todo_set:
                continue
            a, b = self.shard_range(s)
            lo, hi = max(a, r0), min(b, r1)
            if lo >= hi:
                continue
            # Only a view of the batch goes to the writer thread: the cast to the stored dtype,
            # the norms, compression and disk writes all run there, beside the next forward pass.
            self._put(
                (
                    s,
                    lo - a,
                    {k: x.detach().reshape(-1, x.shape[-1])[lo - r0 : hi - r0] for k, x in acts.items()},
                )
            )

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -------------------------------------------------------------- the writer thread
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self._error is None:
                    self._fill(*item)
            except BaseException as e:  # re-raised in the producer by add() / close()
                self._error = e

    def _fill(self, shard: int, offset: int, xs: dict[tuple[int, str], torch.Tensor]) -> None:
        """Copy rows into the shard's buffer (stored dtype, plus each row's norm); write it when full."""
        a, b = self.shard_range(shard)
        data, norms, filled = self._filling.setdefault(
            shard,
            (
                {k: np.empty((b - a, self.d_model), dtype=_NUMPY_DTYPE[self.dtype]) for k in self.keys},
                {k: np.empty(b - a, dtype=np.float32) for k in self.keys},
                np.zeros(b - a, dtype=bool),
            ),
        )
        n = next(iter(xs.values())).shape[0]
        for key in self.keys:
            x = xs[key].float().cpu()
            data[key][offset : offset + n] = encode(x, self.dtype)
            norms[key][offset : offset + n] = x.norm(dim=-1).numpy()
        filled[offset : offset + n] = True  # a batch computed twice (it straddles two runs) fills rows once
        if filled.all():
            del self._filling[shard]
            self._write_shard(shard, data, norms)

    def _write_shard(self, shard: int, data: dict, norms: dict) -> None:
        from mtc.results import atomic_write_json

        a, b = self.shard_range(shard)
        for key in self.keys:
            # zarr merges a write into an existing shard file, reading it first: a file left
            # half-written by a killed run would fail its checksum, so it goes first.
            (site_path(self.dir, *key) / "c" / str(shard) / "0").unlink(missing_ok=True)
            self.arrays[key][a:b] = data[key]
        keep = torch.ones(b - a, dtype=torch.bool)
        if self.skip_bos:  # BOS rows are left out of the norm statistics
            keep = torch.arange(a, b) % self.ctx != 0
        sums = {}
        for key in self.keys:
            n = torch.from_numpy(norms[key])
            sums[f"L{key[0]}/{key[1]}"] = [
                n[c : c + self.chunk_rows][keep[c : c + self.chunk_rows]].double().sum().item()
                for c in range(0, b - a, self.chunk_rows)
            ]
        counts = [int(keep[c : c + self.chunk_rows].sum()) for c in range(0, b - a, self.chunk_rows)]
        atomic_write_json(self._marker(shard), {"shard": shard, "norm_sum": sums, "norm_count": counts})

    # -------------------------------------------------------------- finishing
    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def abort(self) -> None:
        """Stop the writer thread after the shard in hand (on an error in the producer)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop_thread()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

    def close(self) -> None:
        """Wait for this writer's shards; then (rank 0, after every rank) mark the store complete."""
        self._stop_thread()
        self._raise_if_failed()
        if self._filling:
            missing = sorted(self._filling)
            raise StoreError(
                f"{self.dir}: shards {missing} were only partly given rows; every window must be added"
            )
        self._barrier()
        if self.rank == 0:
            self._finalise()
        self._barrier()

    def _finalise(self) -> None:
        done = self._done_shards()
        missing = [s for s in range(self.n_shards) if s not in done]
        if missing:
            raise StoreError(
                f"{self.dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} of "
                f"{self.n_shards} are not on disk; re-run extract to finish them"
            )
        markers = [json.loads(self._marker(s).read_text()) for s in range(self.n_shards)]
        for key, arr in self.arrays.items():
            name = f"L{key[0]}/{key[1]}"
            norm_sum, count = 0.0, 0
            for m in markers:  # chunk by chunk in row order, whoever wrote them
                for chunk_sum, chunk_count in zip(m["norm_sum"][name], m["norm_count"]):
                    norm_sum += chunk_sum
                    count += chunk_count
            arr.attrs.update({"mean_norm": norm_sum / max(1, count), "complete": True})
        # The token ids are marked complete last: ActivationStore checks them first.
        zarr.open_array(str(tokens_path(self.dir)), mode="r+").attrs["complete"] = True
        shutil.rmtree(self._progress_dir())


# ------------------------------------------------------------------------------ reading
@dataclass
class SiteArray:
    """One (layer, site) of a store, read as float32 rows."""

    array: Any
    layer: int
    site: str
    where: str = ""
    """The array's path or URL, for error messages."""
    store: Any = None
    """The ActivationStore it came from, kept alive with it: its pinned snapshot lives as long."""

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
        return decode(read_checked(self.array, start, stop, self.where), self.attrs["dtype"])


def read_checked(array: Any, start: int, stop: int, where: str) -> np.ndarray:
    """``array[start:stop]``; a chunk that fails its checksum (or cannot be decoded) becomes a
    StoreError naming the array and the chunk."""
    try:
        return array[start:stop]
    except StoreError:
        raise  # already one line naming the file (a missing shard)
    except Exception as first:
        rows_per_chunk = array.chunks[0]
        for c in range(start // rows_per_chunk, -(-stop // rows_per_chunk)):
            a, b = c * rows_per_chunk, min((c + 1) * rows_per_chunk, array.shape[0])
            try:
                array[a:b]
            except StoreError:
                raise
            except Exception as e:
                raise _corrupt(where, c, a, b, array, e) from None
        raise _corrupt(where, start // rows_per_chunk, start, stop, array, first) from None


# DVC's hardlink cache shares each file's bytes with the working tree: a damaged file is damaged in
# the cache too, so `dvc checkout` cannot restore it, and `dvc checkout --force` deletes it.
REPAIR = "rebuild the store: dvc repro -f extract (or mtc extract)"


def _corrupt(where: str, chunk: int, a: int, b: int, array: Any, e: Exception) -> StoreError:
    shard = f", shard {a // array.shards[0]}" if getattr(array, "shards", None) else ""
    detail = (str(e).splitlines() or [""])[0][:120]
    return StoreError(
        f"{where}: chunk {chunk} (rows {a}..{b - 1}{shard}) is corrupt or truncated "
        f"({type(e).__name__}: {detail}); {REPAIR}"
    )


WRITE_EVERY_CHUNK = {"write_empty_chunks": True}

READERS_DIR = ".mtc-readers"
LOCK_SUFFIX = ".lock"
_HOST = socket.gethostname()


@dataclass
class Snapshot:
    """A reader's snapshot of a store and the lock that says its reader is alive."""

    path: Path
    lock_fd: int
    """Holds an ``flock`` on ``{path}.lock`` for the reader's whole life; the OS releases it when
    the reader dies, even on kill -9."""


def pin(store_dir: Path) -> Snapshot | None:
    """A private snapshot of a local store for one reader: a hard link to each of its files in
    ``{parent}/.mtc-readers/{name}.{pid}-{n}``. Whoever replaces the store meanwhile (``dvc repro``
    deleting it before ``extract``, ``mtc extract`` moving a new one in) unlinks files and writes new
    ones, never edits one in place, so the reader keeps reading the version it opened: it can
    neither read zeros where shards vanished nor switch datasets halfway. The walk holds each
    directory open (``os.fwalk``), so it cannot stray into a store moved in while it runs; files
    deleted under it are caught by the shard check after it. The reader holds the snapshot's lock
    until ``unpin`` (or its death): see ``remove_abandoned_snapshots``. Returns None (read in place,
    with a warning) where hard links or locks cannot be made: another filesystem, a read-only one."""
    readers = store_dir.parent / READERS_DIR
    remove_abandoned_snapshots(readers)
    snapshot = None
    try:
        snapshot = _claim_snapshot(readers, store_dir.name)
        for dirpath, _, filenames, dirfd in os.fwalk(store_dir):
            dest = snapshot.path / Path(dirpath).relative_to(store_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for name in filenames:
                try:
                    os.link(name, dest / name, src_dir_fd=dirfd)
                except FileNotFoundError:
                    pass  # deleted under the walk: the shard check reports it
    except OSError as e:
        if snapshot is not None:
            unpin(snapshot)
        print(
            f"warning: cannot pin {store_dir} in a locked snapshot of hard links ({e.strerror}); "
            "reading it in place: "
            "do not replace it while this runs",
            file=sys.stderr,
        )
        return None
    return snapshot


_snapshot_numbers = iter(range(1 << 62))


def _claim_snapshot(readers: Path, name: str) -> Snapshot:
    """A new, empty snapshot directory whose lock this process holds. The lock file is created
    exclusively (never someone else's); a sweeper that opened it before our ``flock`` either still
    holds it or has removed it (the path no longer leads to our file): then another name. A
    filesystem without locks raises OSError (the store is read in place)."""
    while True:
        readers.mkdir(exist_ok=True)
        path = readers / f"{name}.{os.getpid()}-{next(_snapshot_numbers)}"
        lock_path = path.with_name(path.name + LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except (FileExistsError, FileNotFoundError):
            continue  # the name is taken, or the readers' directory was removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_still(lock_path, fd):
                os.write(fd, _HOST.encode())
                path.mkdir()
                return Snapshot(path, fd)
        except BlockingIOError:
            pass  # a sweeper has it
        except FileExistsError:
            lock_path.unlink()  # a directory of that name left without its lock: not ours
        except OSError:  # no locks here
            os.close(fd)
            lock_path.unlink(missing_ok=True)
            raise
        os.close(fd)


def _is_still(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, nor replaced)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def unpin(snapshot: Snapshot) -> None:
    """Remove a reader's snapshot, then its lock (and the readers' directory once it is empty)."""
    shutil.rmtree(snapshot.path, ignore_errors=True)
    if not snapshot.path.exists():  # else its lock stays, for a later reader to retry the removal
        snapshot.path.with_name(snapshot.path.name + LOCK_SUFFIX).unlink(missing_ok=True)
    os.close(snapshot.lock_fd)
    try:
        snapshot.path.parent.rmdir()
    except OSError:
        pass  # other readers' snapshots are still there


def remove_abandoned_snapshots(readers: Path) -> None:
    """Remove the snapshots whose reader is provably gone: those whose lock this process can take,
    made on this host (the lock file names it: some shared filesystems keep ``flock`` to one
    node). A process id proves nothing (the reader may run in another PID namespace, or on another
    host), so snapshots without a lock file (made by an mtc before readers locked them) are left
    alone, as are other hosts' snapshots."""
    for lock_path in sorted(readers.glob(f"*{LOCK_SUFFIX}")) if readers.is_dir() else []:
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_still(lock_path, fd) and os.read(fd, 1024).decode(errors="replace") in ("", _HOST):
                snapshot = lock_path.with_name(lock_path.name.removesuffix(LOCK_SUFFIX))
                if snapshot.exists():
                    shutil.rmtree(snapshot)
                lock_path.unlink()  # last: a snapshot is never left without its lock
        except OSError:
            pass  # held by a live reader, or cannot be decided: keep it
        finally:
            os.close(fd)


MAX_CHUNK_BYTES = 1 << 30
"""The most memory one chunk may take decoded: 64x the largest written by default (4096 rows of
d_model 16384 in float32 is 256 MiB); a zarr.json asking for more is refused, not allocated."""

_METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


_SIZES = ("n_sequences", "context_size", "chunk_rows", "shard_rows", "d_model", "n_holdout_sequences")
_REQUIRED_SIZES = ("chunk_rows", "n_holdout_sequences")


def _provenance_sizes(provenance: dict[str, Any], where: str) -> dict[str, int | None]:
    """The sizes the provenance records (None where an older store has none), each an integer,
    positive but for the held-out windows."""
    sizes = {k: provenance.get(k) for k in _SIZES}
    for k, v in sizes.items():
        lowest = 0 if k == "n_holdout_sequences" else 1
        if (v is None and k in _REQUIRED_SIZES) or (v is not None and (type(v) is not int or v < lowest)):
            raise StoreError(f"{where}/zarr.json: provenance {k} is {v!r}, not a size; {REPAIR}")
    return sizes


def _implausible_metadata(array: Any, expected: dict[str, Any]) -> str | None:
    """What is wrong with an array's shape, chunks and shards (None if nothing): checked before
    any list or buffer is sized from them."""
    shape, chunks, shards = tuple(array.shape), tuple(array.chunks), array.shards
    grid = tuple(shards or chunks)
    if len(shape) != 2 or min(shape + chunks + grid) < 1:
        return f"implausible shape {list(shape)}, chunks {list(chunks)}, shards {list(grid)}"
    if chunks[1] != shape[1] or grid[1] != shape[1]:
        return f"chunks {list(chunks)} and shards {list(grid)} do not span the width {shape[1]}"
    if chunks[0] * chunks[1] * array.dtype.itemsize > MAX_CHUNK_BYTES:
        return f"chunks {list(chunks)} of {array.dtype} would take over {MAX_CHUNK_BYTES >> 30} GiB each"
    actual = {
        "rows": shape[0],
        "width": shape[1],
        "chunk_rows": chunks[0],
        "shard_rows": grid[0],
        "dtype": array.dtype,
    }
    wrong = [
        f"{k} {actual[k]}, expected {v}" for k, v in expected.items() if v is not None and actual[k] != v
    ]
    if wrong:
        return f"the array's {', '.join(wrong)} (from the store's provenance)"
    return None


class MissingChunksAreErrors(WrapperStore):
    """A zarr store in which a missing chunk (shard) file is a StoreError naming it. zarr itself
    reads a missing chunk as the fill value, zeros: a shard deleted after the store was opened
    (from a reader's snapshot, or from a URL store) would become zeros in the middle of a read."""

    def __init__(self, store: Any, where: str = ""):
        super().__init__(store)
        self.where = where.rstrip("/")

    def _with_store(self, store: Any) -> MissingChunksAreErrors:
        return type(self)(store, self.where)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        value = await self._store.get(key, prototype, byte_range)
        if value is None and not key.endswith(_METADATA_KEYS):
            raise StoreError(
                f"{self.where}/{key}: shard file is missing (deleted while being read?); zarr would "
                f"read it as zeros; {REPAIR}"
            )
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, byte_range), value in zip(key_ranges, values):
            if value is None:
                await self.get(key, prototype, byte_range)  # raises for a chunk
        return values


def is_url(store_dir: str | Path) -> bool:
    """``s3://bucket/store``, ``gs://…``, ``memory://…``, ``file://…``: read through fsspec."""
    return "://" in str(store_dir)


class ActivationStore:
    """Read side of a store directory, or of a store URL read through fsspec (``s3://…``).

    A local store is read through a snapshot of hard links taken when it is opened (``pin``), so
    one reader sees one version of it from start to end, whatever replaces it meanwhile."""

    def __init__(self, store_dir: str | Path):
        import fsspec

        self.url = str(store_dir) if is_url(store_dir) else None
        self.dir = self.url or Path(store_dir)
        self._read_dir = self.dir
        if not self.url and (self.dir / "tokens.zarr").is_dir():
            snapshot = pin(self.dir)
            if snapshot is not None:
                self._read_dir = snapshot.path
                self._unpin = weakref.finalize(self, unpin, snapshot)
        self._fs, self._root = fsspec.core.url_to_fs(str(self._read_dir))
        self._zarr_root = None
        if self.url:
            from zarr.storage import FsspecStore

            self._zarr_root = FsspecStore.from_url(self.url, read_only=True)
        if not self._exists("tokens.zarr"):
            raise StoreError(
                f"{self.dir}: no activation store here (tokens.zarr missing); run the extract stage"
            )
        self.tokens_array = self._open("tokens.zarr")
        self.provenance = self.tokens_array.attrs.asdict()
        if not self.provenance.get("complete"):
            raise StoreError(
                f"{self._where('tokens.zarr')}: store is incomplete (extraction did not finish); "
                "re-run extract"
            )
        p = self._sizes = _provenance_sizes(self.provenance, self._where("tokens.zarr"))
        ctx = (p["context_size"] or max(1, self.tokens_array.shape[-1])) if self.tokens_array.ndim == 2 else 1
        self._check_layout(
            "tokens.zarr",
            self.tokens_array,
            {
                "rows": p["n_sequences"],
                "width": p["context_size"],
                "chunk_rows": p["chunk_rows"] // ctx,
                "shard_rows": p["shard_rows"] and p["shard_rows"] // ctx,
                "dtype": np.dtype(np.int32),
            },
        )
        self.n_sequences, self.context_size = self.tokens_array.shape
        self.n_rows = self.n_sequences * self.context_size
        self.chunk_rows = p["chunk_rows"]
        self.n_holdout_sequences = p["n_holdout_sequences"]
        self.skip_bos = bool(self.provenance.get("prepend_bos"))
        self._sites: dict[tuple[int, str], SiteArray] = {}

    # -------------------------------------------------------------- local directory or fsspec URL
    def _where(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}" if self.url else str(self.dir / rel)

    def _exists(self, rel: str) -> bool:
        return self._fs.exists(f"{self._root}/{rel}/zarr.json")

    def _open(self, rel: str):
        base = self._zarr_root if self._zarr_root is not None else LocalStore(self._read_dir, read_only=True)
        try:
            where = self.url or str(self._read_dir)  # the files read: the snapshot's, if pinned
            return zarr.open_array(store=MissingChunksAreErrors(base, where), path=rel, mode="r")
        except Exception as e:  # a truncated or edited zarr.json: JSON, key or value errors from zarr
            detail = (str(e).splitlines() or [""])[0][:120]
            raise StoreError(
                f"{self._where(rel)}/zarr.json: unreadable array metadata ({type(e).__name__}: "
                f"{detail}); {REPAIR}"
            ) from None

    def _check_layout(self, rel: str, array: Any, expected: dict[str, int]) -> None:
        """Check an array's metadata before anything is sized from it: against what the store says
        elsewhere (``expected``: shape, chunk and shard sizes), against a bound on one chunk's
        memory, and against its shard files, which must all be there (zarr reads a missing one as
        zeros) and each hold at least its index."""
        problem = _implausible_metadata(array, expected)
        if problem:
            raise StoreError(f"{self._where(rel)}/zarr.json: {problem}; {REPAIR}")
        rows_per_file = (array.shards or array.chunks)[0]
        n_files = -(-array.shape[0] // rows_per_file)
        prefix = f"{self._root}/{rel}/c/"
        sizes = {
            p.removeprefix(prefix): info["size"] for p, info in self._fs.find(prefix, detail=True).items()
        }
        present = {i for i in range(min(n_files, len(sizes) + 1)) if f"{i}/0" in sizes}
        if len(present) < n_files:
            first = min(set(range(len(present) + 1)) - present)
            raise StoreError(
                f"{self._where(rel)}: {n_files - len(present)} of its {n_files} shard files are missing "
                f"(shard {first} first); {REPAIR}"
            )
        if array.shards is not None:
            index_bytes = (array.shards[0] // array.chunks[0]) * 16 + 4  # 2 x uint64 a chunk, crc32c
            short = [k for k, size in sizes.items() if size < index_bytes]
            if short:
                raise StoreError(
                    f"{self._where(rel)}/c/{short[0]}: {sizes[short[0]]} bytes, shorter than the "
                    f"{index_bytes}-byte shard index zarr.json implies; {REPAIR}"
                )

    @property
    def n_train_rows(self) -> int:
        return (self.n_sequences - self.n_holdout_sequences) * self.context_size

    @property
    def n_usable_train_rows(self) -> int:
        """Training rows a dictionary trains on: all but each window's BOS row."""
        bos_rows = (self.n_sequences - self.n_holdout_sequences) if self.skip_bos else 0
        return self.n_train_rows - bos_rows

    def tokens(self, first: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids of windows [first, stop) (all by default)."""
        stop = self.n_sequences if stop is None else stop
        return read_checked(self.tokens_array, first, stop, self._where("tokens.zarr"))

    def site(self, layer: int, site: str) -> SiteArray:
        key = (layer, site)
        if key not in self._sites:
            rel = f"L{layer}/{site}.zarr"
            if not self._exists(rel):
                have = sorted(
                    p.removeprefix(self._root).strip("/").removesuffix("/zarr.json")
                    for p in self._fs.glob(f"{self._root}/L*/*.zarr/zarr.json")
                )
                raise StoreError(
                    f"{self._where(rel)}: not in the store (has: {', '.join(have) or 'nothing'}); "
                    "add the layer/site to extract.layers/extract.sites and re-run extract"
                )
            arr = self._open(rel)
            if not arr.attrs.get("complete"):
                raise StoreError(
                    f"{self._where(rel)}: incomplete (extraction did not finish); re-run extract"
                )
            if (dtype := arr.attrs.get("dtype")) not in _NUMPY_DTYPE:
                raise StoreError(
                    f"{self._where(rel)}/zarr.json: unknown dtype {dtype!r} in its attrs; {REPAIR}"
                )
            self._check_layout(
                rel,
                arr,
                {
                    "rows": self.n_rows,
                    "width": self._sizes["d_model"],
                    "chunk_rows": self.chunk_rows,
                    "shard_rows": self._sizes["shard_rows"],
                    "dtype": np.dtype(_NUMPY_DTYPE[dtype]),  # what decode() reads it as
                },
            )
            self._sites[key] = SiteArray(arr, layer, site, self._where(rel), self)
        return self._sites[key]

    def keep_mask(self, start: int, stop: int) -> torch.Tensor:
        """Rows in [start, stop) worth training on: all but the BOS position of each window."""
        pos = torch.arange(start, stop) % self.context_size
        return pos != 0 if self.skip_bos else torch.ones(stop - start, dtype=torch.bool)

    def chunk_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """[start, stop) cut at chunk boundaries."""
        first = start // self.chunk_rows * self.chunk_rows
        return [(max(a, start), min(a + self.chunk_rows, stop)) for a in range(first, stop, self.chunk_rows)]

    def read(
        self, keys: list[tuple[int, str]], start: int, stop: int
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Rows [start, stop) of each site (BOS rows dropped) and their row indices."""
        keep = self.keep_mask(start, stop)
        rows = torch.arange(start, stop)[keep]
        return [self.site(*k).rows(start, stop)[keep] for k in keys], rows

    def iter_holdout(
        self, keys: list[tuple[int, str]], batch_rows: int
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Held-out rows in order, in batches of about ``batch_rows``."""
        for start in range(self.n_train_rows, self.n_rows, batch_rows):
            yield self.read(keys, start, min(start + batch_rows, self.n_rows))

    def iter_training_batches(
        self, keys: list[tuple[int, str]], batch_size: int, seed: int, shuffle_chunks: int = 16
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Endless shuffled batches of training rows: ([x_B_d per key], rows_B).

        Each epoch visits the training chunks in a seeded random order, ``shuffle_chunks`` at a
        time, and shuffles rows across those chunks; the carry-over between windows keeps every
        row used once per epoch. Memory is O(shuffle_chunks x chunk_rows).
        """
        ranges = self.chunk_ranges(0, self.n_train_rows)
        if self.n_usable_train_rows < batch_size:
            raise StoreError(
                f"batch_size: {batch_size} is larger than the {self.n_usable_train_rows} training rows "
                f"in {self.dir}; lower batch_size or extract more tokens"
            )
        gen = torch.Generator().manual_seed(seed)
        carry: tuple[list[torch.Tensor], torch.Tensor] | None = None
        while True:
            order = torch.randperm(len(ranges), generator=gen).tolist()
            for w in range(0, len(order), shuffle_chunks):
                parts = [self.read(keys, *ranges[i]) for i in order[w : w + shuffle_chunks]]
                if carry is not None:
                    parts.append(carry)
                xs = [torch.cat([p[0][j] for p in parts]) for j in range(len(keys))]
                rows = torch.cat([p[1] for p in parts])
                del parts  # one copy of the window in memory, not three (a CLT reads every layer)
                perm = torch.randperm(rows.shape[0], generator=gen)
                n_full = rows.shape[0] // batch_size * batch_size
                for b in range(0, n_full, batch_size):  # each batch gathered on its own
                    take = perm[b : b + batch_size]
                    yield [x[take] for x in xs], rows[take]
                take = perm[n_full:]
                carry = ([x[take] for x in xs], rows[take])
                del xs


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
    diffs = [
        f"{k}: store has {store.provenance.get(k)!r}, params ask {v!r}"
        for k, v in expected.items()
        if store.provenance.get(k) != v
    ]
    if diffs:
        raise StoreError(f"{store.dir}: store does not match params ({'; '.join(diffs)}); re-run extract")
