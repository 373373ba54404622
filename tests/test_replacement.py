"""The replacement model on the real stories260K model: every MLP output replaced at once, each
layer reading the replaced model's own resid_mid. Its CE, KL and top-1 agreement are what running
the Hugging Face model by hand, MLP by MLP, gives; a replacement that is the model's own MLP changes
nothing; zero ablation is zeroing every MLP."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mtc import pipeline, readout
from mtc.config import parse_params
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.evaluate import heldout_windows
from mtc.models import load_bridge
from mtc.replacement import (
    MEAN,
    ZERO,
    MeanAblation,
    SetReplacement,
    ZeroAblation,
    mean_training_rows,
    replacement_metrics,
    set_replacement_metrics,
)
from tests.conftest import tiny_params
from tests.helpers import LargestLastDim

N_LAYERS = 5  # stories260K


@pytest.fixture(scope="module")
def model(tiny_pipeline):
    """The bridge, the same model in Hugging Face form, 8 held-out windows and whether BOS is skipped."""
    store = pipeline.open_store(tiny_pipeline)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_pipeline.model_dir), dtype=torch.float32).eval()
    bridge = load_bridge(tiny_pipeline.model_dir)
    return bridge, hf, heldout_windows(store, 8), store.skip_bos


def measure(model, replacements):
    bridge, _, windows, skip_bos = model
    return replacement_metrics(bridge, windows, replacements, batch_size=4, skip_bos=skip_bos)


class OwnMLP:
    """The model's own MLP, computed from resid_mid through the layer's norm and MLP."""

    def __init__(self, hf):
        self.hf, self.layers = hf, list(range(N_LAYERS))

    def start(self):
        pass

    def mlp_out(self, layer, resid_mid_BTD):
        block = self.hf.model.layers[layer]
        return block.mlp(block.post_attention_layernorm(resid_mid_BTD))


class Recording:
    """Another replacement, recording the calls it gets and the resid_mid it is given."""

    def __init__(self, inner):
        self.inner, self.layers, self.calls, self.seen = inner, inner.layers, [], {}

    def start(self):
        self.calls.append("start")
        self.inner.start()

    def mlp_out(self, layer, resid_mid_BTD):
        self.calls.append(layer)
        self.seen[layer] = resid_mid_BTD.clone()
        return self.inner.mlp_out(layer, resid_mid_BTD)


def random_transcoders() -> dict[int, MatryoshkaBatchTopK]:
    return {
        layer: MatryoshkaBatchTopK(64, 64, [32, 32], top_k=4, seed=layer).eval() for layer in range(N_LAYERS)
    }


def by_hand(hf, tokens_BT, mlp_out, skip_bos):
    """Logits [B, T, V] of the HF model with every MLP's output replaced by ``mlp_out(layer,
    resid_mid, own_output)`` (BOS keeps the MLP's own output with ``skip_bos``), and each layer's
    resid_mid."""
    resid_mid, handles = {}, []
    for layer, block in enumerate(hf.model.layers):

        def read(module, args, layer=layer):
            resid_mid[layer] = args[0]

        def replace(module, args, out, layer=layer):
            new = mlp_out(layer, resid_mid[layer], out).clone()
            if skip_bos:
                new[:, 0] = out[:, 0]
            return new

        handles += [
            block.post_attention_layernorm.register_forward_pre_hook(read),
            block.mlp.register_forward_hook(replace),
        ]
    try:
        return hf(tokens_BT).logits, resid_mid
    finally:
        for h in handles:
            h.remove()


def hand_metrics(model, mlp_out):
    """CE, KL(clean || replaced) and top-1 agreement per scored token, computed by hand."""
    _, hf, windows, skip_bos = model
    first = 1 if skip_bos else 0  # position t predicts token t+1; BOS's prediction is not scored
    with torch.no_grad():
        clean = torch.log_softmax(hf(windows).logits[:, first:-1], dim=-1).flatten(0, 1)
    with torch.no_grad():
        logits, _ = by_hand(hf, windows, mlp_out, skip_bos)
    replaced = torch.log_softmax(logits[:, first:-1], dim=-1).flatten(0, 1)
    targets = windows[:, first + 1 :].flatten()
    return {
        "ce": float(torch.nn.functional.nll_loss(replaced, targets)),
        "kl": float((clean.exp() * (clean - replaced)).sum(-1).mean()),
        "top1_agreement": float((replaced.argmax(-1) == clean.argmax(-1)).float().mean()),
    }


def test_a_transcoder_set_gives_the_ce_kl_and_top1_of_replacing_every_mlp_by_hand(model):
    transcoders = random_transcoders()
    r = measure(model, {"set": SetReplacement(transcoders)})
    expected = hand_metrics(model, lambda layer, x, _: transcoders[layer](x.flatten(0, 1)).view_as(x))
    assert r["replacements"]["set"] == pytest.approx(expected, rel=1e-4)
    assert r["replacements"]["set"]["kl"] > 0.01, "random transcoders change the model"
    assert r["n_tokens"] == 8 * 62, "BOS position and last position are not scored"


@pytest.mark.parametrize("vocab_tile", [8192, 100])
def test_in_tiles_of_a_few_rows_and_tokens_the_metrics_are_the_whole_logits_ones(
    model, vocab_tile, monkeypatch
):
    """Five rows of logits at a time (pieces that do not divide the batch's 248 rows), on the whole
    vocabulary or 100 tokens at a time: the same CE, KL and top-1 as by hand from the batch's whole
    logits, and no [B, T, vocab] tensor made."""
    monkeypatch.setattr(readout, "VOCAB_TILE", vocab_tile)
    bridge, _, windows, skip_bos = model
    vocab, d = bridge.original_model.get_output_embeddings().weight.shape
    transcoders = random_transcoders()
    budget = 5 * min(vocab, vocab_tile)
    with LargestLastDim(vocab) as watch:
        r = replacement_metrics(
            bridge,
            windows,
            {"set": SetReplacement(transcoders)},
            batch_size=4,
            skip_bos=skip_bos,
            logits_budget=budget,
        )
    expected = hand_metrics(model, lambda layer, x, _: transcoders[layer](x.flatten(0, 1)).view_as(x))
    assert r["replacements"]["set"] == pytest.approx(expected, rel=1e-4)
    assert watch.largest <= max(vocab * d, 4 * vocab, budget) < 4 * 64 * vocab


def test_a_prefix_of_the_transcoders_is_their_first_groups(model):
    transcoders = random_transcoders()
    r = measure(model, {"prefix_1": SetReplacement(transcoders, n_groups=1)})
    expected = hand_metrics(model, lambda layer, x, _: transcoders[layer](x.flatten(0, 1), 1).view_as(x))
    assert r["replacements"]["prefix_1"] == pytest.approx(expected, rel=1e-4)


def test_the_models_own_mlps_as_replacement_change_nothing_and_recover_all_the_loss(model):
    r = measure(model, {ZERO: ZeroAblation(list(range(N_LAYERS))), "own": OwnMLP(model[1])})
    own = r["replacements"]["own"]
    assert own["kl"] == pytest.approx(0.0, abs=1e-6)
    assert own["ce"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert own["top1_agreement"] == 1.0
    assert own["ce_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-5)
    assert "ce_recovered_vs_mean" not in own, "no mean ablation was measured"
    assert "ce_recovered_vs_zero" not in r["replacements"][ZERO], "an ablation is not measured against itself"


def test_zero_ablation_is_zeroing_every_mlp_by_hand(model):
    r = measure(model, {ZERO: ZeroAblation(list(range(N_LAYERS)))})
    expected = hand_metrics(model, lambda layer, x, _: torch.zeros_like(x))
    assert r["replacements"][ZERO] == pytest.approx(expected, rel=1e-4)
    assert r["replacements"][ZERO]["ce"] > r["ce_clean"] + 0.1


def test_each_layer_reads_the_resid_mid_of_the_replaced_model_not_the_clean_one(model):
    bridge, hf, windows, skip_bos = model
    recording = Recording(ZeroAblation(list(range(N_LAYERS))))
    replacement_metrics(bridge, windows[:2], {ZERO: recording}, batch_size=2, skip_bos=skip_bos)
    assert recording.calls == ["start", *range(N_LAYERS)], "start, then every layer once, in order"
    with torch.no_grad():
        _, replaced = by_hand(hf, windows[:2], lambda layer, x, _: torch.zeros_like(x), skip_bos)
        _, clean = by_hand(hf, windows[:2], lambda layer, x, own: own, skip_bos)
    for layer in range(N_LAYERS):
        torch.testing.assert_close(recording.seen[layer], replaced[layer], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(recording.seen[2], clean[2], atol=1e-3), "earlier MLPs' outputs are replaced"
    torch.testing.assert_close(recording.seen[0], clean[0], msg="layer 0 reads the embeddings and attention")


def test_mean_ablation_outputs_the_mean_mlp_out_of_the_training_rows(tiny_pipeline, model):
    store = pipeline.open_store(tiny_pipeline)
    (y,), _ = store.read([(2, "mlp_out")], 0, store.n_train_rows)
    mean = mean_training_rows(store, [(2, "mlp_out")])[2, "mlp_out"]
    torch.testing.assert_close(mean, y.double().mean(dim=0).float())
    r = measure(model, {MEAN: MeanAblation({2: mean})})
    expected = hand_metrics(model, lambda layer, x, own: mean.expand_as(x) if layer == 2 else own)
    assert r["replacements"][MEAN] == pytest.approx(expected, rel=1e-4)


def set_params(tiny_pipeline, layers) -> dict:
    raw = tiny_params(tiny_pipeline.model.name)
    shared = {k: raw["dictionaries"]["tc"][k] for k in ("dict_size", "group_sizes", "top_k", "batch_size")}
    raw["transcoder_set"] = {
        "name": "tcs",
        "layers": layers,
        "steps": 20,
        "dictionary": {**shared, "save_every": 20},
    }
    return raw


def set_config(tiny_pipeline, tmp_path, layers):
    raw = set_params(tiny_pipeline, layers)
    return parse_params(raw, data_root=tiny_pipeline.data_root, results_root=tmp_path / "results")


def test_mtc_replacement_set_measures_every_prefix_against_ablating_the_sets_mlps(
    tiny_pipeline, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from mtc.cli import app

    raw = set_params(tiny_pipeline, [2])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").symlink_to(tiny_pipeline.data_root)
    monkeypatch.chdir(tmp_path)
    pipeline.train(parse_params(raw), ["tcs-L2"])
    result = CliRunner().invoke(app, ["replacement-set"])
    assert result.exit_code == 0, result.output
    out = "results/sets/stories260K/tcs/replacement.json"
    assert "prefix_3" in result.output and f"wrote {out}" in result.output
    r = json.loads((tmp_path / out).read_text())
    assert (r["set"], r["layers"], r["n_model_layers"]) == ("tcs", [2], N_LAYERS)
    assert list(r["replacements"]) == [ZERO, MEAN, "prefix_1", "prefix_2", "prefix_3"]
    assert r["n_sequences"] == 8 and r["n_tokens"] == 8 * 62  # evaluate.n_ce_sequences
    full = r["replacements"]["prefix_3"]
    assert 0 <= full["top1_agreement"] <= 1 and full["kl"] > 0
    assert full["ce_recovered_vs_zero"] > 0, "a trained transcoder beats zeros"


def test_without_a_set_or_its_trained_transcoders_it_fails_in_one_line(tiny_pipeline, tmp_path):
    with pytest.raises(ConfigError, match="transcoder_set.layers: lists none"):
        set_replacement_metrics(dataclasses.replace(tiny_pipeline, transcoder_set=None), None)
    with pytest.raises(ConfigError, match="train it first .mtc train tcs-L2") as e:
        set_replacement_metrics(set_config(tiny_pipeline, tmp_path, [2]), None)
    assert "\n" not in str(e.value)
