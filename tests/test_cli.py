"""The mtc CLI: bad input ends in one line and exit code 2; the seed's uses work."""

from __future__ import annotations

import subprocess
import sys

import yaml

from mtc.cli import adhoc_params, model_type_of
from mtc.results import run_dir_of
from tests.conftest import tiny_params


def mtc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mtc.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_bad_params_end_in_one_line_naming_the_key_and_exit_code_2(tmp_path):
    raw = tiny_params()
    raw["dictionaries"]["tc"]["group_sizes"] = [1, 2, 3]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for command in (["extract"], ["train"], ["evaluate", "tc"], ["mine", "tc"], ["prepare-model"]):
        result = mtc(*command, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and "dictionaries.tc.group_sizes" in lines[0] and "Traceback" not in result.stderr
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing written"


def test_stage_scripts_fail_the_same_way(tmp_path):
    from tests.conftest import REPO

    (tmp_path / "params.yaml").write_text("model: [\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "extract.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: params.yaml: not valid YAML")


def test_model_types_from_names():
    assert model_type_of("gpt2") == "gpt2"
    assert model_type_of("google/gemma-2-2b") == "gemma-2-2b"
    assert model_type_of("packaged:SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_type_of("/models/my model/") == "my-model"


def test_a_command_line_transcoder_uses_the_model_preset_and_overrides():
    from mtc.config import parse_params

    raw, name = adhoc_params(
        tiny_params(),
        model_name="gemma-2-2b",
        source_layer=8,
        target_layer=9,
        overrides={"top_k": 64, "dataset": {"n_tokens": 1000}},
        steps=None,
    )
    cfg = parse_params(raw)
    d = cfg.dictionaries[name]
    assert cfg.model.type == "gemma-2-2b" and cfg.extract.layers == [8, 9]
    assert d.group_sizes == [2304, 4608, 9216, 20736] and d.k == 64 and d.resolved_target_layer == 9
    assert cfg.dataset.n_tokens == 1000 and str(run_dir_of(d)) == "results/gemma-2-2b/8/1000/transcoder-to-L9"


def test_smoke_run_extracts_trains_evaluates_and_mines(tmp_path, stories_model_dir):
    raw = tiny_params(str(stories_model_dir))
    raw["dictionaries"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    overrides = {"dict_size": 256, "group_sizes": [32, 64, 160], "top_k": 8, "batch_size": 512, "lr": 0.003}
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(overrides))
    result = mtc(
        "train",
        "--model-name",
        str(stories_model_dir),
        "--source-layer",
        "2",
        "--target-layer",
        "2",
        "--config",
        "over.yaml",
        "--steps",
        "40",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "results" / stories_model_dir.name / "2" / "40" / "transcoder"
    assert (run_dir / "metrics.json").is_file() and (
        run_dir / "activation_samples" / "mined" / "meta.json"
    ).is_file()
    shown = mtc("samples", str(run_dir), "-n", "2", cwd=tmp_path)
    assert shown.returncode == 0 and "«" in shown.stdout, shown.stderr


def test_facts_of_a_local_model_are_checked_before_anything_is_written(tmp_path, stories_model_dir):
    raw = tiny_params(str(stories_model_dir))
    raw["extract"]["layers"] = [2, 7]  # stories260K has layers 0..4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = mtc("prepare-model", cwd=tmp_path)
    assert result.returncode == 2 and "layer 7 is out of range; the model has layers 0..4" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing written"


def test_a_missing_local_dataset_is_named_before_any_work(tmp_path, stories_model_dir):
    raw = tiny_params(str(stories_model_dir))
    raw["dataset"]["path"] = "./no/such/corpus.jsonl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = mtc("prepare-model", cwd=tmp_path)
    assert result.returncode == 2 and "dataset.path: './no/such/corpus.jsonl' does not exist" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_summarize_set_without_a_transcoder_set_says_so_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    result = mtc("summarize-set", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "transcoder_set.layers: params.yaml lists none, so there is no set to summarize" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
