"""Extraction-speed benchmark on the default model (SmolLM2-135M-Instruct), side by side in one run:

- extract: what the extract stage does once the model is loaded (forward to the last needed layer
  with hooks on two sites of layer 8; the writer thread casting to bf16, compressing and writing the
  sharded store; close);
- forward: a bare forward pass of the same model over the same tokens and batch size, stopped after
  the same last layer (no hooks, nothing kept);
- full: a bare full-depth forward (all 30 layers and the unembedding) against the early-stopped one
  on one batch, for the early-stop speed-up.

    python tests/benchmarks/bench_extract.py --quick     # 8192 tokens, 7 repeats (< 3 min)
    python tests/benchmarks/bench_extract.py             # 32768 tokens, 7 repeats
    python tests/benchmarks/bench_extract.py --model ../shared/assets/models/stories260K --layer 2 \
        --tokens 1024 --repeats 1 --batch 4              # seconds: the test suite's smoke run

Each pair is interleaved (a, b, b, a, ...), so drift on a shared machine hits both alike; ratios are
medians of the per-repeat ratios (runs seconds apart), times are medians. The store uses the default
layout (4096-row chunks, 65536-row shards), so with a few thousand tokens the whole store is one
shard written at close(), after the last forward pass: the quick figure includes that tail, which a
long extraction amortises. Ends with one JSON line: extract_over_forward, early_stop_speedup,
bytes_per_value (stored, before compression), compression_ratio (on these real activations),
tokens/s, and extract_over_forward_cpu_time (CPU seconds of all threads: immune to other processes
competing for the cores, and an upper bound on the writer's cost, as if nothing overlapped). On a busy
shared machine wall-clock ratios swing both ways (a process with more runnable threads gets a larger
share of the cores); compare the CPU-time ratio. Prints the machine (CPU model, vector extensions,
threads) first; the JSON line has it too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

from mtc import models  # noqa: E402
from mtc.config import DatasetConfig  # noqa: E402
from mtc.data import iter_pieces, pack_tokens  # noqa: E402
from mtc.extract import fill  # noqa: E402
from mtc.store import ActivationStore, StoreWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "data" / "models" / "SmolLM2-135M-Instruct"


def interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, alternating the order (a, b, b, a, ...), after a warm-up."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs} | {f"{name}_cpu": [] for name in runs}
    for i in range(repeats):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            t, c = time.perf_counter(), time.process_time()
            runs[name]()
            times[name].append(time.perf_counter() - t)
            times[f"{name}_cpu"].append(time.process_time() - c)  # all threads: robust to other load
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median of the per-repeat ratios: each pair ran seconds apart, so load from other processes cancels."""
    return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", help="forward dtype (params.yaml model.dtype)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="a prepared model directory")
    ap.add_argument(
        "--layer", type=int, default=8, help="the layer whose resid_mid and mlp_out are extracted"
    )
    ap.add_argument("--tokens", type=int, default=None, help="default 32768 (--quick 8192)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved pairs")
    args = ap.parse_args()
    n_tokens, repeats = args.tokens or (8192 if args.quick else 32768), args.repeats
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: run `dvc repro prepare_model` (or mtc prepare-model) first")
    wanted = [(args.layer, "resid_mid"), (args.layer, "mlp_out")]

    tokenizer = models.load_tokenizer(args.model)
    ds = DatasetConfig(n_tokens=n_tokens, context_size=128)
    tokens = pack_tokens(iter_pieces(ds), tokenizer, ds)
    bridge = models.load_bridge(args.model, args.dtype, "cpu")
    d_model = models.read_architecture(args.model).d_model
    last = max(layer for layer, _ in wanted)
    batches = [
        torch.from_numpy(tokens[s : s + args.batch]).long() for s in range(0, tokens.shape[0], args.batch)
    ]
    work = Path(tempfile.mkdtemp(prefix="mtc-bench-extract-"))
    stats = {}

    def extract(store: Path) -> None:
        """What the extract stage does once the model is loaded: writer, forward passes, close."""
        writer = StoreWriter(
            store,
            {"prepend_bos": True, "n_holdout_sequences": 1},
            tokens,
            wanted,
            d_model,
            "bfloat16",
            chunk_rows=4096,
        )
        with writer:
            fill(writer, bridge, tokens, wanted, args.batch, "cpu")
            writer.close()

    def timed_extract() -> None:
        shutil.rmtree(work / "s", ignore_errors=True)  # outside the timing would be fairer; it is ~ms
        extract(work / "s")

    @torch.no_grad()
    def forward(batches, stop_at_layer) -> None:
        for ids in batches:
            bridge(ids, stop_at_layer=stop_at_layer)

    # The store's figures, from one extraction outside the timings.
    extract(work / "first")
    store = ActivationStore(work / "first")
    on_disk = sum(p.stat().st_size for p in (work / "first").glob("L*/*.zarr/c/*/*"))
    raw = sum(store.site(*k).array.nbytes for k in wanted)
    stats.update(
        bytes_per_value=store.site(*wanted[0]).array.dtype.itemsize, compression_ratio=round(raw / on_disk, 3)
    )

    # extract vs a bare forward to the same last layer: all tokens. Full depth vs early stop: one batch.
    a = interleaved({"extract": timed_extract, "forward": lambda: forward(batches, last + 1)}, repeats)
    b = interleaved(
        {"full": lambda: forward(batches[:1], None), "forward": lambda: forward(batches[:1], last + 1)},
        max(3, repeats // 2),
    )
    shutil.rmtree(work, ignore_errors=True)
    n = tokens.size
    machine = cpu_description()
    print(f"machine: {machine}")
    print(
        f"{n} tokens of {args.model.name} layer {args.layer}, batch {args.batch}, forward dtype "
        f"{args.dtype}, interleaved repeats (median):"
    )
    for label, times, count in (
        ("extract", a["extract"], n),
        ("forward", a["forward"], n),
        ("full (1 batch)", b["full"], batches[0].numel()),
        ("forward (1 batch)", b["forward"], batches[0].numel()),
    ):
        med = statistics.median(times)
        print(
            f"  {label:18s} {med:7.2f} s  {count / med:8.0f} tokens/s   runs: "
            + ", ".join(f"{t:.2f}" for t in times)
        )
    print(
        json.dumps(
            {
                "machine": machine,
                "model": args.model.name,
                "layer": args.layer,
                "repeats": repeats,
                "extract_over_forward": ratio(a, "extract", "forward"),
                "early_stop_speedup": ratio(b, "full", "forward"),
                "extract_over_forward_cpu_time": ratio(a, "extract_cpu", "forward_cpu"),
                **stats,
                "tokens": n,
                "sites": len(wanted),
                "forward_dtype": args.dtype,
                "extract_tokens_per_s": round(n / statistics.median(a["extract"])),
                "forward_tokens_per_s": round(n / statistics.median(a["forward"])),
            }
        )
    )


if __name__ == "__main__":
    main()
