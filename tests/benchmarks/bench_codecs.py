"""Codec and layout benchmark on real activations of the default model (SmolLM2-135M-Instruct,
layer 8, resid_mid and mlp_out, bfloat16 stored as uint16 bits).

    python tests/benchmarks/bench_codecs.py [--tokens 32768]
    python tests/benchmarks/bench_codecs.py --quick --model ../shared/assets/models/stories260K --layer 2
        # 4096 tokens, one repeat: seconds (the test suite runs it on that 1 MB model)

For each codec (zstd levels, blosc zstd/lz4 with byte- or bit-shuffle, none) and chunk/shard
layout it writes both sites into a fresh sharded zarr array and reads them back: compression
ratio, write and read MB/s of raw bf16 (medians of 3), files per site. Prints the machine, a table
and one JSON line. The numbers behind the codec choice in mtc.store.chunk_codecs and the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "data" / "models" / "SmolLM2-135M-Instruct"


def real_activations(n_tokens: int, model_dir: Path, layer: int) -> dict[str, np.ndarray]:
    from mtc import models
    from mtc.config import DatasetConfig
    from mtc.data import iter_pieces, pack_tokens
    from mtc.store import encode

    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: run `dvc repro prepare_model` (or mtc prepare-model) first")
    tok = models.load_tokenizer(model_dir)
    ds = DatasetConfig(n_tokens=n_tokens, context_size=128)
    tokens = pack_tokens(iter_pieces(ds), tok, ds)
    bridge = models.load_bridge(model_dir, "bfloat16", "cpu")
    out = {"resid_mid": [], "mlp_out": []}
    for s in range(0, tokens.shape[0], 16):
        acts = models.run_sites(
            bridge, torch.from_numpy(tokens[s : s + 16]).long(), [(layer, "resid_mid"), (layer, "mlp_out")]
        )
        for (_, site), x in acts.items():
            out[site].append(encode(x.reshape(-1, x.shape[-1]).float(), "bfloat16"))
    return {k: np.concatenate(v) for k, v in out.items()}


CODECS = {
    "none": lambda: [Crc32cCodec()],
    "zstd-1": lambda: [ZstdCodec(level=1), Crc32cCodec()],
    "zstd-3": lambda: [ZstdCodec(level=3), Crc32cCodec()],
    "zstd-9": lambda: [ZstdCodec(level=9), Crc32cCodec()],
    "blosc-zstd1-byteshuffle": lambda: [
        BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2),
        Crc32cCodec(),
    ],
    "blosc-zstd1-bitshuffle": lambda: [
        BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=2),
        Crc32cCodec(),
    ],
    "blosc-zstd3-bitshuffle": lambda: [
        BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=2),
        Crc32cCodec(),
    ],
    "blosc-lz4-byteshuffle": lambda: [
        BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),
        Crc32cCodec(),
    ],
    "blosc-lz4-bitshuffle": lambda: [
        BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2),
        Crc32cCodec(),
    ],
}


def measure(
    data: dict[str, np.ndarray], codec: str, chunk_rows: int, shard_rows: int, repeats: int = 3
) -> dict:
    raw = sum(a.nbytes for a in data.values())
    writes, reads, stored, files = [], [], 0, 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            arrays = {
                k: zarr.create_array(
                    store=f"{tmp}/{k}.zarr",
                    shape=a.shape,
                    dtype="uint16",
                    chunks=(chunk_rows, a.shape[1]),
                    shards=(shard_rows, a.shape[1]),
                    compressors=CODECS[codec](),
                )
                for k, a in data.items()
            }
            t = time.perf_counter()
            for k, a in data.items():
                for s in range(0, a.shape[0], shard_rows):  # whole shards, as StoreWriter writes
                    arrays[k][s : s + shard_rows] = a[s : s + shard_rows]
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            for k, a in data.items():
                for s in range(0, a.shape[0], chunk_rows):  # chunk by chunk, as training reads
                    arrays[k][s : s + chunk_rows]
            reads.append(time.perf_counter() - t)
            chunk_files = [p for p in Path(tmp).rglob("c/*/*")]
            stored = sum(p.stat().st_size for p in chunk_files)
            files = len(chunk_files) // len(data)
            assert all(np.array_equal(arrays[k][:], a) for k, a in data.items())
    mb = raw / 1e6
    return {
        "codec": codec,
        "chunk_rows": chunk_rows,
        "shard_rows": shard_rows,
        "ratio": round(raw / stored, 3),
        "write_MBps": round(mb / statistics.median(writes), 1),
        "read_MBps": round(mb / statistics.median(reads), 1),
        "files_per_site": files,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3, help="writes and reads per codec and layout")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="a prepared model directory")
    ap.add_argument("--layer", type=int, default=8, help="the layer whose resid_mid and mlp_out are stored")
    ap.add_argument("--quick", action="store_true", help="4096 tokens, one repeat: seconds on a tiny model")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 4096, 1  # one whole 4096-row chunk
    torch.manual_seed(0)
    t = time.perf_counter()
    data = real_activations(args.tokens, args.model, args.layer)
    forward_s = time.perf_counter() - t
    n = next(iter(data.values())).shape[0]
    need = sum(a.nbytes for a in data.values()) / forward_s / 1e6
    machine = cpu_description()
    print(f"machine: {machine}")
    print(
        f"{n} tokens of {args.model.name} layer {args.layer}, forward (bf16, incl. loading) "
        f"{forward_s:.1f} s: the writer must keep up with {need:.1f} MB/s of raw bf16 for two sites"
    )
    results = [measure(data, c, 4096, 16384, args.repeats) for c in CODECS]
    best = "zstd-1"
    layouts = ((1024, 16384), (4096, 4096), (8192, 32768))
    results += [measure(data, best, cr, sr, args.repeats) for cr, sr in layouts]
    print(
        f"{'codec':26s} {'chunk':>6s} {'shard':>6s} {'ratio':>6s} {'write MB/s':>10s} "
        f"{'read MB/s':>9s} {'files':>5s}"
    )
    for r in results:
        print(
            f"{r['codec']:26s} {r['chunk_rows']:6d} {r['shard_rows']:6d} {r['ratio']:6.3f} "
            f"{r['write_MBps']:10.1f} {r['read_MBps']:9.1f} {r['files_per_site']:5d}"
        )
    print(
        json.dumps(
            {
                "machine": machine,
                "model": args.model.name,
                "layer": args.layer,
                "tokens": n,
                "repeats": args.repeats,
                "forward_MBps_needed": round(need, 1),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
