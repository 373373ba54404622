"""``mtc export --format circuit-tracer``: a transcoder for every layer of stories260K (a
``transcoder_set``), trained from one store, loads in circuit-tracer (its own virtualenv,
``.venv-circuit-tracer``: scripts/setup.sh makes it with MTC_WITH_CIRCUIT_TRACER=1, as .ci/run
does); its replacement model with the error term reproduces the model's logits, circuit-tracer
computes the reconstruction mtc does, and an attribution graph of a prompt has feature nodes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from mtc import pipeline
from mtc.circuit_tracer import SET_CONFIG, export_circuit_tracer
from mtc.config import parse_params
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.results import run_dir_of
from tests.conftest import REPO, tiny_params

CT_PYTHON = REPO / ".venv-circuit-tracer" / "bin" / "python"
N_LAYERS = 5  # stories260K
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


@pytest.fixture(scope="module")
def transcoder_set(tmp_path_factory, stories_model_dir):
    """One transcoder per layer (global input scale, skip connection), trained from one store."""
    root = tmp_path_factory.mktemp("set")
    raw = tiny_params(str(stories_model_dir))
    raw["extract"]["layers"] = list(range(N_LAYERS))
    entry = raw.pop("dictionaries")["tc"]
    shared = {k: entry[k] for k in ("dict_size", "group_sizes", "top_k", "lr", "batch_size")}
    raw["dictionaries"] = {}
    raw["transcoder_set"] = {
        "name": "tcs",
        "layers": list(range(N_LAYERS)),
        "steps": 60,
        "dictionary": {**shared, "save_every": 60, "input_norm": "global", "skip_connection": True},
    }
    cfg = parse_params(raw, data_root=root / "data", results_root=root / "results")
    pipeline.prepare_model(cfg)
    pipeline.extract(cfg)
    pipeline.train(cfg, list(cfg.dictionaries))  # one pass over the store for the whole set
    run_dirs = [run_dir_of(cfg.dictionaries[f"tcs-L{i}"], cfg.results_root) for i in range(N_LAYERS)]
    return cfg, run_dirs, export_circuit_tracer(run_dirs, root / "ct-set")


def test_the_set_has_every_layer_in_circuit_tracers_layout(transcoder_set):
    _, run_dirs, set_dir = transcoder_set
    import yaml

    config = yaml.safe_load((set_dir / SET_CONFIG).read_text())
    assert config["model_kind"] == "transcoder_set"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("hook_resid_mid", "hook_mlp_out")
    for i in range(N_LAYERS):
        tensors = load_file(str(set_dir / f"layer_{i}.safetensors"))
        assert tensors["W_enc"].shape == (256, 64) and tensors["W_skip"].shape == (64, 64)
        assert tensors["activation_function.threshold"].shape == (256,)


def test_a_set_missing_a_layer_is_refused(transcoder_set, tmp_path):
    _, run_dirs, _ = transcoder_set
    with pytest.raises(ConfigError, match="no transcoder for layer 0"):
        export_circuit_tracer(run_dirs[1:], tmp_path / "a")


@pytest.mark.skipif(
    not CT_PYTHON.exists() and os.environ.get("MTC_REQUIRE_CIRCUIT_TRACER") != "1",
    reason="no .venv-circuit-tracer: MTC_WITH_CIRCUIT_TRACER=1 bash scripts/setup.sh",
)
def test_circuit_tracer_loads_the_set_reproduces_the_logits_and_builds_a_graph(transcoder_set, tmp_path):
    cfg, run_dirs, set_dir = transcoder_set
    result = subprocess.run(
        [
            str(CT_PYTHON),
            str(REPO / "tests" / "circuit_tracer_check.py"),
            str(cfg.model_dir),
            str(set_dir),
            str(tmp_path),
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "result.json").read_text())
    print("circuit-tracer:", report)
    assert report["max_abs_logit_difference"] < 1e-4 * max(1.0, report["logit_scale"]), report
    assert report["feature_nodes"] > 0 and (tmp_path / "graph" / "check.json").is_file()

    # circuit-tracer's error term is mlp_out minus its reconstruction: the reconstruction is ours
    acts = load_file(str(tmp_path / "activations.safetensors"))
    for layer, run_dir in enumerate(run_dirs):
        ours = MatryoshkaBatchTopK.load(run_dir)
        x = acts["resid_mid"][layer, 1:]  # circuit-tracer zeroes the BOS position
        with torch.no_grad():
            theirs = acts["mlp_out"][layer, 1:] - acts["error"][layer, 1:]
            torch.testing.assert_close(theirs, ours(x), rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
