"""``mtc export --format saelens``: SAELens's own loader reads the directory, and its SAE computes
what ours does on the same raw activations (codes up to the documented scale, the same active
features, the same reconstruction), for the full dictionary and for a prefix."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from mtc import pipeline
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.results import run_dir_of
from mtc.saelens import CFG_FILE, SPARSITY_FILE, export_saelens

try:
    import sae_lens
except ImportError:  # scripts/setup.sh installs it: its absence is a broken setup, not a skip
    pytest.fail("sae_lens is not installed: pip install -e '.[interop]'", pytrace=False)

VARIANTS = {
    "sae": dict(kind="sae", target_site="resid_mid", input_norm="token"),
    "transcoder": dict(kind="transcoder", input_norm="token", skip_connection=False),
    "skip transcoder, global scale": dict(kind="transcoder", input_norm="global", skip_connection=True),
    "sae, global scale": dict(kind="sae", target_site="resid_mid", input_norm="global"),
}


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    """Each variant trained for 60 steps on the stories260K store, then evaluated (for sparsity)."""
    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path_factory.mktemp("results"))
    base = cfg.dictionaries["tc"]
    entries = {
        name.replace(" ", "-").replace(",", ""): dataclasses.replace(
            base, name=name.replace(" ", "-").replace(",", ""), steps=60, save_every=60, **fields
        )
        for name, fields in VARIANTS.items()
    }
    cfg = dataclasses.replace(
        cfg, dictionaries=entries, evaluate=dataclasses.replace(cfg.evaluate, n_ce_sequences=0)
    )
    pipeline.train(cfg, list(entries))
    for name in entries:
        pipeline.evaluate(cfg, name)
    store = pipeline.open_store(cfg)
    xs, _ = next(store.iter_holdout([(2, "resid_mid")], 1024))
    return cfg, xs[0].float()


def _load(directory, fold=False):
    return sae_lens.SAE.load_from_disk(str(directory), device="cpu", fold_W_dec_norm=fold)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n_groups", [None, 2])
def test_saelens_loads_the_export_and_computes_what_mtc_does(trained, tmp_path, variant, n_groups):
    cfg, x = trained
    run_dir = run_dir_of(cfg.dictionary(variant.replace(" ", "-").replace(",", "")), cfg.results_root)
    ours = MatryoshkaBatchTopK.load(run_dir)
    out = export_saelens(run_dir, tmp_path / "export", n_groups)
    exported = json.loads((out / CFG_FILE).read_text())
    sae = _load(out)
    end = ours.boundaries[-1 if n_groups is None else n_groups - 1]
    assert sae.cfg.d_sae == end and sae.cfg.metadata.hook_name == "blocks.2.hook_resid_mid"

    with torch.no_grad():
        codes = ours.encode(x)[:, :end]
        recon = ours.decode(ours.encode(x), n_groups, source=x)
        their_codes = sae.encode(x)
        their_recon = sae(x)
    scale = exported["metadata"]["mtc_code_scale"]
    assert torch.equal(their_codes > 0, codes > 0), "the same features fire on every row"
    assert (codes > 0).sum(1).float().mean() > 1
    torch.testing.assert_close(their_codes, codes * scale, rtol=1e-4, atol=1e-5 * float(codes.max() * scale))
    err = (their_recon - recon).norm() / recon.norm()
    assert err < 1e-5, f"relative reconstruction difference {err:.2e}"

    folded = _load(out, fold=True)  # what SAEBench does: a no-op, the decoder rows are unit norm
    with torch.no_grad():
        torch.testing.assert_close(folded(x), their_recon, rtol=1e-5, atol=1e-6 * float(recon.abs().max()))
        torch.testing.assert_close(folded.encode(x), their_codes, rtol=1e-5, atol=1e-6)

    sparsity = sae_lens_sparsity(out)
    assert sparsity.shape == (end,) and float(sparsity.max()) <= 0


def sae_lens_sparsity(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / SPARSITY_FILE))["sparsity"]


def test_the_metadata_names_the_model_hooks_data_and_groups(trained, tmp_path):
    cfg, _ = trained
    run_dir = run_dir_of(cfg.dictionary("transcoder"), cfg.results_root)
    meta = _load(export_saelens(run_dir, tmp_path / "e", 2)).cfg.metadata
    assert meta.hook_name_out == "blocks.2.hook_mlp_out"
    assert meta.context_size == 64 and meta.prepend_bos is True
    assert meta.group_sizes == [32, 64] and meta.training_tokens == 60 * 512


def test_a_per_token_scaled_skip_transcoder_is_refused_in_one_line(tiny_pipeline, tmp_path):
    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path / "results")
    entry = dataclasses.replace(cfg.dictionaries["tc"], steps=10, save_every=10)  # token scale + skip
    cfg = dataclasses.replace(cfg, dictionaries={"tc": entry})
    [run_dir] = pipeline.train(cfg, ["tc"])
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "export", str(run_dir), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "skip_connection:" in result.stderr and "input_norm: global" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
