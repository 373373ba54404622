"""Export a per-layer transcoder set as circuit-tracer 0.5 reads it (``ReplacementModel.from_pretrained(
model_dir, set_dir)``): ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook``,
``feature_output_hook: hook_mlp_out``) and one ``layer_{i}.safetensors`` per layer.

Each layer holds ``W_enc`` [F, d_model], ``W_dec`` [F, d_model], ``b_enc`` [F], ``b_dec`` [d_model],
``activation_function.threshold`` [F] and, with a skip connection, ``W_skip`` [d_model, d_model]
(applied as ``x @ W_skip.T``). circuit-tracer encodes its input hook's activations with ``pre * (pre >
threshold)`` and no normalisation of its own, so the normalisation goes into the weights, as for
the SAELens export (the source mean into the encoder bias, the target scale into the codes):

- ``input_norm: global``: the input is the raw ``resid_mid`` (``hook_resid_mid``), the one scale
  folded into ``W_enc`` and ``W_skip``;
- ``input_norm: token``: the input is what the MLP reads, ``resid_mid`` through the block's RMSNorm
  (``mlp.hook_in``: ``gamma * x / rms(x)``, circuit-tracer's Llama mapping), which is our
  ``x / rms(x)`` times the norm's weight ``gamma``: dividing ``W_enc``'s and ``W_skip``'s input
  columns by ``gamma`` makes the two the same (up to the norm's epsilon). This needs the model's
  weights, so the export reads them from the model directory.

circuit-tracer needs every layer from 0 up, with one dictionary size and one input.

A cross-layer transcoder (``MatryoshkaCLT``, one run directory) is written as circuit-tracer's
``load_clt`` reads a directory: ``config.yaml`` (``model_kind: cross_layer_transcoder``), and per
layer i ``W_enc_{i}.safetensors`` (``W_enc_{i}`` [F, d_model], ``b_enc_{i}`` [F], ``b_dec_{i}``
[d_model], ``threshold_{i}`` [F]) and ``W_dec_{i}.safetensors`` (``W_dec_{i}`` [F, L - i, d_model]:
what layer i's features write to layers i .. L-1). circuit-tracer counts the layers by the
``W_enc_*`` files, encodes with ``pre * (pre > threshold)`` (no ReLU of its own: equal to ours for a
threshold >= 0, so a negative one is written as 0, which gives ReLU in both), and by default reads
decoder rows from ``W_dec_{i}.safetensors`` lazily, while it attributes: the export must stay in
place while a graph is built. Its directory loader has no skip connection (nor has ours). The
normalisation folds as for a set; the target scales go into the decoders (a feature writes to
several layers, each with its own scale) and the output biases, so codes are mtc's codes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from mtc.clt import MatryoshkaCLT, is_clt_dir
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.models import hub_id
from mtc.results import (
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    finished_run_record,
    swapped_in_dir,
)
from mtc.saelens import check_groups, folded_tensors, model_config

SET_CONFIG = "config.yaml"
LAYER_FILE = re.compile(r"layer_\d+\.safetensors")  # layer_{i}.safetensors
CLT_FILE = re.compile(r"W_(enc|dec)_\d+\.safetensors")  # W_enc_{i}.safetensors, W_dec_{i}.safetensors
GRAPH_SCRIPT = Path(__file__).parent / "external" / "circuit_tracer_graph.py"
SCORES_SCRIPT = Path(__file__).parent / "external" / "circuit_tracer_scores.py"
GRAPH_PROMPTS = Path(__file__).parent / "external" / "graph_prompts.txt"  # mtc graph-scores' fixed set
SCORES_KIND = "mtc graph scores"  # the "kind" of the JSON it writes
# circuit-tracer needs an older transformers than mtc: it lives in a virtualenv of its own
# (MTC_WITH_CIRCUIT_TRACER=1 bash scripts/setup.sh), found here unless MTC_CIRCUIT_TRACER_PYTHON says.
DEFAULT_PYTHON = Path(".venv-circuit-tracer") / "bin" / "python"


# circuit-tracer's hook for what a transcoder reads, per mtc input_norm
INPUT_HOOKS = {"global": "hook_resid_mid", "token": "mlp.hook_in"}


def export_circuit_tracer(
    run_dirs: list[str | Path],
    out: str | Path,
    n_groups: int | None = None,
    model_dir: str | Path | None = None,
) -> Path:
    """Write the finished transcoder runs in ``run_dirs`` (one per layer) as a set in ``out``.
    ``model_dir`` (what prepare_model wrote) is read for a set trained with ``input_norm: token``.
    The whole set is checked before anything is written; ``out`` must be new, empty or an earlier set
    of mtc's, and the set is written whole beside it and swapped in. A single cross-layer transcoder
    run is exported by ``export_clt_circuit_tracer``."""
    clts = [run_dir for run_dir in run_dirs if is_clt_dir(run_dir)]
    if clts and len(run_dirs) == 1:
        return export_clt_circuit_tracer(clts[0], out, n_groups, model_dir)
    if clts:
        raise ConfigError(
            f"{clts[0]}: a cross-layer transcoder covers every layer and is exported alone; "
            f"got {len(run_dirs)} run directories"
        )
    out = Path(out).resolve()
    check_output_dir(out, is_circuit_tracer_export, "mtc export --format circuit-tracer")
    by_layer: dict[int, tuple[Path, dict]] = {}
    for run_dir in map(Path, run_dirs):
        record = _transcoder_record(run_dir)
        layer = record["source_layer"]
        if layer in by_layer:
            raise ConfigError(
                f"{run_dir}: a second transcoder for layer {layer} (the first: {by_layer[layer][0]})"
            )
        by_layer[layer] = run_dir, record
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise ConfigError(
            f"the set has no transcoder for layer {missing[0]}: circuit-tracer needs every layer from 0"
        )
    dictionaries = {layer: MatryoshkaBatchTopK.load(run_dir) for layer, (run_dir, _) in by_layer.items()}
    norms = {d.shape.input_norm for d in dictionaries.values()}
    if len(norms) > 1:
        raise ConfigError(
            f"the set mixes input_norm {sorted(norms)}; circuit-tracer reads every layer at one hook"
        )
    [input_norm] = norms
    gammas = _mlp_input_norm_weights(model_dir, sorted(by_layer)) if input_norm == "token" else {}
    groups = {layer: check_groups(n_groups, d, str(by_layer[layer][0])) for layer, d in dictionaries.items()}
    sizes = {d.boundaries[groups[layer] - 1] for layer, d in dictionaries.items()}
    if len(sizes) > 1:
        raise ConfigError(f"the set's dictionaries have sizes {sorted(sizes)}; circuit-tracer needs one size")
    config = {
        "model_kind": "transcoder_set",
        "model_name": hub_id(by_layer[0][1].get("store_provenance", {}).get("model_name", "")),
        "feature_input_hook": INPUT_HOOKS[input_norm],
        "feature_output_hook": "hook_mlp_out",
        "scan": out.name,
        "transcoders": [str(out / f"layer_{layer}.safetensors") for layer in sorted(by_layer)],
    }
    with swapped_in_dir(out) as new:  # checked: now written, one layer at a time
        for layer in sorted(by_layer):
            tensors, _ = folded_tensors(dictionaries[layer], groups[layer])
            if layer in gammas:  # the input is gamma * x / rms(x): undo gamma in the weights that read it
                tensors["W_enc"] = tensors["W_enc"] / gammas[layer][:, None]
                if "W_skip" in tensors:
                    tensors["W_skip"] = tensors["W_skip"] / gammas[layer][None, :]
            layout = _circuit_tracer_layout(tensors)
            atomic_write_bytes(new / f"layer_{layer}.safetensors", save_tensors(layout))
        atomic_write_text(new / SET_CONFIG, yaml.safe_dump(config, sort_keys=False))
    return out


def is_circuit_tracer_set(directory: Path) -> bool:
    """Whether ``directory`` holds an earlier ``export_circuit_tracer`` and nothing else: its
    ``config.yaml`` (a ``transcoder_set`` naming layer files in this directory) and layer files."""
    if any(p.name != SET_CONFIG and not LAYER_FILE.fullmatch(p.name) for p in directory.iterdir()):
        return False
    try:
        config = yaml.safe_load((directory / SET_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(config, dict) or config.get("model_kind") != "transcoder_set":
        return False
    files = config.get("transcoders")
    return isinstance(files, list) and all(Path(str(f)).parent == directory.resolve() for f in files)


def export_clt_circuit_tracer(
    run_dir: str | Path,
    out: str | Path,
    n_groups: int | None = None,
    model_dir: str | Path | None = None,
) -> Path:
    """Write the finished cross-layer transcoder run in ``run_dir`` (its first ``n_groups`` groups of
    every layer) to ``out`` as circuit-tracer's ``load_clt`` reads it. ``model_dir`` (what
    prepare_model wrote) is read for ``input_norm: token`` (the MLP's norm weights) and, when given,
    to check that the CLT covers every layer of the model. ``out`` must be new, empty or an earlier
    circuit-tracer export of mtc's; it is written whole beside and swapped in."""
    run_dir, out = Path(run_dir), Path(out).resolve()
    check_output_dir(out, is_circuit_tracer_export, "mtc export --format circuit-tracer")
    record = finished_run_record(run_dir)
    clt = MatryoshkaCLT.load(run_dir)
    n_groups = check_groups(n_groups, clt, str(run_dir))
    if clt.shape.first_layer != 0:
        raise ConfigError(
            f"{run_dir}: a CLT from layer {clt.shape.first_layer}; circuit-tracer needs every layer from 0"
        )
    if model_dir is not None or clt.shape.input_norm == "token":
        n_model = model_config(model_dir, "a CLT with input_norm: token reads the MLP's norm weights").get(
            "num_hidden_layers"
        )
        if n_model is not None and n_model != clt.n_layers:
            raise ConfigError(
                f"{run_dir}: a CLT over {clt.n_layers} layers; the model in {model_dir} has {n_model}, "
                "and circuit-tracer replaces every layer's MLP"
            )
    gammas = _mlp_input_norm_weights(model_dir, clt.layers) if clt.shape.input_norm == "token" else {}
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": hub_id(record.get("store_provenance", {}).get("model_name", "")),
        "feature_input_hook": INPUT_HOOKS[clt.shape.input_norm],
        "feature_output_hook": "hook_mlp_out",
        "scan": out.name,
        "mtc_run": str(record.get("name") or run_dir.name),  # how a later export knows this one
    }
    with swapped_in_dir(out) as new:  # checked: now written, one layer at a time
        for i in range(clt.n_layers):
            encoder, decoder = clt_layer_tensors(clt, i, n_groups, gammas.get(i))
            atomic_write_bytes(new / f"W_enc_{i}.safetensors", save_tensors(encoder))
            atomic_write_bytes(new / f"W_dec_{i}.safetensors", save_tensors(decoder))
        atomic_write_text(new / SET_CONFIG, yaml.safe_dump(config, sort_keys=False))
    return out


def clt_layer_tensors(
    clt: MatryoshkaCLT, i: int, n_groups: int, gamma: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Layer i of ``clt`` (its first ``n_groups`` groups) as plain weights on circuit-tracer's input
    hook: the raw ``resid_mid`` (``input_norm: global``), or ``gamma * x / rms(x)`` (``token``, with
    ``gamma`` the MLP's norm weight). Returns (``W_enc_{i}`` file, ``W_dec_{i}`` file) contents."""
    end = clt.boundaries[n_groups - 1]
    with torch.no_grad():
        W_enc_FD = clt.W_encT[i][:end].double()
        if gamma is not None:  # x / rms(x) = input / gamma
            input_scale_D = 1 / gamma.double()
        else:
            input_scale_D = clt.source_scale[i].double().expand(clt.d_model)
        target_scale_T = clt.target_scale[i:].double()  # the layers it writes, i .. L-1
        encoder = {
            f"W_enc_{i}": W_enc_FD * input_scale_D[None, :],
            f"b_enc_{i}": clt.b_enc[i][:end].double() - W_enc_FD @ clt.source_mean[i].double(),
            f"b_dec_{i}": clt.output_bias()[i].double(),
            f"threshold_{i}": clt.threshold[i].double().clamp_min(0).expand(end),
        }
        decoder = {f"W_dec_{i}": clt.W_dec[i][:end].double() / target_scale_T[None, :, None]}
    return _float32(encoder), _float32(decoder)


def _float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float().contiguous() for k, v in tensors.items()}


def is_circuit_tracer_export(directory: Path) -> bool:
    """Whether ``directory`` holds an earlier circuit-tracer export of mtc's: a set or a CLT."""
    return is_circuit_tracer_set(directory) or is_circuit_tracer_clt(directory)


def is_circuit_tracer_clt(directory: Path) -> bool:
    """Whether ``directory`` holds an earlier ``export_clt_circuit_tracer`` and nothing else: its
    ``config.yaml`` (a ``cross_layer_transcoder`` naming the mtc run) and ``W_enc_*``/``W_dec_*`` files."""
    if any(p.name != SET_CONFIG and not CLT_FILE.fullmatch(p.name) for p in directory.iterdir()):
        return False
    try:
        config = yaml.safe_load((directory / SET_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_kind") == "cross_layer_transcoder"
        and "mtc_run" in config
    )


def _mlp_input_norm_weights(model_dir: str | Path | None, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's RMSNorm weight in front of the MLP (Llama: ``post_attention_layernorm``)."""
    config = model_config(
        model_dir,
        "a set trained with input_norm: token reads the MLP's input norm weights from the model "
        "prepare_model wrote",
    )
    model_dir = Path(model_dir)
    architectures = config.get("architectures") or []
    if architectures != ["LlamaForCausalLM"]:
        raise ConfigError(
            f"{model_dir}: a {architectures} model; exporting an input_norm: token set for circuit-tracer "
            "is built for Llama-architecture models (train the set with input_norm: global for others)"
        )
    names = {layer: f"model.layers.{layer}.post_attention_layernorm.weight" for layer in layers}
    gammas = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for layer, name in names.items():
                if name in f.keys():
                    gammas[layer] = f.get_tensor(name).float()
    missing = [names[layer] for layer in layers if layer not in gammas]
    if missing:
        raise ConfigError(f"{model_dir}: no tensor {missing[0]} in its safetensors files")
    tiny = [layer for layer, g in gammas.items() if float(g.abs().min()) < 1e-6]
    if tiny:
        raise ConfigError(
            f"{model_dir}: layer {tiny[0]}'s MLP input norm has a zero weight; its input cannot be undone"
        )
    return gammas


def _circuit_tracer_layout(tensors: dict) -> dict:
    """SAELens's layout (``W_enc`` [d_in, F], ``threshold``) as circuit-tracer names and lays it out."""
    layout = {
        "W_enc": tensors["W_enc"].T.contiguous(),
        "W_dec": tensors["W_dec"],
        "b_enc": tensors["b_enc"],
        "b_dec": tensors["b_dec"],
        "activation_function.threshold": tensors["threshold"],
    }
    if "W_skip" in tensors:
        layout["W_skip"] = tensors["W_skip"]  # [d_out, d_in]: both lay it out as x @ W_skip.T
    return layout


def _transcoder_record(run_dir: Path) -> dict:
    record = finished_run_record(run_dir)
    shape = (record.get("kind"), record.get("source_site"), record.get("target_site"))
    if shape != ("transcoder", "resid_mid", "mlp_out") or record["source_layer"] != record["target_layer"]:
        raise ConfigError(
            f"{run_dir}: a {record.get('kind')} from {record.get('source_site')} to "
            f"{record.get('target_site')}; a circuit-tracer set holds transcoders "
            "resid_mid -> mlp_out of the same layer"
        )
    return record


def circuit_tracer_python(python: str | Path | None = None) -> Path:
    """The interpreter of circuit-tracer's virtualenv: ``python``, $MTC_CIRCUIT_TRACER_PYTHON, or
    ``.venv-circuit-tracer/bin/python``."""
    path = Path(python or os.environ.get("MTC_CIRCUIT_TRACER_PYTHON") or DEFAULT_PYTHON)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no circuit-tracer virtualenv there; make it with "
            "MTC_WITH_CIRCUIT_TRACER=1 bash scripts/setup.sh, or pass --python"
        )
    return path


def graph_command(
    python: Path, model_dir: Path, set_dir: Path, out: Path, prompt: str, slug: str, max_feature_nodes: int
) -> list[str]:
    """The helper's command line: options first (``--slug=S``, whatever S is), then ``--`` and the
    positional arguments, so that a prompt (or a path) starting with ``-`` is read as itself."""
    options = [f"--slug={slug}", f"--max-feature-nodes={max_feature_nodes}"]
    return [str(python), str(GRAPH_SCRIPT), *options, "--", str(model_dir), str(set_dir), str(out), prompt]


def attribute(
    set_dir: str | Path,
    prompt: str,
    out: str | Path,
    model_dir: str | Path,
    python: str | Path | None = None,
    slug: str = "graph",
    max_feature_nodes: int = 7500,
) -> dict:
    """Build circuit-tracer's attribution graph of ``prompt`` over an exported set (``mtc export
    --format circuit-tracer``) in circuit-tracer's own virtualenv; returns its summary (see
    ``external/circuit_tracer_graph.py`` for what ``out`` then holds)."""
    set_dir, model_dir, out = Path(set_dir), Path(model_dir), Path(out)
    _check_export_and_model(set_dir, model_dir, "a transcoder set")
    command = graph_command(
        circuit_tracer_python(python), model_dir, set_dir, out, prompt, slug, max_feature_nodes
    )
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ConfigError(f"circuit-tracer failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return json.loads((out / "summary.json").read_text())


def _check_export_and_model(export_dir: Path, model_dir: Path, what: str) -> None:
    """What circuit-tracer's virtualenv is about to read: an export (its config.yaml) and a model."""
    if not (export_dir / SET_CONFIG).is_file():
        raise ConfigError(
            f"{export_dir}: not {what} (no {SET_CONFIG}); write one with "
            "mtc export RUN_DIR... OUT --format circuit-tracer"
        )
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: not a model directory (no config.json); run mtc prepare-model")


def graph_scores(
    export_dir: str | Path,
    model_dir: str | Path,
    prompts_file: str | Path = GRAPH_PROMPTS,
    out_json: str | Path = "graph_scores.json",
    python: str | Path | None = None,
) -> dict:
    """circuit-tracer's graph scores of an exported set or CLT over a fixed prompt set, in
    circuit-tracer's own virtualenv: per prompt and their means, the replacement and completeness
    scores and the feature and error nodes of the pruned graph, with fixed attribution and pruning
    settings (``external/circuit_tracer_scores.py``). Written to ``out_json`` (new, or an earlier
    one of these) and returned."""
    export_dir, model_dir, out_json = Path(export_dir), Path(model_dir), Path(out_json)
    prompts_file = Path(prompts_file)
    _check_export_and_model(export_dir, model_dir, "a circuit-tracer export")
    if not prompts_file.is_file():
        raise ConfigError(f"{prompts_file}: no prompt file there")
    if out_json.exists() and not _is_graph_scores(out_json):
        raise ConfigError(f"{out_json}: a file mtc graph-scores did not write is there; give a new path")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_json.parent, prefix=".graph-scores-") as work:
        written = Path(work) / "scores.json"
        command = [
            str(circuit_tracer_python(python)),
            str(SCORES_SCRIPT),
            "--",
            *(str(p.resolve()) for p in (model_dir, export_dir, prompts_file)),
            str(written),
        ]
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise ConfigError(f"circuit-tracer failed: {lines[-1] if lines else f'exit {result.returncode}'}")
        scores = json.loads(written.read_text())
    atomic_write_text(out_json, json.dumps(scores, indent=2) + "\n")
    return scores


def _is_graph_scores(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("kind") == SCORES_KIND
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
