"""SAELens v6 directories: export a trained dictionary (``SAE.load_from_disk`` reads it as it is), and
import a SAELens SAE or transcoder as a run directory that evaluate, mine and browse accept.

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
- a skip connection becomes ``jumprelu_skip_transcoder``'s ``W_skip`` [d_out, d_in], a map of the
  hook's activations. With ``input_norm: token`` our skip reads ``x / rms(x)``, which SAELens's
  rescaling does not give the skip; the export then names the hook that holds ``x / rms(x)`` itself,
  TransformerLens's ``blocks.L.ln2.hook_normalized`` (the MLP's RMSNorm before its weight; models
  with RMSNorms, transcoders from ``resid_mid``), with ``normalize_activations: none``.

Decoder rows stay unit norm, so SAELens's ``fold_W_dec_norm`` (which SAEBench calls) changes nothing.
The target's scale folds into the codes instead: a SAELens code is the mtc code times
``metadata.mtc_code_scale`` (1 for an SAE with per-token scaling, whose output SAELens scales back
per row as ours does; ``1 / target_scale`` otherwise, i.e. codes in the target's raw units).
``--groups N`` exports the Matryoshka prefix of the first N groups: encoding is per feature at
inference, so a prefix is a slice.

Import keeps the architecture's own encode (``DictionaryShape.activation``): ``standard`` and
``transcoder`` are ReLU, ``topk`` keeps the k largest per token, the ``jumprelu`` kinds a threshold
per feature; ``constant_norm_rescale`` becomes ``input_norm: token``, ``apply_b_dec_to_input`` the
source mean. A dictionary mtc exported comes back with its groups (``metadata.group_sizes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from mtc.config import DictionaryConfig
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.errors import ConfigError
from mtc.models import hook_name, hub_id, read_architecture, site_of_hook
from mtc.results import (
    FREQUENCY_FILE,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    finished_run_record,
    read_tensors,
    run_dir_path,
    swapped_in_dir,
    write_config,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The cfg.json format written (v6 nested form); SAELens converts configs older than 6.0 and would
drop the ``metadata`` block of one that does not name its version."""


def export_saelens(
    run_dir: str | Path, out: str | Path, n_groups: int | None = None, model_dir: str | Path | None = None
) -> Path:
    """Write the finished run in ``run_dir`` (or its first ``n_groups`` groups) to ``out``.
    ``model_dir`` (what prepare_model wrote) is read for a skip transcoder with ``input_norm: token``.
    ``out`` must be new, empty or an earlier export of mtc's: it is written whole beside and swapped in."""
    run_dir, out = Path(run_dir), Path(out)
    check_output_dir(out, is_saelens_export, "mtc export --format saelens")
    record = finished_run_record(run_dir)
    dictionary = MatryoshkaBatchTopK.load(run_dir)
    n_groups = check_groups(n_groups, dictionary)
    reads_normalized = dictionary.shape.input_norm == "token" and dictionary.W_skip is not None
    if reads_normalized:
        _check_reads_mlp_input(record, model_dir)
    tensors, code_scale = folded_tensors(dictionary, n_groups)
    cfg = saelens_cfg(dictionary, record, n_groups, code_scale, reads_normalized)
    with swapped_in_dir(out) as new:
        atomic_write_bytes(new / WEIGHTS_FILE, save_tensors(tensors))
        atomic_write_text(new / CFG_FILE, json.dumps(cfg, indent=2) + "\n")
        if (run_dir / FREQUENCY_FILE).is_file():  # from evaluate: SAELens's log10 feature density
            log10_freq = read_tensors(run_dir / FREQUENCY_FILE)["log10_frequency"][: cfg["d_sae"]]
            sparsity = torch.log10(torch.pow(10.0, log10_freq.double()) + 1e-10).float()
            atomic_write_bytes(new / SPARSITY_FILE, save_tensors({"sparsity": sparsity}))
    return out


def is_saelens_export(directory: Path) -> bool:
    """Whether ``directory`` holds an earlier ``export_saelens`` and nothing else: only its files, and
    a ``cfg.json`` whose metadata names the mtc run (a SAELens directory from elsewhere has none)."""
    if {p.name for p in directory.iterdir()} - {CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE}:
        return False
    try:
        meta = json.loads((directory / CFG_FILE).read_text()).get("metadata")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(meta, dict) and "mtc_run" in meta


def check_groups(n_groups: int | None, d: MatryoshkaBatchTopK, what: str = "this dictionary") -> int:
    """``--groups``: how many Matryoshka groups to export (all when None)."""
    available = len(d.group_sizes)
    if n_groups is None:
        return available
    if not 1 <= n_groups <= available:
        raise ConfigError(f"--groups: got {n_groups}; {what} has {available} groups")
    return n_groups


def _check_reads_mlp_input(record: dict, model_dir: str | Path | None) -> None:
    """A skip transcoder with ``input_norm: token`` reads ``x / rms(x)`` with its skip as well as
    its encoder; SAELens's skip reads the raw hook, so the export names the hook that holds exactly
    that: TransformerLens's ``blocks.L.ln2.hook_normalized``, the MLP's RMSNorm before its weight.
    That is the MLP's input only for a transcoder from ``resid_mid``, and ``x / rms(x)`` only in a
    model whose norms are RMSNorms (a LayerNorm also centres), which the model's config tells."""
    if record.get("source_site") != "resid_mid" or record.get("source_layer") != record.get("target_layer"):
        raise ConfigError(
            "skip_connection: a skip transcoder with input_norm: token exports to SAELens only from "
            "resid_mid of its own layer (read at ln2.hook_normalized); train with input_norm: global"
        )
    config = model_config(
        model_dir,
        "a skip transcoder with input_norm: token is exported at ln2.hook_normalized, which needs the "
        "model's norm kind",
    )
    if "rms_norm_eps" not in config:
        raise ConfigError(
            f"{model_dir}: the model's norms are not RMSNorms, so ln2.hook_normalized is not x / rms(x); "
            "train the skip transcoder with input_norm: global to export it"
        )


def model_config(model_dir: str | Path | None, why: str) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of the model an export needs (``why``: for what)."""
    config = Path(model_dir) / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        raise ConfigError(f"--model-dir: {model_dir} is not a model directory; {why}")
    return json.loads(config.read_text())


def folded_tensors(d: MatryoshkaBatchTopK, n_groups: int) -> tuple[dict[str, torch.Tensor], float]:
    """The first ``n_groups`` groups of ``d`` as plain weights on its input (the raw source, or the
    source divided by its RMS with ``input_norm: token``): scales and the source mean folded into
    the encoder and biases, the target scale into the codes (SAELens's names and layouts). Returns
    them and the factor from mtc codes to these codes."""
    token, sae = d.shape.input_norm == "token", d.shape.kind == "sae"
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


def saelens_cfg(
    d: MatryoshkaBatchTopK, record: dict, n_groups: int, code_scale: float, reads_normalized: bool = False
) -> dict[str, Any]:
    """``reads_normalized``: the source hook is the MLP's normalised input (``ln2.hook_normalized``,
    already ``x / rms(x)``), so SAELens normalises nothing."""
    provenance = record.get("store_provenance", {})
    kind = d.shape.kind
    architecture = "jumprelu" if kind == "sae" else "jumprelu_transcoder"
    if d.W_skip is not None:
        architecture = "jumprelu_skip_transcoder"
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": hub_id(provenance.get("model_name") or record.get("model_type", "")),
        "model_source": provenance.get("model_source"),
        "model_revision": provenance.get("model_revision"),
        "hook_name": (
            f"blocks.{record['source_layer']}.ln2.hook_normalized"
            if reads_normalized
            else hook_name(record["source_site"], record["source_layer"])
        ),
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
        "normalize_activations": (
            "constant_norm_rescale" if d.shape.input_norm == "token" and not reads_normalized else "none"
        ),
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if kind == "transcoder":
        cfg["d_out"] = d.shape.d_out
    return cfg


# ----------------------------------------------------------------------------- import
ACTIVATION_OF = {
    "standard": "relu",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}
"""The SAELens architectures mtc imports, and the activation each one encodes with."""
_NORMS = {"none": "global", "expected_average_only_in": "global", "constant_norm_rescale": "token"}
"""SAELens's ``normalize_activations`` at inference from disk (``expected_average_only_in`` only
scales while training) and mtc's ``input_norm`` that computes the same."""


def import_saelens(
    directory: str | Path,
    name: str,
    model_type: str,
    out: str | Path | None = None,
    results_root="results",
    model_dir: str | Path | None = None,
) -> Path:
    """Write SAELens directory ``directory`` as an mtc run directory named ``name``: ``out``, or
    ``results/{model_type}/{layer}/imported/{name}``. Everything is checked before anything is written:
    the config's values and the weights' shapes (finite numbers), and, when ``model_dir`` holds the
    model (what prepare_model wrote), the hooks' layers and the width against it. The run directory
    must not exist yet (an import replaces no run: its metrics and samples would belong to other
    weights); it is written beside and renamed into place."""
    directory = Path(directory)
    cfg = _read_cfg(directory)
    where = directory / CFG_FILE
    architecture = _one_of(where, cfg, "architecture", "standard", ACTIVATION_OF)
    _one_of(where, cfg, "normalize_activations", "none", _NORMS)
    meta = _metadata(where, cfg)
    layer, source_site = _stored_site(where, "hook_name", meta.get("hook_name") or meta.get("hook_point"))
    transcoder = "transcoder" in architecture
    target = (
        _stored_site(where, "hook_name_out", meta.get("hook_name_out"))
        if transcoder
        else (layer, source_site)
    )
    dictionary = saelens_dictionary(architecture, cfg, _read_weights(directory, architecture), where)
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        _check_against_model(where, Path(model_dir), dictionary, [(layer, source_site), target])
    record = DictionaryConfig(
        name=name,
        kind=dictionary.shape.kind,
        layer=layer,
        target_layer=target[0],
        source_site=source_site,
        target_site=target[1],
        act_size=dictionary.shape.d_in,
        dict_size=dictionary.dict_size,
        group_sizes=list(dictionary.group_sizes),
        top_k=dictionary.top_k or None,
        steps=1,  # trained elsewhere: no mtc training steps
        input_norm=dictionary.shape.input_norm,
        skip_connection=dictionary.W_skip is not None,
        model_type=model_type,
    ).to_dict()
    record.update(
        imported_from=str(directory.resolve()), saelens_architecture=architecture, saelens_metadata=meta
    )
    record["top_k"] = dictionary.top_k or None  # none for ReLU and JumpReLU dictionaries
    out = Path(out) if out is not None else run_dir_path(model_type, layer, "imported", name, results_root)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(
            f"{out}: already exists; mtc import writes a new run directory and replaces none (its "
            "metrics and samples belong to other weights): pick another --name, or remove it first"
        )
    with swapped_in_dir(out) as new:
        dictionary.save(new)
        write_config(new, record, completed=True)
    return out


def saelens_dictionary(architecture: str, cfg: dict, weights: dict, where: Path) -> MatryoshkaBatchTopK:
    """An mtc dictionary computing what SAELens's ``architecture`` computes with ``weights`` (read
    by ``_read_weights``: the tensors the architecture needs, with their ranks, all finite)."""
    weights = {k: v.float() for k, v in weights.items()}
    W_enc, b_enc, W_dec, b_dec = (weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)  # SAELens scales pre-activations by them and divides them out again
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    token = _NORMS[cfg.get("normalize_activations", "none")] == "token"
    if token and "W_skip" in weights:
        raise ConfigError(
            f"{where}: a skip transcoder with constant_norm_rescale (its skip reads the raw source, "
            "its encoder the rescaled one) has no mtc counterpart"
        )
    (d_in, F), d_out = W_enc.shape, W_dec.shape[1]
    activation = ACTIVATION_OF[architecture]
    try:
        dictionary = MatryoshkaBatchTopK(
            d_in,
            d_out,
            _group_sizes(where, _metadata(where, cfg), F),
            _top_k(where, cfg, F) if activation == "topk" else 0,
            kind="transcoder" if "transcoder" in architecture else "sae",
            input_norm="token" if token else "global",
            skip_connection="W_skip" in weights,
            activation=activation,
        )
    except ValueError as e:  # what the shape itself refuses (an SAE whose output is not its input)
        raise ConfigError(f"{where}: {e}") from None
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if activation == "jumprelu":
        state["threshold"] = weights["threshold"]
    if "W_skip" in weights:
        state["W_skip"] = weights["W_skip"].T
    if "transcoder" not in architecture and cfg.get("apply_b_dec_to_input", True):
        state["source_mean"] = b_dec  # SAELens subtracts b_dec from the (normalised) input
    with torch.no_grad():
        for key, value in state.items():
            target = dictionary.W_encT if key == "W_enc" else getattr(dictionary, key)
            value = value.T if key == "W_enc" else value
            if target.shape != value.shape:
                raise ConfigError(
                    f"{where}: {key} has shape {list(value.shape)}; expected {list(target.shape)}"
                )
            target.copy_(value)
    return dictionary


def _one_of(where: Path, cfg: dict, key: str, default: str, allowed: dict) -> str:
    value = cfg.get(key, default)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}: {key} {value!r} cannot be imported; mtc imports {', '.join(allowed)}")
    return value


def _metadata(where: Path, cfg: dict) -> dict:
    """The ``metadata`` object (configs before SAELens 6 keep its keys at the top level)."""
    meta = cfg.get("metadata")
    if meta is None or meta == {}:
        return cfg
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: metadata is {_short(meta)}; expected an object (hook_name, ...)")
    return meta


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _top_k(where: Path, cfg: dict, F: int) -> int:
    k = cfg.get("k")
    if not (_is_int(k) and 0 < k < F):
        raise ConfigError(
            f"{where}: k {_short(k)} is not a top-k size; a topk dictionary needs an integer k from 1 "
            f"to {F - 1} (it has {F} features)"
        )
    return k


def _group_sizes(where: Path, meta: dict, F: int) -> list[int]:
    """``metadata.group_sizes`` (a Matryoshka dictionary mtc exported), or one group of all ``F``."""
    sizes = meta.get("group_sizes")
    if sizes is None:
        return [F]  # not an mtc export: one group
    if not (
        isinstance(sizes, list) and sizes and all(_is_int(g) and g > 0 for g in sizes) and sum(sizes) == F
    ):
        raise ConfigError(
            f"{where}: metadata.group_sizes {_short(sizes)} is not a list of positive integers "
            f"summing to the dictionary's {F} features"
        )
    return sizes


def _check_against_model(
    where: Path, model_dir: Path, d: MatryoshkaBatchTopK, sites: list[tuple[int, str]]
) -> None:
    """The hooks' layers and sites exist in the model, and the dictionary's width is the model's."""
    arch = read_architecture(model_dir)
    for layer, site in sites:
        arch.check_site(site, layer, f"{where}: {hook_name(site, layer)}")
    for what, width in (("input", d.shape.d_in), ("output", d.shape.d_out)):
        if width != arch.d_model:
            raise ConfigError(
                f"{where}: the dictionary's {what} width is {width}; the model in {model_dir} "
                f"has width {arch.d_model} (a dictionary of another model?)"
            )


def _stored_site(where: Path, key: str, hook: Any) -> tuple[int, str]:
    found = site_of_hook(hook) if isinstance(hook, str) else None
    if found is None:
        raise ConfigError(
            f"{where}: {key} {_short(hook)} is not a hook mtc stores (blocks.L.hook_resid_pre, _resid_mid, "
            "_mlp_out or _resid_post)"
        )
    return found


def _read_cfg(directory: Path) -> dict:
    path = directory / CFG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a SAELens directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return cfg


RANKS = {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1, "threshold": 1, "W_skip": 2}
"""The tensors an import reads, and how many dimensions each has."""


def _read_weights(directory: Path, architecture: str) -> dict[str, torch.Tensor]:
    """The tensors ``architecture`` computes with: each there, of its rank, every number finite."""
    path = directory / WEIGHTS_FILE
    try:
        weights = load_file(str(path))
    except Exception as e:  # missing, truncated, not safetensors: the message is what matters
        raise ConfigError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"]
    needed += ["threshold"] if ACTIVATION_OF[architecture] == "jumprelu" else []
    needed += ["W_skip"] if "skip" in architecture else []
    missing = [k for k in needed if k not in weights]
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)} (a {architecture} dictionary needs it)")
    if "W_skip" in weights and "W_skip" not in needed:
        raise ConfigError(f"{path}: holds W_skip, which a {architecture} dictionary does not have")
    for key in needed:
        tensor = weights[key]
        if tensor.dim() != RANKS[key]:
            raise ConfigError(
                f"{path}: {key} has shape {list(tensor.shape)}; expected {RANKS[key]} dimensions"
            )
        if not torch.isfinite(tensor.float()).all():
            raise ConfigError(f"{path}: {key} holds NaN or infinite numbers")
    return {k: weights[k] for k in needed}
