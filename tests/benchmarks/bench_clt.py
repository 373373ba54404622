"""Cross-layer transcoder training speed: our sparse step vs the sum of its encoder matmuls and vs
the straightforward dense step, side by side in one process, with dead features (so the auxiliary
loss runs), and the peak memory of training.

    python tests/benchmarks/bench_clt.py --store data/activations/SmolLM2-135M-Instruct
        # real rows of every layer (a store with resid_mid and mlp_out at all of them, e.g. the one
        # examples/smollm2-clt.params.yaml extracts), 30 layers x 1,152 features, k 16, batch 512
    python tests/benchmarks/bench_clt.py --quick     # tiny random shape, seconds (the test suite runs it)

Prints the machine, a table of medians and one JSON line (machine, step_over_matmuls,
dense_over_step, ...).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

from mtc.clt import MatryoshkaCLT  # noqa: E402
from mtc.store import ActivationStore  # noqa: E402
from mtc.train import make_optimizer  # noqa: E402


def rows(store_dir: str | None, n_layers: int, d: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of (resid_mid, mlp_out) [B, L, d]: real rows from the store, or random ones."""
    if store_dir is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, n_layers, d, generator=g), torch.randn(batch, n_layers, d, generator=g)
    store = ActivationStore(store_dir)
    layers = range(n_layers)  # layers 0 .. n_layers - 1, each with resid_mid and mlp_out
    keys = [(layer, site) for layer in layers for site in ("resid_mid", "mlp_out")]
    xs, _ = next(store.iter_training_batches(keys, batch, seed=0, shuffle_chunks=1))
    return torch.stack(xs[0::2], dim=1), torch.stack(xs[1::2], dim=1)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="a store holding resid_mid and mlp_out at every layer")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--dict-size", type=int, default=1152, help="features per layer")
    p.add_argument("--k", type=int, default=16, help="codes per token and layer")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dead", type=float, default=0.1, help="fraction of each layer's features marked dead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dense-repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny random shape: seconds")
    a = p.parse_args()
    if a.quick:
        a.store, a.layers, a.dict_size, a.k, a.batch, a.repeats, a.dense_repeats = None, 4, 64, 4, 128, 3, 1
    x, y = rows(a.store, a.layers, 576 if a.store is None and not a.quick else 32, a.batch)
    if a.store:
        a.layers = x.shape[1]
    d = x.shape[2]
    groups = [a.dict_size // 8, a.dict_size // 4, a.dict_size - a.dict_size // 8 - a.dict_size // 4]
    clt = MatryoshkaCLT(d, a.layers, groups, a.k)
    clt.set_scales(x.norm(dim=-1).mean(0).tolist(), y.norm(dim=-1).mean(0).tolist())
    clt.init_means(x, y)
    opt = make_optimizer(clt, 1e-4)
    dead = int(a.dead * a.dict_size)

    def mark_dead() -> None:  # before every step: the same dead count whatever fired
        clt.inactive_batches.zero_()
        clt.inactive_batches[:, a.dict_size - dead :] = clt.shape.n_batches_to_dead

    def update() -> None:
        clt.remove_parallel_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clt.normalize_decoder()

    def ours() -> None:
        mark_dead()
        clt.training_forward(x, y).loss.backward()
        update()

    def dense() -> None:
        mark_dead()
        clt.dense_reference_loss(x, y)[0].backward()
        update()

    xn = [clt._normalised_source(i, x[:, i]).contiguous() for i in range(a.layers)]
    W = [w.detach().t().contiguous() for w in clt.W_encT]

    def matmuls() -> None:
        for i in range(a.layers):
            torch.mm(xn[i], W[i])

    times = {"ours": [], "matmuls": [], "dense": []}
    ours(), matmuls()  # warm-up
    for _ in range(a.repeats):
        times["ours"].append(timed(ours))
        times["matmuls"].append(timed(matmuls))
    peak_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for _ in range(a.dense_repeats):
        times["dense"].append(timed(dense))
    med = {name: statistics.median(t) for name, t in times.items()}
    decoder = sum(w.numel() for w in clt.W_dec)
    machine = cpu_description()
    print(f"machine: {machine}")
    print(
        f"shape: {a.layers} layers x {a.dict_size} features, d {d}, k {a.k}/layer, batch {a.batch}, "
        f"{dead} dead per layer, {decoder / 1e6:.0f}M decoder parameters, rows: {a.store or 'random'}"
    )
    print(f"{'':<26}{'median s':>10}")
    for name, label in (("ours", "our step"), ("matmuls", "encoder matmuls (sum)"), ("dense", "dense step")):
        print(f"{label:<26}{med[name]:>10.3f}")
    result = {
        "machine": machine,
        "step_over_matmuls": med["ours"] / med["matmuls"],
        "dense_over_step": med["dense"] / med["ours"],
        "step_seconds": med["ours"],
        "peak_rss_gib_training": peak_ours,
        "layers": a.layers,
        "dict_size": a.dict_size,
        "k": a.k,
        "batch": a.batch,
        "dead_per_layer": dead,
    }
    ratios = result["step_over_matmuls"], result["dense_over_step"]
    print("step / encoder matmuls {:.2f}; dense / step {:.2f}".format(*ratios))
    print(f"peak resident memory while training (before the dense step): {peak_ours:.2f} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
