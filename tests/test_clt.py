"""The Matryoshka BatchTopK cross-layer transcoder: sparse loss and gradients equal the dense step,
truncation, thresholds, save/load."""

from __future__ import annotations

import pytest
import torch

from mtc.clt import MatryoshkaCLT, is_clt_dir

GROUPS = [4, 4, 8]
L, D = 3, 6


def make(input_norm="global", decoder_init="random", seed=0, **kw):
    torch.manual_seed(seed)
    m = MatryoshkaCLT(
        D, L, GROUPS, 3, top_k_aux=4, input_norm=input_norm, decoder_init=decoder_init, seed=seed, **kw
    )
    with torch.no_grad():
        for b in m.b_enc:
            b.normal_(0, 0.3)
        m.b_dec.normal_()
        m.source_scale.copy_(torch.tensor([0.7, 1.1, 0.9]))
        m.target_scale.copy_(torch.tensor([1.3, 0.8, 1.0]))
    return m


def batch(B=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g) * 3, torch.randn(B, L, D, generator=g)


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("input_norm", ["token", "global"])
@pytest.mark.parametrize("with_dead", [False, True, "aux on every row"])
@pytest.mark.parametrize("topk_scope", ["layer", "shared"])
def test_sparse_training_step_equals_the_dense_step_loss_and_every_gradient(
    input_norm, with_dead, topk_scope
):
    # aux_budget 0.15 reads 2 of the 20 rows at layer 0, 1 at layer 2; None (the default) all
    m = make(input_norm, topk_scope=topk_scope, aux_budget=None if with_dead == "aux on every row" else 0.15)
    x, y = batch()
    if with_dead:  # layer 0 and 2 have dead features: the auxiliary loss is on
        m.inactive_batches[0, [1, 5, 9, 15]] = 10
        m.inactive_batches[2, :12] = 10
    dense_loss, dense_mse = m.dense_reference_loss(x, y)
    dense_loss.backward()
    expected = grads(m)
    m.zero_grad(set_to_none=True)
    out = m.training_forward(x, y)
    out.loss.backward()
    torch.testing.assert_close(out.prefix_mse, dense_mse)
    torch.testing.assert_close(out.loss.detach(), dense_loss.detach())
    got = grads(m)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (out.aux_loss > 0) == bool(with_dead)


def test_prefix_losses_follow_the_hand_computed_cross_layer_reconstruction():
    m = make()
    x, y = batch()
    out = m.training_forward(x, y)
    codes = out.codes.dense().view(20, L, -1)  # rows are (token, layer)
    y_n = y * m.target_scale[:, None]
    for g, end in enumerate(m.boundaries):
        recon = m.b_dec.expand(20, L, D).clone()
        for j in range(L):  # layer j's output: every layer i <= j writes to it
            for i in range(j + 1):
                recon[:, j] += codes[:, i, :end] @ m.W_dec[i][:end, j - i]
        expected = ((recon - y_n) ** 2).sum(dim=(1, 2)).mean() / D
        torch.testing.assert_close(out.prefix_mse[g], expected.detach())
    assert out.codes.l0() == pytest.approx(3.0, abs=0.5)  # top_k per token and layer


def test_gradients_stay_exact_over_steps_with_an_optimizer():
    m, ref = make(), make()
    opt, ref_opt = (torch.optim.Adam(p.parameters(), lr=1e-2) for p in (m, ref))
    for step in range(3):
        x, y = batch(seed=step)
        out = m.training_forward(x, y)
        out.loss.backward()
        loss, _ = ref.dense_reference_loss(x, y)
        loss.backward()
        for model, o in ((m, opt), (ref, ref_opt)):
            model.remove_parallel_grad()
            o.step()
            o.zero_grad(set_to_none=True)
            model.normalize_decoder()
        ref.inactive_batches.copy_(m.inactive_batches)
        ref.threshold.copy_(m.threshold)
    for (name, a), (_, b) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_each_features_whole_decoder_stays_unit_norm():
    m = make()
    x, y = batch()
    m.training_forward(x, y).loss.backward()
    m.remove_parallel_grad()
    for W in m.W_dec:
        torch.testing.assert_close((W.grad * W).sum(dim=(1, 2)), torch.zeros(W.shape[0]), atol=1e-6, rtol=0)
        with torch.no_grad():
            W.mul_(3)
    m.normalize_decoder()
    for W in m.W_dec:
        torch.testing.assert_close(W.flatten(1).norm(dim=1), torch.ones(W.shape[0]))


def test_own_layer_init_writes_only_to_its_own_layer_at_first():
    m = make(decoder_init="own_layer")
    for W in m.W_dec:
        assert W[:, 0].abs().sum() > 0 and W[:, 1:].abs().sum() == 0


@pytest.mark.parametrize("input_norm", ["token", "global"])
def test_forward_on_raw_activations_matches_the_layer_by_layer_sum(input_norm):
    m = make(input_norm)
    m.threshold.fill_(0.2)
    x, _ = batch()
    out = m(x)
    for j in range(L):
        expected = m.b_dec[j] / m.target_scale[j]
        for i in range(j + 1):
            pre = m.pre_acts(i, x[:, i])
            codes = pre * (pre > 0.2)
            expected = expected + codes @ m.W_dec[i][:, j - i] / m.target_scale[j]
        torch.testing.assert_close(out[:, j], expected)
    # truncated at a group boundary: only the first group of every layer
    first = m(x, n_groups=1)
    m2 = make(input_norm)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        for b in m2.b_enc:
            b[4:] = -1e9
    torch.testing.assert_close(first, m2(x))


def test_per_token_scaling_makes_it_blind_to_each_rows_norm():
    m = make("token")
    x, _ = batch()
    torch.testing.assert_close(m(x * 7.5), m(x))


def test_calibrated_thresholds_give_top_k_codes_per_token_and_layer():
    m = make()
    x, _ = batch(B=200)
    m.calibrate_threshold([x[:100], x[100:]])
    for i in range(L):
        assert (m.encode(i, x[:, i]) > 0).sum().item() == pytest.approx(3 * 200, abs=3)


def test_a_shared_budget_keeps_top_k_per_layer_on_average_and_one_threshold():
    m = make(topk_scope="shared")
    x, y = batch(B=200)
    with torch.no_grad():
        m.b_enc[0].add_(3.0)  # layer 0 fires more: with a shared budget it takes more of the codes
    out = m.training_forward(x, y)
    per_layer = torch.bincount(out.codes.rows % L, minlength=L)
    assert per_layer.sum() == 3 * L * 200 and per_layer[0] > per_layer[1:].max()
    m.calibrate_threshold([x])
    assert len(set(m.threshold.tolist())) == 1
    assert sum((m.encode(i, x[:, i]) > 0).sum().item() for i in range(L)) == pytest.approx(3 * L * 200, abs=3)


def test_save_and_load_give_the_same_function(tmp_path):
    m = make("token", decoder_init="own_layer", first_layer=2)
    m.threshold.fill_(0.1)
    m.save(tmp_path)
    assert is_clt_dir(tmp_path)
    back = MatryoshkaCLT.load(tmp_path)
    x, _ = batch()
    torch.testing.assert_close(back(x), m(x))
    assert back.layers == [2, 3, 4]


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        MatryoshkaCLT(D, L, GROUPS, 16)
    with pytest.raises(ValueError, match="decoder_init"):
        MatryoshkaCLT(D, L, GROUPS, 3, decoder_init="zeros")
