"""Export a trained dictionary as a SAELens v6 directory (``SAE.load_from_disk`` reads it as it is).

mtc's inference is a JumpReLU with one threshold for every feature, on a normalised, mean-shifted
source; each of those steps folds into a SAELens architecture's weights:

- the source's normalisation: ``input_norm: token`` (each row divided by its own RMS) is SAELens's
  ``normalize_activations: constant_norm_rescale`` (``x * sqrt(d_in) / ||x||``, the same number);
  ``global`` (one scale) folds into ``W_enc``, and the export says ``none``;
- the source mean subtracted before encoding folds into ``b_enc`` (``apply_b_dec_to_input: false``,
  which SAELens requires of transcoders anyway);
- the threshold becomes the per-feature ``threshold`` of ``jumprelu`` / ``jumprelu_transcoder``
  (SAELens keeps ``relu(h) * (h > threshold)``, ours ``relu(h) * (relu(h) > threshold)``: equal for a
  threshold >= 0, which a calibrated threshold is);
- a skip connection becomes ``jumprelu_skip_transcoder``'s ``W_skip`` [d_out, d_in], a map of the raw
  source, so only a globally scaled skip transcoder exports: with ``input_norm: token`` our skip reads
  ``x / rms(x)``, which no SAELens architecture computes.

Decoder rows stay unit norm, so SAELens's ``fold_W_dec_norm`` (which SAEBench calls) changes nothing.
The target's scale folds into the codes instead: a SAELens code is the mtc code times
``metadata.mtc_code_scale`` (1 for an SAE with per-token scaling, whose output SAELens scales back
per row as ours does; ``1 / target_scale`` otherwise, i.e. codes in the target's raw units).
``--groups N`` exports the Matryoshka prefix of the first N groups: encoding is per feature at
inference, so a prefix is a slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.models import PACKAGED, hook_name
from mtc.results import CONFIG_FILE, FREQUENCY_FILE, atomic_write_bytes, atomic_write_text, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The cfg.json format written (v6 nested form); SAELens converts configs older than 6.0 and would
drop the ``metadata`` block of one that does not name its version."""


def export_saelens(run_dir: str | Path, out: str | Path, n_groups: int | None = None) -> Path:
    """Write the finished run in ``run_dir`` (or its first ``n_groups`` groups) to ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    record = _finished_run_record(run_dir)
    dictionary = MatryoshkaBatchTopK.load(run_dir)
    n_groups = _check_groups(n_groups, len(dictionary.group_sizes))
    tensors, code_scale = saelens_tensors(dictionary, n_groups)
    cfg = saelens_cfg(dictionary, record, n_groups, code_scale)
    atomic_write_bytes(out / WEIGHTS_FILE, save_tensors(tensors))
    atomic_write_text(out / CFG_FILE, json.dumps(cfg, indent=2) + "\n")
    if (run_dir / FREQUENCY_FILE).is_file():  # from evaluate: SAELens's log10 feature density
        log10_freq = load_file(str(run_dir / FREQUENCY_FILE))["log10_frequency"][: cfg["d_sae"]]
        sparsity = torch.log10(torch.pow(10.0, log10_freq.double()) + 1e-10).float()
        atomic_write_bytes(out / SPARSITY_FILE, save_tensors({"sparsity": sparsity}))
    return out


def saelens_tensors(d: MatryoshkaBatchTopK, n_groups: int) -> tuple[dict[str, torch.Tensor], float]:
    """SAELens's weights for the first ``n_groups`` groups of ``d``, and the factor from mtc codes
    to SAELens codes."""
    token, sae = d.shape.input_norm == "token", d.shape.kind == "sae"
    if token and d.W_skip is not None:
        raise ConfigError(
            "skip_connection: this transcoder's skip reads the source divided by its own RMS "
            "(input_norm: token), which SAELens's skip transcoders (a linear map of the raw source) "
            "cannot compute; train with input_norm: global, or skip_connection: false, to export it"
        )
    end = d.boundaries[n_groups - 1]
    with torch.no_grad():
        code_scale = 1.0 if (token and sae) else 1.0 / float(d.target_scale)
        input_scale = 1.0 if token else float(d.source_scale)
        W_enc = d.W_enc[:, :end].double()
        tensors = {
            "W_enc": W_enc * input_scale * code_scale,
            "b_enc": (d.b_enc[:end].double() - d.source_mean.double() @ W_enc) * code_scale,
            "W_dec": d.W_dec[:end].double(),
            "b_dec": d.b_dec.double() * code_scale,
            "threshold": d.threshold.double().expand(end) * code_scale,
        }
        if d.W_skip is not None:  # skip(x) = (x * s - mean) @ W_skip / target_scale, in raw units
            W_skip = d.W_skip.double() / float(d.target_scale)
            tensors["W_skip"] = (W_skip * input_scale).T
            tensors["b_dec"] = tensors["b_dec"] - d.source_mean.double() @ W_skip
    return {k: v.float().contiguous() for k, v in tensors.items()}, code_scale


def saelens_cfg(d: MatryoshkaBatchTopK, record: dict, n_groups: int, code_scale: float) -> dict[str, Any]:
    provenance = record.get("store_provenance", {})
    kind = d.shape.kind
    architecture = "jumprelu" if kind == "sae" else "jumprelu_transcoder"
    if d.W_skip is not None:
        architecture = "jumprelu_skip_transcoder"
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": _hub_name(provenance.get("model_name") or record.get("model_type", "")),
        "model_source": provenance.get("model_source"),
        "model_revision": provenance.get("model_revision"),
        "hook_name": hook_name(record["source_site"], record["source_layer"]),
        "context_size": provenance.get("context_size"),
        "prepend_bos": provenance.get("prepend_bos"),
        "dataset_path": provenance.get("dataset_path"),
        "group_sizes": d.group_sizes[:n_groups],
        "training_tokens": record["steps"] * record["batch_size"],
        "top_k": d.top_k,
        "mtc_code_scale": code_scale,
        "mtc_run": record.get("name"),
    }
    if kind == "transcoder":
        metadata["hook_name_out"] = hook_name(record["target_site"], record["target_layer"])
    cfg = {
        "architecture": architecture,
        "d_in": d.shape.d_in,
        "d_sae": d.boundaries[n_groups - 1],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "constant_norm_rescale" if d.shape.input_norm == "token" else "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if kind == "transcoder":
        cfg["d_out"] = d.shape.d_out
    return cfg


def _hub_name(model_name: str) -> str:
    """The hub id the model came from (a packaged model's too); a local path as it was given."""
    if model_name.startswith("packaged:") and model_name[9:] in PACKAGED:
        return PACKAGED[model_name[9:]].hub_id
    return model_name


def _finished_run_record(run_dir: Path) -> dict:
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    record = read_json(config)
    if not record.get("completed_at"):
        raise ConfigError(f"{run_dir}: the run has not finished (no completed_at in {CONFIG_FILE})")
    return record


def _check_groups(n_groups: int | None, available: int) -> int:
    if n_groups is None:
        return available
    if not 1 <= n_groups <= available:
        raise ConfigError(f"--groups: got {n_groups}; this dictionary has {available} groups")
    return n_groups
