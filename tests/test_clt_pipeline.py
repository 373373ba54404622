"""A cross-layer transcoder through the pipeline on stories260K: params, training from every layer
of one store, resuming, and its replacement model measured as a set's is (checked by hand)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mtc import pipeline, train
from mtc.clt import MatryoshkaCLT
from mtc.config import ConfigError, parse_params
from mtc.evaluate import heldout_windows
from mtc.models import load_bridge
from mtc.replacement import CLTReplacement, replacement_metrics
from tests.conftest import tiny_params
from tests.test_damaged_runs import mtc, one_line  # noqa: F401
from tests.test_replacement import hand_metrics

LAYERS = [0, 1, 2, 3, 4]  # every layer of stories260K
CLT = {"layers": LAYERS, "steps": 40, "dict_size": 96, "group_sizes": [32, 64], "top_k": 6}
CLT.update({"lr": 0.003, "batch_size": 256, "save_every": 20, "calibration_rows": 2048, "shuffle_chunks": 4})


TC = tiny_params()["dictionaries"]["tc"]


def clt_params(model_name: str, **entry) -> dict:
    raw = tiny_params(model_name)
    raw["extract"]["layers"] = LAYERS
    raw["dataset"]["n_tokens"] = 16384
    raw["clt"] = {"c": {**CLT, **entry}}
    return raw


@pytest.fixture(scope="module")
def clt_pipeline(tmp_path_factory, stories_model_dir):
    """Every layer's resid_mid and mlp_out extracted; the CLT ``c`` trained (read-only)."""
    root = tmp_path_factory.mktemp("clt")
    cfg = parse_params(
        clt_params(str(stories_model_dir)), data_root=root / "data", results_root=root / "results"
    )
    pipeline.prepare_model(cfg)
    pipeline.extract(cfg)
    pipeline.train(cfg, ["c"])
    return cfg


def run_dir(cfg, name="c"):
    return cfg.results_root / "stories260K" / "0" / str(cfg.dictionary(name).steps) / name


def test_a_clt_entry_needs_consecutive_extracted_layers_and_its_own_section(stories_model_dir):
    def parse(**changes):
        raw = clt_params(str(stories_model_dir))
        for section, value in changes.items():
            raw[section] = value
        return parse_params(raw)

    assert parse().dictionary("c").layers == LAYERS
    bad = {
        "clt.c.layers[0]: got 7": {"clt": {"c": {**CLT, "layers": [7]}}},
        "clt.c.layers: got [0, 2]": {"clt": {"c": {**CLT, "layers": [0, 2]}}},
        "clt.c.steps: missing": {"clt": {"c": {k: v for k, v in CLT.items() if k != "steps"}}},
        "clt.c.layer: got 0; expected left out": {"clt": {"c": {**CLT, "layer": 0}}},
        "clt.c.skip_connection: got True": {"clt": {"c": {**CLT, "skip_connection": True}}},
        "clt.c.feature_init: got 'data'": {"clt": {"c": {**CLT, "feature_init": "data"}}},
        "clt.'a;b': got": {"clt": {"a;b": CLT}},
        "dictionaries.tc.kind: got 'clt'": {"dictionaries": {"tc": {**TC, "kind": "clt", "layers": [2]}}},
        "dictionaries.tc.layers: got [2]": {"dictionaries": {"tc": {**TC, "layers": [2]}}},
    }
    for message, changes in bad.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
            parse(**changes)
        assert "\n" not in str(e.value)


def test_a_clt_trains_from_every_layer_of_the_store_and_its_loss_falls(clt_pipeline):
    log = [
        json.loads(line) for line in (run_dir(clt_pipeline) / "training_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    assert log[-1]["loss"] < 0.9 * log[0]["loss"]
    assert log[-1]["l0"] == pytest.approx(6, abs=0.5), "top_k codes per token and layer"
    clt = MatryoshkaCLT.load(run_dir(clt_pipeline))
    assert (clt.layers, clt.dict_size, clt.boundaries) == (LAYERS, 96, [32, 96])
    assert (clt.threshold > 0).all(), "calibrated per layer"


def test_a_clt_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    clt_pipeline, tmp_path, monkeypatch
):
    cfg = parse_params(
        clt_params(clt_pipeline.model.name),
        data_root=clt_pipeline.data_root,
        results_root=tmp_path / "results",
    )
    step = train._train_step
    calls = {"n": 0}

    def dies_at_step_30(run, by_key, rows, i, clock):
        if i == 30:
            raise KeyboardInterrupt  # as a kill: the checkpoint at step 20 is the last thing saved
        return step(run, by_key, rows, i, clock)

    monkeypatch.setattr(train, "_train_step", dies_at_step_30)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(cfg, ["c"])
    assert (run_dir(cfg) / "checkpoints" / "step_20").is_dir()
    monkeypatch.setattr(
        train, "_train_step", lambda *a: (calls.__setitem__("n", calls["n"] + 1), step(*a))[1]
    )
    pipeline.train(cfg, ["c"])
    assert calls["n"] == 20, "steps 21..40 only"
    resumed, reference = (MatryoshkaCLT.load(run_dir(c)).state_dict() for c in (cfg, clt_pipeline))
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_the_clt_replacement_model_is_what_running_the_model_by_hand_gives(clt_pipeline):
    clt = MatryoshkaCLT.load(run_dir(clt_pipeline)).eval()
    store = pipeline.open_store(clt_pipeline)
    windows = heldout_windows(store, 8)
    bridge = load_bridge(clt_pipeline.model_dir)
    r = replacement_metrics(
        bridge, windows, {"clt": CLTReplacement(clt)}, batch_size=4, skip_bos=store.skip_bos
    )

    outputs = {}

    def by_hand(layer, resid_mid_BTD, _):
        """Layer l's output: the bias plus what every layer i <= l's codes write to it."""
        x = resid_mid_BTD.flatten(0, 1)
        outputs[layer] = clt.decode(layer, clt.encode(layer, x))  # [BT, L - layer, d]
        out = clt.output_bias()[layer] + sum(outputs[i][:, layer - i] for i in range(layer + 1))
        return out.view_as(resid_mid_BTD)

    hf = AutoModelForCausalLM.from_pretrained(str(clt_pipeline.model_dir), dtype=torch.float32).eval()
    expected = hand_metrics((bridge, hf, windows, store.skip_bos), by_hand)
    assert r["replacements"]["clt"] == pytest.approx(expected, rel=1e-4)


def test_evaluate_writes_each_layers_fvu_and_the_replacement_model_like_a_sets(clt_pipeline):
    out = pipeline.evaluate(clt_pipeline, "c")
    m = json.loads(out.read_text())
    assert len(m["fvu_per_layer"]) == len(LAYERS) and all(0 < f < 1 for f in m["fvu_per_layer"])
    assert m["fvu_mean"] == pytest.approx(sum(m["fvu_per_layer"]) / len(LAYERS))
    assert list(m["replacements"]) == ["zero_ablation", "mean_ablation", "prefix_1", "prefix_2"]
    assert m["ce_recovered_vs_zero"] == m["replacements"]["prefix_2"]["ce_recovered_vs_zero"] > 0
    assert m["kl"] < m["replacements"]["zero_ablation"]["kl"]
    plot = json.loads((out.parent / "plots" / "replacement_by_layer.json").read_text())
    assert [row["layer"] for row in plot] == LAYERS


def test_a_dvc_stage_name_picks_the_clt_entry(clt_pipeline):
    assert pipeline.stage_dictionary(clt_pipeline, [], "train_clt@c") == "c"
    with pytest.raises(ConfigError, match="no such dictionary"):
        pipeline.stage_dictionary(clt_pipeline, [], "train_clt@nope")


def test_the_example_params_file_parses(stories_model_dir):
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).parents[1] / "examples" / "smollm2-clt.params.yaml").read_text())
    cfg = parse_params(raw)
    assert cfg.dictionary("clt").layers == list(range(30))


def test_mtc_finetune_writes_the_kl_fine_tuned_clt_beside_its_metrics_before_and_after(
    clt_pipeline,
    tmp_path,
    monkeypatch,
    mtc,  # noqa: F811
):
    from typer.testing import CliRunner

    from mtc.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(clt_params(str(clt_pipeline.model.name))))
    (tmp_path / "data").symlink_to(clt_pipeline.data_root)
    (tmp_path / "results").symlink_to(clt_pipeline.results_root)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["finetune", "c", "--out", "ft", "--steps", "3", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ft/finetune.json").read_text())
    assert summary["settings"]["steps"] == 3 and summary["before"]["kl"] > 0 and summary["after"]["kl"] > 0
    assert summary["before"] != summary["after"]
    assert len((tmp_path / "ft/finetune_log.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "ft/replacement.json").read_text())["kl"] == summary["after"]["kl"]
    tuned, trained = MatryoshkaCLT.load(tmp_path / "ft"), MatryoshkaCLT.load(run_dir(clt_pipeline))
    assert not torch.equal(tuned.W_dec[0], trained.W_dec[0]), "the weights moved"
    torch.testing.assert_close(tuned.threshold, trained.threshold, msg="thresholds stay")
    assert json.loads((tmp_path / "ft/config.json").read_text())["kl_finetune"]["lr"] == 1e-3

    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    for args, message in (
        (["finetune", "c", "--out", "other"], "other: a directory holding other files"),
        (["finetune", "c", "--out", "x", "--steps", "0"], "--steps: got 0"),
        (["finetune", "nope", "--out", "x"], "clt.nope: no such entry"),
    ):
        one_line(mtc(tmp_path, *args), message)
    assert (tmp_path / "other/notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()
