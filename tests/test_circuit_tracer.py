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
import yaml
from safetensors.torch import load_file

from mtc import pipeline
from mtc.circuit_tracer import SET_CONFIG, export_circuit_tracer
from mtc.config import parse_params
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.results import run_dir_of
from tests.conftest import REPO, tiny_params
from tests.test_cli import mtc

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
    (root / "params.yaml").write_text(yaml.safe_dump(raw))  # for the CLI, run in root
    pipeline.prepare_model(cfg)
    pipeline.extract(cfg)
    pipeline.train(cfg, list(cfg.dictionaries))  # one pass over the store for the whole set
    run_dirs = [run_dir_of(cfg.dictionaries[f"tcs-L{i}"], cfg.results_root) for i in range(N_LAYERS)]
    return cfg, run_dirs, export_circuit_tracer(run_dirs, root / "ct-set")


def test_the_set_has_every_layer_in_circuit_tracers_layout(transcoder_set):
    _, run_dirs, set_dir = transcoder_set
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


needs_circuit_tracer = pytest.mark.skipif(
    not CT_PYTHON.exists() and os.environ.get("MTC_REQUIRE_CIRCUIT_TRACER") != "1",
    reason="no .venv-circuit-tracer: MTC_WITH_CIRCUIT_TRACER=1 bash scripts/setup.sh",
)


@needs_circuit_tracer
def test_circuit_tracer_loads_the_set_and_reproduces_the_logits_and_our_reconstruction(
    transcoder_set, tmp_path
):
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

    # circuit-tracer's error term is mlp_out minus its reconstruction: the reconstruction is ours
    acts = load_file(str(tmp_path / "activations.safetensors"))
    for layer, run_dir in enumerate(run_dirs):
        ours = MatryoshkaBatchTopK.load(run_dir)
        x = acts["resid_mid"][layer, 1:]  # circuit-tracer zeroes the BOS position
        with torch.no_grad():
            theirs = acts["mlp_out"][layer, 1:] - acts["error"][layer, 1:]
            torch.testing.assert_close(theirs, ours(x), rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@needs_circuit_tracer
def test_mtc_attribute_writes_the_graph_for_the_viewer_and_its_picture(transcoder_set, tmp_path):
    _, _, set_dir = transcoder_set
    out = tmp_path / "graph"
    result = mtc(
        "attribute", str(set_dir), PROMPT, "--out", str(out), "--python", str(CT_PYTHON), cwd=set_dir.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    print("mtc attribute:", summary)
    assert summary["active_features"] > 0 and summary["pruned_nodes"]["cross layer transcoder"] > 0
    assert summary["pruned_nodes"]["logit"] >= 1 and summary["pruned_links"] > 0
    graph = json.loads((out / "graph_files" / "graph.json").read_text())
    assert graph["metadata"]["prompt"].endswith(PROMPT)  # after the BOS token
    assert (out / "graph_files" / "graph-metadata.json").is_file() and (out / "graph.pt").is_file()
    assert (out / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mtc_attribute_without_a_set_fails_in_one_line(transcoder_set, tmp_path):
    _, _, set_dir = transcoder_set
    result = mtc("attribute", str(tmp_path), "a prompt", cwd=set_dir.parent)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a transcoder set (no config.yaml); write one with "
        "mtc export RUN_DIR... OUT --format circuit-tracer"
    ]
