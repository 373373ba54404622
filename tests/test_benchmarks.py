"""Every documented benchmark command runs: a smoke run at tiny sizes (seconds), so a command that
docs/ gives cannot rot unnoticed. Each benchmark runs in a subprocess, prints ``machine: ...`` (the
CPU its figures come from) and ends with one JSON line, whose fields are checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.conftest import SHAKESPEARE

BENCHMARKS = Path(__file__).parent / "benchmarks"
# One intra-op thread: the suite runs two workers on two cores, and at these sizes a second thread
# mostly waits at barriers for a core (a tiny training step took 0.26 s with two threads, 0.01 s with one).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    machine = [line.removeprefix("machine: ") for line in lines if line.startswith("machine: ")]
    assert machine, "every benchmark says which CPU its figures come from"
    result = json.loads(lines[-1])
    assert result["machine"] == machine[0], "the JSON line names the machine too"
    assert "vector: " in result["machine"]
    return result


def test_bench_clt_quick_measures_our_step_against_the_matmuls_and_the_dense_step():
    result = run("bench_clt.py", "--quick")
    assert result["step_seconds"] > 0 and result["dense_over_step"] > 0 and result["dead_per_layer"] > 0


def test_bench_train_quick_measures_the_step_the_loader_and_a_dead_feature_sweep():
    result = run("bench_train.py", "--quick")
    assert result["shape"] == "tiny" and result["ours_tokens_per_s"] > 0
    assert result["speedup_vs_dense"] > 0 and result["step_over_matmul"] > 0 and result["multi4_over_one"] > 0
    assert result["loader_over_train"] > 0, "the loader read its store"
    [store_run] = result["store_runs"]
    assert store_run["kind"] == "transcoder" and store_run["warmup_steps"] == 2
    sweep = {row["dead_features"]: row for row in result["dead_sweep"]}
    assert sorted(sweep) == [0, 64]
    assert sweep[0]["aux_loss"] == 0 and sweep[64]["aux_loss"] > 0, (
        "the auxiliary loss runs when features are dead"
    )
    for row in sweep.values():
        assert row["step_over_matmul"] > 0 and row["aux_over_no_aux"] > 0 and row["dense_over_step"] > 0


def test_bench_codecs_quick_round_trips_every_codec_and_zstd_compresses(stories_model_dir):
    result = run("bench_codecs.py", "--quick", "--model", stories_model_dir, "--layer", 2)
    assert result["tokens"] == 4096 and result["layer"] == 2
    by_layout = {(r["codec"], r["chunk_rows"], r["shard_rows"]): r for r in result["results"]}
    assert len(by_layout) == 12  # 9 codecs, then zstd-1 in 3 more layouts; each read back equal
    assert all(
        r["write_MBps"] > 0 and r["read_MBps"] > 0 and r["files_per_site"] == 1 for r in by_layout.values()
    )
    assert by_layout[("zstd-1", 4096, 16384)]["ratio"] > by_layout[("none", 4096, 16384)]["ratio"]


def test_bench_extract_smallest_run_extracts_and_times_the_forward_pass(stories_model_dir):
    args = ("--model", stories_model_dir, "--layer", 2, "--tokens", 1024, "--repeats", 1, "--batch", 4)
    result = run("bench_extract.py", *args)
    assert result["tokens"] == 1024 and result["sites"] == 2 and result["bytes_per_value"] == 2
    assert result["compression_ratio"] > 1, "zstd compresses real activations"
    assert result["extract_over_forward"] > 0 and result["early_stop_speedup"] > 0
    assert result["extract_tokens_per_s"] > 0 and result["forward_tokens_per_s"] > 0


def test_bench_dvc_save_smallest_run_saves_a_store_into_the_dvc_cache(tmp_path):
    from mtc.store import StoreWriter

    n_seq, ctx, keys = 16, 128, [(2, "resid_mid"), (2, "mlp_out")]
    tokens = np.random.default_rng(0).integers(3, 512, (n_seq, ctx), dtype=np.int32)
    tokens[:, 0] = 1  # BOS
    provenance = {"prepend_bos": True, "bos_token_id": 1, "n_holdout_sequences": 1}
    with StoreWriter(tmp_path / "source", provenance, tokens, keys, 16, "bfloat16", 1024) as writer:
        writer.add({key: torch.randn(n_seq, ctx, 16) for key in keys})
        writer.close()
    args = ("--source", tmp_path / "source", "--tokens", 1024, "--workdir", tmp_path / "work")
    result = run("bench_dvc_save.py", *args)
    assert result["tokens"] == 1024 and result["sites"] == 2 and result["files"] > 0
    assert result["store_MiB"] > 0 and result["dvc_save_s"] > 0
    assert 2 in result["link_counts"], "the store's files are hard links into the DVC cache"


def test_bench_quality_quick_trains_evaluates_and_splices_both_recipes(stories_model_dir):
    corpus = SHAKESPEARE if SHAKESPEARE.is_file() else "builtin:pydoc-topics"
    args = ("--quick", "--model", stories_model_dir, "--layer", 2, "--corpus", corpus, "--reference")
    result = run("bench_quality.py", *args)
    assert result["layer"] == 2 and result["steps"] == 20
    rows = {(r["recipe"], r["kind"]): r for r in result["results"]}
    assert set(rows) == {(recipe, kind) for recipe in ("mtc", "reference") for kind in ("sae", "transcoder")}
    assert all(len(r["fvu_per_prefix"]) == 3 and r["l0"] > 0 for r in rows.values())
    assert rows["mtc", "sae"]["fvu_per_prefix"][-1] < 1, "20 steps already reconstruct some of the rows"
    spliced = rows["mtc", "transcoder"]
    assert spliced["ce_windows"] == 8 and spliced["ce_clean"] > 0 and "ce_recovered_vs_mean" in spliced


def test_bench_stages_quick_measures_every_stage_beside_the_models_own_forward(stories_model_dir):
    result = run("bench_stages.py", "--quick", "--model", stories_model_dir, "--layer", 2)
    assert result["quick"] and result["layer"] == 2 and result["tokens"] == 4096
    stages = result["stages"]
    assert list(stages) == ["extract", "forward", "forward_no_logits", "train", "evaluate", "mine"]
    assert stages["extract"]["tokens"] == stages["forward"]["tokens"] >= 4096, "every window extracted"
    assert stages["forward_no_logits"]["peak_over_floor"] == 1, "the floor is the forward without logits"
    for r in stages.values():
        assert r["peak_GB"] > 0 and r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["peak_over_floor"] > 0
    assert len(result["load_average"]["before"]) == 3
