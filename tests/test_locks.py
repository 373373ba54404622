"""The lock beside a run or a store is not data: holding it changes nothing DVC hashes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml

from tests.conftest import REPO, tiny_params
from tests.helpers import copy_data


def dvc(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def test_a_train_that_has_nothing_to_do_leaves_dvc_status_clean(trained_transcoder, tmp_path):
    """summarize_set depends on the whole results/{model} directory, which holds each run's
    ``<run>.lock``; a second `mtc train` (another process, so another pid) finds the run finished."""
    cfg, run_dir = trained_transcoder
    root = tmp_path  # the run is in tmp_path/results
    copy_data(cfg.data_root, root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(cfg.model.name)))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    stage = {"cmd": "true", "deps": ["results/stories260K"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"summarize": stage}}))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert dvc(root, "init", "-q").returncode == 0
    assert dvc(root, "repro", "-q").returncode == 0
    assert run_dir.with_name(run_dir.name + ".lock").is_file()

    again = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "train", "tc"], cwd=root, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    status = dvc(root, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
