"""Peak memory and speed of each stage that runs the model or reads its vocabulary, beside the model's
own forward pass over the same tokens:

- forward: the plain Hugging Face model over the extracted windows, in the extract stage's batches,
  returning its logits as it does ([B, T, vocab]);
- forward, no logits: the same model's decoder stack only (``base_model``): the weights and one
  batch's activations, the floor a stage that runs the model can reach;
- extract, train, evaluate, mine: the stages themselves (``mtc.pipeline``), on a store of
  ``--tokens`` tokens of Python's documentation, a dictionary of 16 x d_model features trained for a
  few steps, ``--windows`` spliced-loss windows.

Each runs in a process of its own; its peak is that process's largest resident set (``ru_maxrss``,
interpreter and libraries included), its time the stage call's (loading the model included).
``peak / floor`` is the peak over the no-logits forward's: the target is at most 2.

    python tests/benchmarks/bench_stages.py --model data/models/gemma-3-270m --layer 6
    python tests/benchmarks/bench_stages.py             # SmolLM2 (data/models/SmolLM2-135M-Instruct), layer 8
    python tests/benchmarks/bench_stages.py --quick --model ../shared/assets/models/stories260K --layer 2

``--quick`` (under a minute, a tiny model): 4,096 tokens, 64-token windows, a 16 x d dictionary trained for
5 steps, 4 spliced-loss windows. The tokens counted for tokens/s: extract and the forwards, every
window; train, its rows; evaluate, the spliced-loss windows (each runs 2 + groups forward passes);
mine, the held-out rows. Prints the machine and the load average (the machine may be shared) first;
ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
STAGES = ("extract", "forward", "forward_no_logits", "train", "evaluate", "mine")
LABELS = {"forward": "forward (own)", "forward_no_logits": "forward, no logits"}


def params(model_dir: Path, d_model: int, args) -> dict:
    """A params.yaml for the benchmark's pipeline: one 16 x d_model transcoder at ``args.layer``."""
    quick = args.quick
    d = d_model
    return {
        "model": {"name": str(model_dir), "type": model_dir.name},
        "dataset": {
            "path": "builtin:pydoc-topics",
            "n_tokens": args.tokens or (4096 if quick else 30000),
            "context_size": 64 if quick else 128,
            "holdout_fraction": 0.1 if quick else 0.05,
        },
        "extract": {"layers": [args.layer], "sites": ["resid_mid", "mlp_out"], "batch_size": args.batch},
        "dictionaries": {
            "tc": {
                "kind": "transcoder",
                "layer": args.layer,
                "source_site": "resid_mid",
                "target_site": "mlp_out",
                "dict_size": 16 * d,
                "group_sizes": [d, 2 * d, 4 * d, 9 * d],
                "top_k": 32,
                "batch_size": 256 if quick else 2048,
                "steps": 5 if quick else 20,
                "save_every": 5 if quick else 20,
            }
        },
        "transcoder_set": {"name": "tcs", "layers": [], "steps": 1, "dictionary": {}},
        "clt": {},
        "evaluate": {
            "n_ce_sequences": args.windows or (4 if quick else 12),
            "ce_batch_size": 4 if quick else 8,
        },
        "mine": {},
        "browse": {},
    }


def child(stage: str, root: Path) -> None:
    """Run one stage on the benchmark's pipeline in ``root``; print its figures as ``RESULT {json}``."""
    import torch

    from mtc import models, pipeline
    from mtc.config import parse_params, read_yaml

    cfg = parse_params(
        read_yaml(root / "params.yaml"), data_root=root / "data", results_root=root / "results"
    )
    t, cpu = time.perf_counter(), time.process_time()
    if stage == "extract":
        pipeline.extract(cfg)
        tokens = pipeline.open_store(cfg).n_rows
    elif stage in ("forward", "forward_no_logits"):
        hf = models.load_hf_model(cfg.model_dir, cfg.model.dtype)
        run = hf if stage == "forward" else hf.base_model
        ids = torch.from_numpy(pipeline.open_store(cfg).tokens()).long()
        with torch.no_grad():
            for batch in ids.split(cfg.extract.batch_size):
                run(batch)
        tokens = ids.numel()
    elif stage == "train":
        pipeline.train(cfg, ["tc"])
        tokens = cfg.dictionary("tc").steps * cfg.dictionary("tc").batch_size
    elif stage == "evaluate":
        pipeline.evaluate(cfg, "tc")
        store = pipeline.open_store(cfg)
        tokens = min(cfg.evaluate.n_ce_sequences, store.n_holdout_sequences) * store.context_size
    elif stage == "mine":
        pipeline.mine(cfg, "tc")
        store = pipeline.open_store(cfg)
        tokens = store.n_rows - store.n_train_rows
    else:
        raise SystemExit(f"unknown stage {stage}")
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(
        "RESULT " + json.dumps({"peak_bytes": peak, "seconds": seconds, "cpu_seconds": cpu, "tokens": tokens})
    )


def run_child(stage: str, root: Path) -> dict:
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO / "src")]))
    env = {**os.environ, "MTC_QUIET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, __file__, "--child", stage, "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{stage} failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a tiny model, under a minute")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="a prepared model directory")
    ap.add_argument(
        "--layer", type=int, default=8, help="the layer whose resid_mid and mlp_out are extracted"
    )
    ap.add_argument(
        "--tokens", type=int, default=None, help="tokens to extract (default 30000; --quick 4096)"
    )
    ap.add_argument("--batch", type=int, default=16, help="windows per extract batch")
    ap.add_argument("--windows", type=int, default=None, help="spliced-loss windows (default 12; --quick 4)")
    ap.add_argument("--stages", default=",".join(STAGES), help="which to run, in order (extract first)")
    ap.add_argument(
        "--keep", type=Path, default=None, help="work here and keep it (default: a temporary dir)"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root)
    model_dir = args.model.resolve()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model}: run `dvc repro prepare_model` (or mtc prepare-model) first")
    config = json.loads((model_dir / "config.json").read_text())
    d_model = config.get("hidden_size") or config.get("n_embd")
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    machine, load_before = cpu_description(), os.getloadavg()
    print(f"machine: {machine}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    root = args.keep or Path(tempfile.mkdtemp(prefix="mtc-bench-stages-"))
    (root / "data" / "models").mkdir(parents=True, exist_ok=True)
    link = root / "data" / "models" / model_dir.name
    if not link.exists():
        link.symlink_to(model_dir)  # the prepared model, as prepare_model would have written it
    raw = params(model_dir, d_model, args)
    (root / "params.yaml").write_text(json.dumps(raw))  # JSON is YAML
    results = {}
    for stage in args.stages.split(","):
        results[stage] = run_child(stage, root)
        r = results[stage]
        print(
            f"  {LABELS.get(stage, stage):20s} peak {r['peak_bytes'] / 1e9:6.2f} GB  {r['seconds']:7.1f} s",
            flush=True,
        )
    load_after = os.getloadavg()
    if args.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)

    floor = results.get("forward_no_logits", {}).get("peak_bytes")
    rows = {}
    for stage, r in results.items():
        rows[stage] = {
            "peak_GB": round(r["peak_bytes"] / 1e9, 3),
            "seconds": round(r["seconds"], 2),
            "cpu_seconds": round(r["cpu_seconds"], 2),
            "tokens": r["tokens"],
            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            **({"peak_over_floor": round(r["peak_bytes"] / floor, 3)} if floor else {}),
        }
    n = raw["dataset"]["n_tokens"]
    print(
        f"{model_dir.name} layer {args.layer}: {n} tokens in windows of {raw['dataset']['context_size']}, "
        f"batch {args.batch}; weights {weights / 1e9:.2f} GB; load average after: "
        + " ".join(f"{x:.2f}" for x in load_after)
    )
    print(f"  {'stage':20s} {'peak GB':>8s} {'/ floor':>8s} {'seconds':>8s} {'CPU s':>8s} {'tokens/s':>10s}")
    for stage, r in rows.items():
        ratio = f"{r['peak_over_floor']:8.2f}" if "peak_over_floor" in r else f"{'-':>8s}"
        print(
            f"  {LABELS.get(stage, stage):20s} {r['peak_GB']:8.2f} {ratio} {r['seconds']:8.1f} "
            f"{r['cpu_seconds']:8.1f} {r['tokens_per_s']:10.0f}"
        )
    print(
        json.dumps(
            {
                "machine": machine,
                "model": model_dir.name,
                "layer": args.layer,
                "quick": args.quick,
                "tokens": n,
                "weights_GB": round(weights / 1e9, 3),
                "load_average": {"before": load_before, "after": load_after},
                "stages": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
