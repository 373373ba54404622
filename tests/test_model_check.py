"""The wrapper check: extraction refuses activations that are not the model's own."""

from __future__ import annotations

import pytest
import torch

from mtc import model_check, models, readout
from mtc.config import ConfigError
from mtc.models import Architecture, ModelError
from tests.helpers import SMALL_DECODER as SMALL
from tests.helpers import LargestLastDim


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


def check(model_dir, wanted, perturb=None, batch=2):
    from transformers import AutoConfig

    arch = Architecture.from_hf_config(AutoConfig.from_pretrained(model_dir))
    hf = models.load_hf_model(model_dir)
    ids = torch.randint(3, 98, (batch, 16), generator=torch.Generator().manual_seed(0))
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


def test_the_reference_gives_the_forwards_own_logits_at_the_positions_asked_and_the_hidden_state_everywhere(
    tmp_path,
):
    hf = models.load_hf_model(saved("llama", tmp_path))
    ids = torch.randint(3, 98, (2, 16), generator=torch.Generator().manual_seed(0))
    structure = model_check.Structure.of(hf, 3)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
    for positions in (torch.arange(32), torch.tensor([0, 5, 17, 31])):
        logits, hidden, sites = model_check.reference_sites(hf, structure, ids, [(1, "resid_pre")], positions)
        torch.testing.assert_close(logits, out.logits.reshape(32, -1)[positions], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hidden, out.hidden_states[-1], rtol=0, atol=0)
        torch.testing.assert_close(sites[1, "resid_pre"], out.hidden_states[1], rtol=0, atol=0)


def test_logits_fitting_the_budget_are_compared_at_every_position_else_spread_over_the_batch():
    assert model_check.logit_positions(32, 512).tolist() == list(range(32))
    assert model_check.logit_positions(2048, 262_144).tolist()[:3] == [0, 32, 65]
    assert len(model_check.logit_positions(2048, 262_144)) == readout.LOGITS_BUDGET // 262_144 == 64
    assert model_check.logit_positions(2048, 262_144)[-1] == 2047
    assert model_check.logit_positions(32, 512, budget=4 * 512).tolist() == [0, 10, 21, 31]


def test_with_few_positions_logits_compared_a_wrong_hidden_state_elsewhere_is_still_refused(
    tmp_path, monkeypatch
):
    """The logits of four of the batch's 64 positions fit the budget (0, 21, 42, 63); the wrapper's
    final norm is wrong at position 5 only, which none of those logits see: the hidden state,
    compared everywhere, does. No tensor as large as the batch's logits is made."""
    monkeypatch.setattr(readout, "LOGITS_BUDGET", 4 * 512)

    def wrong_at_5(hf):
        def hook(module, args, out):
            out = out.clone()
            out[0, 5] += 1
            return out

        hf.model.norm.register_forward_hook(hook)

    model_dir = saved("llama", tmp_path)
    with LargestLastDim(512) as watch:
        errors = check(model_dir, [(1, "resid_pre")], batch=4)
    assert max(errors.values()) < 1e-5, errors
    assert watch.largest <= max(4 * 512, 512 * 32) < 4 * 16 * 512, "the unembedding [d, vocab], no logits"
    with pytest.raises(ModelError, match=r"llama: transformer_lens's wrapper disagrees .* at final_hidden"):
        check(model_dir, [(1, "resid_pre")], perturb=wrong_at_5, batch=4)
