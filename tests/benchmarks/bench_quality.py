"""Dictionary quality on real activations: mtc against the reference recipe, same data and budget.

Builds (once, then reuses) a store of SmolLM2-135M-Instruct layer-8 ``resid_mid`` and ``mlp_out`` over
the English corpus in ``../shared/assets/corpora/english-mix/``, its documents shuffled (seed 0; the
file is sorted by source): 2M training tokens and 200k held-out tokens (the last windows: documents no
run trains on). Extraction runs in float32 (about 28 min on a 2-core AVX2 CPU). Then trains, through the
real training code,
a Matryoshka SAE on ``resid_mid`` and a transcoder ``resid_mid -> mlp_out`` (dict 9216, groups
[576, 1152, 2304, 5184], k 46, batch 4096, lr 3e-4, one epoch of 488 steps), and reports on the
held-out tokens FVU per prefix (raw activation space), L0 at inference, dead features, CE loss
recovered with the transcoder spliced in (vs zero and mean ablation) and the median step time.

    python tests/benchmarks/bench_quality.py                      # ours, full budget (< 40 min here)
    python tests/benchmarks/bench_quality.py --reference          # and the reference recipe beside it
    python tests/benchmarks/bench_quality.py --steps 150 --variant norm-global:input_norm=global
        # ablations: each --variant NAME:key=value,... trains ours again with those config fields

The reference recipe (``--reference``) is the algorithm of bartbussmann/matryoshka_sae's
``GlobalBatchTopKMatryoshkaSAE`` written here from its description: each row standardised (centre,
divide by its std) and mapped back, encoder centred on ``b_dec`` without ``b_enc`` (SAE), tied
kaiming-uniform init, the mean of the bias-only and every prefix's MSE, the same auxiliary loss and
threshold, Adam (0.9, 0.99), dense autograd. Its transcoder (the adaptation in
a1842806/matryoshka_transcoder) standardises the target with the target's own mean and std and
maps back with them, which no transcoder can do at inference: its transcoder figures are flattered.
Its inference threshold is a moving average started at 0, so it is only comparable near the full
budget (after 100 steps it holds 63 % of its value). Dense: about 6 s a step here.

    python tests/benchmarks/bench_quality.py --quick --model ../shared/assets/models/stories260K --layer 2 \
        --corpus ../shared/assets/corpora/tinyshakespeare/input.txt --reference
        # seconds, the whole path at tiny sizes (the test suite runs it)

Prints the machine (CPU model, vector extensions, threads), a table, and ends with one JSON line
(which has the machine too).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

from mtc import pipeline
from mtc.cli import model_type_of as model_type
from mtc.config import DictionaryConfig, EvaluateConfig, check_config, parse_params
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.evaluate import heldout_windows, reconstruction
from mtc.metrics import ce_loss_recovered
from mtc.models import load_bridge
from mtc.results import LOG_FILE
from mtc.spliced import Replacements, spliced_loss
from mtc.store import ActivationStore, Prefetcher
from mtc.train import train

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "assets" / "corpora" / "english-mix" / "train.jsonl"


def sites(args) -> tuple[tuple[int, str], tuple[int, str]]:
    """(source, target): the layer's resid_mid and mlp_out."""
    return (args.layer, "resid_mid"), (args.layer, "mlp_out")


def store_params(args) -> dict:
    n_train_windows = args.train_tokens // args.context
    n_holdout_windows = -(-args.heldout_tokens // args.context)
    n_windows = n_train_windows + n_holdout_windows
    return {
        "model": {
            "name": args.model,
            "type": model_type(args.model),
            "dtype": args.model_dtype,
            "device": "auto",
        },
        "dataset": {
            "path": str(args.corpus),
            "n_tokens": n_windows * args.context,
            "context_size": args.context,
            # the store holds out ceil(n * fraction) windows: exactly n_holdout_windows
            "holdout_fraction": (n_holdout_windows - 0.5) / n_windows,
            "prepend_bos": True,
            # the corpus is sorted by source: shuffled, training and held-out rows share its mixture
            "shuffle_seed": args.shuffle_seed,
        },
        "extract": {"layers": [args.layer], "sites": ["resid_mid", "mlp_out"], "dtype": "bfloat16"},
        "dictionaries": {},
        "evaluate": {},
        "mine": {},
    }


def build_store(args):
    """The pipeline config and its store, extracted on first use (about 10 min here)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "params.yaml").write_text(yaml.safe_dump(store_params(args)))
    cfg = parse_params(
        store_params(args), data_root=args.workdir / "data", results_root=args.workdir / "results"
    )
    if not (cfg.model_dir / "config.json").is_file():
        pipeline.prepare_model(cfg)
    if not (cfg.store_dir / "tokens.zarr").is_dir():
        t = time.time()
        pipeline.extract(cfg)
        print(f"extracted {cfg.dataset.n_tokens} tokens in {time.time() - t:.0f} s", file=sys.stderr)
    return cfg, pipeline.open_store(cfg)


def dictionary_config(args, kind: str, overrides: dict) -> DictionaryConfig:
    base = DictionaryConfig(
        name=kind,
        kind=kind,
        layer=args.layer,
        source_site="resid_mid",
        target_site="resid_mid" if kind == "sae" else "mlp_out",
        dict_size=sum(args.groups),
        group_sizes=list(args.groups),
        top_k=args.top_k,
        lr=args.lr,
        batch_size=args.batch_size,
        steps=args.steps,
        save_every=10**9,
        seed=args.seed,
        model_type=model_type(args.model),
    )
    cfg = replace(base, **overrides)
    check_config(cfg, f"variant {kind}")
    return cfg


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` (values as YAML) -> (name, overrides)."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


# ----------------------------------------------------------------------------- the reference recipe
class ReferenceRecipe(torch.nn.Module):
    """The reference's Matryoshka BatchTopK, dense, for comparison (see the module docstring)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        groups: list[int],
        k: int,
        kind: str,
        seed: int,
        top_k_aux: int = 512,
        aux_penalty: float = 1 / 32,
        n_batches_to_dead: int = 5,
    ):
        super().__init__()
        torch.manual_seed(seed)
        F_ = sum(groups)
        self.kind, self.k, self.group_sizes = kind, k, list(groups)
        self.boundaries = [sum(groups[: i + 1]) for i in range(len(groups))]
        self.dict_size = F_
        self.top_k_aux, self.aux_penalty, self.n_batches_to_dead = top_k_aux, aux_penalty, n_batches_to_dead
        self.W_enc = torch.nn.Parameter(torch.nn.init.kaiming_uniform_(torch.empty(d_in, F_)))
        W_dec = (
            self.W_enc.detach().t().clone()
            if d_in == d_out
            else torch.nn.init.kaiming_uniform_(torch.empty(F_, d_out))
        )
        self.W_dec = torch.nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.b_enc = torch.nn.Parameter(torch.zeros(F_))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("inactive", torch.zeros(F_))
        self._target_stats = None

    @staticmethod
    def standardise(x):
        mean = x.mean(dim=-1, keepdim=True)
        std = (x - mean).std(dim=-1, keepdim=True)
        return (x - mean) / (std + 1e-5), mean, std

    def pre(self, x_n):
        if self.kind == "sae":
            return F.relu((x_n - self.b_dec) @ self.W_enc)
        return F.relu(x_n @ self.W_enc + self.b_enc)

    def loss(self, x, y):
        x_n, _, _ = self.standardise(x)
        y_n = x_n if self.kind == "sae" else self.standardise(y)[0]
        acts = self.pre(x_n)
        top = acts.flatten().topk(self.k * x.shape[0])
        codes = torch.zeros_like(acts.flatten()).scatter(0, top.indices, top.values).view_as(acts)
        recon, total = self.b_dec, (self.b_dec - y_n).pow(2).mean()
        start = 0
        for end in self.boundaries:
            recon = recon + codes[:, start:end] @ self.W_dec[start:end]
            total = total + (recon - y_n).pow(2).mean()
            start = end
        with torch.no_grad():
            fired = (codes > 0).any(dim=0)
            self.inactive.add_(1).masked_fill_(fired, 0)
            positive = codes[codes > 0]
            if positive.numel():
                self.threshold.mul_(0.99).add_(0.01 * positive.min())
        loss = total / (len(self.boundaries) + 1)
        dead = self.inactive >= self.n_batches_to_dead
        if dead.any():
            aux = acts[:, dead].topk(min(self.top_k_aux, int(dead.sum())), dim=1)
            aux_codes = torch.zeros_like(acts[:, dead]).scatter(1, aux.indices, aux.values)
            residual = y_n - recon
            loss = loss + self.aux_penalty * (aux_codes @ self.W_dec[dead] - residual).pow(2).mean()
        return loss

    def step(self, optimizer, x, y):
        loss = self.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 100000)
        with torch.no_grad():  # unit decoder rows, gradient without its parallel part
            W = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * W).sum(1, keepdim=True) * W
            self.W_dec.copy_(W)
        optimizer.step()

    # the interface evaluate.reconstruction uses: encode, then decode with the encoded rows
    def encode(self, x):
        acts = self.pre(self.standardise(x)[0])
        return acts * (acts > self.threshold)

    def decode(self, acts, n_groups=None, source=None):
        end = self.dict_size if n_groups is None else self.boundaries[n_groups - 1]
        recon = acts[:, :end] @ self.W_dec[:end] + self.b_dec
        _, mean, std = self.standardise(source if self.kind == "sae" else self._target_stats)
        return recon * (std + 1e-5) + mean


def train_reference(args, kind: str, store: ActivationStore) -> tuple[ReferenceRecipe, float]:
    source, target = sites(args)
    keys = [source] if kind == "sae" else [source, target]
    d = store.site(*source).d_model
    ref = ReferenceRecipe(d, d, args.groups, args.top_k, kind, args.seed)
    opt = torch.optim.Adam(ref.parameters(), lr=args.lr, betas=(0.9, 0.99))
    times = []
    batches = store.iter_training_batches(keys, args.batch_size, args.seed)
    with Prefetcher(batches) as it:
        for step in range(args.steps):
            xs, _ = next(it)
            x, y = xs[0].float(), xs[-1].float()
            t = time.perf_counter()
            ref.step(opt, x, y)
            times.append(time.perf_counter() - t)
            if (step + 1) % 50 == 0:
                print(f"reference {kind}: step {step + 1}/{args.steps}", file=sys.stderr)
    return ref, statistics.median(times)


class _OracleTarget:
    """Hands the reference transcoder the held-out target rows its decode maps back with."""

    def __init__(self, ref: ReferenceRecipe, store: ActivationStore, keys: list[tuple[int, str]]):
        self.ref, self.targets = ref, store.iter_holdout(keys, 4096)
        self.group_sizes, self.dict_size, self.boundaries = ref.group_sizes, ref.dict_size, ref.boundaries

    def to(self, device):
        return self

    def eval(self):
        return self

    def encode(self, x):
        (_, y), _ = next(self.targets)
        self.ref._target_stats = y.float()
        return self.ref.encode(x)

    def decode(self, acts, n_groups=None, source=None):
        return self.ref.decode(acts, n_groups, source)


# ----------------------------------------------------------------------------- measuring
def heldout_metrics(dictionary, store, kind, args, cfg, with_ce: bool) -> dict:
    source, target = sites(args)
    target = source if kind == "sae" else target
    ecfg = EvaluateConfig(batch_size=4096, n_ce_sequences=args.ce_windows)
    with torch.no_grad():
        metrics, _, mean_target = reconstruction(dictionary, store, source, target, ecfg)
    out = {
        "fvu_per_prefix": [round(f, 4) for f in metrics["fvu_per_prefix"]],
        "l0": round(metrics["l0"], 2),
        "dead_fraction": round(metrics["dead_fraction"], 4),
    }
    if with_ce and kind == "transcoder" and args.ce_windows:
        out.update(ce_in_blocks(dictionary, store, mean_target, cfg.model_dir, args.ce_windows, sites(args)))
    return out


def ce_in_blocks(dictionary, store, mean_target, model_dir, n_windows: int, keys, block: int = 64) -> dict:
    """CE loss recovered at full size on the first ``n_windows`` held-out windows (``keys``: the
    source and target spliced), and how much it moves between blocks of ``block`` windows (the
    figure's noise: a few documents decide a block)."""
    bridge = load_bridge(model_dir, "float32", "auto")
    device = next(bridge.parameters()).device
    replacements = Replacements(dictionary.to(device).eval(), mean_target.to(device))
    windows = heldout_windows(store, min(n_windows, store.n_holdout_sequences))
    blocks = [
        spliced_loss(bridge, w, replacements, *keys, batch_size=8, skip_bos=store.skip_bos)
        for w in windows.split(block)
    ]
    tokens = sum(b["ce_n_tokens"] for b in blocks)

    def mean(value) -> float:  # over every scored token
        return sum(value(b) * b["ce_n_tokens"] for b in blocks) / tokens

    clean, spliced = mean(lambda b: b["ce_clean"]), mean(lambda b: b["ce_spliced_per_prefix"][-1])
    zero, mean_ablated = mean(lambda b: b["ce_zero_ablation"]), mean(lambda b: b["ce_mean_ablation"])
    per_block = [b["ce_recovered_vs_zero_per_prefix"][-1] for b in blocks]
    return {
        "ce_recovered_vs_zero": round(ce_loss_recovered(clean, spliced, zero), 4),
        "ce_recovered_vs_mean": round(ce_loss_recovered(clean, spliced, mean_ablated), 4),
        "ce_recovered_vs_zero_per_block": [round(r, 4) for r in per_block],
        "ce_clean": round(clean, 4),
        "ce_windows": int(windows.shape[0]),
    }


def run_ours(args, cfg, store, kind: str, label: str, overrides: dict) -> dict:
    dcfg = dictionary_config(args, kind, {**overrides, "name": f"{label}-{kind}"})
    t = time.time()
    [run_dir] = train([dcfg], store.dir, args.workdir / "results", tokenizer_dir=cfg.model_dir)
    seconds = time.time() - t
    log = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    steps = [r["step_seconds"] for r in log if r.get("step_seconds")]
    model = MatryoshkaBatchTopK.load(run_dir)
    result = {
        "recipe": label,
        "kind": kind,
        "train_seconds": round(seconds, 1),
        "median_step_seconds": round(statistics.median(steps), 4) if steps else None,
        "dead_in_training": log[-1]["dead_features"],
        "final_prefix_mse": log[-1]["prefix_mse"],
        **heldout_metrics(model, store, kind, args, cfg, with_ce=not args.no_ce),
    }
    return result


def run_reference(args, cfg, store, kind: str) -> dict:
    t = time.time()
    ref, step = train_reference(args, kind, store)
    seconds = time.time() - t
    dictionary = ref.eval() if kind == "sae" else _OracleTarget(ref, store, list(sites(args)))
    return {
        "recipe": "reference",
        "kind": kind,
        "train_seconds": round(seconds, 1),
        "median_step_seconds": round(step, 4),
        **heldout_metrics(dictionary, store, kind, args, cfg, with_ce=False),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the store and runs go (default data/bench_quality; --quick: a temporary directory)",
    )
    p.add_argument(
        "--model",
        default="packaged:SmolLM2-135M-Instruct",
        help="the model whose activations are stored (params.yaml's model.name)",
    )
    p.add_argument("--layer", type=int, default=8, help="its layer: resid_mid (source) and mlp_out (target)")
    p.add_argument("--train-tokens", type=int, default=2_000_000)
    p.add_argument("--heldout-tokens", type=int, default=200_000)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--shuffle-seed", type=int, default=0, help="document order (-1: the file's order)")
    p.add_argument(
        "--model-dtype",
        default="float32",
        help="forward-pass dtype of extraction "
        "(bfloat16 is emulated, 100x slower, on CPUs without AVX512-BF16)",
    )
    p.add_argument("--steps", type=int, default=None, help="default: one epoch of the training tokens")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=46)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--groups", type=int, nargs="+", default=[576, 1152, 2304, 5184])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=["sae", "transcoder"], choices=["sae", "transcoder"])
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (ours with overrides)")
    p.add_argument(
        "--no-default", action="store_true", help="train only the --variant recipes, not the defaults"
    )
    p.add_argument("--reference", action="store_true", help="also train the reference recipe")
    p.add_argument(
        "--ce-windows",
        type=int,
        default=64,
        help="held-out windows for the spliced loss, in blocks of 64 (0: skip); the JSON gives each "
        "block's figure, which moves by a few hundredths from block to block",
    )
    p.add_argument("--no-ce", action="store_true", help="skip the spliced loss")
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds on a tiny model (--model DIR --layer L): 16,384 training and 2,048 held-out tokens, "
        "20 steps of 256 rows, groups 16 16 32, k 8, 8 CE windows, in a temporary --workdir",
    )
    args = p.parse_args()
    if args.quick:
        args.train_tokens, args.heldout_tokens, args.steps, args.batch_size = 16384, 2048, 20, 256
        args.groups, args.top_k, args.ce_windows = [16, 16, 32], 8, 8
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or (Path(tmp) if args.quick else REPO / "data" / "bench_quality")
        run(args)


def run(args) -> None:
    args.steps = args.steps or args.train_tokens // args.batch_size
    args.shuffle_seed = None if args.shuffle_seed < 0 else args.shuffle_seed

    cfg, store = build_store(args)
    recipes = ([] if args.no_default else [("mtc", {})]) + [parse_variant(v) for v in args.variant]
    results = []
    for kind in args.kinds:
        for label, overrides in recipes:
            results.append(run_ours(args, cfg, store, kind, label, overrides))
            print(json.dumps(results[-1]), file=sys.stderr)
        if args.reference:
            results.append(run_reference(args, cfg, store, kind))
            print(json.dumps(results[-1]), file=sys.stderr)

    machine = cpu_description()
    print(f"\nmachine: {machine}")
    print(
        f"{model_type(args.model)} layer {args.layer}; {args.steps} steps x {args.batch_size} rows, "
        f"k {args.top_k}, lr {args.lr}, groups {args.groups}; held-out: {args.heldout_tokens} tokens"
    )
    print(
        f"{'recipe':<16} {'kind':<11} {'FVU per prefix':<32} {'L0':>6} {'dead':>6} "
        f"{'CE rec 0/mean':>14} {'s/step':>7}"
    )
    for r in results:
        ce = (
            f"{r['ce_recovered_vs_zero']:.3f}/{r['ce_recovered_vs_mean']:.3f}"
            if "ce_recovered_vs_zero" in r
            else "-"
        )
        fvu = " / ".join(f"{f:.3f}" for f in r["fvu_per_prefix"])
        print(
            f"{r['recipe']:<16} {r['kind']:<11} {fvu:<32} {r['l0']:>6.1f} "
            f"{r['dead_fraction']:>6.1%} {ce:>14} "
            f"{r['median_step_seconds'] or math.nan:>7.3f}"
        )
    print(
        json.dumps(
            {
                "machine": machine,
                "model": model_type(args.model),
                "layer": args.layer,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "top_k": args.top_k,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
