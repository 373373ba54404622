"""Extraction-speed benchmark on the default model (SmolLM2-135M-Instruct), side by side in one run:

- extract: the extract stage's loop (forward to the last needed layer with hooks on two sites of
  layer 8, bf16 encoding, the writer thread compressing and writing the sharded store), closed;
- forward: a bare forward pass of the same model over the same tokens and batch size, stopped after
  the same last layer (no hooks, nothing kept);
- full: a bare full-depth forward (all 30 layers and the unembedding), for the early-stop speed-up.

    python tests/benchmarks/bench_extract.py --quick     # 4096 tokens, 3 repeats (< 3 min)
    python tests/benchmarks/bench_extract.py             # 16384 tokens, 5 repeats

Repeats are interleaved (extract, forward, full, extract, ...) so drift on a shared machine hits all
three alike. Ratios are medians of the per-repeat ratios (each from runs seconds apart), so load
from other processes on a shared machine cancels; times are medians. Ends with one JSON line: extract_over_forward,
early_stop_speedup, bytes_per_value (stored, before compression), compression_ratio (on these
real activations), tokens_per_s. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtc import models
from mtc.config import DatasetConfig
from mtc.data import iter_texts, pack_tokens
from mtc.extract import fill
from mtc.store import ActivationStore, StoreWriter

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
WANTED = [(8, "resid_mid"), (8, "mlp_out")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", help="forward dtype (params.yaml model.dtype)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    n_tokens, repeats = (4096, 5) if args.quick else (16384, 7)
    if not (MODEL_DIR / "config.json").is_file():
        raise SystemExit(f"{MODEL_DIR}: run `dvc repro prepare_model` (or mtc prepare-model) first")

    tokenizer = models.load_tokenizer(MODEL_DIR)
    ds = DatasetConfig(n_tokens=n_tokens, context_size=128)
    tokens = pack_tokens(iter_texts(ds), tokenizer, ds)
    bridge = models.load_bridge(MODEL_DIR, args.dtype, "cpu")
    d_model = models.read_architecture(MODEL_DIR).d_model
    last = max(layer for layer, _ in WANTED)
    batches = [torch.from_numpy(tokens[s:s + args.batch]).long() for s in range(0, tokens.shape[0], args.batch)]
    stats = {}

    def extract() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            writer = StoreWriter(Path(tmp) / "s", {"prepend_bos": True, "n_holdout_sequences": 1}, tokens,
                                 WANTED, d_model, "bfloat16", chunk_rows=4096)
            with writer:
                fill(writer, bridge, tokens, WANTED, args.batch, "cpu")
                writer.close()
            store = ActivationStore(Path(tmp) / "s")
            arr = store.site(*WANTED[0]).array
            on_disk = sum(p.stat().st_size for p in (Path(tmp) / "s").glob("L*/*.zarr/c/*/*"))
            raw = sum(store.site(*k).array.nbytes for k in WANTED)
            stats.update(bytes_per_value=arr.dtype.itemsize, compression_ratio=round(raw / on_disk, 3))

    @torch.no_grad()
    def forward(stop_at_layer) -> None:
        for ids in batches:
            bridge(ids, stop_at_layer=stop_at_layer)

    runs = {"extract": extract, "forward": lambda: forward(last + 1), "full": lambda: forward(None)}
    for fn in runs.values():  # warm-up: first-call allocations and lazy init
        fn()
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):  # alternate the order
            fn = runs[name]
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    n = tokens.size
    print(f"{n} tokens, batch {args.batch}, forward dtype {args.dtype}, {repeats} interleaved repeats (medians):")
    for name in runs:
        print(f"  {name:8s} {med[name]:7.2f} s  {n / med[name]:8.0f} tokens/s   runs: "
              + ", ".join(f"{t:.2f}" for t in times[name]))
    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    print(json.dumps({
        "extract_over_forward": ratio("extract", "forward"),
        "early_stop_speedup": ratio("full", "forward"),
        **stats,
        "tokens": n, "sites": len(WANTED), "forward_dtype": args.dtype,
        "extract_tokens_per_s": round(n / med["extract"]), "forward_tokens_per_s": round(n / med["forward"]),
        "full_tokens_per_s": round(n / med["full"]),
    }))


if __name__ == "__main__":
    main()
