"""Training killed with kill -9 at random points resumes and ends with the same dictionary."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_params
from tests.helpers import copy_data

pytestmark = pytest.mark.slow
KILL_POINTS = 4


def start_training(cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "mtc.cli", "train", "tc"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "MTC_QUIET": "1"},
    )


def project(root, tiny_pipeline):
    root.mkdir()
    raw = tiny_params(tiny_pipeline.model.name, steps=300, save_every=25)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "data").symlink_to(tiny_pipeline.data_root.resolve())
    return root / "results" / "stories260K" / "2" / "300" / "tc"


def latest_checkpoint_step(run_dir) -> int:
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
    return max(steps, default=0)


def logged_step(run_dir) -> int:
    try:
        lines = (run_dir / "training_log.jsonl").read_text().splitlines()
        return yaml.safe_load(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, yaml.YAMLError, TypeError):
        return 0  # not written yet, or caught mid-write


def kill_after(proc, run_dir, step: int, extra: float) -> bool:
    """kill -9 ``proc`` ``extra`` seconds after it logs ``step``; False if it finished first."""
    while proc.poll() is None and logged_step(run_dir) < step:
        time.sleep(0.02)
    time.sleep(extra)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


@pytest.fixture(scope="module")
def reference(tiny_pipeline, tmp_path_factory):
    """The run directory of an uninterrupted training of the project's config."""
    root = tmp_path_factory.mktemp("undisturbed")
    run_dir = project(root / "reference", tiny_pipeline)
    assert start_training(root / "reference").wait() == 0
    return run_dir


def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_dictionary(
    tiny_pipeline, tmp_path, reference
):

    run_dir = project(tmp_path / "killed", tiny_pipeline)
    rng = random.Random(0)
    targets = sorted(rng.sample(range(10, 300, 10), KILL_POINTS))
    kills = []
    for target in targets:
        proc = start_training(tmp_path / "killed")
        # A random moment shortly after the target step: mid-step, mid-checkpoint or mid-log write.
        assert kill_after(proc, run_dir, target, rng.uniform(0, 0.2)), f"killed before step {target}"
        kills.append((target, latest_checkpoint_step(run_dir)))
    print(f"kill points (logged step, newest checkpoint): {kills}")
    finish = start_training(tmp_path / "killed")
    assert finish.wait() == 0, finish.stderr.read().decode()

    expected = load_file(str(reference / "dictionary.safetensors"))
    got = load_file(str(run_dir / "dictionary.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    steps = [
        yaml.safe_load(line)["step"] for line in (run_dir / "training_log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 300, "the log has each step once, in order"


SHARD_ROWS = 4096  # 8 shards of 4 chunks: the unit of writing and resuming


def extraction_project(root, tiny_pipeline):
    import shutil

    root.mkdir()
    raw = tiny_params(tiny_pipeline.model.name)
    raw["extract"]["batch_size"] = 6  # batches that straddle shard boundaries
    raw["extract"]["shard_rows"] = SHARD_ROWS
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(tiny_pipeline.model_dir, root / "data" / "models" / "stories260K")
    return root / "data" / "activations" / "stories260K"


def rows_on_disk(partial) -> int:
    """Rows in shards the writer has marked done."""
    return len(list((partial / "progress").glob("shard_*.json"))) * SHARD_ROWS


def test_kill_9_during_extraction_then_rerun_gives_a_bit_identical_store(tiny_pipeline, tmp_path):
    from mtc.store import ActivationStore, StoreError

    def extract(cwd):
        return subprocess.Popen(
            [sys.executable, "-m", "mtc.cli", "extract"],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "MTC_QUIET": "1"},
        )

    reference = extraction_project(tmp_path / "reference", tiny_pipeline)
    assert extract(tmp_path / "reference").wait() == 0
    store = extraction_project(tmp_path / "killed", tiny_pipeline)
    partial = store.with_name(store.name + ".partial")
    rng = random.Random(1)
    kills = []
    for target in sorted(rng.sample(range(SHARD_ROWS, 32768, SHARD_ROWS), KILL_POINTS)):
        proc = extract(tmp_path / "killed")
        while proc.poll() is None and rows_on_disk(partial) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # mid-batch, mid-shard write or mid-marker write
        assert proc.poll() is None, "killed before it finished"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(rows_on_disk(partial))
        assert not store.exists(), "a half-written store is never in place"
        with pytest.raises(StoreError, match="incomplete"):
            ActivationStore(partial)  # nor readable as complete where it lies
    print(f"kill points (rows on disk): {kills}")
    first_shard = partial / "L2" / "mlp_out.zarr" / "c" / "0" / "0"
    written_before = first_shard.stat().st_mtime_ns
    assert extract(tmp_path / "killed").wait() == 0
    moved = store / "L2" / "mlp_out.zarr" / "c" / "0" / "0"
    assert moved.stat().st_mtime_ns == written_before, "the rerun resumed: shards on disk were not rewritten"
    expected = {p.relative_to(reference): p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    got = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert expected.keys() == got.keys()
    assert [str(f) for f in expected if expected[f] != got[f]] == [], "every file byte for byte"


def replaced_store(store, root):
    """A copy of ``store`` whose activations are all negated: what another dataset's extraction
    would leave in its place."""
    import shutil

    import zarr

    other = root / "other-store"
    shutil.copytree(store, other)
    for array_dir in other.glob("L*/*.zarr"):
        array = zarr.open_array(str(array_dir), mode="r+")
        array[:] = -array[:] if array.dtype.kind == "f" else array[:] ^ 0x8000  # bfloat16 bits: flip the sign
    return other


def test_a_store_replaced_while_training_reads_it_changes_nothing(tiny_pipeline, tmp_path, reference):
    """What `dvc repro -s extract` does under a running `mtc train`: the store is deleted, a new
    one (other data) moves in. Training keeps reading the version it opened: the same dictionary
    as an undisturbed run, bit for bit."""
    import shutil

    root = tmp_path / "disturbed"
    root.mkdir()
    (root / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(tiny_pipeline.model.name, steps=300, save_every=25))
    )
    copy_data(tiny_pipeline.data_root, root / "data")
    store = root / "data" / "activations" / "stories260K"
    other = replaced_store(store, tmp_path)
    run_dir = root / "results" / "stories260K" / "2" / "300" / "tc"
    proc = start_training(root)
    while proc.poll() is None and logged_step(run_dir) < 30:
        time.sleep(0.01)
    shutil.rmtree(store)  # DVC removes the outputs before running the stage
    while proc.poll() is None and logged_step(run_dir) < 120:
        time.sleep(0.01)
    shutil.copytree(other, store)  # ... and the new extraction moves in
    assert proc.poll() is None, "training finished before the store was replaced: make it longer"
    assert proc.wait() == 0, proc.stderr.read().decode()

    expected = load_file(str(reference / "dictionary.safetensors"))
    got = load_file(str(run_dir / "dictionary.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert not (store.parent / ".mtc-readers").exists(), "the reader's snapshot is removed at exit"
