"""What putting a store under DVC costs: the time DVC spends saving it to the cache (hashing and
linking, the step `dvc repro` runs after a stage's command) and the disk used, for a store of
``--tokens`` tokens built from real activations.

    python tests/benchmarks/bench_dvc_save.py --source data/activations/SmolLM2-135M-Instruct \\
        --tokens 2000000 --workdir /tmp/mtc-dvc-save

The store is written by StoreWriter (the extract stage's writer) from the real rows of
``--source`` repeated until ``--tokens`` (zstd sees the same data, so sizes are realistic; running
the model for 2M tokens would take ~9 min here and is not what is measured). Then, in a fresh git +
DVC repository with this project's cache settings, ``dvc add`` saves the store exactly as a stage
output is saved. Prints the machine (CPU model, vector extensions, threads) and one JSON line, which
has it too. The test suite runs it on a tiny store with ``--tokens 1024`` (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

from mtc.store import ActivationStore, StoreWriter, decode  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def du_kib(*paths: Path) -> list[int]:
    """``du -sk`` of paths in one call: a file hardlinked into several is counted once, in the first."""
    out = subprocess.run(["du", "-sk", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True, help="an existing store with real activations")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--workdir", default="/tmp/mtc-dvc-save")
    args = ap.parse_args()

    src = ActivationStore(args.source)
    keys = sorted({(int(p.parent.name[1:]), p.name[:-5]) for p in Path(args.source).glob("L*/*.zarr")})
    real = {k: src.site(*k).array[:] for k in keys}
    ctx = src.context_size
    n_seq = args.tokens // ctx
    tokens = src.tokens()[[i % src.n_sequences for i in range(n_seq)]]
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    store = work / "data" / "activations" / "store"
    d = src.site(*keys[0]).d_model

    t = time.perf_counter()
    writer = StoreWriter(
        store, {"prepend_bos": True, "n_holdout_sequences": 1}, tokens, keys, d, "bfloat16", 4096
    )
    with writer:
        for w in range(0, n_seq, 16):
            rows = [(i % src.n_sequences) for i in range(w, min(w + 16, n_seq))]
            idx = torch.tensor([r * ctx + p for r in rows for p in range(ctx)])
            writer.add({k: decode(real[k][idx.numpy()], "bfloat16").reshape(len(rows), ctx, d) for k in keys})
        writer.close()
    write_s = time.perf_counter() - t

    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "b@x",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "b@x",
    }
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=work, check=True, env=env)
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    files = [p for p in store.rglob("*") if p.is_file()]
    [before] = du_kib(store)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dvc", "add", "-q", "data/activations/store"], cwd=work, check=True, env=env
    )
    save_s = time.perf_counter() - t
    store_kib, extra_cache_kib = du_kib(store, work / ".dvc" / "cache")
    links = {p.stat().st_nlink for p in store.rglob("*") if p.is_file()}
    machine = cpu_description()
    print(f"machine: {machine}")
    print(
        json.dumps(
            {
                "machine": machine,
                "tokens": n_seq * ctx,
                "sites": len(keys),
                "files": len(files),
                "store_MiB": round(before / 1024, 1),
                "write_store_s": round(write_s, 1),
                "dvc_save_s": round(save_s, 1),
                "store_plus_cache_MiB": round((store_kib + extra_cache_kib) / 1024, 1),
                "cache_extra_MiB": round(extra_cache_kib / 1024, 1),
                "link_counts": sorted(links),
                "cache_type": (REPO / ".dvc" / "config")
                .read_text()
                .split("type = ")[1]
                .split()[0]
                .strip('"'),
            }
        )
    )


if __name__ == "__main__":
    main()
