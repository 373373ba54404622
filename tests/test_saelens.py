"""``mtc export --format saelens``: SAELens's own loader reads the directory, and its SAE computes
what ours does on the same raw activations (codes up to the documented scale, the same active
features, the same reconstruction), for the full dictionary and for a prefix."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

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
    "skip transcoder": dict(kind="transcoder", input_norm="token", skip_connection=True),  # the default
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
    out = export_saelens(run_dir, tmp_path / "export", n_groups, model_dir=cfg.model_dir)
    exported = json.loads((out / CFG_FILE).read_text())
    sae = _load(out)
    end = ours.boundaries[-1 if n_groups is None else n_groups - 1]
    assert sae.cfg.d_sae == end
    hook = sae.cfg.metadata.hook_name
    if variant == "skip transcoder":
        # its skip reads x / rms(x) too: exported at the hook that holds it, TransformerLens's RMSNorm
        # output before the weight (x / sqrt(mean(x^2) + eps): the norm's eps is checked below)
        assert hook == "blocks.2.ln2.hook_normalized" and exported["normalize_activations"] == "none"
        their_input = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True))
    else:
        assert hook == "blocks.2.hook_resid_mid"
        their_input = x

    with torch.no_grad():
        codes = ours.encode(x)[:, :end]
        recon = ours.decode(ours.encode(x), n_groups, source=x)
        their_codes = sae.encode(their_input)
        their_recon = sae(their_input)
    if variant == "skip transcoder":
        eps = json.loads((cfg.model_dir / "config.json").read_text())["rms_norm_eps"]
        with torch.no_grad():
            at_hook = sae(x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps))
        err = (at_hook - recon).norm() / recon.norm()
        print(f"with the norm's eps {eps}: relative reconstruction difference {err:.1e}")
        assert err < 1e-3
    scale = exported["metadata"]["mtc_code_scale"]
    assert torch.equal(their_codes > 0, codes > 0), "the same features fire on every row"
    assert (codes > 0).sum(1).float().mean() > 1
    torch.testing.assert_close(their_codes, codes * scale, rtol=1e-4, atol=1e-5 * float(codes.max() * scale))
    err = (their_recon - recon).norm() / recon.norm()
    assert err < 1e-5, f"relative reconstruction difference {err:.2e}"

    folded = _load(out, fold=True)  # what SAEBench does: a no-op, the decoder rows are unit norm
    with torch.no_grad():
        torch.testing.assert_close(
            folded(their_input), their_recon, rtol=1e-5, atol=1e-6 * float(recon.abs().max())
        )
        torch.testing.assert_close(folded.encode(their_input), their_codes, rtol=1e-5, atol=1e-6)

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


def test_only_an_export_that_needs_the_model_reads_params_yaml_and_its_refusal_takes_one_line(
    trained, tmp_path
):
    cfg, _ = trained

    def export(name: str, cwd: Path) -> subprocess.CompletedProcess:
        run_dir = run_dir_of(cfg.dictionary(name), cfg.results_root)
        cwd.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "mtc.cli", "export", str(run_dir), str(cwd / f"out-{name}")]
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd)

    bare, broken = tmp_path / "bare", tmp_path / "broken"  # no params.yaml; one that does not parse
    broken.mkdir()
    (broken / "params.yaml").write_text("model: {name: [\n")
    assert export("sae", broken).returncode == 0  # an SAE export needs no model
    for cwd, because in ((bare, ""), (broken, "(the default, from params.yaml: ")):
        result = export("skip-transcoder", cwd)  # token scale + skip: needs the MLP norm's model
        assert result.returncode == 2
        assert "--model-dir: None is not a model directory" in result.stderr and because in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (cwd / "out-skip-transcoder").exists()


# ----------------------------------------------------------------------------- import
IMPORTED = {  # name: (SAELens class, its config's extra fields)
    "standard": ("StandardSAE", {}),
    "standard, rescaled per token, b_dec on the input": (
        "StandardSAE",
        {"normalize_activations": "constant_norm_rescale", "apply_b_dec_to_input": True},
    ),
    "topk": ("TopKSAE", {"k": 6}),
    "topk, acts rescaled by decoder norm": ("TopKSAE", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": ("JumpReLUSAE", {"apply_b_dec_to_input": True}),
    "transcoder": ("Transcoder", {}),
    "jumprelu_transcoder": ("JumpReLUTranscoder", {"normalize_activations": "constant_norm_rescale"}),
    "skip_transcoder": ("SkipTranscoder", {}),
    "jumprelu_skip_transcoder": ("JumpReLUSkipTranscoder", {}),
}


def saelens_dictionary_on_disk(directory, class_name, fields, d, scale):
    """A SAELens dictionary with random weights, written by SAELens's own save_model."""
    from sae_lens.saes.sae import SAEMetadata

    transcoder = "Transcoder" in class_name
    meta = {"hook_name": "blocks.2.hook_resid_mid"}
    if transcoder:
        meta["hook_name_out"] = "blocks.2.hook_mlp_out"
        fields = {"d_out": d, "apply_b_dec_to_input": False, **fields}
    config_class = getattr(sae_lens, class_name + "Config")
    sae = getattr(sae_lens, class_name)(
        config_class(d_in=d, d_sae=96, metadata=SAEMetadata(**meta), **fields)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in sae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (scale if pname == "W_enc" else 0.1))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(96, generator=gen) * 0.3)
    sae.save_model(str(directory))
    return sae


@pytest.mark.parametrize("variant", list(IMPORTED))
def test_a_saelens_dictionary_imports_and_encodes_as_saelens_does(tiny_pipeline, tmp_path, variant):
    from mtc.saelens import import_saelens

    store = pipeline.open_store(tiny_pipeline)
    xs, _ = next(store.iter_holdout([(2, "resid_mid")], 1024))
    x = xs[0].float()
    class_name, fields = IMPORTED[variant]
    saved = saelens_dictionary_on_disk(
        tmp_path / "saelens", class_name, fields, x.shape[1], 1 / float(x.norm(dim=1).mean())
    )
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    run_dir = import_saelens(tmp_path / "saelens", "imported", "stories260K", tmp_path / "run")
    ours = MatryoshkaBatchTopK.load(run_dir)
    with torch.no_grad():
        theirs_codes, theirs_out = sae.encode(x), sae(x)
        codes, out = ours.encode(x), ours(x)
    assert torch.equal(codes > 0, theirs_codes > 0), "the same features fire on every row"
    assert 1 < float((codes > 0).sum(1).float().mean()) < 90
    torch.testing.assert_close(codes, theirs_codes, rtol=1e-5, atol=1e-5)
    assert float((out - theirs_out).norm() / theirs_out.norm()) < 1e-5
    assert saved.cfg.architecture() in str(json.loads((run_dir / "config.json").read_text()))


def test_evaluate_mine_and_browse_accept_an_imported_run_and_match_saelens_fvu(tiny_pipeline, tmp_path):
    from mtc.browse import build_site
    from mtc.metrics import FVUAccumulator
    from mtc.saelens import import_saelens

    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path / "results")
    store = pipeline.open_store(cfg)
    xs, _ = next(store.iter_holdout([(2, "resid_mid")], 1024))
    scale = 1 / float(xs[0].float().norm(dim=1).mean())
    saelens_dictionary_on_disk(tmp_path / "saelens", "JumpReLUTranscoder", {}, xs[0].shape[1], scale)
    run_dir = import_saelens(tmp_path / "saelens", "jt", "stories260K", results_root=cfg.results_root)
    assert run_dir == tmp_path / "results" / "stories260K" / "2" / "imported" / "jt"

    metrics = json.loads(pipeline.evaluate(cfg, str(run_dir)).read_text())
    sae, fvu = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens")), FVUAccumulator(1)
    with torch.no_grad():
        for (x, y), _ in store.iter_holdout([(2, "resid_mid"), (2, "mlp_out")], 1024):
            fvu.update(y.float(), [sae(x.float())])
    assert abs(metrics["fvu"] - fvu.fvus()[0]) < 1e-6 * max(1.0, fvu.fvus()[0])
    pipeline.mine(cfg, str(run_dir))
    assert (build_site(run_dir, cfg=cfg.browse)).is_file()


def test_mtc_import_of_a_directory_without_a_saelens_config_is_one_line(tmp_path, stories_model_dir):
    import yaml

    from tests.conftest import tiny_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(str(stories_model_dir))))
    (tmp_path / "not-saelens").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "import", "not-saelens", "--name", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not-saelens/cfg.json: not found" in result.stderr


# ----------------------------------------------------------------------------- malformed imports
def _jumprelu_sae(d_in=64, d_sae=96):
    """A well-formed SAELens JumpReLU SAE on stories260K's resid_mid of layer 2 (d_model 64): its cfg
    and its weights, for the table below to break one thing of."""
    gen = torch.Generator().manual_seed(0)
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.2.hook_resid_mid"},
    }
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.zeros(d_in),
        "threshold": torch.full((d_sae,), 0.1),
    }
    return cfg, weights


def _as_topk(cfg, weights, **k):
    cfg.update(architecture="topk", **k)
    del weights["threshold"]


def _nan_in(weights, key):
    weights[key] = weights[key].clone()
    weights[key].view(-1)[3] = float("nan")


MALFORMED = {  # what is wrong: (break it, what the one line says)
    "metadata a string": (lambda c, w: c.update(metadata="blocks.2.hook_resid_mid"), "metadata is 'blocks"),
    "metadata a list": (lambda c, w: c.update(metadata=["blocks.2.hook_resid_mid"]), "metadata is ["),
    "architecture a list": (lambda c, w: c.update(architecture=["x"]), "architecture ['x'] cannot be"),
    "normalize_activations an object": (
        lambda c, w: c.update(normalize_activations={}),
        "normalize_activations {} cannot be",
    ),
    "hook_name a number": (lambda c, w: c["metadata"].update(hook_name=5), "hook_name 5 is not a hook"),
    "topk k a string": (lambda c, w: _as_topk(c, w, k="abc"), "k 'abc' is not a top-k size"),
    "topk without k": (lambda c, w: _as_topk(c, w), "k None is not a top-k size"),
    "topk k 1e5": (lambda c, w: _as_topk(c, w, k=1e5), "k 100000.0 is not a top-k size"),
    "jumprelu without threshold": (lambda c, w: w.pop("threshold"), "no threshold"),
    "skip transcoder without W_skip": (
        lambda c, w: c.update(
            architecture="jumprelu_skip_transcoder",
            d_out=64,
            metadata={"hook_name": "blocks.2.hook_resid_mid", "hook_name_out": "blocks.2.hook_mlp_out"},
        ),
        "no W_skip",
    ),
    "1-D W_enc": (lambda c, w: w.update(W_enc=w["W_enc"].flatten()), "W_enc has shape [6144]"),
    "1-D W_dec": (lambda c, w: w.update(W_dec=w["W_dec"].flatten()), "W_dec has shape [6144]"),
    "group_sizes with a negative size": (
        lambda c, w: c["metadata"].update(group_sizes=[140, -44]),
        "metadata.group_sizes [140, -44] is not a list of positive integers",
    ),
    "group_sizes of floats": (
        lambda c, w: c["metadata"].update(group_sizes=[96.0]),
        "metadata.group_sizes [96.0] is not",
    ),
    "group_sizes not summing to the features": (
        lambda c, w: c["metadata"].update(group_sizes=[32, 32]),
        "metadata.group_sizes [32, 32] is not",
    ),
    "another model's width": (
        lambda c, w: w.update({k: v for k, v in _jumprelu_sae(d_in=48)[1].items()}),
        "the dictionary's input width is 48; the model in",
    ),
    "a layer the model does not have": (
        lambda c, w: c["metadata"].update(hook_name="blocks.7.hook_resid_mid"),
        "layer 7 is out of range; the model has layers 0..4",
    ),
    "NaN in W_dec": (lambda c, w: _nan_in(w, "W_dec"), "W_dec holds NaN or infinite numbers"),
    "infinity in b_enc": (lambda c, w: w.update(b_enc=w["b_enc"] + float("inf")), "b_enc holds NaN"),
}


@pytest.fixture
def import_project(tiny_pipeline, tmp_path, monkeypatch):
    """A project directory (params.yaml, the prepared stories260K model) that `mtc import` runs in,
    in this process; returns it and a function running ``mtc import DIR --name x`` on a SAELens
    directory written from a cfg and weights, giving the exit code and stderr."""
    import yaml
    from safetensors.torch import save_file

    from mtc import cli
    from tests.conftest import tiny_params

    project = tmp_path / "project"
    (project / "data" / "models").mkdir(parents=True)
    (project / "data" / "models" / "stories260K").symlink_to(tiny_pipeline.model_dir.resolve())
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_pipeline.model.name)))
    monkeypatch.chdir(project)

    def mtc_import(cfg, weights, capsys) -> tuple[int, str]:
        saelens = tmp_path / "saelens"
        saelens.mkdir()
        (saelens / CFG_FILE).write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(saelens / "sae_weights.safetensors"))
        monkeypatch.setattr(sys, "argv", ["mtc", "import", str(saelens), "--name", "x"])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        return exit_.value.code, capsys.readouterr().err

    return project, mtc_import


def test_the_well_formed_sae_of_the_malformed_table_imports(import_project, capsys):
    project, mtc_import = import_project
    code, err = mtc_import(*_jumprelu_sae(), capsys)
    assert code == 0, err
    assert (project / "results" / "stories260K" / "2" / "imported" / "x" / "config.json").is_file()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_mtc_import_of_a_malformed_saelens_directory_is_one_line_exit_2_and_writes_nothing(
    import_project, capsys, case
):
    project, mtc_import = import_project
    cfg, weights = _jumprelu_sae()
    breaking, says = MALFORMED[case]
    breaking(cfg, weights)
    code, err = mtc_import(cfg, weights, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert says in err
    assert not (project / "results").exists(), "nothing written"


def test_mtc_import_refuses_a_name_that_holds_a_run_and_leaves_that_run_whole(import_project, capsys):
    project, mtc_import = import_project
    assert mtc_import(*_jumprelu_sae(), capsys)[0] == 0
    run_dir = project / "results" / "stories260K" / "2" / "imported" / "x"
    (run_dir / "metrics.json").write_text('{"fvu": 0.3}')  # what evaluate wrote for these weights
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    shutil.rmtree(project.parent / "saelens")
    code, err = mtc_import(*_jumprelu_sae(d_sae=128), capsys)  # other weights, the same --name
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: {Path('results/stories260K/2/imported/x')}: already exists" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- where an export goes
def test_an_export_over_an_earlier_export_of_another_dictionary_holds_only_the_new_one(trained, tmp_path):
    cfg, _ = trained
    evaluated = run_dir_of(cfg.dictionary("sae"), cfg.results_root)
    not_evaluated = Path(
        shutil.copytree(run_dir_of(cfg.dictionary("transcoder"), cfg.results_root), tmp_path / "tc")
    )
    (not_evaluated / "feature_frequency.safetensors").unlink()
    out = tmp_path / "export"
    export_saelens(evaluated, out)
    assert (out / SPARSITY_FILE).is_file()
    export_saelens(not_evaluated, out)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"], (
        "no sparsity of the earlier dictionary beside the new weights"
    )
    assert json.loads((out / CFG_FILE).read_text())["metadata"]["mtc_run"] == "transcoder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tc"], "no temporaries left"


def test_export_refuses_a_directory_it_did_not_write_and_changes_nothing_in_it(trained, tmp_path):
    from mtc.errors import ConfigError

    cfg, _ = trained
    run_dir = run_dir_of(cfg.dictionary("sae"), cfg.results_root)
    notes, elsewhere = tmp_path / "notes", tmp_path / "saelens-from-elsewhere"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    saelens_dictionary_on_disk(elsewhere, "StandardSAE", {}, 64, 0.1)  # SAELens's own files
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out in (notes, elsewhere):
        with pytest.raises(ConfigError, match="a directory holding other files"):
            export_saelens(run_dir, out)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_mtc_export_to_an_existing_file_is_one_line_and_leaves_the_file(trained, tmp_path):
    cfg, _ = trained
    run_dir = run_dir_of(cfg.dictionary("sae"), cfg.results_root)
    (tmp_path / "afile").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "export", str(run_dir), "afile"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "error: afile: a file is there; mtc export --format saelens writes a directory"
    )
    assert (tmp_path / "afile").read_text() == "mine"
