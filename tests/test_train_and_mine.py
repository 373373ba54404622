"""Training from the store, the results contract, evaluation and mined samples."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtc import pipeline
from mtc.config import ConfigError, parse_params
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.results import run_dir_of
from mtc.samples import ActivationSampleAnalyzer, TopActivations
from tests.conftest import REPO, tiny_params
from tests.helpers import copy_data


def test_trained_transcoder_beats_the_trivial_predictor_on_held_out_rows(trained_transcoder):
    cfg, run_dir = trained_transcoder
    metrics = json.loads(pipeline.evaluate(cfg, "tc").read_text())
    assert len(metrics["fvu_per_prefix"]) == 3
    assert metrics["fvu_max"] < 1.0, metrics
    assert metrics["fvu_min"] == min(metrics["fvu_per_prefix"]) and metrics["fvu_max"] == max(
        metrics["fvu_per_prefix"]
    )
    assert metrics["fvu_per_prefix"][-1] < metrics["fvu_per_prefix"][0], (
        "the full dictionary beats its first group"
    )
    assert 0 <= metrics["dead_fraction"] <= 1 and metrics["l0"] > 0
    assert metrics["n_tokens"] > 0
    # Spliced loss at every prefix: the transcoder is closer to the clean model than zero-ablating the MLP.
    for key in (
        "ce_spliced_per_prefix",
        "ce_recovered_vs_zero_per_prefix",
        "ce_recovered_vs_mean_per_prefix",
        "kl_per_prefix",
    ):
        assert len(metrics[key]) == 3, key
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"]
    assert metrics["kl_per_prefix"][-1] < metrics["kl_zero_ablation"]
    assert metrics["ce_recovered_vs_zero"] == metrics["ce_recovered_vs_zero_per_prefix"][-1] > 0
    assert metrics["ce_n_sequences"] == cfg.evaluate.n_ce_sequences == 8
    # Feature statistics: frequencies on disk, dead and dense counted per group.
    freq = load_file(str(run_dir / "feature_frequency.safetensors"))
    assert freq["log10_frequency"].shape == (256,)
    assert int((freq["fire_count"] == 0).sum()) == metrics["dead_features"] == sum(metrics["dead_per_group"])
    assert int((freq["fire_count"] > 0.1 * metrics["n_tokens"]).sum()) == sum(metrics["dense_per_group"])
    assert len(metrics["dense_per_group"]) == 3
    # DVC plots: one row per prefix, and the histogram counts every feature.
    fvu_rows = json.loads((run_dir / "plots" / "fvu.json").read_text())
    assert [r["features"] for r in fvu_rows] == [32, 96, 256]
    assert [r["fvu"] for r in fvu_rows] == metrics["fvu_per_prefix"]
    hist = json.loads((run_dir / "plots" / "frequency_histogram.json").read_text())
    assert sum(r["features"] for r in hist) == 256 and hist[-1]["log10_frequency"] == "dead"
    labels = [r["log10_frequency"] for r in hist[:-1]]
    assert labels == sorted(labels), "bars sort alphabetically in frequency order"


def trained_and_evaluated(tiny_pipeline, tmp_path, **dictionary) -> dict:
    """Held-out metrics (no spliced loss) of the tiny dictionary trained with these settings."""
    raw = tiny_params(str(tiny_pipeline.model.name), **dictionary)
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path / "results")
    pipeline.train(cfg, ["tc"])
    no_ce = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, n_ce_sequences=0))
    return json.loads(pipeline.evaluate(no_ce, "tc").read_text())


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
def test_every_group_a_trained_dictionary_adds_lowers_held_out_fvu_and_inference_l0_matches_k(
    tiny_pipeline, tmp_path, kind
):
    # A Matryoshka dictionary must never reconstruct worse with more of itself, and the threshold
    # it encodes with at inference must give about the top_k codes per token it was trained with.
    site = {"target_site": "resid_mid"} if kind == "sae" else {}
    metrics = trained_and_evaluated(tiny_pipeline, tmp_path, kind=kind, steps=300, top_k=8, **site)
    fvus = metrics["fvu_per_prefix"]
    assert all(b < a for a, b in zip(fvus, fvus[1:])), fvus
    assert metrics["prefix_fvu_decreasing"] is True and metrics["warnings"] == []
    assert abs(metrics["l0"] - 8) <= 0.8, f"inference L0 {metrics['l0']:.2f} for top_k 8"


def test_a_briefly_trained_transcoder_at_the_seeds_learning_rate_gains_from_every_group(
    tiny_pipeline, tmp_path
):
    # The benchmark's shape scaled down: 16 features per input dimension in four groups (1, 2, 4, 9
    # per dimension), the seed's lr 3e-4, few steps. A random encoder pairs each input direction with
    # an unrelated output direction, so at this learning rate its features add noise for most of a
    # short run, the largest group most: at f95526d each group made held-out FVU worse
    # (1.009 / 1.022 / 1.053 / 1.125). Features starting at training rows (feature_init: data, the
    # transcoder default) help from the first step.
    metrics = trained_and_evaluated(
        tiny_pipeline, tmp_path, steps=100, lr=3e-4, dict_size=1024, group_sizes=[64, 128, 256, 576]
    )
    fvus = metrics["fvu_per_prefix"]
    assert all(b < a for a, b in zip(fvus, fvus[1:])), fvus
    assert fvus[-1] < 0.7 and metrics["warnings"] == [], fvus


def test_evaluate_warns_when_a_group_makes_the_reconstruction_worse():
    from mtc.evaluate import prefix_warnings

    assert prefix_warnings([0.5, 0.4, 0.3], [8, 24, 64]) == []
    [message] = prefix_warnings([0.5, 0.3, 0.31], [8, 24, 64])
    assert "24 to 64 features" in message and "0.3000 -> 0.3100" in message


def test_a_finished_run_honours_the_results_contract(trained_transcoder):
    from datetime import datetime

    cfg, run_dir = trained_transcoder
    assert run_dir == cfg.results_root / "stories260K" / "2" / "150" / "tc"
    config = json.loads((run_dir / "config.json").read_text())
    datetime.fromisoformat(config["completed_at"])
    for key in (
        "dict_size",
        "group_sizes",
        "top_k",
        "lr",
        "batch_size",
        "steps",
        "save_every",
        "layer",
        "source_site",
        "target_site",
        "store_provenance",
    ):
        assert key in config
    assert (run_dir / "dictionary.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_100", "step_50"]
    log = [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 150 and log[-1]["loss"] < log[0]["loss"]


def test_every_dvc_output_exists_even_when_no_step_saves_a_checkpoint(tiny_pipeline, tmp_path):
    raw = tiny_params(steps=20, save_every=20)
    raw["model"]["name"] = tiny_pipeline.model.name
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path)
    [run_dir] = pipeline.train(cfg, ["tc"])
    outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["outs"]
    for out in outs:
        name = out.split("${key}/", 1)[1]
        assert (run_dir / name).exists(), f"train@ declares {name} but did not write it"


def test_the_loaded_dictionary_works_on_raw_store_rows(trained_transcoder):
    cfg, run_dir = trained_transcoder
    store = pipeline.open_store(cfg)
    d = MatryoshkaBatchTopK.load(run_dir)
    (x, y), _ = store.read([(2, "resid_mid"), (2, "mlp_out")], store.n_train_rows, store.n_rows)
    from mtc.metrics import compute_fvu

    assert compute_fvu(y, d(x)) < 1.0


def test_interrupted_training_resumes_from_its_last_checkpoint(tiny_pipeline, tmp_path):
    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path / "a")
    [full] = pipeline.train(cfg, ["tc"])
    # Simulate a crash after step 100: keep the checkpoints, drop the finished marker and weights.
    resumed_cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path / "b")
    import shutil

    shutil.copytree(full, run_dir_of(resumed_cfg.dictionaries["tc"], tmp_path / "b"))
    run_dir = run_dir_of(resumed_cfg.dictionaries["tc"], tmp_path / "b")
    shutil.rmtree(run_dir / "checkpoints" / "step_50")
    config = json.loads((run_dir / "config.json").read_text())
    config.pop("completed_at")
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "dictionary.safetensors").unlink()
    pipeline.train(resumed_cfg, ["tc"])
    a, b = MatryoshkaBatchTopK.load(full), MatryoshkaBatchTopK.load(run_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_a_finished_run_with_another_config_is_not_overwritten(trained_transcoder):
    cfg, run_dir = trained_transcoder
    changed = dataclasses.replace(
        cfg, dictionaries={"tc": dataclasses.replace(cfg.dictionaries["tc"], lr=0.01)}
    )
    with pytest.raises(ConfigError, match="holds a finished run with a different config"):
        pipeline.train(changed, ["tc"])


def test_multi_mode_trains_several_dictionaries_from_one_pass(tiny_pipeline, tmp_path):
    raw = tiny_params()
    raw["model"]["name"] = tiny_pipeline.model.name
    raw["dictionaries"]["sae"] = {**raw["dictionaries"]["tc"], "kind": "sae", "source_site": "mlp_out"}
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path / "results")
    single = dataclasses.replace(cfg, results_root=tmp_path / "single")
    together = pipeline.train(cfg, ["tc", "sae"])
    [alone] = pipeline.train(single, ["sae"])
    assert [p.name for p in together] == ["tc", "sae"]
    # Same batches in the same order: the SAE trained alongside equals the SAE trained alone.
    a, b = MatryoshkaBatchTopK.load(together[1]), MatryoshkaBatchTopK.load(alone)
    torch.testing.assert_close(a.W_dec, b.W_dec)


def test_top_activations_keep_the_largest_values_per_feature_once():
    top = TopActivations(dict_size=3, max_samples=2, threshold=0.1)
    top.update(torch.tensor([[0.5, 0.0, 0.05], [0.9, 0.2, 0.0], [0.7, 0.0, 0.0]]), torch.tensor([10, 11, 12]))
    top.update(torch.tensor([[0.8, 0.3, 0.0]]), torch.tensor([11]))  # row 11 again (a later epoch)
    assert top.rows[0].tolist() == [11, 12] and top.values[0].tolist() == pytest.approx([0.9, 0.7])
    assert top.rows[1].tolist() == [11, -1]
    assert top.rows[2].tolist() == [-1, -1], "below the threshold"


def test_mined_samples_show_text_with_the_activating_token_marked(trained_transcoder):
    cfg, run_dir = trained_transcoder
    out = pipeline.mine(cfg, "tc")
    analyzer = ActivationSampleAnalyzer(out)
    features = analyzer.features()
    assert features, "some feature fired on held-out text"
    samples = analyzer.samples(features[0])
    assert 1 <= len(samples) <= cfg.mine.max_samples_per_feature
    assert [s["activation"] for s in samples] == sorted((s["activation"] for s in samples), reverse=True)
    store = pipeline.open_store(cfg)
    tokens = store.tokens().reshape(-1)
    first = samples[0]
    assert first["row"] >= store.n_train_rows
    assert first["token"] == analyzer.tokenizer.decode([int(tokens[first["row"]])])
    assert f"«{first['token']}»" in first["text"]
    assert "feature" in analyzer.show(features[0])
    # The feature's activation on every context token: at the activating token it is the sample's value.
    for s in samples + analyzer.quantile_samples(features[0]):
        assert s["token_acts"][s["token_index"]] == pytest.approx(s["activation"], rel=2e-3)


def test_mining_keeps_quantile_samples_histograms_frequencies_and_logit_effects(trained_transcoder):
    cfg, run_dir = trained_transcoder
    analyzer = ActivationSampleAnalyzer(pipeline.mine(cfg, "tc"))
    info = analyzer.feature_info
    fired = torch.nonzero(info["fire_count"] > 0).flatten().tolist()
    assert len(fired) > 100
    # Same held-out tokens, same encoder: mine's fire counts are evaluate's (its spliced loss skipped here).
    metrics = pipeline.evaluate(
        dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, n_ce_sequences=0)), "tc"
    )
    assert "ce_clean" not in json.loads(metrics.read_text())
    torch.testing.assert_close(
        info["fire_count"], load_file(str(run_dir / "feature_frequency.safetensors"))["fire_count"]
    )
    torch.testing.assert_close(info["histogram"].sum(dim=1), info["fire_count"])
    bands, per_band = cfg.mine.quantile_bands, cfg.mine.samples_per_band
    for f in fired[:50]:
        tail = analyzer.quantile_samples(f)
        assert len(tail) == min(bands * per_band, int(info["fire_count"][f]))
        values = [s["activation"] for s in tail]
        assert values == sorted(values), "lowest activation first"
        assert [s["band"] for s in tail] == sorted(s["band"] for s in tail)
        assert max(values) <= float(info["max_activation"][f]) + 1e-6
    busy = max(fired, key=lambda f: int(info["fire_count"][f]))
    assert {s["band"] for s in analyzer.quantile_samples(busy)} == set(range(bands))
    # Quantile samples reach below the top contexts.
    assert analyzer.quantile_samples(busy)[0]["activation"] < analyzer.samples(busy)[-1]["activation"]
    effects = analyzer.logit_effects(busy)
    promoted, suppressed = [s for _, s in effects["promoted"]], [s for _, s in effects["suppressed"]]
    assert len(promoted) == cfg.mine.n_logit_tokens and promoted == sorted(promoted, reverse=True)
    assert suppressed == sorted(suppressed) and suppressed[0] < promoted[-1]


def test_samples_collected_during_training(tiny_pipeline, tmp_path):
    raw = tiny_params(save_activation_samples=True, sample_collection_freq=50, max_samples_per_feature=4)
    raw["model"]["name"] = tiny_pipeline.model.name
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path)
    [run_dir] = pipeline.train(cfg, ["tc"])
    analyzer = ActivationSampleAnalyzer(run_dir / "activation_samples" / "training")
    assert analyzer.meta["n_tokens_seen"] == 3 * 512
    assert (
        analyzer.features()
        and analyzer.samples(analyzer.features()[0])[0]["row"] < pipeline.open_store(cfg).n_train_rows
    )


def test_wandb_logs_offline_when_configured(tiny_pipeline, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (the optional extra `wandb`)")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = tiny_params(wandb_project="mtc-test", steps=20, save_every=10)
    raw["model"]["name"] = tiny_pipeline.model.name
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path / "results")
    pipeline.train(cfg, ["tc"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), "an offline wandb run was written"
    assert wandb.run is None, "the run was finished"


def test_wandb_stays_off_without_credentials_and_says_so_once(tiny_pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    raw = tiny_params(wandb_project="mtc-test", steps=10, save_every=10)
    raw["model"]["name"] = tiny_pipeline.model.name
    raw["dictionaries"]["tc2"] = {**raw["dictionaries"]["tc"], "lr": 0.01}
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path / "results")
    pipeline.train(cfg, ["tc", "tc2"])
    assert not (tmp_path / "wandb").exists()
    said = [line for line in capsys.readouterr().err.splitlines() if "wandb" in line]
    assert said == [
        "warning: wandb tracking is off: wandb_project is set but WANDB_API_KEY is not "
        "(set it, or WANDB_MODE=offline to log locally)"
    ], "said once for the two dictionaries"


def test_an_unreachable_wandb_server_neither_stops_nor_slows_training(tiny_pipeline, tmp_path):
    """A key but no server (a closed port on this machine): training goes on, logging offline."""
    import os
    import subprocess
    import sys
    import time

    pytest.importorskip("wandb", reason="wandb is not installed (the optional extra `wandb`)")
    raw = tiny_params(tiny_pipeline.model.name, wandb_project="mtc-test", steps=20, save_every=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").symlink_to(tiny_pipeline.data_root.resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_DIR=str(tmp_path))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "train", "tc"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - started
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("warning: wandb")]
    assert len(said) == 1 and "cannot reach its server" in said[0] and "logging offline to" in said[0]
    assert took < 90, f"{took:.0f} s: wandb waited on its server for more than its init timeout"
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb")), "the run's metrics are kept offline"
    run_dir = run_dir_of(
        parse_params(raw, data_root=tmp_path / "data", results_root=tmp_path / "results").dictionary("tc"),
        tmp_path / "results",
    )
    assert json.loads((run_dir / "config.json").read_text())["completed_at"]


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tiny_pipeline, tmp_path):
    import pickle

    from mtc.errors import CheckpointError

    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path)
    [run_dir] = pipeline.train(cfg, ["tc"])
    config = json.loads((run_dir / "config.json").read_text())
    config.pop("completed_at")  # looks interrupted: the next run resumes
    (run_dir / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run_dir / "checkpoints" / "step_100" / "optimizer.pt").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(CheckpointError, match=r"step_100: cannot resume from it"):
        pipeline.train(cfg, ["tc"])
    assert not marker.exists(), "the pickle's code never ran"


def test_a_second_writer_of_the_same_run_fails_fast(tiny_pipeline, tmp_path):
    from mtc.locks import LockedError, exclusive

    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path)
    with exclusive(run_dir_of(cfg.dictionaries["tc"], tmp_path)):
        with pytest.raises(LockedError, match=r"tc: another process \(pid \d+\) is writing it"):
            pipeline.train(cfg, ["tc"])
    [run_dir] = pipeline.train(cfg, ["tc"])  # released: the next run goes ahead
    assert json.loads((run_dir / "config.json").read_text())["completed_at"]


def test_a_nan_in_the_activations_stops_training_naming_the_step(tiny_pipeline, tmp_path):

    import numpy as np
    import zarr

    from mtc.store import site_path

    data = tmp_path / "data"
    copy_data(tiny_pipeline.data_root, data)
    cfg = dataclasses.replace(tiny_pipeline, data_root=data, results_root=tmp_path / "results")
    arr = zarr.open_array(str(site_path(cfg.store_dir, 2, "mlp_out")), mode="r+")
    rows = arr[:]
    rows[1::7] = np.uint16(0x7FC0)  # bfloat16 NaN bits in every 7th row
    arr[:] = rows
    with pytest.raises(FloatingPointError, match=r"tc: loss is nan at step 1; the last good checkpoint"):
        pipeline.train(cfg, ["tc"])
    run_dir = run_dir_of(cfg.dictionaries["tc"], cfg.results_root)
    assert "completed_at" not in json.loads((run_dir / "config.json").read_text())


def test_gradient_clipping_changes_training_only_when_set(tiny_pipeline, tmp_path):
    runs = {}
    for clip in (None, 1e-4):
        raw = tiny_params(steps=10, save_every=10, max_grad_norm=clip)
        raw["model"]["name"] = tiny_pipeline.model.name
        cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path / str(clip))
        [runs[clip]] = pipeline.train(cfg, ["tc"])
    a, b = MatryoshkaBatchTopK.load(runs[None]), MatryoshkaBatchTopK.load(runs[1e-4])
    moved = lambda m: (m.W_enc - MatryoshkaBatchTopK(64, 64, [32, 64, 160], 8, seed=0).W_enc).norm()  # noqa: E731
    assert moved(b) < moved(a), "a tiny clip norm keeps the weights closer to their start"
