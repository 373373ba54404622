"""``mtc export --format circuit-tracer``: a transcoder for every layer of stories260K (a
``transcoder_set``), trained from one store, loads in circuit-tracer (its own virtualenv,
``.venv-circuit-tracer``: scripts/setup.sh makes it with MTC_WITH_CIRCUIT_TRACER=1, as .ci/run
does); its replacement model with the error term reproduces the model's logits, circuit-tracer
computes the reconstruction mtc does, and an attribution graph of a prompt has feature nodes. A set
of a tiny random Gemma 3 checks what that architecture adds: the model circuit-tracer's older
transformers loads is ours (RoPE bases included), and its token nodes carry the scaled embedding."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtc import models, pipeline
from mtc.circuit_tracer import SET_CONFIG, export_circuit_tracer
from mtc.config import parse_params
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.results import run_dir_of
from tests.conftest import REPO, tiny_params
from tests.helpers import tiny_random_gemma3_dir
from tests.test_cli import mtc

CT_PYTHON = REPO / ".venv-circuit-tracer" / "bin" / "python"
N_LAYERS = 5  # stories260K
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


@pytest.fixture(scope="module")
def transcoder_sets(tmp_path_factory, stories_model_dir):
    """Two sets of one transcoder per layer (skip connection), trained from one store in one pass:
    ``token`` scales each row by its own RMS (circuit-tracer reads the MLP's normalised input),
    ``global`` by one scale (it reads the raw resid_mid). Returns the config and, per input_norm,
    the run directories and the exported set."""
    root = tmp_path_factory.mktemp("set")
    raw = tiny_params(str(stories_model_dir))
    raw["extract"]["layers"] = list(range(N_LAYERS))
    entry = raw.pop("dictionaries")["tc"]
    shared = {k: entry[k] for k in ("dict_size", "group_sizes", "top_k", "lr", "batch_size")}
    shared.update(save_every=60, skip_connection=True)
    raw["transcoder_set"] = {
        "name": "tcs",
        "layers": list(range(N_LAYERS)),
        "steps": 60,
        "dictionary": {**shared, "input_norm": "token"},
    }
    raw["dictionaries"] = {
        f"global-L{i}": {**shared, "layer": i, "steps": 60, "input_norm": "global"} for i in range(N_LAYERS)
    }
    cfg = parse_params(raw, data_root=root / "data", results_root=root / "results")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))  # for the CLI, run in root
    pipeline.prepare_model(cfg)
    pipeline.extract(cfg)
    pipeline.train(cfg, list(cfg.dictionaries))  # one pass over the store for both sets
    sets = {}
    for norm, prefix in (("token", "tcs"), ("global", "global")):
        run_dirs = [run_dir_of(cfg.dictionaries[f"{prefix}-L{i}"], cfg.results_root) for i in range(N_LAYERS)]
        sets[norm] = run_dirs, export_circuit_tracer(run_dirs, root / f"ct-{norm}", model_dir=cfg.model_dir)
    return cfg, sets


INPUT_HOOKS = {"token": "mlp.hook_in", "global": "hook_resid_mid"}


def circuit_tracer_check(model_dir, export_dir, out) -> dict:
    """Run tests/circuit_tracer_check.py in circuit-tracer's venv; its report (result.json in ``out``)."""
    result = subprocess.run(
        [
            str(CT_PYTHON),
            str(REPO / "tests" / "circuit_tracer_check.py"),
            str(model_dir),
            str(export_dir),
            str(out),
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())  # out: a Path (tmp_path)


def assert_circuit_tracer_runs_our_model(report: dict, model_dir, out) -> None:
    """circuit-tracer's replacement model (error term on) gives the logits of its own transformers'
    load of the model, and those are the logits of ours (mtc's transformers, which wrote the model
    directory: the RoPE settings included); its token nodes carry what the embedding adds to the
    residual stream (Gemma: the rows times sqrt(d_model))."""
    assert report["circuit_tracer"]["name"] == "circuit-tracer", report
    assert report["max_abs_logit_difference"] < 1e-4 * max(1.0, report["logit_scale"]), report
    assert report["max_abs_token_vector_difference"] <= 1e-5 * report["token_vector_scale"], report
    acts = load_file(str(out / "activations.safetensors"))
    with torch.no_grad():
        ours = models.load_hf_model(model_dir)(acts["ids"][None]).logits[0]
    torch.testing.assert_close(acts["logits"], ours, rtol=1e-4, atol=1e-4 * max(1.0, float(ours.abs().max())))


def test_each_set_has_every_layer_in_circuit_tracers_layout_read_at_its_input(transcoder_sets):
    _, sets = transcoder_sets
    for norm, (_, set_dir) in sets.items():
        config = yaml.safe_load((set_dir / SET_CONFIG).read_text())
        assert config["model_kind"] == "transcoder_set"
        assert (config["feature_input_hook"], config["feature_output_hook"]) == (
            INPUT_HOOKS[norm],
            "hook_mlp_out",
        )
        for i in range(N_LAYERS):
            tensors = load_file(str(set_dir / f"layer_{i}.safetensors"))
            assert tensors["W_enc"].shape == (256, 64) and tensors["W_skip"].shape == (64, 64)
            assert tensors["activation_function.threshold"].shape == (256,)


def test_a_set_missing_a_layer_or_mixing_inputs_is_refused(transcoder_sets, tmp_path):
    _, sets = transcoder_sets
    token_runs, global_runs = sets["token"][0], sets["global"][0]
    with pytest.raises(ConfigError, match="no transcoder for layer 0"):
        export_circuit_tracer(token_runs[1:], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"the set mixes input_norm \['global', 'token'\]"):
        export_circuit_tracer(global_runs[:1] + token_runs[1:], tmp_path / "b")


def test_only_a_set_that_reads_the_mlps_normalised_input_needs_the_model_directory(transcoder_sets, tmp_path):
    _, sets = transcoder_sets
    with pytest.raises(ConfigError, match="--model-dir: None is not a model directory"):
        export_circuit_tracer(sets["token"][0], tmp_path / "token")
    config = yaml.safe_load(
        (export_circuit_tracer(sets["global"][0], tmp_path / "global") / SET_CONFIG).read_text()
    )
    assert config["feature_input_hook"] == "hook_resid_mid"


needs_circuit_tracer = pytest.mark.skipif(
    not CT_PYTHON.exists() and os.environ.get("MTC_REQUIRE_CIRCUIT_TRACER") != "1",
    reason="no .venv-circuit-tracer: MTC_WITH_CIRCUIT_TRACER=1 bash scripts/setup.sh",
)


@needs_circuit_tracer
@pytest.mark.parametrize("norm", ["token", "global"])
def test_circuit_tracer_loads_the_set_and_reproduces_the_logits_and_our_reconstruction(
    transcoder_sets, norm, tmp_path
):
    cfg, sets = transcoder_sets
    run_dirs, set_dir = sets[norm]
    report = circuit_tracer_check(cfg.model_dir, set_dir, tmp_path)
    print("circuit-tracer:", report)  # which one ran: name, version, source, home page
    assert_circuit_tracer_runs_our_model(report, cfg.model_dir, tmp_path)

    # circuit-tracer's error term is mlp_out minus its reconstruction: the reconstruction is ours
    # (with input_norm: token, circuit-tracer reads gamma * x / rms(x) and the export undoes gamma)
    acts = load_file(str(tmp_path / "activations.safetensors"))
    for layer, run_dir in enumerate(run_dirs):
        ours = MatryoshkaBatchTopK.load(run_dir)
        x = acts["resid_mid"][layer, 1:]  # circuit-tracer zeroes the BOS position
        with torch.no_grad():
            theirs = acts["mlp_out"][layer, 1:] - acts["error"][layer, 1:]
            torch.testing.assert_close(theirs, ours(x), rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@needs_circuit_tracer
def test_mtc_attribute_writes_the_graph_for_the_viewer_and_its_picture(transcoder_sets, tmp_path):
    _, sets = transcoder_sets
    set_dir = sets["token"][1]
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


@pytest.fixture(scope="module")
def gemma3_set(tmp_path_factory):
    """A transcoder per layer (input_norm: global: circuit-tracer reads hook_resid_mid, the input of
    pre_feedforward_layernorm) of a tiny random Gemma 3 whose RoPE bases are not transformers'
    defaults, trained from one store and exported. Returns the config, the run directories and the
    exported set."""
    root = tmp_path_factory.mktemp("gemma3-set")
    raw = tiny_params(str(tiny_random_gemma3_dir(root / "random-gemma3")))
    raw["model"]["type"] = "tiny-gemma3"
    raw["extract"]["layers"] = [0, 1, 2]
    entry = raw.pop("dictionaries")["tc"]
    shared = {k: entry[k] for k in ("dict_size", "group_sizes", "top_k", "lr", "batch_size")}
    raw["dictionaries"] = {}
    raw["transcoder_set"] = {
        "name": "tcs",
        "layers": [0, 1, 2],
        "steps": 60,
        "dictionary": {**shared, "save_every": 60, "input_norm": "global"},
    }
    cfg = parse_params(raw, data_root=root / "data", results_root=root / "results")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))  # for the CLI, run in root
    pipeline.prepare_model(cfg)
    pipeline.extract(cfg)
    pipeline.train(cfg, list(cfg.dictionaries))
    run_dirs = [run_dir_of(cfg.dictionaries[f"tcs-L{i}"], cfg.results_root) for i in range(3)]
    return cfg, run_dirs, export_circuit_tracer(run_dirs, root / "ct", model_dir=cfg.model_dir)


@needs_circuit_tracer
def test_circuit_tracer_runs_a_gemma3_set_on_our_model_with_its_token_nodes_scaled(gemma3_set, tmp_path):
    """Gemma 3 in circuit-tracer's nnsight mapping: its transformers 4.57 reads the RoPE bases that
    transformers 5 wrote (``rope_parameters``), its token nodes carry the embedding scaled by
    sqrt(d_model), and its reconstruction at hook_resid_mid -> hook_mlp_out (after the
    post-feedforward norm) is ours at every layer; mtc attribute draws a graph."""
    cfg, run_dirs, set_dir = gemma3_set
    report = circuit_tracer_check(cfg.model_dir, set_dir, tmp_path)
    print("circuit-tracer on a tiny Gemma 3:", report)
    assert_circuit_tracer_runs_our_model(report, cfg.model_dir, tmp_path)
    acts = load_file(str(tmp_path / "activations.safetensors"))
    for layer, run_dir in enumerate(run_dirs):
        ours = MatryoshkaBatchTopK.load(run_dir)
        with torch.no_grad():
            theirs = acts["mlp_out"][layer, 1:] - acts["error"][layer, 1:]  # BOS zeroed
            expected = ours(acts["resid_mid"][layer, 1:])
        torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))

    out = tmp_path / "graph"
    root = set_dir.parent
    result = mtc("attribute", str(set_dir), PROMPT, "--out", str(out), "--python", str(CT_PYTHON), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["active_features"] > 0 and summary["pruned_nodes"]["logit"] >= 1, summary


def test_mtc_attribute_without_a_set_fails_in_one_line(transcoder_sets, tmp_path):
    _, sets = transcoder_sets
    set_dir = sets["token"][1]
    result = mtc("attribute", str(tmp_path), "a prompt", cwd=set_dir.parent)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a transcoder set (no config.yaml); write one with "
        "mtc export RUN_DIR... OUT --format circuit-tracer"
    ]


@pytest.mark.parametrize(
    "prompt, slug",
    [
        ("--help", "graph"),
        ("--out=elsewhere", "graph"),
        ("--max-feature-nodes=3", "graph"),
        ("-h", "graph"),
        ("a prompt", "-s"),
    ],
)
def test_a_prompt_or_slug_that_looks_like_an_option_reaches_the_graph_helper_as_itself(
    tmp_path, monkeypatch, prompt, slug
):
    """``mtc attribute`` starts external/circuit_tracer_graph.py; here its command line is run by the
    helper's own main (argument parsing as it is) in this process, without circuit-tracer."""
    import importlib.util
    import sys

    from mtc import circuit_tracer

    spec = importlib.util.spec_from_file_location("circuit_tracer_graph", circuit_tracer.GRAPH_SCRIPT)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    seen = {}

    def graph(replacement, prompt, out, slug, max_feature_nodes):
        seen.update(prompt=prompt, out=out, slug=slug)
        return {"prompt": prompt}

    monkeypatch.setattr(helper, "load_replacement", lambda model_dir, set_dir, work: (None, None))
    monkeypatch.setattr(helper, "attribution_graph", graph)

    def run_helper(command, **_):
        assert command[1] == str(circuit_tracer.GRAPH_SCRIPT)
        helper.main(command[2:])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(circuit_tracer.subprocess, "run", run_helper)
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / SET_CONFIG).write_text("model_kind: transcoder_set\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "graph"
    summary = circuit_tracer.attribute(
        tmp_path / "set", prompt, out, tmp_path / "model", python=sys.executable, slug=slug
    )
    assert seen == {"prompt": prompt, "out": out, "slug": slug} and summary == {"prompt": prompt}


def _graph_helper():
    """external/circuit_tracer_graph.py as a module of this process (it imports no circuit-tracer
    at the top)."""
    import importlib.util

    from mtc import circuit_tracer

    spec = importlib.util.spec_from_file_location("circuit_tracer_graph", circuit_tracer.GRAPH_SCRIPT)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    return helper


def test_the_model_copy_for_circuit_tracer_names_the_rope_settings_as_transformers_4_57_reads_them():
    """transformers 5's ``rope_parameters`` (SmolLM2's base 100,000; Gemma 3's per layer type) in
    4.57's keys, which would otherwise take its defaults (10,000 for Llama) without a word."""
    rope = _graph_helper().rope_config_for_4_57
    llama = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert rope(llama) == {"model_type": "llama", "rope_theta": 100000.0}
    gemma3 = {
        "rope_parameters": {
            "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        }
    }
    assert rope(gemma3) == {
        "rope_local_base_freq": 1e4,
        "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    assert rope({"rope_theta": 5.0}) == {"rope_theta": 5.0}  # written by 4.57: as it is
    sliding_scaled = {"sliding_attention": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}
    with pytest.raises(SystemExit, match="sliding-window RoPE"):
        rope({"rope_parameters": sliding_scaled})
    with pytest.raises(SystemExit, match="no transformers 4.57 form"):
        rope({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "mystery": 1}})


def _finished_transcoder_run(run_dir, layer: int, group_sizes: list[int]):
    """A finished (untrained) resid_mid -> mlp_out transcoder run of ``layer``: enough for an export."""
    from mtc.results import write_config

    d = MatryoshkaBatchTopK(8, 8, group_sizes, 2, kind="transcoder", input_norm="global")
    d.save(run_dir)
    record = dict(name=f"L{layer}", kind="transcoder", source_site="resid_mid", target_site="mlp_out")
    write_config(run_dir, {**record, "source_layer": layer, "target_layer": layer}, completed=True)
    return run_dir


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_set_of_mismatched_sizes_is_refused_before_an_earlier_set_in_its_place_is_touched(tmp_path):
    runs = [_finished_transcoder_run(tmp_path / f"L{i}", i, [4, 4]) for i in range(3)]
    odd = _finished_transcoder_run(tmp_path / "L1-wide", 1, [4, 12])
    out = export_circuit_tracer(runs, tmp_path / "set")
    before = _files(out)
    with pytest.raises(ConfigError, match=r"the set's dictionaries have sizes \[8, 16\]"):
        export_circuit_tracer([runs[0], odd, runs[2]], out)
    assert _files(out) == before, "the earlier set is whole"


def test_a_set_replaces_an_earlier_set_whole_and_nothing_else(tmp_path):
    runs = [_finished_transcoder_run(tmp_path / f"L{i}", i, [4, 4]) for i in range(3)]
    out = export_circuit_tracer(runs, tmp_path / "set")
    export_circuit_tracer(runs[:2], out, n_groups=1)
    assert sorted(_files(out)) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    assert yaml.safe_load((out / SET_CONFIG).read_text())["transcoders"] == [
        str(out / "layer_0.safetensors"),
        str(out / "layer_1.safetensors"),
    ]
    assert load_file(str(out / "layer_1.safetensors"))["b_enc"].shape == (4,)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="a directory holding other files"):
        export_circuit_tracer(runs, notes)
    assert _files(notes) == {"todo.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L0", "L1", "L2", "notes", "set"], "no temporaries"


# ---------------------------------------------------------------------------- cross-layer transcoders
def _finished_clt_run(run_dir, input_norm: str, n_layers: int = 3, d_model: int = 8, seed: int = 0):
    """A finished (untrained) MatryoshkaCLT run with random biases, means, scales and thresholds
    (layer 0's negative, which circuit-tracer's encoder, with no ReLU of its own, must not see)."""
    from mtc.clt import MatryoshkaCLT
    from mtc.results import write_config

    clt = MatryoshkaCLT(d_model, n_layers, [4, 12], 3, input_norm=input_norm, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in clt.b_enc:
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=gen))
        clt.source_mean.copy_(0.2 * torch.randn(clt.source_mean.shape, generator=gen))
        clt.source_scale.copy_(torch.rand(n_layers, generator=gen) + 0.5)
        clt.target_scale.copy_(torch.rand(n_layers, generator=gen) + 0.5)
        clt.threshold.copy_(torch.rand(n_layers, generator=gen) * 0.5)
        clt.threshold[0] = -0.1
    clt.save(run_dir)
    write_config(run_dir, {"name": "clt", "kind": "clt"}, completed=True)
    return run_dir


def _llama_norms_dir(path, n_layers: int = 3, d_model: int = 8):
    """A model directory with just what the export reads: the config and each MLP's RMSNorm weight."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": n_layers})
    )
    gen = torch.Generator().manual_seed(7)
    norms = {
        f"model.layers.{i}.post_attention_layernorm.weight": torch.rand(d_model, generator=gen) + 0.5
        for i in range(n_layers)
    }
    save_file(norms, str(path / "model.safetensors"))
    return path, [norms[f"model.layers.{i}.post_attention_layernorm.weight"] for i in range(n_layers)]


def _circuit_tracer_clt_by_hand(clt_dir, hook_in_BLD):
    """What circuit-tracer's CrossLayerTranscoder computes from its input hook's activations, read
    from the exported files: ``pre * (pre > threshold)``, then every layer's decoders summed."""
    n_layers = hook_in_BLD.shape[1]
    out = torch.stack(
        [load_file(str(clt_dir / f"W_enc_{j}.safetensors"))[f"b_dec_{j}"] for j in range(n_layers)]
    )
    out = out.expand_as(hook_in_BLD).clone()
    for i in range(n_layers):
        enc = load_file(str(clt_dir / f"W_enc_{i}.safetensors"))
        W_dec = load_file(str(clt_dir / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]  # [F, L - i, d]
        pre = hook_in_BLD[:, i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        codes = pre * (pre > enc[f"threshold_{i}"])
        out[:, i:] += torch.einsum("bf,ftd->btd", codes, W_dec)
    return out


@pytest.mark.parametrize("input_norm", ["token", "global"])
@pytest.mark.parametrize("n_groups", [None, 1])
def test_an_exported_clt_applied_to_circuit_tracers_input_hook_is_the_clt_on_raw_resid_mid(
    tmp_path, input_norm, n_groups
):
    from mtc.clt import MatryoshkaCLT

    run_dir = _finished_clt_run(tmp_path / "run", input_norm)
    model_dir, gammas = _llama_norms_dir(tmp_path / "model")
    out = export_circuit_tracer([run_dir], tmp_path / "ct", n_groups=n_groups, model_dir=model_dir)
    config = yaml.safe_load((out / SET_CONFIG).read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == (
        INPUT_HOOKS[input_norm],
        "hook_mlp_out",
    )
    n_features = 4 if n_groups == 1 else 16
    assert load_file(str(out / "W_dec_1.safetensors"))["W_dec_1"].shape == (n_features, 2, 8)
    assert load_file(str(out / "W_enc_2.safetensors"))["threshold_2"].shape == (n_features,)

    clt = MatryoshkaCLT.load(run_dir)
    x_BLD = 3 * torch.randn(64, 3, 8, generator=torch.Generator().manual_seed(3))
    if input_norm == "token":  # mlp.hook_in: the MLP's RMSNorm, gamma * x / rms(x)
        rms = x_BLD.pow(2).mean(dim=-1, keepdim=True).sqrt()
        hook_in = torch.stack(gammas)[None] * x_BLD / rms
    else:  # hook_resid_mid: the raw residual stream
        hook_in = x_BLD
    with torch.no_grad():
        ours = clt(x_BLD, n_groups)
    theirs = _circuit_tracer_clt_by_hand(out, hook_in)
    assert ours.abs().max() > 1 and (ours != clt.output_bias()).any(), "features fire"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_clt_that_does_not_cover_the_models_layers_is_refused(tmp_path):
    from mtc.clt import MatryoshkaCLT
    from mtc.results import write_config

    run_dir = _finished_clt_run(tmp_path / "run", "global", n_layers=2)
    model_dir, _ = _llama_norms_dir(tmp_path / "model", n_layers=3)
    with pytest.raises(ConfigError, match="a CLT over 2 layers; the model in .* has 3"):
        export_circuit_tracer([run_dir], tmp_path / "ct", model_dir=model_dir)
    late = tmp_path / "late"
    MatryoshkaCLT(8, 3, [4, 12], 3, input_norm="global", first_layer=1).save(late)
    write_config(late, {"name": "late"}, completed=True)
    with pytest.raises(ConfigError, match="a CLT from layer 1; circuit-tracer needs every layer from 0"):
        export_circuit_tracer([late], tmp_path / "ct")
    with pytest.raises(ConfigError, match="exported alone; got 2 run directories"):
        export_circuit_tracer([run_dir, late], tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_a_clt_export_replaces_an_earlier_export_of_mtcs_whole_and_nothing_else(tmp_path):
    run_dir = _finished_clt_run(tmp_path / "run", "global")
    out = export_circuit_tracer([run_dir], tmp_path / "ct")
    export_circuit_tracer([run_dir], out, n_groups=1)
    assert set(_files(out)) == {"config.yaml"} | {
        f"W_{kind}_{i}.safetensors" for kind in ("dec", "enc") for i in range(3)
    }
    assert load_file(str(out / "W_enc_0.safetensors"))["b_enc_0"].shape == (4,)
    sets = [_finished_transcoder_run(tmp_path / f"L{i}", i, [4, 4]) for i in range(3)]
    export_circuit_tracer(sets, out)  # a set may replace the CLT in its place, and back
    assert sorted(_files(out)) == [
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
        "layer_2.safetensors",
    ]
    export_circuit_tracer([run_dir], out)
    foreign = tmp_path / "foreign"  # circuit-tracer's own CLT layout, not written by mtc
    foreign.mkdir()
    (foreign / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    (foreign / "W_enc_0.safetensors").write_bytes(b"theirs")
    with pytest.raises(ConfigError, match="a directory holding other files"):
        export_circuit_tracer([run_dir], foreign)
    assert _files(foreign) == {
        "config.yaml": b"model_kind: cross_layer_transcoder\n",
        "W_enc_0.safetensors": b"theirs",
    }


def _stories_resid_mid(model_dir, text: str) -> torch.Tensor:
    """Raw resid_mid [T, L, d] of every layer on ``text`` (what the MLPs' norms read)."""
    from mtc.models import load_hf_model, load_tokenizer

    model, tokenizer = load_hf_model(model_dir), load_tokenizer(model_dir)
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i: seen.__setitem__(i, a[0][0].detach().clone())
            )
        )
    with torch.no_grad():
        model(tokenizer(text, return_tensors="pt").input_ids)
    for hook in hooks:
        hook.remove()
    return torch.stack([seen[i] for i in range(len(seen))], dim=1)


@pytest.fixture(scope="module")
def stories_clts(tmp_path_factory, stories_model_dir):
    """A random (untrained) CLT over every layer of stories260K per input_norm, its means, scales
    and thresholds set from the model's own activations (about 8 codes per token and layer), saved
    as a finished run and exported. Returns, per input_norm, the run and the export."""
    from mtc.clt import MatryoshkaCLT
    from mtc.results import write_config

    root = tmp_path_factory.mktemp("clt")
    text = "One day, a little boy named Tim went to the park with his mom. They saw a big dog. " * 4
    x_TLD = _stories_resid_mid(stories_model_dir, text)
    exports = {}
    for norm in ("token", "global"):
        clt = MatryoshkaCLT(64, N_LAYERS, [32, 96], 8, input_norm=norm, seed=1)
        with torch.no_grad():
            clt.set_scales(x_TLD.norm(dim=-1).mean(0).tolist(), [8.0 * (i + 1) for i in range(N_LAYERS)])
            clt.init_means(x_TLD, torch.zeros_like(x_TLD))
            clt.b_dec.normal_(generator=torch.Generator().manual_seed(2))
            clt.calibrate_threshold([x_TLD])
        run_dir = root / f"run-{norm}"
        clt.save(run_dir)
        write_config(run_dir, {"name": f"clt-{norm}"}, completed=True)
        exports[norm] = (
            run_dir,
            export_circuit_tracer([run_dir], root / f"ct-{norm}", model_dir=stories_model_dir),
        )
    return exports


@needs_circuit_tracer
@pytest.mark.slow
@pytest.mark.parametrize("norm", ["token", "global"])
def test_circuit_tracer_loads_the_clt_and_reproduces_the_logits_and_our_reconstruction(
    stories_model_dir, stories_clts, norm, tmp_path
):
    from mtc.clt import MatryoshkaCLT

    run_dir, clt_dir = stories_clts[norm]
    report = circuit_tracer_check(stories_model_dir, clt_dir, tmp_path)
    print("circuit-tracer:", report)
    assert report["max_abs_logit_difference"] < 1e-4 * max(1.0, report["logit_scale"]), report

    # the error term is mlp_out minus circuit-tracer's reconstruction: that is ours, at every layer
    acts = load_file(str(tmp_path / "activations.safetensors"))
    clt = MatryoshkaCLT.load(run_dir)
    x_TLD = acts["resid_mid"][:, 1:].transpose(0, 1)  # circuit-tracer zeroes the BOS position
    with torch.no_grad():
        ours = clt(x_TLD)
        codes = torch.stack([clt.encode(i, x_TLD[:, i]) for i in range(N_LAYERS)])
    assert 2 < float((codes > 0).sum(-1).float().mean()) < 32, "features fire, sparsely"
    theirs = (acts["mlp_out"][:, 1:] - acts["error"][:, 1:]).transpose(0, 1)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@needs_circuit_tracer
@pytest.mark.slow
def test_graph_scores_of_a_clt_over_a_prompt_file(stories_model_dir, stories_clts, tmp_path):
    from mtc.circuit_tracer import graph_scores

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nOnce upon a time, there was a\n\nThe little girl was very\n")
    out = tmp_path / "scores" / "clt.json"
    scores = graph_scores(stories_clts["token"][1], stories_model_dir, prompts, out, CT_PYTHON)
    print("graph scores:", scores["mean"])
    assert json.loads(out.read_text()) == scores
    assert [p["prompt"] for p in scores["prompts"]] == [
        "Once upon a time, there was a",
        "The little girl was very",
    ]
    for p in scores["prompts"]:
        assert 0 < p["replacement_score"] < 1 and 0 < p["completeness_score"] < 1, p
        assert p["pruned_feature_nodes"] > 0 and 0 < p["pruned_error_nodes"] <= N_LAYERS * p["n_tokens"], p
    for key, mean in scores["mean"].items():
        assert mean == pytest.approx(sum(p[key] for p in scores["prompts"]) / 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["clt.json"], "no temporaries"
    graph_scores(stories_clts["token"][1], stories_model_dir, prompts, out, CT_PYTHON)  # its own: replaced


def test_graph_scores_needs_an_export_and_replaces_only_its_own_file(stories_model_dir, tmp_path):
    from mtc.circuit_tracer import GRAPH_PROMPTS, graph_scores

    prompts = [line for line in GRAPH_PROMPTS.read_text().splitlines() if line and not line.startswith("#")]
    assert len(prompts) >= 20 and "The capital of France is" in prompts
    with pytest.raises(ConfigError, match="not a circuit-tracer export"):
        graph_scores(tmp_path, stories_model_dir, GRAPH_PROMPTS, tmp_path / "s.json")
    run_dir = _finished_clt_run(tmp_path / "run", "global")
    export = export_circuit_tracer([run_dir], tmp_path / "ct")
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(ConfigError, match="a file mtc graph-scores did not write is there"):
        graph_scores(export, stories_model_dir, GRAPH_PROMPTS, mine)
    assert mine.read_text() == '{"mine": 1}'
