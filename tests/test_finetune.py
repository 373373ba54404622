"""KL fine-tuning of a replacement model on the real stories260K model: the gradient a step leaves
in the dictionaries is the one of the loss written out by hand on the Hugging Face model (KL through
every replaced MLP, plus each layer's FVU against the model's own MLP output at the replaced input),
the KL's gradient taken a few rows of logits at a time is the whole logits' one, and fine-tuning
lowers the replacement model's KL on held-out windows."""

from __future__ import annotations

import json

import pytest
import torch

from mtc import pipeline
from mtc.clt import MatryoshkaCLT
from mtc.finetune import FinetuneSettings, finetune, finetune_step, kl_and_gradient
from mtc.readout import Readout
from mtc.replacement import CLTReplacement, SetReplacement, replacement_metrics
from tests.test_replacement import N_LAYERS, by_hand, model, random_transcoders  # noqa: F401


def test_the_kl_gradient_in_pieces_of_a_few_rows_is_the_whole_logits_one(model):  # noqa: F811
    bridge = model[0]
    readout = Readout(bridge)
    d = readout.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    clean, replaced = torch.randn(23, d, generator=gen), torch.randn(23, d, generator=gen)
    total, grad = kl_and_gradient(readout, clean, replaced, budget=5 * readout.vocab)

    h = replaced.clone().requires_grad_()
    log_p = torch.log_softmax(readout(clean), -1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(readout(h), -1))).sum()
    kl.backward()
    assert total == pytest.approx(float(kl.detach()), rel=1e-5)
    torch.testing.assert_close(grad, h.grad, rtol=1e-4, atol=1e-7)


def hand_loss(model, tokens, mlp_out, mse_coefficient):  # noqa: F811
    """KL(clean || replaced) per scored token + c * the layers' mean FVU, on the Hugging Face model."""
    _, hf, _, skip_bos = model
    first = 1 if skip_bos else 0
    pairs = []

    def replace(layer, x, own):
        new = mlp_out(layer, x)
        pairs.append((new[:, first:].flatten(0, 1), own[:, first:].flatten(0, 1).detach()))
        return new

    with torch.no_grad():
        clean = torch.log_softmax(hf(tokens).logits[:, first:-1], -1)
    logits, _ = by_hand(hf, tokens, replace, skip_bos)
    replaced = torch.log_softmax(logits[:, first:-1], -1)
    kl = (clean.exp() * (clean - replaced)).sum(-1).mean()
    fvu = torch.stack([(n - o).pow(2).sum() / (o - o.mean(0)).pow(2).sum() for n, o in pairs]).mean()
    return kl + mse_coefficient * fvu, float(kl.detach()), float(fvu.detach())


def gradients(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["set", "clt"])
def test_a_step_leaves_the_gradient_of_the_kl_and_fvu_loss_by_hand(model, kind):  # noqa: F811
    bridge, _, windows, skip_bos = model
    tokens = windows[:3]
    if kind == "set":
        transcoders = random_transcoders()
        modules = torch.nn.ModuleList(transcoders.values())
        replacement = SetReplacement(transcoders)

        def mlp_out(layer, x):
            return transcoders[layer](x.flatten(0, 1)).view_as(x)

    else:
        clt = MatryoshkaCLT(64, N_LAYERS, [32, 32], top_k=4, seed=0).eval()
        with torch.no_grad():  # a threshold that lets features through (a trained CLT learns one)
            clt.threshold.fill_(0.05)
        modules, replacement = clt, CLTReplacement(clt)
        decoded = {}

        def mlp_out(layer, x):
            decoded[layer] = clt.decode(layer, clt.encode(layer, x.flatten(0, 1)))
            out = clt.output_bias()[layer] + sum(decoded[i][:, layer - i] for i in range(layer + 1))
            return out.view_as(x)

    step = finetune_step(bridge, Readout(bridge), replacement, tokens, skip_bos=skip_bos, mse_coefficient=0.5)
    ours = gradients(modules)
    modules.zero_grad(set_to_none=True)
    loss, kl, fvu = hand_loss(model, tokens, mlp_out, 0.5)
    loss.backward()
    theirs = gradients(modules)

    assert step == pytest.approx({"kl": kl, "fvu_mean": fvu}, rel=1e-4)
    assert set(ours) == set(theirs) == {name for name, _ in modules.named_parameters()}, "every parameter"
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in ours.values())


def test_fine_tuning_lowers_the_replacement_models_kl_on_held_out_windows(tiny_pipeline, model):  # noqa: F811
    bridge, _, heldout, skip_bos = model
    store = pipeline.open_store(tiny_pipeline)
    training = torch.from_numpy(store.tokens(0, store.n_sequences - store.n_holdout_sequences)).long()
    transcoders = random_transcoders()

    def kl():
        r = replacement_metrics(
            bridge, heldout, {"set": SetReplacement(transcoders)}, batch_size=4, skip_bos=skip_bos
        )
        return r["replacements"]["set"]["kl"]

    before = kl()
    params = [p for t in transcoders.values() for p in t.parameters()]
    log = finetune(
        bridge,
        SetReplacement(transcoders),
        params,
        training,
        FinetuneSettings(steps=12, lr=1e-2),
        skip_bos=skip_bos,
    )
    after = kl()
    print(f"held-out KL {before:.4f} -> {after:.4f}")
    assert [row["step"] for row in log] == list(range(1, 13))
    assert after < 0.7 * before, (before, after)


def test_a_fine_tuned_set_is_a_finished_run_per_layer_with_its_replacement_model_before_and_after(
    tiny_pipeline, tmp_path
):
    from mtc.dictionary import load_finished_run
    from mtc.finetune import finetune_replacement
    from tests.test_replacement import set_config

    cfg = set_config(tiny_pipeline, tmp_path, [2])
    pipeline.train(cfg, ["tcs-L2"])
    settings = FinetuneSettings(steps=2, lr=1e-3)
    written = finetune_replacement(cfg, pipeline.open_store(cfg), None, settings, tmp_path / "ft")
    record, tuned = load_finished_run(tmp_path / "ft" / "2")
    _, trained = load_finished_run(cfg.results_root / "stories260K" / "2" / "20" / "tcs-L2")
    assert record["kl_finetune"]["steps"] == 2 and record["name"] == "tcs-L2"
    assert not torch.equal(tuned.W_dec, trained.W_dec)
    summary = json.loads(written.read_text())
    assert summary["before"]["kl"] != summary["after"]["kl"]
    assert json.loads((tmp_path / "ft" / "replacement.json").read_text())["layers"] == [2]
