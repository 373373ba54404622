"""Training-speed benchmark: our Matryoshka BatchTopK step vs the straightforward dense step and vs
one bare encoder matmul, loader throughput vs training, and multi mode, measured side by side.

    python tests/benchmarks/bench_train.py --quick     # tiny shapes, seconds (the test suite runs it)
    python tests/benchmarks/bench_train.py --runs gpt2:64 --repeats 3   # GPT-2 shape, k 64 (< 3 min)
    python tests/benchmarks/bench_train.py             # GPT-2 (k 32, 64) and Gemma-2-2B shapes
    python tests/benchmarks/bench_train.py --store data/bench_quality/data/activations/SmolLM2-135M-Instruct
        # real activations (the store bench_quality.py builds), after --warmup real training steps:
        # the dead features and the auxiliary loss of real training, on and off; then a sweep over
        # dead-feature counts (--dead 0,1000,4000,8000: the last N features marked dead before
        # every step): step / matmul, the step with the auxiliary loss / without, dense / step

Random inputs into a fresh dictionary never leave a feature dead, so the auxiliary loss never runs
there: only ``--store`` measures the step that real training takes. ``--quick`` runs a tiny random
shape (without the peak-memory processes) and then the ``--store`` measurements on a tiny store of
random rows, with 0 and 64 of 256 features dead.

Prints the machine (CPU model, vector extensions, threads), tables of medians, and ends with one
JSON line: "machine", the headline random-shape run's figures (speedup_vs_dense, step_over_matmul,
loader_over_train, multi4_over_one, ...), and with a store "store_runs" and "dead_sweep".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

from mtc.dictionary import MatryoshkaBatchTopK  # noqa: E402
from mtc.store import ActivationStore, StoreWriter  # noqa: E402
from mtc.train import make_optimizer  # noqa: E402

SHAPES = {
    "tiny": dict(d=32, groups=[32, 64, 160], batch=256),  # --quick: seconds, for the test suite
    "gpt2": dict(d=768, groups=[768, 1536, 3072, 6912], batch=4096),
    "gemma-2-2b": dict(d=2304, groups=[2304, 4608, 9216, 20736], batch=1024),
}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def side_by_side(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round (after one warm-up round),
    so that a change in the machine's load hits every function alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b (each round's pair measured back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


def make(d, groups, k, seed=0):
    m = MatryoshkaBatchTopK(d, d, groups, k, seed=seed)
    return m, make_optimizer(m, 3e-4)


def our_step(m, opt, x, y, matmul_dtype=torch.float32):
    out = m.training_forward(x, y, matmul_dtype)
    out.loss.backward()
    m.remove_parallel_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.normalize_decoder()
    return out


def dense_step(m, opt, x, y):
    """The straightforward step: dense encode, one dense decode per group, dense autograd."""
    loss, _ = m.dense_reference_loss(x, y)
    loss.backward()
    m.remove_parallel_grad()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.normalize_decoder()


def write_random_store(path, keys: list[tuple[int, str]], d: int, n_seq: int, ctx: int = 128):
    """A store as extraction writes one (StoreWriter, bf16, the default chunk size), of random rows.
    Its windows hold token ids as packed text does, each starting with BOS: an all-zero tokens array
    is nothing but zarr's fill value, whose shard a zarr that skips empty chunks never writes, and the
    store then (rightly) refuses to open."""
    g = torch.Generator().manual_seed(0)
    bos, vocab = 1, 512
    tokens = torch.randint(3, vocab, (n_seq, ctx), generator=g, dtype=torch.int32)
    tokens[:, 0] = bos
    provenance = {"prepend_bos": True, "bos_token_id": bos, "n_holdout_sequences": 1, "context_size": ctx}
    with StoreWriter(path, provenance, tokens.numpy(), keys, d, "bfloat16", 4096) as writer:
        for s in range(0, n_seq, 32):
            x = torch.randn(min(32, n_seq - s), ctx, d, generator=g)
            writer.add({key: x for key in keys})
        writer.close()
    return ActivationStore(path)


def loader_rows_per_s(d: int, batch: int, n_batches: int) -> float:
    """Shuffled bf16 rows read from a zarr store (two sites, as a transcoder reads them)."""
    keys = [(0, "resid_mid"), (0, "mlp_out")]
    with tempfile.TemporaryDirectory() as tmp:
        n_seq = max(64, (n_batches + 2) * batch // 128)
        store = write_random_store(tmp, keys, d, n_seq)
        # Timed from the start: batches come from chunks read, decompressed and shuffled on the way
        # (the store holds about n_batches + 2 batches, so each row is read once).
        t = time.perf_counter()
        batches = store.iter_training_batches(keys, batch, seed=0, shuffle_chunks=4)
        for _ in range(n_batches):
            next(batches)
        return n_batches * batch / (time.perf_counter() - t)


def peak_rss_gib(variant: str, shape: str, k: int) -> float:
    """Peak RSS of a fresh process that builds the inputs and runs two steps of ``variant``."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_peak_rss_child, (variant, shape, k))


def _peak_rss_child(variant: str, shape: str, k: int) -> float:
    cfg = SHAPES[shape]
    x, y = torch.randn(cfg["batch"], cfg["d"]), torch.randn(cfg["batch"], cfg["d"])
    m, opt = make(cfg["d"], cfg["groups"], k)
    m.init_means(x, y)
    for _ in range(2):
        (our_step if variant == "ours" else dense_step)(m, opt, x, y)
    # VmHWM, not ru_maxrss: the latter survives exec, so a spawned child would report the parent's
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def bench(shape: str, k: int, repeats: int) -> dict:
    cfg = SHAPES[shape]
    d, groups, B = cfg["d"], cfg["groups"], cfg["batch"]
    D = sum(groups)
    torch.manual_seed(0)
    x, y = torch.randn(B, d), torch.randn(B, d)
    W = torch.randn(d, D)
    xb, Wb = x.bfloat16(), W.bfloat16()
    out = torch.empty(B, D)  # the matmul into a reused buffer: no page faults for a fresh output
    (m, opt), (md, optd) = make(d, groups, k), make(d, groups, k)
    for mm, _ in [(m, opt), (md, optd)]:
        mm.init_means(x, y)
    # Two phases, so that the dense step runs beside one dictionary only: every other dictionary's
    # resident buffers make its fresh B x D tensors' page faults dearer on this VM (8 -> 11 matmuls).
    t = side_by_side(
        {
            "matmul": lambda: x @ W,
            "matmul_out": lambda: torch.mm(x, W, out=out),
            "ours": lambda: our_step(m, opt, x, y),
            "dense": lambda: dense_step(md, optd, x, y),
        },
        repeats,
    )
    md = optd = None  # free the dense dictionary before the second phase
    (mb, optb), four = make(d, groups, k), [make(d, groups, k, seed=s) for s in range(4)]
    for mm, _ in [(mb, optb), *four]:
        mm.init_means(x, y)
    t2 = side_by_side(
        {
            "matmul": lambda: x @ W,
            "matmul_bf16": lambda: xb @ Wb,
            "ours": lambda: our_step(m, opt, x, y),
            "ours_bf16": lambda: our_step(mb, optb, x, y, torch.bfloat16),
            "multi4": lambda: [our_step(mm, oo, x, y) for mm, oo in four],
        },
        repeats,
    )
    ours = statistics.median(t["ours"])
    # a fresh process per step (seconds to start): not at the tiny shape, where the peak would be
    # torch's own footprint
    peak = {v: peak_rss_gib(v, shape, k) if shape != "tiny" else float("nan") for v in ("ours", "dense")}
    loader = loader_rows_per_s(d, B, n_batches=8)
    return {
        "shape": shape,
        "d": d,
        "dict_size": D,
        "k": k,
        "batch": B,
        "repeats": repeats,
        "matmul_s": statistics.median(t["matmul"]),
        "ours_s": ours,
        "ours_tokens_per_s": B / ours,
        "dense_tokens_per_s": B / statistics.median(t["dense"]),
        "speedup_vs_dense": median_ratio(t["dense"], t["ours"]),
        "step_over_matmul": median_ratio(t["ours"], t["matmul"]),
        "step_over_matmul_into_buffer": median_ratio(t["ours"], t["matmul_out"]),
        "dense_over_matmul": median_ratio(t["dense"], t["matmul"]),
        "bf16_step_over_fp32_matmul": median_ratio(t2["ours_bf16"], t2["matmul"]),
        "bf16_step_over_bf16_matmul": median_ratio(t2["ours_bf16"], t2["matmul_bf16"]),
        "bf16_tokens_per_s": B / statistics.median(t2["ours_bf16"]),
        "loader_over_train": loader / (B / ours),
        "multi4_over_one": median_ratio(t2["multi4"], t2["ours"]),
        "peak_rss_gib_ours": peak["ours"],
        "peak_rss_gib_dense": peak["dense"],
    }


def mark_dead(m: MatryoshkaBatchTopK, n_dead: int) -> None:
    """Make the last ``n_dead`` features dead as training counts them (not fired for
    ``n_batches_to_dead`` batches) and every other one live: called before each step, so every
    step sees the same dead count whatever fired in the one before."""
    m.inactive_batches.zero_()
    if n_dead:
        m.inactive_batches[m.dict_size - n_dead :] = m.shape.n_batches_to_dead


def real_dictionary(store_dir, kind, k, groups, batch, warmup, input_norm, layer):
    """A dictionary on a store's rows after ``warmup`` real training steps, with its optimizer and
    an endless supply of (source, target) batches."""
    store = ActivationStore(store_dir)
    source, target = (layer, "resid_mid"), (layer, "resid_mid" if kind == "sae" else "mlp_out")
    keys = sorted({source, target})
    batches = store.iter_training_batches(keys, batch, seed=0)
    d = store.site(*source).d_model
    # the skip connection as the config's default has it: on for transcoders
    m = MatryoshkaBatchTopK(
        d,
        store.site(*target).d_model,
        groups,
        k,
        kind=kind,
        input_norm=input_norm,
        skip_connection=kind == "transcoder",
    )
    m.set_scales(store.site(*source).mean_norm, store.site(*target).mean_norm)
    opt = make_optimizer(m, 3e-4)

    def pair():
        xs, _ = next(batches)
        by_key = dict(zip(keys, xs))
        return by_key[source].float(), by_key[target].float()

    x, y = pair()
    m.init_means(x, y)
    for _ in range(warmup):
        our_step(m, opt, *pair())
    return m, opt, pair


def bench_real(
    store_dir: str,
    kind: str,
    k: int,
    groups: list[int],
    batch: int,
    warmup: int,
    repeats: int,
    input_norm: str = "token",
    dead_counts: list[int] = (),
    layer: int = 8,
) -> tuple[dict, list[dict]]:
    """Our step on real rows after ``warmup`` real training steps (its dead features and auxiliary
    loss as training has them), beside the same step without the auxiliary loss, the dense step and
    one bare encoder matmul (real rows, the trained encoder), interleaved. Then the same four with
    each of ``dead_counts`` features marked dead before every step (one row each)."""
    m, opt, pair = real_dictionary(store_dir, kind, k, groups, batch, warmup, input_norm, layer)
    rows = [pair() for _ in range(4)]
    cycle = itertools.cycle(range(len(rows)))
    no_aux, dense = copy.deepcopy(m), copy.deepcopy(m)
    no_aux.shape = dataclasses.replace(no_aux.shape, aux_penalty=0.0)
    opts = {id(mm): make_optimizer(mm, 3e-4) for mm in (no_aux, dense)}
    W = m.W_enc.detach().contiguous()
    x0 = m._normalised_source(rows[0][0]).detach()
    n_dead = int(m.dead_features().numel())
    t = side_by_side(
        {
            "matmul": lambda: x0 @ W,
            "ours": lambda: our_step(m, opt, *rows[next(cycle)]),
            "ours_no_aux": lambda: our_step(no_aux, opts[id(no_aux)], *rows[next(cycle)]),
            "dense": lambda: dense_step(dense, opts[id(dense)], *rows[next(cycle)]),
        },
        repeats,
    )
    natural = {
        "kind": kind,
        "input_norm": input_norm,
        "k": k,
        "batch": batch,
        "dict_size": sum(groups),
        "warmup_steps": warmup,
        "dead_features": n_dead,
        "repeats": repeats,
        "matmul_s": statistics.median(t["matmul"]),
        "ours_s": statistics.median(t["ours"]),
        "step_over_matmul": median_ratio(t["ours"], t["matmul"]),
        "no_aux_step_over_matmul": median_ratio(t["ours_no_aux"], t["matmul"]),
        "speedup_vs_dense": median_ratio(t["dense"], t["ours"]),
        "dense_over_matmul": median_ratio(t["dense"], t["matmul"]),
    }
    sweep = [
        dead_row(m, opt, no_aux, dense, opts, rows, x0, W, n, repeats)
        | {"kind": kind, "input_norm": input_norm}
        for n in dead_counts
    ]
    return natural, sweep


def dead_row(m, opt, no_aux, dense, opts, rows, x0, W, n_dead: int, repeats: int) -> dict:
    """Our step, our step without the auxiliary loss, the dense step and one encoder matmul, with
    ``n_dead`` features marked dead before every step, interleaved round by round. The steps are the
    dictionary's own (``training_forward``, ``dense_reference_loss``): whatever the library's
    auxiliary loss does is what is timed."""
    for mm in (m, no_aux, dense):
        mark_dead(mm, n_dead)
        if mm.n_dead() != n_dead:
            raise SystemExit(
                f"bench_train: {n_dead} features marked dead, the dictionary counts {mm.n_dead()}: "
                "its dead-feature bookkeeping changed; update mark_dead"
            )
    cycle = itertools.cycle(range(len(rows)))
    aux = []

    def ours():
        mark_dead(m, n_dead)
        aux.append(float(our_step(m, opt, *rows[next(cycle)]).aux_loss))

    def ours_no_aux():
        mark_dead(no_aux, n_dead)
        our_step(no_aux, opts[id(no_aux)], *rows[next(cycle)])

    def dense_():
        mark_dead(dense, n_dead)
        dense_step(dense, opts[id(dense)], *rows[next(cycle)])

    t = side_by_side(
        {"matmul": lambda: x0 @ W, "ours": ours, "ours_no_aux": ours_no_aux, "dense": dense_}, repeats
    )
    return {
        "dead_features": n_dead,
        "repeats": repeats,
        "ours_s": statistics.median(t["ours"]),
        "no_aux_s": statistics.median(t["ours_no_aux"]),
        "dense_s": statistics.median(t["dense"]),
        "matmul_s": statistics.median(t["matmul"]),
        "step_over_matmul": median_ratio(t["ours"], t["matmul"]),
        "aux_over_no_aux": median_ratio(t["ours"], t["ours_no_aux"]),
        "dense_over_step": median_ratio(t["dense"], t["ours"]),
        "aux_loss": statistics.median(aux),  # 0 exactly when no feature is dead
    }


def rounded(r: dict, digits: int = 4) -> dict:
    """A result for the JSON line: floats rounded, a figure not measured (NaN) as null."""
    return {k: (None if v != v else round(v, digits)) if isinstance(v, float) else v for k, v in r.items()}


def run_real(args, store: str) -> tuple[list[dict], list[dict]]:
    """The --store measurements: two tables printed, their rows returned."""
    natural, sweep = [], []
    for kind in args.kinds:
        for norm in args.input_norms:
            r, rows = bench_real(
                store,
                kind,
                args.k,
                args.groups,
                args.batch,
                args.warmup,
                args.repeats,
                norm,
                args.dead,
                args.layer,
            )
            natural.append(r)
            sweep += rows
    print(f"rows from {store}, layer {args.layer}; fp32; medians of {args.repeats} interleaved rounds")
    print(
        f"{'kind':<11}{'input_norm':>11}{'dead':>6}{'step s':>8}{'/matmul':>9}{'no aux /matmul':>16}"
        f"{'vs dense':>9}{'dense/mm':>9}"
    )
    for r in natural:
        print(
            f"{r['kind']:<11}{r['input_norm']:>11}{r['dead_features']:>6}{r['ours_s']:>8.3f}{r['step_over_matmul']:>9.2f}"
            f"{r['no_aux_step_over_matmul']:>16.2f}{r['speedup_vs_dense']:>9.2f}{r['dense_over_matmul']:>9.2f}"
        )
    if sweep:
        print(
            f"the last N of the {sum(args.groups)} features marked dead before every step; "
            "medians of per-round ratios"
        )
        print(
            f"{'kind':<11}{'input_norm':>11}{'dead':>6}{'step s':>8}{'step/matmul':>12}{'aux/no aux':>11}"
            f"{'dense/step':>11}{'aux loss':>10}"
        )
        for r in sweep:
            print(
                f"{r['kind']:<11}{r['input_norm']:>11}{r['dead_features']:>6}{r['ours_s']:>8.3f}"
                f"{r['step_over_matmul']:>12.2f}{r['aux_over_no_aux']:>11.2f}{r['dense_over_step']:>11.2f}"
                f"{r['aux_loss']:>10.4f}"
            )
    return natural, sweep


def run_spec(text: str) -> tuple[str, int]:
    shape, _, k = text.partition(":")
    if shape not in SHAPES or not k.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not SHAPE:K with SHAPE one of {', '.join(SHAPES)}")
    return shape, int(k)


def dead_list(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of feature counts, e.g. 0,1000,4000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds: a tiny random shape, then the --store measurements on a tiny store of random "
        "rows with a tiny --dead list (what the test suite runs)",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        type=run_spec,
        default=[("gpt2", 32), ("gpt2", 64), ("gemma-2-2b", 64)],
        help=f"without --store: SHAPE:K to measure, SHAPE one of {', '.join(SHAPES)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    parser.add_argument(
        "--store", help="a real store (resid_mid and mlp_out of --layer): measure real training"
    )
    parser.add_argument("--layer", type=int, default=8, help="with --store: the layer read")
    parser.add_argument("--kinds", nargs="+", default=["transcoder", "sae"], help="with --store")
    parser.add_argument(
        "--input-norms",
        nargs="+",
        default=["token"],
        help="with --store: token (the default "
        "recipe) and/or global (the old one, which leaves features dead: the auxiliary loss runs)",
    )
    parser.add_argument("--warmup", type=int, default=150, help="with --store: real training steps first")
    parser.add_argument("--k", type=int, default=46, help="with --store")
    parser.add_argument("--batch", type=int, default=4096, help="with --store")
    parser.add_argument("--groups", type=int, nargs="+", default=[576, 1152, 2304, 5184], help="with --store")
    parser.add_argument(
        "--dead",
        type=dead_list,
        default=[0, 1000, 4000, 8000],
        help="with --store: dead-feature counts to sweep, a comma list (each marked dead before every step)",
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.repeats = [("tiny", 8)], args.repeats or 3
        args.kinds, args.input_norms, args.warmup = ["transcoder"], ["token"], 2
        args.k, args.batch, args.groups, args.dead = 8, 256, [32, 64, 160], [0, 64]
    args.repeats = args.repeats or 5
    too_many = [n for n in args.dead if not 0 <= n <= sum(args.groups)]
    if too_many:
        parser.error(f"--dead {too_many[0]} is not between 0 and the {sum(args.groups)} features of --groups")
    machine = cpu_description()
    result: dict = {"machine": machine}
    print(f"machine: {machine}")
    if not args.store:
        results = [bench(shape, k, args.repeats) for shape, k in args.runs]
        print(f"fp32 unless noted; medians of {args.repeats} interleaved rounds")
        print(
            f"{'shape':<11}{'k':>4}{'ours tok/s':>11}{'dense tok/s':>12}{'vs dense':>9}{'/matmul':>8}"
            f"{'dense/mm':>9}{'bf16 tok/s':>11}{'bf16/mm32':>10}{'loader/train':>13}{'multi4/one':>11}"
            f"{'GiB ours':>9}{'GiB dense':>10}"
        )
        for r in results:
            print(
                f"{r['shape']:<11}{r['k']:>4}{r['ours_tokens_per_s']:>11.0f}{r['dense_tokens_per_s']:>12.0f}"
                f"{r['speedup_vs_dense']:>9.2f}{r['step_over_matmul']:>8.2f}{r['dense_over_matmul']:>9.2f}"
                f"{r['bf16_tokens_per_s']:>11.0f}{r['bf16_step_over_fp32_matmul']:>10.2f}"
                f"{r['loader_over_train']:>13.1f}{r['multi4_over_one']:>11.2f}{r['peak_rss_gib_ours']:>9.2f}"
                f"{r['peak_rss_gib_dense']:>10.2f}"
            )
        # the headline: GPT-2 k 64 when measured, else the last run
        headline = next((r for r in results if (r["shape"], r["k"]) == ("gpt2", 64)), results[-1])
        result |= rounded(headline, 3)
    if args.store or args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            store = args.store
            if store is None:  # --quick: a tiny store of random rows, written as extraction writes one
                write_random_store(tmp, [(args.layer, "resid_mid"), (args.layer, "mlp_out")], 32, 64)
                store = tmp
            natural, sweep = run_real(args, store)
        result |= {"store_runs": [rounded(r) for r in natural], "dead_sweep": [rounded(r) for r in sweep]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
