"""The unembedding read from safetensors ranks tokens as the model's own readout does."""

from __future__ import annotations

import pytest
import torch

from mtc import mine, unembedding
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.models import ModelError
from mtc.unembedding import load_unembedding
from tests.helpers import LargestLastDim, tiny_hf_models


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "neox"])
def test_scores_are_the_models_logits_up_to_the_final_norms_scale(family, tmp_path):
    model = tiny_hf_models()[family].eval()
    model.save_pretrained(tmp_path)
    u = load_unembedding(tmp_path)
    norm = model.get_submodule(u.norm)
    h = torch.randn(5, 32) * 4
    with torch.no_grad():
        logits = model.get_output_embeddings()(norm(h))
    centred = h - h.mean(dim=-1, keepdim=True) if u.centre else h
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
    scale = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    expected = logits - (
        norm.bias @ model.get_output_embeddings().weight.T if getattr(norm, "bias", None) is not None else 0
    )
    torch.testing.assert_close(u.scores(h) / scale, expected, atol=1e-5, rtol=1e-4)
    assert u.centre == (family in ("gpt2", "neox")), "LayerNorm centres, RMSNorm does not"


def test_the_default_models_tied_unembedding_is_read_without_loading_the_model(stories_model_dir):
    u = load_unembedding(stories_model_dir)
    assert u.W_U.shape == (64, 512) and u.norm == "model.norm" and not u.centre


def test_a_directory_without_a_model_is_named(tmp_path):
    with pytest.raises(ModelError, match="no model here"):
        load_unembedding(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_read_seven_rows_at_a_time_the_unembedding_is_the_whole_matrix_times_the_norms_factor(
    family, tmp_path, monkeypatch
):
    model = tiny_hf_models()[family].eval()
    norm = model.get_submodule("transformer.ln_f" if family == "gpt2" else "model.norm")
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(unembedding, "READ_ROWS", 7)
    u = load_unembedding(tmp_path)
    g = norm.weight.detach() + (1 if family == "gemma2" else 0)  # Gemma's RMSNorm multiplies by 1 + weight
    assert torch.equal(u.W_U, g[:, None] * model.get_output_embeddings().weight.detach().T)


@pytest.mark.parametrize("vocab_piece", [512, 51])
def test_logit_effects_scored_a_few_features_and_tokens_at_a_time_are_those_of_all_at_once(
    vocab_piece, tmp_path, monkeypatch
):
    """Three features against the whole vocabulary at a time, or 30 against 51 tokens (the last
    piece two tokens, fewer than the ten kept): the top tokens of every feature, as if scored at once."""
    tiny_hf_models()["llama"].save_pretrained(tmp_path)
    u = load_unembedding(tmp_path)
    dictionary = MatryoshkaBatchTopK(32, 32, [16, 48], top_k=4, seed=0)
    monkeypatch.setattr(mine, "VOCAB_PIECE", vocab_piece)
    with LargestLastDim(vocab_piece) as watch:
        got = mine.logit_effects(dictionary, u, 10, logits_budget=3 * 512)
    scores = u.scores((dictionary.W_dec / dictionary.target_scale).detach())  # [64, 512] at once
    for name, largest in (("promoted", True), ("suppressed", False)):
        expected = scores.topk(10, dim=1, largest=largest)
        assert torch.equal(got[f"{name}_ids"], expected.indices)
        torch.testing.assert_close(got[f"{name}_scores"], expected.values, rtol=1e-6, atol=1e-7)
    rows = 3 * 512 // vocab_piece  # features at a time; the largest tensor may be W_U's [32, piece] slice
    assert watch.largest == max(rows, 32) * vocab_piece < 64 * 512, "never all features' scores at once"
