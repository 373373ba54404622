"""End to end: `dvc repro` on the real stories260K model in a fresh repository."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import copy_project, tiny_params

pytestmark = pytest.mark.slow
SUMMARY_STAGE = "Running stage 'summarize_set':"
REPLACE_STAGE = "Running stage 'replace_set':"  # reads results/{model} too
CHECK_STAGE = "Running stage 'check_params':"  # reruns (in seconds) whenever params.yaml changes


def dvc(cwd, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, stories_model_dir):
    root = copy_project(tmp_path_factory.mktemp("project"))
    params = tiny_params(str(stories_model_dir), steps=100, save_every=50)
    params["extract"]["layers"] = [2, 3]
    tiny = {
        k: params["dictionaries"]["tc"][k] for k in ("dict_size", "group_sizes", "top_k", "lr", "batch_size")
    }
    params["transcoder_set"] = {
        "name": "tcs",
        "layers": [2],
        "steps": 30,
        "dictionary": {**tiny, "save_every": 30},
    }
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
    assert (run_dir / "browser" / "index.html").is_file()
    shown = json.dumps(json.loads(dvc(project, "metrics", "show", "--json")))
    for headline in ("fvu_mean", "ce_recovered_vs_zero", "ce_recovered_vs_mean", "kl", "dense_features"):
        assert f'"{headline}"' in shown, headline


def test_dvc_plots_show_renders_every_declared_plot(project):
    plots = json.loads(dvc(project, "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    base = "results/stories260K/2/100/tc/plots/"
    for name, n_points in (("fvu", 3), ("ce_recovered_vs_zero", 3), ("ce_recovered_vs_mean", 3), ("kl", 3)):
        [spec] = plots["data"][base + name + ".json"]
        values = spec["content"]["data"]["values"]
        assert len(values) == n_points and all(v["features"] in (32, 96, 256) for v in values), name
    [hist] = plots["data"][base + "frequency_histogram.json"]
    assert hist["content"]["mark"]["type"] == "bar"
    assert sum(int(v["features"]) for v in hist["content"]["data"]["values"]) == 256
    dvc(project, "plots", "show", "-o", "plots_html")
    assert (project / "plots_html" / "index.html").stat().st_size > 1000


def test_a_second_repro_does_nothing(project):
    out = dvc(project, "repro")
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in dvc(project, "status")


def test_adding_a_cross_layer_transcoder_runs_only_its_own_stages_where_dvc_expects_them(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dictionaries"]["tc-to-L3"] = {  # resid_mid at 2 -> mlp_out at 3: results under layer 2
        **params["dictionaries"]["tc"],
        "target_layer": 3,
        "steps": 40,
        "save_every": 40,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(project, "status")
    for stage in ("extract", "prepare_model", "train@tc", "evaluate@tc", "mine@tc", "browse@tc"):
        assert f"{stage}:" not in status, status
    out = dvc(project, "repro")
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == sorted(
        [f"Running stage '{s}@tc-to-L3':" for s in ("train", "evaluate", "mine", "browse")]
        + [
            SUMMARY_STAGE,
            REPLACE_STAGE,
            CHECK_STAGE,
        ]  # summarize_set and replace_set read results/{model}: they rerun when anything there does
    ), out
    run_dir = project / "results" / "stories260K" / "2" / "40" / "tc-to-L3"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["source_layer"], config["target_layer"]) == (2, 3)
    assert json.loads((run_dir / "metrics.json").read_text())["fvu_max"] < 1.5
    assert "Running stage" not in dvc(project, "repro"), "a second repro runs nothing"


def test_a_layer_added_to_the_transcoder_set_runs_only_its_own_stages(project):
    assert (project / "results" / "stories260K" / "2" / "30" / "tcs-L2" / "metrics.json").is_file()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["transcoder_set"]["layers"] = [2, 3]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro")
    ran = sorted(line for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(
        [f"Running stage '{s}_set@3':" for s in ("train", "evaluate", "mine", "browse")]
        + [SUMMARY_STAGE, REPLACE_STAGE, CHECK_STAGE]
    ), out
    assert (project / "results" / "stories260K" / "3" / "30" / "tcs-L3" / "browser" / "index.html").is_file()
    rows = json.loads(
        (project / "results" / "sets" / "stories260K" / "tcs" / "fvu_by_layer.json").read_text()
    )
    for row, layer in zip(rows, [2, 3], strict=True):
        metrics = json.loads(
            (
                project / "results" / "stories260K" / str(layer) / "30" / f"tcs-L{layer}" / "metrics.json"
            ).read_text()
        )
        assert row["layer"] == layer and row["fvu"] == metrics["fvu"] < 1, row
    plots = json.loads(dvc(project, "plots", "show", "--json"))
    [spec] = plots["data"]["results/sets/stories260K/tcs/fvu_by_layer.json"]
    assert [v["layer"] for v in spec["content"]["data"]["values"]] == [2, 3]


def test_a_clt_entry_runs_its_own_two_stages_and_dvc_metrics_set_it_beside_the_set(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    tiny = {k: params["transcoder_set"]["dictionary"][k] for k in ("dict_size", "group_sizes", "top_k", "lr")}
    params["clt"] = {"c": {**tiny, "layers": [2, 3], "steps": 20, "save_every": 20, "batch_size": 256}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro")
    ran = sorted(line for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(
        ["Running stage 'train_clt@c':", "Running stage 'evaluate_clt@c':"]
        + [SUMMARY_STAGE, REPLACE_STAGE, CHECK_STAGE]
    ), out
    shown = json.loads(dvc(project, "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    clt = files["results/stories260K/2/20/c/metrics.json"]["data"]
    the_set = files["results/sets/stories260K/tcs/replacement.json"]["data"]
    for headline in ("fvu_mean", "kl", "top1_agreement", "ce_recovered_vs_zero", "ce_recovered_vs_mean"):
        assert isinstance(clt[headline], float) and isinstance(the_set[headline], float), headline
    assert "Running stage" not in dvc(project, "repro"), "a second repro runs nothing"


def test_a_teammate_pulls_the_store_and_trains_without_the_model(project, tmp_path):
    """dvc push to a local-directory remote; a fresh copy of the project (no data) pulls only the
    store, adds a dictionary and trains it from the pulled store without the model on disk; after
    pulling the rest, `dvc repro` evaluates it and neither prepare_model nor extract runs."""
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
    dvc(clone, "pull", "extract")  # the store only
    store = clone / "data" / "activations" / "stories260K"
    assert (store / "tokens.zarr" / "zarr.json").is_file()
    assert not (clone / "data" / "models").exists(), "the model is not pulled"

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["dictionaries"]["tc2"] = {
        **params["dictionaries"]["tc"],
        "top_k": 4,
        "steps": 20,
        "save_every": 20,
    }
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(clone, "repro", "--allow-missing", "train@tc2")
    ran = sorted(line for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(["Running stage 'train@tc2':", CHECK_STAGE]), out
    assert (clone / "results" / "stories260K" / "2" / "20" / "tc2" / "dictionary.safetensors").is_file()

    # Evaluating (the spliced loss) and mining (the unembedding) need the model: pull the rest.
    dvc(clone, "pull", "--allow-missing")  # tc2's own outputs were never pushed
    out = dvc(clone, "repro")
    ran = sorted(line for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(
        [f"Running stage '{s}@tc2':" for s in ("evaluate", "mine", "browse")] + [SUMMARY_STAGE, REPLACE_STAGE]
    )
    metrics = json.loads(
        (clone / "results" / "stories260K" / "2" / "20" / "tc2" / "metrics.json").read_text()
    )
    assert metrics["fvu_max"] < 1.5
