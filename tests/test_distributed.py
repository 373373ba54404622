"""torchrun with 2 CPU processes (gloo): extraction writes the same store as one process, and
data-parallel training on the same global batch gives the same dictionary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_params

pytestmark = pytest.mark.slow


def run(cwd, *args, nproc: int = 1) -> None:
    # One thread per process for both runs, as torchrun gives each worker by default.
    env = {**os.environ, "MTC_QUIET": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mtc.cli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "mtc.cli",
            *args,
        ]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def extraction_project(root, tiny_pipeline, **extract):
    raw = tiny_params(tiny_pipeline.model.name)
    raw["extract"].update({"batch_size": 6, "shard_rows": 4096, **extract})  # batches straddle shards
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(tiny_pipeline.model_dir, root / "data" / "models" / "stories260K")
    return root / "data" / "activations" / "stories260K"


def test_torchrun_extraction_with_2_ranks_writes_the_single_process_store_byte_for_byte(
    tiny_pipeline, tmp_path
):
    single = extraction_project(tmp_path / "single", tiny_pipeline)
    run(tmp_path / "single", "extract")
    double = extraction_project(tmp_path / "double", tiny_pipeline)
    run(tmp_path / "double", "extract", nproc=2)
    expected, got = files(single), files(double)
    assert len([f for f in expected if "/c/" in f]) == 3 * 8, "8 shards per array: both ranks wrote"
    assert expected.keys() == got.keys()
    assert [f for f in expected if expected[f] != got[f]] == []  # chunks, indexes, attrs (mean norms)


def training_project(root, tiny_pipeline):
    raw = tiny_params(
        tiny_pipeline.model.name,
        dict_size=256,
        group_sizes=[32, 64, 160],
        top_k=8,
        batch_size=256,
        steps=30,
        save_every=10,
    )
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "data").symlink_to(tiny_pipeline.data_root.resolve())
    return root / "results" / "stories260K" / "2" / "30" / "tc"


def test_data_parallel_training_on_2_ranks_gives_the_single_process_dictionary(tiny_pipeline, tmp_path):
    single = training_project(tmp_path / "single", tiny_pipeline)
    run(tmp_path / "single", "train", "tc")
    double = training_project(tmp_path / "double", tiny_pipeline)
    run(tmp_path / "double", "train", "tc", nproc=2)
    expected = load_file(str(single / "dictionary.safetensors"))
    got = load_file(str(double / "dictionary.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:  # float tolerance: matmuls over half the rows round differently
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4, msg=name)
    assert (double / "training_log.jsonl").is_file() and (double / "config.json").is_file()


def _select_on_rank(rank: int, init_file: str, mm_parts, out_dir: str) -> None:
    import torch.distributed as dist

    from mtc.data_parallel import DataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = DataParallel(8, 8, [16, 48], top_k=4)
    with torch.no_grad():
        model.b_enc.copy_(torch.linspace(-0.5, 0.5, 64))
    rows, feats, vals = model._select(mm_parts[rank])
    torch.save((rows, feats, vals), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("skew", [1.0, 50.0])
def test_global_batch_top_k_selects_what_one_process_selects_on_the_whole_batch(tmp_path, skew):
    """skew 50: rank 0 holds nearly all of the global top k x B, far more than its share, so the
    first, candidate-based threshold is short and the selection is redone from it."""
    import torch.multiprocessing as mp

    from mtc.dictionary import batch_topk_pairs

    gen = torch.Generator().manual_seed(0)
    mm = [torch.randn(32, 64, generator=gen) * skew, torch.randn(32, 64, generator=gen)]
    mp.spawn(_select_on_rank, args=(str(tmp_path / "init"), mm, str(tmp_path)), nprocs=2, join=True)
    got = set()
    for rank in (0, 1):
        rows, feats, vals = torch.load(tmp_path / f"rank{rank}.pt")
        got |= {(int(r) + 32 * rank, int(f), round(float(v), 5)) for r, f, v in zip(rows, feats, vals)}
    bias = torch.linspace(-0.5, 0.5, 64)
    rows, feats, vals = batch_topk_pairs(torch.cat(mm), bias, 4 * 64, [16, 64])
    expected = {(int(r), int(f), round(float(v), 5)) for r, f, v in zip(rows, feats, vals)}
    assert got == expected and len(expected) == 4 * 64
