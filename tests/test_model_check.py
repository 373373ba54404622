"""The wrapper check: extraction refuses activations that are not the model's own."""

from __future__ import annotations

import pytest
import torch

from mtc import model_check, models
from mtc.config import ConfigError
from mtc.models import Architecture, ModelError
from tests.helpers import SMALL_DECODER as SMALL


def tiny(name: str):
    import transformers as t

    from tests.helpers import tiny_hf_models

    torch.manual_seed(0)
    built = {
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**SMALL, pad_token_id=0)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**SMALL)),
        "opt": lambda: t.OPTForCausalLM(
            t.OPTConfig(
                num_hidden_layers=3,
                hidden_size=32,
                num_attention_heads=4,
                ffn_dim=64,
                vocab_size=512,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        ),
        "codegen": lambda: t.CodeGenForCausalLM(
            t.CodeGenConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=512, n_positions=64, rotary_dim=4)
        ),
    }
    return built[name]() if name in built else tiny_hf_models()[name]


def saved(name: str, tmp_path):
    """The tiny model saved as a model directory, with a tokenizer (the bridge loads one)."""
    from tests.helpers import tiny_random_llama_dir

    model_dir = tmp_path / name
    tiny(name).save_pretrained(model_dir)
    tiny_random_llama_dir(tmp_path / "tok")
    for f in (tmp_path / "tok").glob("*token*"):
        f.rename(model_dir / f.name)
    return model_dir


def check(model_dir, wanted, perturb=None):
    from transformers import AutoConfig

    arch = Architecture.from_hf_config(AutoConfig.from_pretrained(model_dir))
    hf = models.load_hf_model(model_dir)
    ids = torch.randint(3, 98, (2, 16), generator=torch.Generator().manual_seed(0))
    if perturb is not None:  # a wrapper that gets the model wrong: edited after the reference ran
        real = model_check.load_bridge

        def wrong_bridge(*args, **kwargs):
            bridge = real(*args, **kwargs)
            perturb(kwargs["hf_model"])
            return bridge

        model_check.load_bridge = wrong_bridge
    try:
        return model_check.checked_bridge(model_dir, hf, arch, ids, wanted, "float32", torch.device("cpu"))[1]
    finally:
        if perturb is not None:
            model_check.load_bridge = real


SEQUENTIAL = ["gpt2", "llama", "gemma2", "qwen2", "mistral", "phi3", "opt"]


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_the_wrapper_gives_the_models_own_logits_and_sites(name, tmp_path):
    errors = check(
        saved(name, tmp_path), [(1, s) for s in ("resid_pre", "resid_mid", "mlp_out", "resid_post")]
    )
    assert set(errors) == {"logits", "L1/resid_pre", "L1/resid_mid", "L1/mlp_out", "L1/resid_post"}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("name", ["neox", "cohere"])
def test_parallel_attention_is_found_from_the_structure_and_resid_mid_refused(name, tmp_path):
    model_dir = saved(name, tmp_path)
    with pytest.raises(
        ConfigError, match=r"extract.sites: resid_mid does not exist in \w+ \(its MLP does not read"
    ):
        check(model_dir, [(1, "resid_mid")])


def test_a_perturbed_rotary_base_in_the_wrapper_stops_extraction_in_one_line(tmp_path):
    def bend_rotary(hf):
        hf.model.rotary_emb.inv_freq *= 1.02

    with pytest.raises(
        ModelError, match=r"llama: transformer_lens's wrapper disagrees .* at logits \(relative error"
    ) as e:
        check(saved("llama", tmp_path), [(1, "resid_pre")], perturb=bend_rotary)
    assert "\n" not in str(e.value)


def test_cohere_whose_wrapper_moves_the_logits_is_refused_even_for_resid_pre(tmp_path):
    """transformer_lens wraps Cohere with its own rotary; its outputs are not the model's."""
    with pytest.raises(ModelError, match=r"cohere: transformer_lens's wrapper disagrees .* at logits"):
        check(saved("cohere", tmp_path), [(1, "resid_pre")])


def test_an_architecture_the_wrapper_cannot_run_is_one_line(tmp_path):
    with pytest.raises(
        ModelError, match="codegen: transformer_lens's TransformerBridge cannot run this model"
    ):
        check(saved("codegen", tmp_path), [(1, "resid_pre")])
