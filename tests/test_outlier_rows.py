"""Rare enormous target rows are left out of training (``outlier_norm_ratio``)."""

from __future__ import annotations

import json

import numpy as np
import torch

from mtc.config import DictionaryConfig
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.results import LOG_FILE
from mtc.store import ActivationStore, StoreWriter
from mtc.train import train

N_SEQ, CTX, D, HOLDOUT = 64, 32, 8, 8


def store_with_enormous_rows(path) -> tuple[ActivationStore, torch.Tensor]:
    """resid_mid -> mlp_out is one linear map, except at position 1 of every 16th window, where the
    target is 2000 times larger (like SmolLM2's layer-11 mlp_out right after BOS). Returns the
    store and which rows are enormous."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SEQ, CTX, D, generator=g)
    y = x @ torch.randn(D, D, generator=g)
    enormous = torch.zeros(N_SEQ, CTX, dtype=torch.bool)
    enormous[::16, 1] = True
    y[enormous] *= 2000
    writer = StoreWriter(
        path,
        {"prepend_bos": True, "n_holdout_sequences": HOLDOUT},
        np.arange(N_SEQ * CTX, dtype=np.int32).reshape(N_SEQ, CTX),
        [(0, "resid_mid"), (0, "mlp_out")],
        D,
        "float32",
        256,
    )
    writer.add({(0, "resid_mid"): x, (0, "mlp_out"): y})
    writer.close()
    return ActivationStore(path), enormous.reshape(-1)


def held_out_fvu_on_ordinary_rows(run_dir, store: ActivationStore, enormous: torch.Tensor) -> float:
    rows = torch.arange(store.n_train_rows, N_SEQ * CTX)
    rows = rows[~enormous[rows] & (rows % CTX != 0)]
    x = store.site(0, "resid_mid").rows(0, N_SEQ * CTX)[rows]
    y = store.site(0, "mlp_out").rows(0, N_SEQ * CTX)[rows]
    with torch.no_grad():
        y_hat = MatryoshkaBatchTopK.load(run_dir)(x)
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_rows_hundreds_of_times_larger_than_the_rest_do_not_spoil_the_transcoder(tmp_path):
    store, enormous = store_with_enormous_rows(tmp_path / "store")
    fvu, dropped = {}, {}
    for ratio in (100.0, None):
        cfg = DictionaryConfig(
            name=f"r{ratio}",
            layer=0,
            dict_size=32,
            group_sizes=[8, 24],
            top_k=4,
            lr=3e-3,
            batch_size=256,
            steps=60,
            save_every=1000,
            calibration_rows=1024,
            outlier_norm_ratio=ratio,
            skip_connection=False,
        )
        [run_dir] = train([cfg], store, tmp_path / "results")
        fvu[ratio] = held_out_fvu_on_ordinary_rows(run_dir, store, enormous)
        log = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
        dropped[ratio] = log[-1]["dropped_rows"]
    # 4 of the 1,736 training rows are enormous; 60 steps of 256 rows are 10 epochs of 6 batches
    # (each epoch leaves 200 rows out at random), so about 40 enormous rows came by, each left out.
    assert 30 <= dropped[100.0] <= 40 and dropped[None] == 0
    assert fvu[100.0] < 0.5 * fvu[None], fvu
