"""Training-speed benchmark: our Matryoshka BatchTopK step vs the straightforward dense step and vs
one bare encoder matmul, loader throughput vs training, and multi mode, measured side by side.

    python tests/benchmarks/bench_train.py --quick     # GPT-2 shape, k 64, a few steps (< 3 min)
    python tests/benchmarks/bench_train.py             # GPT-2 (k 32, 64) and Gemma-2-2B shapes

Prints a table of medians and ends with one JSON line (speedup_vs_dense, step_over_matmul,
loader_over_train, multi4_over_one, ...). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import numpy as np
import torch

from mtc.dictionary import MatryoshkaBatchTopK, batch_topk_threshold
from mtc.store import ActivationStore, StoreWriter

SHAPES = {
    "gpt2": dict(d=768, groups=[768, 1536, 3072, 6912], batch=4096),
    "gemma-2-2b": dict(d=2304, groups=[2304, 4608, 9216, 20736], batch=1024),
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make(d, groups, k, seed=0):
    m = MatryoshkaBatchTopK(d, d, groups, k, seed=seed)
    return m, torch.optim.AdamW(m.parameters(), lr=3e-4)


def our_step(m, opt, x, y):
    out = m.training_forward(x, y)
    out.loss.backward()
    m.remove_parallel_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.normalize_decoder()


def dense_step(m, opt, x, y):
    """The straightforward step: dense encode, one dense decode per prefix, dense autograd."""
    pre = m.pre_acts(x)
    threshold = batch_topk_threshold(pre.detach(), m.top_k)
    acts = pre * (pre >= threshold)
    yn = y * m.target_scale
    losses = [((acts[:, :end] @ m.W_dec[:end] + m.b_dec - yn) ** 2).mean() for end in m.boundaries]
    torch.stack(losses).mean().backward()
    m.remove_parallel_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.normalize_decoder()


def loader_rows_per_s(d: int, batch: int, n_batches: int) -> float:
    """Shuffled bf16 rows read from a zarr store (two sites, as a transcoder reads them)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx, n_seq = 128, max(64, (n_batches + 2) * batch // 128)
        tokens = np.zeros((n_seq, ctx), dtype=np.int32)
        writer = StoreWriter(tmp, {"prepend_bos": True, "n_holdout_sequences": 1}, tokens,
                             [(0, "resid_mid"), (0, "mlp_out")], d, "bfloat16", 4096)
        for s in range(0, n_seq, 32):
            x = torch.randn(min(32, n_seq - s), ctx, d)
            writer.add({(0, "resid_mid"): x, (0, "mlp_out"): x})
        writer.close()
        store = ActivationStore(tmp)
        # Timed from the start: batches come from chunks read, decompressed and shuffled on the way
        # (the store holds about n_batches + 2 batches, so each row is read once).
        t = time.perf_counter()
        batches = store.iter_training_batches([(0, "resid_mid"), (0, "mlp_out")], batch, seed=0, shuffle_chunks=4)
        for _ in range(n_batches):
            next(batches)
        return n_batches * batch / (time.perf_counter() - t)


def bench(shape: str, k: int, repeats: int) -> dict:
    cfg = SHAPES[shape]
    d, groups, B = cfg["d"], cfg["groups"], cfg["batch"]
    D = sum(groups)
    torch.manual_seed(0)
    x, y = torch.randn(B, d), torch.randn(B, d)
    W = torch.randn(d, D)
    matmul = median_time(lambda: x @ W, repeats)
    m, opt = make(d, groups, k)
    m.init_means(x, y)
    ours = median_time(lambda: our_step(m, opt, x, y), repeats)
    md, optd = make(d, groups, k)
    md.init_means(x, y)
    dense = median_time(lambda: dense_step(md, optd, x, y), max(1, repeats // 2))
    four = [make(d, groups, k, seed=s) for s in range(4)]
    for mm, _ in four:
        mm.init_means(x, y)
    multi4 = median_time(lambda: [our_step(mm, oo, x, y) for mm, oo in four], max(1, repeats // 2))
    loader = loader_rows_per_s(d, B, n_batches=8)
    return {
        "shape": shape, "d": d, "dict_size": D, "k": k, "batch": B,
        "ours_tokens_per_s": B / ours, "dense_tokens_per_s": B / dense,
        "speedup_vs_dense": dense / ours, "step_over_matmul": ours / matmul,
        "loader_over_train": loader / (B / ours), "multi4_over_one": multi4 / ours,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 shape, k 64, a few steps")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    runs = [("gpt2", 64)] if args.quick else [("gpt2", 32), ("gpt2", 64), ("gemma-2-2b", 64)]
    repeats = args.repeats or (3 if args.quick else 5)
    results = [bench(shape, k, repeats) for shape, k in runs]
    print(f"{'shape':<11}{'k':>4}{'ours tok/s':>12}{'dense tok/s':>13}{'vs dense':>10}{'/matmul':>9}"
          f"{'loader/train':>14}{'multi4/one':>12}{'peak GiB':>10}")
    for r in results:
        print(f"{r['shape']:<11}{r['k']:>4}{r['ours_tokens_per_s']:>12.0f}{r['dense_tokens_per_s']:>13.0f}"
              f"{r['speedup_vs_dense']:>10.2f}{r['step_over_matmul']:>9.2f}{r['loader_over_train']:>14.1f}"
              f"{r['multi4_over_one']:>12.2f}{r['peak_rss_gib']:>10.2f}")
    headline = results[-1] if args.quick else results[1]
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in headline.items()}))


if __name__ == "__main__":
    main()
