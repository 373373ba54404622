"""The Matryoshka BatchTopK dictionary: prefix losses, sparse decode, thresholds, save/load."""

from __future__ import annotations

import pytest
import torch

from mtc.dictionary import MatryoshkaBatchTopK, batch_topk_threshold

GROUPS = [8, 16, 40]


def make(kind="transcoder", d_in=12, d_out=12, k=4, seed=0):
    torch.manual_seed(seed)
    m = MatryoshkaBatchTopK(d_in, d_out, GROUPS, k, kind=kind, seed=seed, top_k_aux=6)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
        m.source_scale.fill_(0.7)
        m.target_scale.fill_(1.3)
    return m


@pytest.mark.parametrize("k", [1, 3, 17])
def test_batch_topk_threshold_is_the_kB_th_largest_value(k):
    pre = torch.rand(32, 64) * (torch.rand(32, 64) > 0.3)
    pre[0, :40] += 5   # one row owns many of the top values: forces the exact fallback path
    expected = pre.flatten().topk(k * 32).values.min()
    assert batch_topk_threshold(pre, k) == expected


def test_prefix_loss_is_the_mean_of_each_prefix_reconstruction_error():
    m = make()
    x, y = torch.randn(20, 12), torch.randn(20, 12)
    out = m.training_forward(x, y)
    pre = torch.relu((x * 0.7 - m.source_mean) @ m.W_enc + m.b_enc)
    keep = pre >= pre.flatten().topk(4 * 20).values.min()
    acts = pre * keep
    direct = []
    for end in (8, 24, 64):  # prefix i = features 0 .. sum(group_sizes[:i+1])
        recon = acts[:, :end] @ m.W_dec[:end] + m.b_dec
        direct.append(((recon - y * 1.3) ** 2).mean())
    torch.testing.assert_close(out.prefix_mse, torch.stack(direct).detach())
    torch.testing.assert_close(out.loss, torch.stack(direct).mean() + out.aux_loss)
    assert (out.acts_BF > 0).sum() == 4 * 20


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
@pytest.mark.parametrize("groups", [[64], [16, 48], [8, 16, 40], [4, 4, 8, 16, 32]])
def test_sparse_prefix_decode_equals_dense_values_and_gradients(kind, groups):
    torch.manual_seed(0)
    m = MatryoshkaBatchTopK(12, 12, groups, 5, kind=kind)
    pre = torch.relu(torch.randn(30, 64)).requires_grad_()
    active = pre.detach() >= batch_topk_threshold(pre.detach(), 5)
    y = torch.randn(30, 12)
    results = []
    for sparse in (True, False):
        pre.grad, m.W_dec.grad, m.b_dec.grad = None, None, None
        recons = m.prefix_reconstructions(pre, active) if sparse else m.prefix_reconstructions_dense(pre * active)
        sum(((r - y) ** 2).mean() for r in recons).backward()
        results.append(([r.detach() for r in recons], pre.grad.clone(), m.W_dec.grad.clone(), m.b_dec.grad.clone()))
    (rs, *gs), (rd, *gd) = results
    for a, b in zip(rs, rd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_aux_loss_uses_only_dead_features():
    m = make()
    x, y = torch.randn(20, 12), torch.randn(20, 12)
    assert m.training_forward(x, y).aux_loss == 0, "no feature is dead yet"
    m.inactive_batches[:30] = 100
    out = m.training_forward(x, y)
    assert out.aux_loss > 0
    m.zero_grad()
    out.loss.backward()
    pre = torch.relu((x * 0.7 - m.source_mean) @ m.W_enc + m.b_enc)
    assert pre.shape == (20, 64)


def test_decoder_rows_stay_unit_norm_and_parallel_grad_is_removed():
    m = make()
    out = m.training_forward(torch.randn(20, 12), torch.randn(20, 12))
    out.loss.backward()
    m.remove_parallel_grad()
    assert (m.W_dec.grad * m.W_dec).sum(dim=1).abs().max() < 1e-5
    with torch.no_grad():
        m.W_dec.mul_(3)
    m.normalize_decoder()
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.ones(64))


def test_inference_encodes_each_token_on_its_own_with_the_learned_threshold():
    m = make()
    for _ in range(50):
        m.training_forward(torch.randn(64, 12), torch.randn(64, 12))
    assert m.threshold > 0
    x = torch.randn(10, 12)
    together = m.encode(x)
    alone = torch.cat([m.encode(x[i:i + 1]) for i in range(10)])
    torch.testing.assert_close(together, alone)
    assert ((together > 0) <= (m.pre_acts(x) > m.threshold)).all()


def test_truncating_at_a_group_boundary_uses_only_that_prefix():
    m = make()
    acts = torch.relu(torch.randn(5, 64))
    first = m.decode(acts, n_groups=1)
    expected = (acts[:, :8] @ m.W_dec[:8] + m.b_dec) / m.target_scale
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(m.decode(acts), m.decode(acts, n_groups=3))


def test_save_and_load_give_the_same_function_on_raw_activations(tmp_path):
    m = make("transcoder", d_in=12, d_out=10)
    m.training_forward(torch.randn(64, 12), torch.randn(64, 10))
    m.save(tmp_path)
    loaded = MatryoshkaBatchTopK.load(tmp_path)
    x = torch.randn(7, 12)
    torch.testing.assert_close(loaded(x), m(x))
    torch.testing.assert_close(loaded(x, n_groups=2), m(x, n_groups=2))
    assert loaded.cfg == m.cfg


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        MatryoshkaBatchTopK(4, 4, [8], 8)
    with pytest.raises(ValueError, match="SAE"):
        MatryoshkaBatchTopK(4, 5, [8], 2, kind="sae")
