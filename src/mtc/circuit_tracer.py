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

from pathlib import Path

import yaml
from safetensors.torch import save as save_tensors

from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.models import hub_id
from mtc.results import atomic_write_bytes, atomic_write_text, finished_run_record
from mtc.saelens import check_groups, saelens_tensors

SET_CONFIG = "config.yaml"


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
