"""Running out of disk ends in one clear line; earlier checkpoints stay intact and resumable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_params


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as on our machines and CI); skipped, with the reason, elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_training_on_a_full_disk_stops_cleanly_and_keeps_earlier_checkpoints(
    tiny_pipeline, small_disk, tmp_path
):
    raw = tiny_params(tiny_pipeline.model.name, steps=150, save_every=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").symlink_to(tiny_pipeline.data_root.resolve())
    (tmp_path / "results").symlink_to(small_disk)
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "train", "tc"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "Traceback" not in result.stderr
    checkpoints = sorted((small_disk / "stories260K" / "2" / "150" / "tc" / "checkpoints").glob("step_*"))
    complete = [c for c in checkpoints if (c / "state.json").is_file()]
    assert complete, "at least one checkpoint was written before the disk filled"
    for c in complete:  # intact: every tensor loads
        assert load_file(str(c / "dictionary.safetensors"))["W_dec"].shape == (256, 64)


def test_extraction_on_a_full_disk_stops_cleanly_and_never_leaves_a_store_in_place(
    tiny_pipeline, small_disk, tmp_path
):
    import shutil

    raw = tiny_params(tiny_pipeline.model.name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(tiny_pipeline.model_dir, tmp_path / "data" / "models" / "stories260K")
    (tmp_path / "data" / "activations").symlink_to(small_disk)
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "extract"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    # (transformers' own "Loading weights" bar may come first)
    assert result.stderr.strip().splitlines()[-1].startswith("error: no space left on the device")
    assert "Traceback" not in result.stderr
    assert not (small_disk / "stories260K").exists(), "a half-written store is never moved into place"
