"""The spliced loss where its answer is known exactly, on the real stories260K model: a dictionary
that reproduces its target leaves the loss unchanged (CE recovered 1, KL 0), one that outputs zeros
is the zero ablation (CE recovered 0), and a splice changes the residual stream, not only a read of it."""

from __future__ import annotations

import pytest
import torch

from mtc import pipeline, readout
from mtc.config import ConfigError
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.evaluate import heldout_windows
from mtc.models import hook_name, load_bridge
from mtc.spliced import Replacements, bos_masks, check_splice_order, splice_hooks, spliced_loss
from tests.helpers import LargestLastDim

LAYER = 2
RESID_MID, MLP_OUT = (LAYER, "resid_mid"), (LAYER, "mlp_out")


@pytest.fixture(scope="module")
def model(tiny_pipeline):
    store = pipeline.open_store(tiny_pipeline)
    bridge = load_bridge(tiny_pipeline.model_dir)
    (y,), _ = store.read([MLP_OUT], store.n_train_rows, store.n_rows)
    return bridge, store, heldout_windows(store, 16), y.mean(dim=0)


def splice(model, dictionary, source, target, **kwargs):
    bridge, store, windows, mean = model
    return spliced_loss(
        bridge,
        windows,
        Replacements(dictionary, mean),
        source,
        target,
        batch_size=16,
        skip_bos=store.skip_bos,
        **kwargs,
    )


@torch.no_grad()
def full_logits_loss(model, dictionary, source, target, batch_size=16):
    """The spliced loss as mtc computed it before it read the logits in pieces: each forward pass's
    whole [B, T, vocab] logits. Returns summed CE per replacement ("clean" too), summed KL, tokens."""
    bridge, store, windows, mean = model
    replacements = Replacements(dictionary, mean)
    ce, kl, n = {}, {}, 0
    for tokens in windows.split(batch_size):
        keep_BT, scored_BT = bos_masks(tokens, store.skip_bos)
        targets_N = tokens[:, 1:][scored_BT]
        seen = {}

        def capture(x, hook):
            seen["source"] = x
            return x

        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name(source[1], source[0]), capture)])
        clean = torch.log_softmax(logits[:, :-1][scored_BT].float(), dim=-1)
        ce["clean"] = ce.get("clean", 0.0) + float(-clean.gather(1, targets_N[:, None]).sum())
        n += targets_N.numel()
        for name, value in replacements.build(seen["source"], dictionary.shape.d_out).items():
            logits = bridge.run_with_hooks(tokens, fwd_hooks=splice_hooks(target, value, keep_BT))
            logp = torch.log_softmax(logits[:, :-1][scored_BT].float(), dim=-1)
            c = float(-logp.gather(1, targets_N[:, None]).sum())
            k = float((clean.exp() * (clean - logp)).sum())
            ce[name], kl[name] = ce.get(name, 0.0) + c, kl.get(name, 0.0) + k
    return ce, kl, n


def identity_sae(d: int) -> MatryoshkaBatchTopK:
    """A real Matryoshka SAE whose two groups are the features +e_i and -e_i: the first prefix gives
    relu(x), the full dictionary relu(x) - relu(-x) = x exactly."""
    sae = MatryoshkaBatchTopK(d, d, [d, d], top_k=1, kind="sae")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


class MLPOracle(MatryoshkaBatchTopK):
    """A 'transcoder' whose every prefix is the model's own MLP applied to resid_mid."""

    def __init__(self, decoder_layer):
        super().__init__(64, 64, [32, 32], top_k=1)
        self.layer = decoder_layer

    def encode(self, x_BD):
        return x_BD

    def decode(self, acts_BF, n_groups=None, source=None):
        return self.layer.mlp(self.layer.post_attention_layernorm(acts_BF))


def test_an_sae_that_reproduces_mlp_out_recovers_all_the_loss_and_only_its_full_prefix_does(model):
    r = splice(model, identity_sae(64), MLP_OUT, MLP_OUT)
    assert r["ce_zero_ablation"] > r["ce_clean"] + 0.01, "ablating the MLP costs loss"
    assert r["ce_recovered_vs_zero_per_prefix"][1] == pytest.approx(1.0, abs=1e-5)
    assert r["ce_recovered_vs_mean_per_prefix"][1] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_per_prefix"][1] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_spliced_per_prefix"][1] == pytest.approx(r["ce_clean"], abs=1e-5)
    # relu(x) alone is not mlp_out: the first prefix must show a loss.
    assert r["kl_per_prefix"][0] > 1e-3 and r["ce_recovered_vs_zero_per_prefix"][0] < 0.999


def test_a_transcoder_that_is_the_mlp_itself_recovers_all_the_loss(model, tiny_pipeline):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_pipeline.model_dir), dtype=torch.float32).eval()
    r = splice(model, MLPOracle(hf.model.layers[LAYER]), RESID_MID, MLP_OUT)
    for recovered, kl in zip(r["ce_recovered_vs_zero_per_prefix"], r["kl_per_prefix"]):
        assert recovered == pytest.approx(1.0, abs=1e-5) and kl == pytest.approx(0.0, abs=1e-6)
    assert r["ce_n_tokens"] == 16 * 62, "BOS position and last position are not scored"


def test_a_dictionary_that_outputs_zeros_is_the_zero_ablation(model):
    zero = MatryoshkaBatchTopK(64, 64, [32, 96], top_k=4)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    r = splice(model, zero, RESID_MID, MLP_OUT)
    assert r["ce_recovered_vs_zero_per_prefix"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert r["kl_per_prefix"] == pytest.approx([r["kl_zero_ablation"]] * 2, rel=1e-5)
    assert r["ce_recovered_vs_mean_per_prefix"][0] < 0.5, "zeros are worse than the mean"


def test_splicing_resid_mid_changes_the_residual_stream_not_only_the_mlp_input(model):
    bridge, _, windows, _ = model
    tokens = windows[:2]
    names = [hook_name(s, LAYER) for s in ("resid_mid", "mlp_out", "resid_post")]
    _, clean = bridge.run_with_cache(tokens, names_filter=names)
    new = clean[names[0]] + torch.randn(64) * 3
    keep = torch.zeros(tokens.shape, dtype=torch.bool)
    keep[:, 0] = True
    seen = {}

    def keep_value(name):
        def hook(x, hook):
            seen[name] = x.detach()
            return x

        return hook

    # The MLP's own output is seen before the splice adds the change of resid_mid to it.
    bridge.run_with_hooks(
        tokens, fwd_hooks=[(n, keep_value(n)) for n in names[1:]] + splice_hooks(RESID_MID, new, keep)
    )
    expected = torch.where(keep[..., None], clean[names[0]], new)
    torch.testing.assert_close(seen[names[2]], expected + seen[names[1]])
    torch.testing.assert_close(seen[names[2]][:, 0], clean[names[2]][:, 0], msg="BOS keeps the model's value")


def test_a_target_before_its_source_cannot_be_spliced():
    with pytest.raises(ConfigError, match="resid_mid at layer 2 comes before the source mlp_out at layer 2"):
        check_splice_order(MLP_OUT, RESID_MID)
    check_splice_order(RESID_MID, (3, "resid_pre"))


@pytest.mark.parametrize("vocab_tile", [8192, 200])
def test_the_loss_from_hidden_states_in_tiles_is_the_loss_from_the_whole_logits(
    model, vocab_tile, monkeypatch
):
    """Read thirteen rows of logits at a time (pieces that do not divide the batch's 992 rows), on the
    whole vocabulary or 200 tokens at a time (the last tile 112), the spliced loss is what the batch's
    whole logits gave, up to float rounding; no [B, T, vocab] tensor is ever made: the largest with
    the vocabulary as last dimension is the unembedding's."""
    monkeypatch.setattr(readout, "VOCAB_TILE", vocab_tile)
    bridge, _, windows, _ = model
    vocab, d = bridge.original_model.get_output_embeddings().weight.shape
    tc = MatryoshkaBatchTopK(64, 64, [32, 32], top_k=4, seed=0)
    budget = 13 * min(vocab, vocab_tile)
    with LargestLastDim(vocab) as watch:
        r = splice(model, tc, RESID_MID, MLP_OUT, logits_budget=budget)
    ce, kl, n = full_logits_loss(model, tc, RESID_MID, MLP_OUT)
    assert r["ce_n_tokens"] == n
    got = [r["ce_clean"], r["ce_zero_ablation"], r["ce_mean_ablation"], *r["ce_spliced_per_prefix"]]
    expected = [ce[k] / n for k in ("clean", "zero_ablation", "mean_ablation", "prefix_1", "prefix_2")]
    assert got == pytest.approx(expected, rel=1e-6)
    got = [r["kl_zero_ablation"], r["kl_mean_ablation"], *r["kl_per_prefix"]]
    expected = [kl[k] / n for k in ("zero_ablation", "mean_ablation", "prefix_1", "prefix_2")]
    assert got == pytest.approx(expected, rel=1e-5)
    assert r["kl_per_prefix"][0] > 1e-3, "the random transcoder changes the model"
    assert watch.largest <= max(vocab * d, 16 * vocab, budget) < 16 * 64 * vocab
