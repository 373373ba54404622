"""The Matryoshka BatchTopK dictionary: prefix losses, sparse decode, thresholds, save/load."""

from __future__ import annotations

import pytest
import torch

from mtc.dictionary import MatryoshkaBatchTopK, aux_loss, aux_row_step, batch_topk_pairs

GROUPS = [8, 16, 40]


def make(kind="transcoder", d_in=12, d_out=12, k=4, seed=0, input_norm="global"):
    torch.manual_seed(seed)
    m = MatryoshkaBatchTopK(d_in, d_out, GROUPS, k, kind=kind, seed=seed, top_k_aux=6, input_norm=input_norm)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
        m.source_scale.fill_(0.7)
        m.target_scale.fill_(1.3)
    return m


def _dense_batch_topk(pre, k):
    """The k*B largest entries of pre that are > 0, as a set of (row, feature)."""
    keep = (pre >= pre.flatten().topk(k * pre.shape[0]).values.min()) & (pre > 0)
    return {tuple(p) for p in keep.nonzero().tolist()}


@pytest.mark.parametrize("k", [1, 3, 17])
def test_batch_topk_pairs_are_the_kB_largest_sorted_by_group_then_row(k):
    torch.manual_seed(k)
    mm, bias = torch.randn(32, 64), torch.randn(64)
    mm[0, :40] += 8  # one row owns many of the top values
    rows, feats, vals = batch_topk_pairs(mm, bias, k * 32, [8, 24, 64])
    assert set(zip(rows.tolist(), feats.tolist())) == _dense_batch_topk(mm + bias, k)
    torch.testing.assert_close(vals, (mm + bias)[rows, feats])
    group = torch.bucketize(feats, torch.tensor([8, 24, 64]), right=True)
    key = (group * 32 + rows) * 64 + feats
    assert (key[1:] > key[:-1]).all()


def test_batch_topk_pairs_stays_exact_when_the_sample_overestimates_the_threshold(monkeypatch):
    torch.manual_seed(0)
    mm, bias = torch.randn(16, 100), torch.zeros(100)
    best = mm.flatten().topk(10).indices  # a "sample" of only the ten largest entries
    monkeypatch.setattr(torch, "randint", lambda high, size, **kw: best.repeat(size[0] // 10 + 1)[: size[0]])
    rows, feats, _ = batch_topk_pairs(mm, bias, 5 * 16, [100])
    assert set(zip(rows.tolist(), feats.tolist())) == _dense_batch_topk(mm, 5)


def test_batch_topk_pairs_keeps_exactly_kB_when_values_tie():
    mm = torch.ones(8, 50, dtype=torch.bfloat16)  # every entry ties
    rows, _, _ = batch_topk_pairs(mm, torch.zeros(50), 3 * 8, [50])
    assert rows.numel() == 3 * 8


def _scaled(x, input_norm, scale):
    """The source (or an SAE's target) as training sees it: per row to RMS 1, or one global scale."""
    return x / x.pow(2).mean(dim=1, keepdim=True).sqrt() if input_norm == "token" else x * scale


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
@pytest.mark.parametrize("input_norm", ["token", "global"])
def test_prefix_loss_is_the_mean_of_each_prefix_reconstruction_error(kind, input_norm):
    m = make(kind, input_norm=input_norm)
    x, y = torch.randn(20, 12) * torch.rand(20, 1) * 10, torch.randn(20, 12)
    if kind == "sae":
        y = x
    out = m.training_forward(x, y)
    x_n = _scaled(x, input_norm, 0.7)
    y_n = x_n if kind == "sae" and input_norm == "token" else y * 1.3
    pre = torch.relu((x_n - m.source_mean) @ m.W_enc + m.b_enc)
    keep = pre >= pre.flatten().topk(4 * 20).values.min()
    acts = pre * keep
    direct = []
    for end in (8, 24, 64):  # prefix i = features 0 .. sum(group_sizes[:i+1])
        recon = acts[:, :end] @ m.W_dec[:end] + m.b_dec
        direct.append(((recon - y_n) ** 2).mean())
    torch.testing.assert_close(out.prefix_mse, torch.stack(direct).detach())
    torch.testing.assert_close(out.loss, torch.stack(direct).mean() + out.aux_loss)
    assert (out.acts_BF > 0).sum() == 4 * 20


@pytest.mark.parametrize("kind", ["transcoder", "sae", "skip transcoder"])
@pytest.mark.parametrize("groups", [[64], [16, 48], [8, 16, 40], [4, 4, 8, 16, 32], [1, 2, 5, 8, 16, 32]])
@pytest.mark.parametrize("with_dead", [False, True, "fewer than top_k_aux", "aux on every row"])
@pytest.mark.parametrize("input_norm", ["token", "global"])
def test_sparse_training_step_equals_the_dense_step_loss_and_every_gradient(
    kind, groups, with_dead, input_norm
):
    torch.manual_seed(0)
    m = MatryoshkaBatchTopK(
        12,
        12,
        groups,
        5,
        kind=kind.split()[-1],
        top_k_aux=6,
        input_norm=input_norm,
        skip_connection=kind.startswith("skip"),
        aux_budget=None if with_dead == "aux on every row" else 0.15,  # 0.15: 2 of the 30 rows
    )
    with torch.no_grad():
        if m.W_skip is not None:
            m.W_skip.normal_(0, 0.2)
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
        m.source_scale.fill_(0.7)
        m.target_scale.fill_(1.3)
        m.source_mean.normal_()
    dead = torch.zeros(64, dtype=torch.long)
    if with_dead:  # a third of the features feed the auxiliary loss, or only four (all of them kept)
        dead[:: 16 if with_dead == "fewer than top_k_aux" else 3] = 100
    x, y = torch.randn(30, 12) * torch.rand(30, 1) * 5, torch.randn(30, 12)
    results = []
    for sparse in (True, False):
        m.zero_grad()
        m.inactive_batches.copy_(dead)
        if sparse:
            out = m.training_forward(x, y)
            loss, prefix_mse = out.loss, out.prefix_mse
            assert (out.aux_loss > 0) == bool(with_dead)
        else:
            loss, prefix_mse = m.dense_reference_loss(x, y)
        loss.backward()
        results.append((loss.detach(), prefix_mse, *[p.grad.clone() for p in m.parameters()]))
    for name, a, b in zip(["loss", "prefix_mse", *dict(m.named_parameters())], *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda e, name=name: f"{name}: {e}")


def test_bf16_encoder_matmul_stays_close_to_float32():
    torch.manual_seed(0)
    m = MatryoshkaBatchTopK(64, 64, [64, 192], 8)
    x, y = torch.randn(256, 64), torch.randn(256, 64)
    m.init_means(x, y)
    outs, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        m.zero_grad()
        out = m.training_forward(x, y, dtype)
        out.loss.backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    f32, b16 = outs
    assert abs(float(b16.loss.detach()) / float(f32.loss.detach()) - 1) < 0.01
    assert b16.codes.l0() == f32.codes.l0() == 8
    same = len(
        set(zip(f32.codes.rows.tolist(), f32.codes.feats.tolist()))
        & set(zip(b16.codes.rows.tolist(), b16.codes.feats.tolist()))
    )
    assert same / f32.codes.rows.numel() > 0.95
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("with_dead", [False, True])
def test_gradients_are_exact_whether_freed_or_zeroed_between_steps_and_old_buffer_contents_never_leak(
    with_dead,
):
    # Freed gradients (set_to_none) are rewritten into buffers reused from step to step; zeroed
    # ones are added to. Poison the reused buffers between steps: no gradient may change.
    freed, zeroed = make(), make()
    if with_dead:  # the aux loss adds a second gradient for each weight
        freed.inactive_batches[::3] = zeroed.inactive_batches[::3] = 100
    for step in range(3):
        x, y = torch.randn(30, 12), torch.randn(30, 12)
        freed.zero_grad(set_to_none=True)
        zeroed.zero_grad(set_to_none=False)
        for buf in freed._scratch.values():
            buf.fill_(float("nan"))
        freed.training_forward(x, y).loss.backward()
        zeroed.training_forward(x, y).loss.backward()
        for (name, a), b in zip(freed.named_parameters(), zeroed.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=lambda e, name=name: f"step {step}, {name}: {e}")


def test_a_second_forward_before_the_backward_is_an_error_not_a_wrong_gradient():
    # The residuals saved for the backward live in a buffer reused from step to step.
    m = make()
    x, y = torch.randn(20, 12), torch.randn(20, 12)
    first = m.training_forward(x, y)
    m.training_forward(x, y).loss.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.loss.backward()


def test_state_dict_holds_the_encoder_input_major_and_loads_back():
    m = make(d_in=12, d_out=10)
    state = m.state_dict()
    assert state["W_enc"].shape == (12, 64) and "W_encT" not in state
    torch.testing.assert_close(state["W_enc"], m.W_enc)
    other = make(d_in=12, d_out=10, seed=1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.W_encT, m.W_encT)
    assert other.W_encT.is_contiguous()


def test_aux_loss_uses_only_dead_features():
    m = make()
    x, y = torch.randn(20, 12), torch.randn(20, 12)
    assert m.training_forward(x, y).aux_loss == 0, "no feature is dead yet"
    m.inactive_batches[:30] = 100
    out = m.training_forward(x, y)
    assert out.aux_loss > 0
    m.zero_grad()
    out.loss.backward()
    assert m.W_dec.grad[30:].abs().sum() > 0 and m.W_encT.grad[:30].abs().sum() > 0


def test_aux_loss_reads_every_row_while_few_features_are_dead_and_a_bounded_share_of_them_after():
    B, F = 4096, 9216
    assert aux_row_step(B, 276, F, 0.15) == 1, "5 * 276 / 9216 < 0.15: exact, every row"
    for n_dead in (1000, 4000, 8000, F):
        rows = -(-B // aux_row_step(B, n_dead, F, 0.15))
        cost = 5 * rows * n_dead / (B * F)  # its five products against one encoder matmul
        assert 0.1 < cost <= 0.15, (n_dead, rows)
    assert aux_row_step(8, 64, 64, 0.15) == 8, "at least one row, whatever the budget"
    assert aux_row_step(B, F, F, None) == 1, "no budget (the default): every row"


def test_aux_loss_on_every_row_is_the_mean_over_the_batch_and_on_fewer_rows_their_mean():
    torch.manual_seed(0)
    x, residual, dead = torch.randn(40, 12), torch.randn(40, 12), torch.arange(0, 64, 2)
    m = make(input_norm="token")
    per_row = []
    for r in range(40):
        pre = torch.relu(x[r] @ m.W_encT[dead].t() + m.b_enc[dead]).detach()
        kept = torch.zeros_like(pre).scatter(0, pre.topk(5).indices, pre.topk(5).values)
        per_row.append((kept @ m.W_dec[dead].detach() + residual[r]).pow(2).mean())
    args = (x, m.W_encT, m.b_enc, m.W_dec, dead, residual, 5, 0.5)
    exact = aux_loss(*args, budget=None, gradients=m._aux_gradients)
    torch.testing.assert_close(exact.detach(), 0.5 * torch.stack(per_row).mean())
    sampled = aux_loss(*args, budget=0.15, gradients=m._aux_gradients)
    step = aux_row_step(40, 32, 64, 0.15)
    assert step > 1
    torch.testing.assert_close(sampled.detach(), 0.5 * torch.stack(per_row[::step]).mean())


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
    alone = torch.cat([m.encode(x[i : i + 1]) for i in range(10)])
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
    assert loaded.shape == m.shape


def test_per_token_scaling_makes_a_transcoder_blind_to_the_source_norm_as_the_model_is():
    # resid_mid reaches the MLP through an RMSNorm: a transcoder should see only its direction.
    m = make("transcoder", input_norm="token")
    x = torch.randn(9, 12)
    torch.testing.assert_close(m.encode(x * 40), m.encode(x))


def test_a_per_token_sae_scales_its_reconstruction_with_each_row():
    m = make("sae", input_norm="token")
    x = torch.randn(9, 12)
    scale = torch.rand(9, 1) * 100
    torch.testing.assert_close(m(x * scale), m(x) * scale, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="decode needs source"):
        m.decode(m.encode(x))


def test_a_dictionary_saved_before_per_token_scaling_loads_with_global_scaling(tmp_path):
    import json

    m = make("transcoder", input_norm="global")
    m.save(tmp_path)
    cfg = json.loads((tmp_path / "dictionary.json").read_text())
    del cfg["input_norm"]
    (tmp_path / "dictionary.json").write_text(json.dumps(cfg))
    x = torch.randn(7, 12)
    torch.testing.assert_close(MatryoshkaBatchTopK.load(tmp_path)(x), m(x))


@pytest.mark.parametrize("input_norm", ["token", "global"])
def test_the_calibrated_threshold_gives_top_k_codes_per_row_on_the_calibration_rows(input_norm):
    m = make(input_norm=input_norm, k=5)
    batches = [torch.randn(50, 12) * torch.rand(50, 1) for _ in range(4)]
    m.calibrate_threshold(iter(batches))
    l0 = float((m.encode(torch.cat(batches)) > 0).sum(dim=1).float().mean())
    assert abs(l0 - 5) <= 1.01 / 200, "k * N codes clear it, less the one at the threshold itself"


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        MatryoshkaBatchTopK(4, 4, [8], 8)
    with pytest.raises(ValueError, match="SAE"):
        MatryoshkaBatchTopK(4, 5, [8], 2, kind="sae")


@pytest.mark.parametrize("input_norm", ["token", "global"])
def test_a_skip_connection_starts_at_the_least_squares_map_of_the_first_batch(input_norm):
    torch.manual_seed(0)
    d = MatryoshkaBatchTopK(16, 8, [8, 24], 4, kind="transcoder", input_norm=input_norm, skip_connection=True)
    x = torch.randn(512, 16) * 3 + 1
    d.set_scales(float(x.norm(dim=1).mean()), 1.0)
    linear = torch.randn(16, 8)
    y = d._normalised_source(x) @ linear + 2.0  # exactly linear in the encoder's input
    d.init_means(x, y)
    with_no_features = d.decode(torch.zeros(512, 32), source=x)
    fvu = (with_no_features - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert fvu < 1e-4  # only the small ridge term is left
    torch.testing.assert_close(d.W_skip / d.target_scale, linear, atol=0.02, rtol=0.01)


def test_features_started_from_data_each_fire_on_their_own_row_and_reconstruct_its_residual():
    torch.manual_seed(0)
    d = MatryoshkaBatchTopK(16, 8, [8, 24], 4, kind="transcoder", input_norm="token", skip_connection=True)
    x, y = torch.randn(512, 16) * 3 + 1, torch.randn(512, 8)
    d.set_scales(float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()))
    d.init_means(x, y)
    rows_x, rows_y = torch.randn(32, 16) * 3 + 1, torch.randn(32, 8)
    d.init_features_from_rows(rows_x, rows_y)
    own = (d._normalised_source(rows_x) @ d.W_enc + d.b_enc).diagonal()
    assert (own > 0).all(), "every feature fires on the row it started from"
    residual = d._scaled_target(rows_x, rows_y) - d.b_dec - d._skip(d._normalised_source(rows_x))
    torch.testing.assert_close(d.W_dec, torch.nn.functional.normalize(residual, dim=1))
    # each feature clears zero on its top k/F share of those rows: about k codes per row
    fires = (d._normalised_source(rows_x) @ d.W_enc + d.b_enc > 0).sum(dim=0)
    assert fires.min() >= 1 and abs(fires.float().mean() - 4) <= 1
    with pytest.raises(ValueError, match="one row per feature"):
        d.init_features_from_rows(rows_x[:10], rows_y[:10])
