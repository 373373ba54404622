"""End to end: `dvc repro` on the real stories260K model in a fresh repository."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import copy_project, tiny_params

pytestmark = pytest.mark.slow


def dvc(cwd, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, stories_model_dir):
    root = copy_project(tmp_path_factory.mktemp("project"))
    params = tiny_params(str(stories_model_dir), steps=100, save_every=50)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(root, "repro")
    return root


def test_dvc_repro_runs_every_stage_and_writes_the_results_contract(project):
    run_dir = project / "results" / "stories260K" / "2" / "100" / "tc"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["completed_at"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"fvu_per_prefix", "fvu_min", "fvu_mean", "fvu_max", "l0", "dead_fraction"} <= set(metrics)
    assert metrics["fvu_max"] < 1
    assert (run_dir / "activation_samples" / "mined" / "samples.safetensors").is_file()
    shown = json.loads(dvc(project, "metrics", "show", "--json"))
    assert "fvu_mean" in json.dumps(shown)


def test_a_second_repro_does_nothing(project):
    out = dvc(project, "repro")
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in dvc(project, "status")


def test_adding_a_dictionary_reruns_only_its_own_stages(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dictionaries"]["sae"] = {**params["dictionaries"]["tc"], "kind": "sae", "source_site": "mlp_out",
                                     "steps": 60}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(project, "status")
    assert "train@sae" in status and "evaluate@sae" in status and "mine@sae" in status
    for stage in ("extract", "prepare_model", "train@tc", "evaluate@tc", "mine@tc"):
        assert f"{stage}:" not in status, status
    out = dvc(project, "repro")
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == sorted(f"Running stage '{s}@sae':" for s in ("train", "evaluate", "mine")), out


def test_a_teammate_pulls_the_store_and_trains_without_the_model(project, tmp_path):
    """dvc push to a local-directory remote; a fresh copy of the project (no data) pulls only the
    store, adds a dictionary and reproduces: extract (and prepare_model) are skipped, the model is
    never even on disk, and the new dictionary trains from the pulled store."""
    import shutil

    store_files = [p for p in (project / "data" / "activations" / "stories260K").rglob("*") if p.is_file()]
    assert {p.stat().st_nlink for p in store_files} == {2}, "the store is hardlinked to the cache, not copied"

    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-f", "-d", "team", str(remote))
    dvc(project, "push")
    assert any(remote.rglob("*")), "the remote holds the cache"

    clone = copy_project(tmp_path / "clone")
    for name in ("params.yaml", "dvc.lock"):
        shutil.copy(project / name, clone / name)
    dvc(clone, "remote", "add", "-d", "team", str(remote))
    dvc(clone, "pull", "extract")                        # the store only
    store = clone / "data" / "activations" / "stories260K"
    assert (store / "tokens.zarr" / "zarr.json").is_file()
    assert not (clone / "data" / "models").exists(), "the model is not pulled"

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["dictionaries"]["tc2"] = {**params["dictionaries"]["tc"], "top_k": 4, "steps": 20, "save_every": 20}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(clone, "repro", "--allow-missing", "train@tc2", "evaluate@tc2")
    ran = sorted(line for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == ["Running stage 'evaluate@tc2':", "Running stage 'train@tc2':"], out
    metrics = json.loads((clone / "results" / "stories260K" / "2" / "20" / "tc2" / "metrics.json").read_text())
    assert metrics["fvu_max"] < 1.5
