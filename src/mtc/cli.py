"""``mtc``: the pipeline's stages outside DVC, plus the seed's one-command training runs.

mtc prepare-model | extract | train [NAME...] | evaluate NAME | mine NAME   (params.yaml)
mtc smoke --layer 8 --steps 2000                                           (quick transcoder)
mtc train --model-name gpt2 --source-layer 8 --target-layer 8 --config overrides.yaml
mtc train --mode multi                                                     (all, one pass)
mtc samples RUN_DIR [--feature F]                                          (show contexts)
mtc browse RUN_DIR [--out DIR]                                             (static HTML browser)
mtc export RUN_DIR OUT --format saelens [--groups N]                       (SAELens v6 directory)
mtc export RUN_DIR... OUT --format circuit-tracer                          (a per-layer transcoder set)
mtc export CLT_RUN_DIR OUT --format circuit-tracer                         (a cross-layer transcoder)
mtc import DIR --format saelens --name NAME                                (a SAELens dictionary)
mtc summarize-set                                                          (FVU per layer of a set)
mtc replacement-set                                                        (a set's replacement model)
mtc attribute SET "prompt" [--out DIR]                                     (circuit-tracer graph)
mtc graph-scores EXPORT_DIR [--out FILE]                                   (scores over fixed prompts)
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Optional

import typer

from mtc import pipeline
from mtc.config import ConfigError, PipelineConfig, parse_params, read_yaml
from mtc.errors import StoreError, one_line_exit

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Matryoshka transcoders and SAEs trained from cached activations.",
)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file.")


def _load(params: Path, raw: Optional[dict] = None) -> PipelineConfig:
    """Validated params, checked against the model's config when it is on disk."""
    cfg = parse_params(read_yaml(params) if raw is None else raw)
    pipeline.check_model_facts(cfg)
    return cfg


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


@app.command("prepare-model")
def prepare_model(params: Path = ParamsOption) -> None:
    """Write model.name as a local model directory (data/models/{model.type})."""
    typer.echo(f"wrote {pipeline.prepare_model(_load(params))}")


@app.command()
def extract(params: Path = ParamsOption) -> None:
    """Run the model over the dataset and write the activation store."""
    typer.echo(f"wrote {pipeline.extract(_load(params))}")


@app.command()
def evaluate(name: str, params: Path = ParamsOption) -> None:
    """Held-out FVU, feature statistics and spliced loss per prefix of dictionary NAME (a params
    entry, or a run directory such as one `mtc import` wrote) -> metrics.json, plots/."""
    typer.echo(f"wrote {pipeline.evaluate(_load(params), name)}")


@app.command("summarize-set")
def summarize_set(params: Path = ParamsOption) -> None:
    """Held-out FVU per layer of params.yaml's transcoder_set (results/sets/{model}/{set}/)."""
    cfg = _load(params)
    if cfg.transcoder_set is None or not cfg.transcoder_set.layers:  # the DVC stage writes empty outputs
        raise ConfigError(f"transcoder_set.layers: {params} lists none, so there is no set to summarize")
    typer.echo(f"wrote {pipeline.summarize_set(cfg)}")


@app.command("replacement-set")
def replacement_set(params: Path = ParamsOption) -> None:
    """The replacement model of params.yaml's transcoder_set: every MLP replaced by its layer's
    transcoder at once, against the clean model and ablating those MLPs
    (results/sets/{model}/{set}/replacement.json)."""
    from mtc.replacement import replace_set, replacement_table
    from mtc.results import read_json

    cfg = _load(params)
    if cfg.transcoder_set is None or not cfg.transcoder_set.layers:
        raise ConfigError(
            f"transcoder_set.layers: {params} lists none, so there is no replacement model to measure"
        )
    out = replace_set(cfg, pipeline.open_store(cfg))
    typer.echo(replacement_table(read_json(out)))
    typer.echo(f"wrote {out}")


@app.command()
def finetune(
    clt_name: Optional[str] = typer.Argument(
        None, help="A clt entry of params.yaml (default: the transcoder set)."
    ),
    out: Path = typer.Option(..., "--out", help="Where the fine-tuned dictionaries and their metrics go."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    lr: float = typer.Option(1e-4, help="Adam's learning rate."),
    windows_per_step: int = typer.Option(4, help="Training windows per step."),
    mse_coefficient: float = typer.Option(1.0, help="Weight of the layers' mean FVU beside the KL."),
    params: Path = ParamsOption,
) -> None:
    """KL fine-tuning: train the transcoder set (or CLT CLT_NAME) further through the model with every
    MLP replaced at once, so that the replaced model predicts what the model predicts; measures the
    replacement model before and after (OUT/finetune.json, OUT/replacement.json)."""
    from mtc.finetune import FinetuneSettings, finetune_replacement
    from mtc.results import read_json

    settings = FinetuneSettings(steps, lr, windows_per_step, mse_coefficient)
    cfg = _load(params)
    written = finetune_replacement(cfg, pipeline.open_store(cfg), clt_name, settings, out)
    summary = read_json(written)
    for when in ("before", "after"):
        typer.echo(
            f"{when:>6}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary[when].items() if v is not None)
        )
    typer.echo(f"wrote {written.parent}")


@app.command()
def mine(name: str, params: Path = ParamsOption) -> None:
    """Top and quantile contexts, histograms and logit effects of every feature of dictionary NAME
    (a params entry or a run directory)."""
    typer.echo(f"wrote {pipeline.mine(_load(params), name)}")


def model_type_of(model_name: str) -> str:
    """``packaged:X`` -> X, ``google/gemma-2-2b`` -> gemma-2-2b, ``/path/to/dir`` -> dir."""
    name = model_name.removeprefix("packaged:").rstrip("/")
    return re.sub(r"[^A-Za-z0-9._-]", "-", name.split("/")[-1])


def adhoc_params(
    raw: dict[str, Any],
    *,
    model_name: Optional[str],
    source_layer: int,
    target_layer: int,
    overrides: dict[str, Any],
    steps: Optional[int],
) -> tuple[dict[str, Any], str]:
    """params.yaml content for one transcoder run given on the command line (the seed's scripts)."""
    raw = copy.deepcopy(raw)
    if model_name:
        raw["model"] = {**raw.get("model", {}), "name": model_name, "type": model_type_of(model_name)}
    for section in ("model", "dataset", "extract", "evaluate", "mine"):
        if isinstance(overrides.get(section), dict):
            raw[section] = {**raw.get(section, {}), **overrides.pop(section)}
    entry = {
        "kind": "transcoder",
        "source_site": "resid_mid",
        "target_site": "mlp_out",
        **overrides,
        "layer": source_layer,
        "target_layer": target_layer,
    }
    if steps is not None:
        entry["steps"] = steps
    # the results path names the source layer only: a cross-layer run's name carries the target
    default_name = entry["kind"] if target_layer == source_layer else f"{entry['kind']}-to-L{target_layer}"
    name = entry.pop("name", default_name)
    sites = sorted({entry["source_site"], entry["target_site"]})
    raw["extract"] = {
        **raw.get("extract", {}),
        "layers": sorted({source_layer, target_layer}),
        "sites": sites,
    }
    raw["dictionaries"] = {name: entry}
    return raw, name


def _ensure_store(cfg: PipelineConfig) -> None:
    """Extract (and prepare the model) first when no matching store exists."""
    try:
        store = pipeline.open_store(cfg)
        for d in cfg.dictionaries.values():  # every site the run reads must be in the store
            store.site(d.layer, d.source_site)
            store.site(d.resolved_target_layer, d.target_site)
        return
    except StoreError as e:
        typer.echo(f"no usable store ({e}); extracting")
    if not (cfg.model_dir / "config.json").is_file():
        pipeline.prepare_model(cfg)
    pipeline.extract(cfg)


@app.command()
def train(
    names: list[str] = typer.Argument(None, help="Dictionaries of params.yaml to train (default: all)."),
    params: Path = ParamsOption,
    mode: str = typer.Option("single", help="single: one pass per dictionary; multi: one pass feeds all."),
    model_name: Optional[str] = typer.Option(
        None, help="Train a transcoder on this model (hub id, dir, packaged:X)."
    ),
    source_layer: Optional[int] = typer.Option(None, help="Source layer of a command-line transcoder."),
    target_layer: Optional[int] = typer.Option(None, help="Target layer (default: source layer)."),
    config: Optional[Path] = typer.Option(
        None, help="YAML of dictionary settings (and optional model/dataset sections)."
    ),
    steps: Optional[int] = typer.Option(None, help="Training steps of a command-line transcoder."),
) -> None:
    """Train dictionaries from the activation store.

    With --model-name/--source-layer (the seed's full run) the store is extracted first when missing,
    and the run is evaluated and mined after training.
    """
    if mode not in ("single", "multi"):
        _fail(f"--mode: got {mode!r}; expected single or multi")
    raw = read_yaml(params) if params.is_file() else {}
    if model_name is not None or source_layer is not None:
        if source_layer is None:
            _fail("--source-layer: required with --model-name")
        overrides = read_yaml(config) if config else {}
        if not isinstance(overrides, dict):
            _fail(f"{config}: expected a mapping of settings")
        raw, name = adhoc_params(
            raw,
            model_name=model_name,
            source_layer=source_layer,
            target_layer=source_layer if target_layer is None else target_layer,
            overrides=overrides,
            steps=steps,
        )
        cfg = _load(params, raw)
        _full_run(cfg, name)
        return
    cfg = _load(params, raw)
    names = names or list(cfg.dictionaries)
    if not names:
        _fail(f"dictionaries: {params} defines none")
    groups = [names] if mode == "multi" else [[n] for n in names]
    for group in groups:
        for run_dir in pipeline.train(cfg, group):
            typer.echo(f"wrote {run_dir}")


def _full_run(cfg: PipelineConfig, name: str) -> None:
    _ensure_store(cfg)
    for run_dir in pipeline.train(cfg, [name]):
        typer.echo(f"wrote {run_dir}")
    typer.echo(f"wrote {pipeline.evaluate(cfg, name)}")
    typer.echo(f"wrote {pipeline.mine(cfg, name)}")


@app.command()
def smoke(
    layer: int = typer.Option(8),
    steps: int = typer.Option(2000),
    params: Path = ParamsOption,
    model_name: Optional[str] = typer.Option(None, help="Default: model.name of params.yaml."),
) -> None:
    """Quick transcoder (resid_mid -> mlp_out at LAYER, the model's preset) end to end: the seed's
    GPT-2 smoke test. Extracts first when no store matches."""
    raw = read_yaml(params) if params.is_file() else {}
    raw, name = adhoc_params(
        raw, model_name=model_name, source_layer=layer, target_layer=layer, overrides={}, steps=steps
    )
    _full_run(_load(params, raw), name)


@app.command()
def samples(
    directory: Path = typer.Argument(..., help="A run directory or its activation_samples/<source>/."),
    feature: Optional[int] = typer.Option(None, help="Feature to show (default: the 3 strongest)."),
    n: int = typer.Option(5, "-n", "--n-samples", help="Contexts per feature."),
) -> None:
    """Show top-activating contexts as text, the activating token in «»."""
    from mtc.samples import META_FILE, ActivationSampleAnalyzer

    if not (directory / META_FILE).is_file():
        from mtc.results import MINED_SAMPLES_DIR

        directory = directory / MINED_SAMPLES_DIR
    if not (directory / META_FILE).is_file():
        _fail(f"{directory}: no activation samples here (run mtc mine)")
    analyzer = ActivationSampleAnalyzer(directory)
    for f in [feature] if feature is not None else analyzer.features()[:3]:
        typer.echo(analyzer.show(f, n))


@app.command()
def browse(
    run_dir: Path = typer.Argument(..., help="A run directory (results/{model}/{layer}/{steps}/{name})."),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Where to write the site (default RUN_DIR/browser): new, empty, or an earlier site.",
    ),
    max_feature_pages: Optional[int] = typer.Option(None, help="Write at most this many feature pages."),
    contexts: int = typer.Option(10, help="Top contexts per feature page."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the one mine used)."),
) -> None:
    """Write a static HTML feature browser (index + one page per feature that fired) from mined samples."""
    from mtc.browse import build_site
    from mtc.config import BrowseConfig, check_config

    try:
        cfg = BrowseConfig(max_feature_pages=max_feature_pages, contexts_per_feature=contexts)
        check_config(cfg, "browse")
    except ConfigError as e:
        _fail(
            str(e)
            .replace("browse.max_feature_pages", "--max-feature-pages")
            .replace("browse.contexts_per_feature", "--contexts")
        )
    if (
        tokenizer is not None
        and not (tokenizer / "tokenizer_config.json").is_file()
        and not (tokenizer / "tokenizer.json").is_file()
    ):
        _fail(f"--tokenizer: {tokenizer} holds no tokenizer")
    tok = None
    if tokenizer is not None:
        from mtc.models import load_tokenizer

        tok = load_tokenizer(tokenizer)
    index = build_site(run_dir, out, cfg, tok)
    typer.echo(f"wrote {index} (open it in a browser; no server needed)")


@app.command()
def export(
    paths: list[Path] = typer.Argument(
        ...,
        help="RUN_DIR OUT (saelens), or RUN_DIR... OUT (circuit-tracer: one transcoder per layer, "
        "or one cross-layer transcoder).",
    ),
    format: str = typer.Option("saelens", "--format", help="saelens | circuit-tracer"),
    groups: Optional[int] = typer.Option(None, "--groups", help="Export the prefix of the first N groups."),
    model_dir: Optional[Path] = typer.Option(
        None,
        "--model-dir",
        help="Where the model's norm weights are read (default: from params.yaml).",
    ),
    params: Path = ParamsOption,
) -> None:
    """Write trained dictionaries in another tool's format: a SAELens v6 directory
    (SAE.load_from_disk), or a circuit-tracer transcoder set or cross-layer transcoder
    (ReplacementModel.from_pretrained)."""
    if len(paths) < 2:
        _fail("export: give RUN_DIR... and OUT")
    *run_dirs, out = paths
    params_problem = None
    if model_dir is None and params.is_file():
        try:  # only exports that need the model's norms read it: a broken params.yaml stops no other
            model_dir = _load(params).model_dir
        except ConfigError as e:
            params_problem = e
    try:
        _export(format, run_dirs, out, groups, model_dir)
    except ConfigError as e:
        if params_problem is None or "--model-dir" not in str(e):
            raise
        raise ConfigError(f"{e} (the default, from {params}: {params_problem})") from None


def _export(format: str, run_dirs: list[Path], out: Path, groups: int | None, model_dir: Path | None) -> None:
    if format == "saelens":
        from mtc.saelens import export_saelens

        if len(run_dirs) != 1:
            _fail(f"--format saelens: exports one run directory; got {len(run_dirs)}")
        written = export_saelens(run_dirs[0], out, groups, model_dir)
        typer.echo(f"wrote {written} (sae_lens: SAE.load_from_disk({str(written)!r}))")
    elif format == "circuit-tracer":
        from mtc.circuit_tracer import export_circuit_tracer

        written = export_circuit_tracer(run_dirs, out, groups, model_dir)
        typer.echo(
            f"wrote {written} (circuit_tracer: ReplacementModel.from_pretrained(MODEL_DIR, {str(written)!r}))"
        )
    else:
        _fail(f"--format: got {format!r}; expected saelens or circuit-tracer")


@app.command()
def attribute(
    set_dir: Path = typer.Argument(..., help="A set written by `mtc export ... --format circuit-tracer`."),
    prompt: str = typer.Argument(..., help="The prompt to attribute."),
    out: Path = typer.Option(Path("attribution"), "--out", help="Where the graph and its picture go."),
    slug: str = typer.Option("graph", "--slug", help="The graph's name in circuit-tracer's viewer."),
    max_feature_nodes: int = typer.Option(7500, "--max-feature-nodes"),
    python: Optional[Path] = typer.Option(
        None, "--python", help="circuit-tracer's interpreter (default: .venv-circuit-tracer/bin/python)."
    ),
    params: Path = ParamsOption,
) -> None:
    """An attribution graph of PROMPT over a transcoder set, with circuit-tracer (in its own
    virtualenv), for the model that params.yaml's prepare_model wrote."""
    from mtc.circuit_tracer import attribute as attribute_graph

    cfg = _load(params)
    summary = attribute_graph(set_dir, prompt, out, cfg.model_dir, python, slug, max_feature_nodes)
    typer.echo(
        f"{summary['active_features']} active features; pruned graph: {summary['pruned_nodes']}, "
        f"{summary['pruned_links']} links"
    )
    typer.echo(
        f"wrote {summary['picture']} and {out / 'graph_files'} (view: .venv-circuit-tracer/bin/"
        f"circuit-tracer start-server --graph_file_dir {out / 'graph_files'}; needs internet for its JS)"
    )


@app.command("graph-scores")
def graph_scores(
    export_dir: Path = typer.Argument(
        ..., help="A set or CLT written by `mtc export ... --format circuit-tracer`."
    ),
    out: Path = typer.Option(Path("graph_scores.json"), "--out", help="Where the scores go (JSON)."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="One prompt a line (default: mtc's fixed set, external/graph_prompts.txt)."
    ),
    python: Optional[Path] = typer.Option(
        None, "--python", help="circuit-tracer's interpreter (default: .venv-circuit-tracer/bin/python)."
    ),
    params: Path = ParamsOption,
) -> None:
    """circuit-tracer's replacement and completeness scores, and the pruned graph's feature and error
    nodes, of every prompt of a fixed set and their means, for the model params.yaml's prepare_model
    wrote."""
    from mtc.circuit_tracer import GRAPH_PROMPTS
    from mtc.circuit_tracer import graph_scores as scores_of

    cfg = _load(params)
    scores = scores_of(export_dir, cfg.model_dir, prompts or GRAPH_PROMPTS, out, python)
    mean = scores["mean"]
    typer.echo(
        f"{len(scores['prompts'])} prompts: replacement score {mean['replacement_score']:.4f}, completeness "
        f"{mean['completeness_score']:.4f}; pruned graphs: {mean['pruned_feature_nodes']:.1f} feature and "
        f"{mean['pruned_error_nodes']:.1f} error nodes; {mean['seconds']:.1f} s a prompt"
    )
    typer.echo(f"wrote {out}")


@app.command("import")
def import_(
    directory: Path = typer.Argument(
        ..., help="A SAELens SAE or transcoder directory (cfg.json, sae_weights.safetensors)."
    ),
    name: str = typer.Option(..., "--name", help="The dictionary's name in results/."),
    format: str = typer.Option("saelens", "--format", help="saelens: a SAELens directory."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Default: results/{model.type}/{layer}/imported/NAME."
    ),
    params: Path = ParamsOption,
) -> None:
    """Turn a dictionary trained elsewhere into a new run directory (an existing one is never
    replaced): `mtc evaluate RUN_DIR`, `mtc mine RUN_DIR` and `mtc browse RUN_DIR` then work on it,
    on this project's store."""
    if format != "saelens":
        _fail(f"--format: got {format!r}; expected saelens")
    from mtc.config import Name, check_value
    from mtc.saelens import import_saelens

    cfg = _load(params)
    check_value("--name", name, Name)
    written = import_saelens(directory, name, cfg.model.type, out, cfg.results_root, cfg.model_dir)
    typer.echo(f"wrote {written} (next: mtc evaluate {written})")


def main() -> None:
    with one_line_exit(lambda line: typer.secho(line, fg="red", err=True)):
        app()


if __name__ == "__main__":
    main()
