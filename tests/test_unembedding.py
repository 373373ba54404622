"""The unembedding read from safetensors ranks tokens as the model's own readout does."""

from __future__ import annotations

import pytest
import torch

from mtc.models import ModelError
from mtc.unembedding import load_unembedding
from tests.helpers import tiny_hf_models


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
