"""Export a per-layer transcoder set as circuit-tracer 0.5 reads it (``ReplacementModel.from_pretrained(
model_dir, set_dir)``): ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook:
hook_resid_mid``, ``feature_output_hook: hook_mlp_out``) and one ``layer_{i}.safetensors`` per layer.

Each layer holds ``W_enc`` [F, d_model], ``W_dec`` [F, d_model], ``b_enc`` [F], ``b_dec`` [d_model],
``activation_function.threshold`` [F] and, with a skip connection, ``W_skip`` [d_model, d_model]
(applied as ``x @ W_skip.T``). circuit-tracer encodes the raw ``resid_mid`` with ``pre * (pre >
threshold)``, no normalisation: the same folding as the SAELens export (global scale and source mean
into the encoder, target scale into the codes), so only ``input_norm: global`` transcoders export.
circuit-tracer needs every layer from 0 up, with one dictionary size.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml
from safetensors.torch import save as save_tensors

from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.models import hub_id
from mtc.results import atomic_write_bytes, atomic_write_text, finished_run_record
from mtc.saelens import check_groups, saelens_tensors

SET_CONFIG = "config.yaml"
GRAPH_SCRIPT = Path(__file__).parent / "external" / "circuit_tracer_graph.py"
# circuit-tracer needs an older transformers than mtc: it lives in a virtualenv of its own
# (MTC_WITH_CIRCUIT_TRACER=1 bash scripts/setup.sh), found here unless MTC_CIRCUIT_TRACER_PYTHON says.
DEFAULT_PYTHON = Path(".venv-circuit-tracer") / "bin" / "python"


def export_circuit_tracer(run_dirs: list[str | Path], out: str | Path, n_groups: int | None = None) -> Path:
    """Write the finished transcoder runs in ``run_dirs`` (one per layer) as a set in ``out``."""
    out = Path(out).resolve()
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
    layer_files = []
    sizes = set()
    for layer, (run_dir, record) in sorted(by_layer.items()):
        dictionary = MatryoshkaBatchTopK.load(run_dir)
        if dictionary.shape.input_norm != "global":
            raise ConfigError(
                f"{run_dir}: input_norm is {dictionary.shape.input_norm}; circuit-tracer encodes the raw "
                "resid_mid, which only input_norm: global can be folded into: train the set with it"
            )
        tensors, _ = saelens_tensors(dictionary, check_groups(n_groups, dictionary, str(run_dir)))
        sizes.add(tensors["b_enc"].numel())
        layer_file = out / f"layer_{layer}.safetensors"
        atomic_write_bytes(layer_file, save_tensors(_circuit_tracer_layout(tensors)))
        layer_files.append(str(layer_file))
    if len(sizes) > 1:
        raise ConfigError(f"the set's dictionaries have sizes {sorted(sizes)}; circuit-tracer needs one size")
    first = by_layer[0][1]
    config = {
        "model_kind": "transcoder_set",
        "model_name": hub_id(first.get("store_provenance", {}).get("model_name", "")),
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "scan": out.name,
        "transcoders": layer_files,
    }
    atomic_write_text(out / SET_CONFIG, yaml.safe_dump(config, sort_keys=False))
    return out


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
    if not (set_dir / SET_CONFIG).is_file():
        raise ConfigError(
            f"{set_dir}: not a transcoder set (no {SET_CONFIG}); write one with "
            "mtc export RUN_DIR... OUT --format circuit-tracer"
        )
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: not a model directory (no config.json); run mtc prepare-model")
    command = [str(circuit_tracer_python(python)), str(GRAPH_SCRIPT), str(model_dir), str(set_dir), str(out)]
    command += [prompt, "--slug", slug, "--max-feature-nodes", str(max_feature_nodes)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ConfigError(f"circuit-tracer failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return json.loads((out / "summary.json").read_text())
