"""Logits in pieces (``mtc.readout``): the hidden state the unembedding reads, unembedded a few rows
at a time, gives the model's own logits, soft cap and logit scales included; a model whose forward
does something else to its logits is refused in one line."""

from __future__ import annotations

import pytest
import torch

from mtc.models import ModelError
from mtc.readout import Readout, rows_per_piece, unembedding_reads
from tests.helpers import SMALL_DECODER, tiny_hf_models


def tiny(family: str):
    import transformers as t

    torch.manual_seed(0)
    if family == "gemma2-softcap":  # Gemma-2's final soft cap (Gemma 3 270M has none)
        return t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL_DECODER, head_dim=8, final_logit_softcapping=0.5))
    if family == "cohere":  # logits times logit_scale
        return t.CohereForCausalLM(t.CohereConfig(**SMALL_DECODER, logit_scale=0.25))
    if family == "granite":  # logits divided by logits_scaling
        return t.GraniteForCausalLM(t.GraniteConfig(**SMALL_DECODER, logits_scaling=4.0))
    return tiny_hf_models()[family]


IDS = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gemma2-softcap", "cohere", "granite"])
@torch.no_grad()
def test_the_hidden_state_unembedded_in_pieces_gives_the_forwards_own_logits(family):
    model = tiny(family).eval()
    full = model(IDS).logits.reshape(48, -1)
    positions = torch.tensor([0, 7, 16, 47])
    with unembedding_reads(model, positions) as seen:
        some = model(IDS).logits
    assert some.shape == (1, 4, 512), "the forward unembedded only the positions asked for"
    torch.testing.assert_close(some[0], full[positions], rtol=1e-6, atol=1e-6)
    hidden = seen["hidden"].reshape(48, -1)
    readout = Readout(model)
    readout.check(hidden[positions], some[0])
    rows, tokens = readout.tiles(48, budget=5 * 512)
    assert [p.stop - p.start for p in rows] == [5] * 9 + [3] and tokens == [slice(0, 512)]
    torch.testing.assert_close(torch.cat([readout(hidden[p]) for p in rows]), full, rtol=1e-6, atol=1e-6)
    by_tiles = torch.cat(
        [readout(hidden, t) for t in [slice(0, 100), slice(100, 500), slice(500, 512)]], dim=1
    )
    torch.testing.assert_close(by_tiles, full, rtol=1e-6, atol=1e-6)


def test_a_model_whose_forward_changes_its_logits_otherwise_is_refused_in_one_line():
    model = tiny("gemma2-softcap").eval()
    with torch.no_grad(), unembedding_reads(model) as seen:
        last = model(IDS).logits[0]
    readout = Readout(model)
    readout.softcap = None  # as if mtc did not know this model's soft cap
    with pytest.raises(ModelError, match=r"gemma2: its logits from the final hidden state .* differ") as e:
        readout.check(seen["hidden"][:, -1], last)
    assert "\n" not in str(e.value)


def test_a_piece_holds_as_many_rows_as_the_budget_allows_and_at_least_one():
    assert rows_per_piece(262_144) == 64 and rows_per_piece(49_152) == 341 and rows_per_piece(512) == 32_768
    assert rows_per_piece(1 << 25) == 1


def test_a_large_vocabulary_is_read_in_tiles_of_8192_tokens_by_2048_rows():
    class Big(torch.nn.Module):  # Gemma 3's unembedding, as shapes only
        config = type("Config", (), {"model_type": "gemma3_text"})()

        def get_output_embeddings(self):
            return torch.nn.Linear(640, 262_144, bias=False, device="meta")

    rows, tokens = Readout(Big()).tiles(3000)
    assert rows == [slice(0, 2048), slice(2048, 3000)]
    assert len(tokens) == 32 and tokens[-1] == slice(253_952, 262_144)


def test_a_model_that_unembeds_flattened_rows_is_refused_in_one_line():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = torch.nn.Linear(8, 16)

        def get_output_embeddings(self):
            return self.lm

        def forward(self, h):
            return self.lm(h.reshape(-1, 8))

    model = Flat()
    with pytest.raises(ModelError, match=r"Flat: its unembedding was not given the hidden state \[batch"):
        with unembedding_reads(model):
            model(torch.zeros(2, 3, 8))
