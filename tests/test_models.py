"""Hook names per architecture: the residual identities hold on tiny random models."""

from __future__ import annotations

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
