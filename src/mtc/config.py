"""Typed, validated configuration for every stage, read from ``params.yaml``.

Each stage has one dataclass; ``load_params`` builds all of them and validates the whole file
before any stage does work, so a typo fails in seconds with one line naming the key.
The seed's dict-based helpers ``get_default_cfg`` / ``post_init_cfg`` sit on top of the same
presets and validation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mtc.errors import ConfigError

SITES = ("resid_pre", "resid_mid", "mlp_out", "resid_post")
DTYPES = ("float32", "bfloat16", "float16")
KINDS = ("transcoder", "sae")
INPUT_NORMS = ("token", "global")
MATMUL_DTYPES = ("float32", "bfloat16")

# Presets of the seed: activation width, dictionary size and Matryoshka groups (geometric).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {"act_size": 768, "dict_size": 12288, "group_sizes": [768, 1536, 3072, 6912]},
    "gemma-2-2b": {"act_size": 2304, "dict_size": 36864, "group_sizes": [2304, 4608, 9216, 20736]},
    "SmolLM2-135M-Instruct": {"act_size": 576, "dict_size": 9216, "group_sizes": [576, 1152, 2304, 5184]},
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- small checkers
def _show(key: Any) -> str:
    """A key as it can be printed on one line: plain when it is a plain name, else its repr."""
    return str(key) if re.fullmatch(r"[\w.\-\[\]]+", str(key)) else repr(key)


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}: got {value!r}; expected {expected}")


def _check_int(key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, value, "an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        _fail(key, value, f"an integer >= {minimum}")
    return value


def _check_float(key: str, value: Any, low: float, high: float, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    if value < low or (low_open and value == low) or value > high:
        _fail(key, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(choices))
    return value


def _check_str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(key, value, "a non-empty string")
    return value


def _check_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        _fail(key, value, "a name of letters, digits, '.', '_' or '-' (it becomes a directory name)")
    return value


def _build(cls, section: Any, prefix: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        _fail(prefix, section, "a mapping of keys to values")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known, key=str)
    if unknown:
        raise ConfigError(
            f"{prefix}.{_show(unknown[0])}: unknown key; valid keys are {', '.join(sorted(known))}"
        )
    obj = cls(**section)
    obj.validate(prefix)
    return obj


# ----------------------------------------------------------------------------- stage configs
@dataclass
class ModelConfig:
    """Which causal LM to read activations from."""

    name: str = "packaged:SmolLM2-135M-Instruct"
    """Hub id (``gpt2``, ``google/gemma-2-2b``), a local model directory, or ``packaged:<name>``
    for a model that ships inside an installed package (the offline default)."""
    type: str = "SmolLM2-135M-Instruct"
    """Short name used in paths: ``data/models/{type}``, ``results/{type}/...`` and presets."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local and packaged models."""
    dtype: str = "float32"
    """dtype of the forward pass during extraction."""
    device: str = "auto"
    """``auto`` (cuda when present, else cpu), ``cpu`` or ``cuda[:N]``."""

    def validate(self, p: str) -> None:
        _check_str(f"{p}.name", self.name)
        _check_local_path(f"{p}.name", self.name)
        _check_name(f"{p}.type", self.type)
        if self.revision is not None:
            _check_str(f"{p}.revision", self.revision)
        _check_choice(f"{p}.dtype", self.dtype, DTYPES)
        _check_device(f"{p}.device", self.device)


def looks_local(path: str) -> bool:
    """A path meant for this disk (as opposed to a hub id such as ``NeelNanda/pile-10k``)."""
    return path.startswith((".", "/", "~")) or path.endswith((".txt", ".jsonl", ".json", ".raw"))


def _check_local_path(key: str, value: str) -> None:
    if looks_local(value) and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}: {value!r} does not exist (relative paths start at the working directory)")


def _check_device(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", value):
        _fail(key, value, "auto, cpu, cuda, cuda:N or mps")
    return value


@dataclass
class DatasetConfig:
    """Text to run the model over."""

    path: str = "builtin:pydoc-topics"
    """``builtin:pydoc-topics`` (Python's own documentation text, in every install), a local
    ``.txt``/``.jsonl`` file or directory of them, a ``datasets.save_to_disk`` directory, or a hub
    dataset id such as ``NeelNanda/pile-10k``."""
    split: str = "train"
    text_field: str = "text"
    """Field holding the text in jsonl files and hub/saved datasets."""
    n_tokens: int = 100_000
    """Tokens to extract (rounded down to whole context windows)."""
    context_size: int = 128
    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token."""
    holdout_fraction: float = 0.05
    """Share of windows (the last ones) kept out of training, for evaluate and mine."""
    shuffle_seed: int | None = None
    """Put the documents in a seeded random order before packing (null: the source's order). A
    corpus sorted by source (english-mix) otherwise trains on its first sources and holds out
    its last one. Local and builtin text is shuffled whole; a hub dataset streams through a
    10,000-document shuffle buffer."""

    def validate(self, p: str) -> None:
        _check_str(f"{p}.path", self.path)
        _check_local_path(f"{p}.path", self.path)
        _check_str(f"{p}.split", self.split)
        _check_str(f"{p}.text_field", self.text_field)
        _check_int(f"{p}.context_size", self.context_size, 2)
        _check_int(f"{p}.n_tokens", self.n_tokens, 1)
        if not isinstance(self.prepend_bos, bool):
            _fail(f"{p}.prepend_bos", self.prepend_bos, "true or false")
        _check_float(f"{p}.holdout_fraction", self.holdout_fraction, 0.0, 0.5)
        if self.shuffle_seed is not None:
            _check_int(f"{p}.shuffle_seed", self.shuffle_seed, 0)
        n_seq = self.n_tokens // self.context_size
        n_holdout = self.n_holdout_sequences
        if n_seq - n_holdout < 1:
            _fail(
                f"{p}.n_tokens",
                self.n_tokens,
                f"enough tokens for at least {n_holdout + 1} windows of context_size {self.context_size}",
            )

    @property
    def n_sequences(self) -> int:
        return self.n_tokens // self.context_size

    @property
    def n_holdout_sequences(self) -> int:
        return max(1, math.ceil(self.n_sequences * self.holdout_fraction))


@dataclass
class ExtractConfig:
    """What to cache from the forward pass and how to store it."""

    layers: list[int] = field(default_factory=lambda: [8])
    sites: list[str] = field(default_factory=lambda: ["resid_mid", "mlp_out"])
    dtype: str = "bfloat16"
    """Storage dtype. bfloat16 is kept as its raw 16 bits in a uint16 zarr array (zarr 3 has no
    bfloat16); the store's attrs say so and the reader turns the bits back into bfloat16."""
    batch_size: int = 16
    """Windows per forward pass."""
    chunk_rows: int = 4096
    """Rows (tokens) per zarr chunk, rounded to whole windows: the unit of reading."""
    shard_rows: int = 65536
    """Rows per shard file, rounded to whole chunks: the unit of writing and of resuming. Memory
    while extracting is about 2-3 shards x sites x d_model x 2 bytes."""

    def validate(self, p: str) -> None:
        if not isinstance(self.layers, list) or not self.layers:
            _fail(f"{p}.layers", self.layers, "a non-empty list of layer indices")
        for i, layer in enumerate(self.layers):
            _check_int(f"{p}.layers[{i}]", layer, 0)
        if not isinstance(self.sites, list) or not self.sites:
            _fail(f"{p}.sites", self.sites, "a non-empty list of sites")
        for i, site in enumerate(self.sites):
            _check_choice(f"{p}.sites[{i}]", site, SITES)
        _check_choice(f"{p}.dtype", self.dtype, DTYPES)
        _check_int(f"{p}.batch_size", self.batch_size, 1)
        _check_int(f"{p}.chunk_rows", self.chunk_rows, 1)
        _check_int(f"{p}.shard_rows", self.shard_rows, 1)


@dataclass
class DictionaryConfig:
    """One Matryoshka BatchTopK transcoder (source site -> target site) or SAE (source = target)."""

    name: str = "dictionary"
    kind: str = "transcoder"
    layer: int = 8
    """Source layer; also the target layer unless ``target_layer`` is given."""
    source_layer: int | None = None
    target_layer: int | None = None
    source_site: str = "resid_mid"
    target_site: str = "mlp_out"
    act_size: int | None = None
    """Width of the activations; filled from the store (or the preset) when left out."""
    dict_size: int = 9216
    group_sizes: list[int] = field(default_factory=lambda: [576, 1152, 2304, 5184])
    top_k: int | None = None
    """Active features per token; defaults to round(dict_size / 200)."""
    lr: float = 3e-4
    adam_beta2: float = 0.999
    """Adam's second-moment decay (the reference recipe uses 0.99)."""
    batch_size: int = 4096
    steps: int = 1000
    save_every: int = 1000
    seed: int = 0
    aux_penalty: float = 1 / 32
    """Weight of the auxiliary loss that revives dead features."""
    top_k_aux: int = 512
    n_batches_to_dead: int = 5
    """A feature that stays silent this many batches counts as dead for the auxiliary loss."""
    threshold_momentum: float = 0.01
    """EMA rate of the inference threshold learned from the batch top-k."""
    calibration_rows: int = 65536
    """Training rows over which the inference threshold is set at the end of training, so that
    inference L0 matches ``top_k`` (0: keep the moving average learned during training)."""
    input_norm: str = "token"
    """``token``: each source row is divided by its own RMS before encoding (an SAE scales its
    output back by it); ``global``: one scale for every row, so rare huge rows dominate the loss."""
    skip_connection: bool | None = None
    """A learned linear map from the (normalised) source to the output beside the features (a
    "skip transcoder"): the MLP's linear part stops costing features. null: on for transcoders
    (held-out FVU 0.413 against 0.462 without, docs/quality.md), off for SAEs (it would learn the
    identity)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this (off when null)."""
    shuffle_chunks: int = 16
    """Store chunks mixed together when shuffling training rows."""
    device: str = "auto"
    matmul_dtype: str = "float32"
    """dtype of the encoder matmul in training (bfloat16: faster on CPUs and GPUs with bf16 units;
    weights, gradients and optimizer state stay float32)."""
    save_activation_samples: bool = False
    sample_collection_freq: int = 1000
    max_samples_per_feature: int = 100
    sample_context_size: int = 20
    sample_activation_threshold: float = 0.1
    wandb_project: str | None = None
    """Log to wandb when set and wandb is configured (WANDB_API_KEY, or WANDB_MODE=offline)."""
    model_type: str | None = None
    """Filled from ``model.type``; names the results directory."""

    def validate(self, p: str) -> None:
        _check_name(f"{p}.name", self.name)
        _check_choice(f"{p}.kind", self.kind, KINDS)
        _check_int(f"{p}.layer", self.layer, 0)
        for key in ("source_layer", "target_layer"):
            if getattr(self, key) is not None:
                _check_int(f"{p}.{key}", getattr(self, key), 0)
        if self.source_layer is not None and self.source_layer != self.layer:
            _fail(
                f"{p}.source_layer", self.source_layer, f"the same as {p}.layer ({self.layer}), or left out"
            )
        _check_choice(f"{p}.source_site", self.source_site, SITES)
        _check_choice(f"{p}.target_site", self.target_site, SITES)
        if self.kind == "sae" and (
            self.source_site != self.target_site or self.resolved_target_layer != self.layer
        ):
            _fail(
                f"{p}.target_site",
                self.target_site,
                f"the source site '{self.source_site}' at the same layer for kind sae "
                "(use kind transcoder otherwise)",
            )
        if self.act_size is not None:
            _check_int(f"{p}.act_size", self.act_size, 1)
        _check_int(f"{p}.dict_size", self.dict_size, 1)
        if not isinstance(self.group_sizes, list) or not self.group_sizes:
            _fail(f"{p}.group_sizes", self.group_sizes, "a non-empty list of positive integers")
        for i, g in enumerate(self.group_sizes):
            _check_int(f"{p}.group_sizes[{i}]", g, 1)
        if sum(self.group_sizes) != self.dict_size:
            raise ConfigError(
                f"{p}.group_sizes: {self.group_sizes} sums to {sum(self.group_sizes)}, "
                f"but {p}.dict_size is {self.dict_size}; they must be equal"
            )
        if self.top_k is not None:
            _check_int(f"{p}.top_k", self.top_k, 1)
            if self.top_k >= self.dict_size:
                _fail(f"{p}.top_k", self.top_k, f"an integer in [1, dict_size={self.dict_size})")
        _check_float(f"{p}.lr", self.lr, 0.0, 1.0)
        _check_float(f"{p}.adam_beta2", self.adam_beta2, 0.0, 0.99999)
        for key in (
            "batch_size",
            "steps",
            "save_every",
            "top_k_aux",
            "n_batches_to_dead",
            "shuffle_chunks",
            "sample_collection_freq",
            "max_samples_per_feature",
            "sample_context_size",
        ):
            _check_int(f"{p}.{key}", getattr(self, key), 1)
        _check_int(f"{p}.seed", self.seed, 0)
        _check_float(f"{p}.aux_penalty", self.aux_penalty, 0.0, 1e3, low_open=False)
        _check_float(f"{p}.threshold_momentum", self.threshold_momentum, 0.0, 1.0)
        _check_choice(f"{p}.input_norm", self.input_norm, INPUT_NORMS)
        _check_int(f"{p}.calibration_rows", self.calibration_rows, 0)
        if self.max_grad_norm is not None:
            _check_float(f"{p}.max_grad_norm", self.max_grad_norm, 0.0, 1e9)
        _check_float(
            f"{p}.sample_activation_threshold", self.sample_activation_threshold, 0.0, 1e9, low_open=False
        )
        if not isinstance(self.save_activation_samples, bool):
            _fail(f"{p}.save_activation_samples", self.save_activation_samples, "true or false")
        if self.skip_connection is not None and not isinstance(self.skip_connection, bool):
            _fail(f"{p}.skip_connection", self.skip_connection, "true, false or null (on for transcoders)")
        if self.skip_connection and self.kind == "sae":
            _fail(f"{p}.skip_connection", True, "false for kind sae (it would learn the identity)")
        _check_device(f"{p}.device", self.device)
        _check_choice(f"{p}.matmul_dtype", self.matmul_dtype, MATMUL_DTYPES)
        if self.wandb_project is not None:
            _check_str(f"{p}.wandb_project", self.wandb_project)
        if self.model_type is not None:
            _check_name(f"{p}.model_type", self.model_type)

    @property
    def resolved_target_layer(self) -> int:
        return self.layer if self.target_layer is None else self.target_layer

    @property
    def has_skip(self) -> bool:
        return self.kind == "transcoder" if self.skip_connection is None else self.skip_connection

    @property
    def k(self) -> int:
        return self.top_k if self.top_k is not None else default_top_k(self.dict_size)

    def run_dir(self, results_root: str | Path = "results") -> Path:
        """``results/{model_type}/{layer}/{steps}/{name}``: the seed's layout plus the dictionary's
        name, so dictionaries sharing model, layer and steps never overwrite each other. ``{layer}`` is
        the source layer, for a cross-layer transcoder too: dvc.yaml templates the same path from the
        entry's ``layer`` (it cannot compute anything else)."""
        return (
            Path(results_root) / (self.model_type or "model") / str(self.layer) / str(self.steps) / self.name
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["top_k"] = self.k
        d["target_layer"] = self.resolved_target_layer
        d["source_layer"] = self.layer
        return d


@dataclass
class EvaluateConfig:
    batch_size: int = 4096
    """Held-out rows per evaluation batch (FVU, L0, feature frequencies)."""
    device: str = "auto"
    n_ce_sequences: int = 64
    """Held-out windows run through the model with the dictionary spliced in (the spliced-loss
    metrics); 0 skips them. Capped at the number of held-out windows."""
    ce_batch_size: int = 8
    """Windows per forward pass of the spliced-loss evaluation."""
    dtype: str = "float32"
    """dtype of the model's forward passes in the spliced-loss evaluation."""

    def validate(self, p: str) -> None:
        _check_int(f"{p}.batch_size", self.batch_size, 1)
        _check_device(f"{p}.device", self.device)
        _check_int(f"{p}.n_ce_sequences", self.n_ce_sequences, 0)
        _check_int(f"{p}.ce_batch_size", self.ce_batch_size, 1)
        _check_choice(f"{p}.dtype", self.dtype, DTYPES)


@dataclass
class MineConfig:
    max_samples_per_feature: int = 20
    """Top-activating contexts kept per feature."""
    sample_context_size: int = 20
    """Tokens of context kept around (mostly before) the activating token."""
    sample_activation_threshold: float = 0.1
    batch_size: int = 4096
    device: str = "auto"
    quantile_bands: int = 4
    """The feature's firings are cut into this many activation quantile bands (lowest first) ..."""
    samples_per_band: int = 3
    """... and this many random contexts are kept from each: the tail below the top contexts."""
    histogram_bins: int = 20
    """Bins of each feature's activation histogram, from 0 to its largest activation."""
    n_logit_tokens: int = 10
    """Tokens listed as most promoted and most suppressed by each feature's decoder direction."""
    seed: int = 0
    """Seed of the random choice of quantile samples."""

    def validate(self, p: str) -> None:
        _check_int(f"{p}.max_samples_per_feature", self.max_samples_per_feature, 1)
        _check_int(f"{p}.sample_context_size", self.sample_context_size, 1)
        _check_float(
            f"{p}.sample_activation_threshold", self.sample_activation_threshold, 0.0, 1e9, low_open=False
        )
        _check_int(f"{p}.batch_size", self.batch_size, 1)
        _check_device(f"{p}.device", self.device)
        for key in ("quantile_bands", "samples_per_band", "histogram_bins", "n_logit_tokens"):
            _check_int(f"{p}.{key}", getattr(self, key), 1)
        _check_int(f"{p}.seed", self.seed, 0)


@dataclass
class BrowseConfig:
    max_feature_pages: int | None = None
    """Feature pages written at most (features that fired, lowest index, i.e. earliest group, first);
    null: a page for every feature that fired. The index lists every feature either way."""
    contexts_per_feature: int = 10
    """Top-activating contexts shown on a feature page (the quantile samples are shown as well)."""

    def validate(self, p: str) -> None:
        if self.max_feature_pages is not None:
            _check_int(f"{p}.max_feature_pages", self.max_feature_pages, 0)
        _check_int(f"{p}.contexts_per_feature", self.contexts_per_feature, 1)


@dataclass
class PipelineConfig:
    """The whole ``params.yaml``."""

    model: ModelConfig
    dataset: DatasetConfig
    extract: ExtractConfig
    dictionaries: dict[str, DictionaryConfig]
    evaluate: EvaluateConfig
    mine: MineConfig
    browse: BrowseConfig = field(default_factory=BrowseConfig)
    data_root: Path = Path("data")
    results_root: Path = Path("results")

    def dictionary(self, name: str) -> DictionaryConfig:
        if name not in self.dictionaries:
            raise ConfigError(
                f"dictionaries.{name}: no such dictionary; known: {', '.join(self.dictionaries) or 'none'}"
            )
        return self.dictionaries[name]

    @property
    def model_dir(self) -> Path:
        return self.data_root / "models" / self.model.type

    @property
    def store_dir(self) -> Path:
        return self.data_root / "activations" / self.model.type


# ----------------------------------------------------------------------------- seed helpers
def default_top_k(dict_size: int) -> int:
    return max(1, round(dict_size / 200))


def get_default_cfg(model_type: str = "SmolLM2-135M-Instruct") -> dict[str, Any]:
    """The seed's default training config for ``model_type`` as a plain dict (edit, then
    ``post_init_cfg``). Unknown model types get a 16x dictionary once ``act_size`` is known."""
    cfg = {
        f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for f in fields(DictionaryConfig)
    }
    cfg["model_type"] = model_type
    preset = PRESETS.get(model_type)
    if preset is not None:
        cfg.update({k: (list(v) if isinstance(v, list) else v) for k, v in preset.items()})
    else:
        cfg.update({"act_size": None, "dict_size": None, "group_sizes": None})
    cfg["top_k"] = None
    return cfg


def geometric_groups(act_size: int, dict_size: int, n_groups: int = 4) -> list[int]:
    """Groups of act_size x 1, 2, 4, ... with the last one taking the rest (the seed's presets)."""
    sizes = [act_size * 2**i for i in range(n_groups - 1)]
    return sizes + [dict_size - sum(sizes)]


def post_init_cfg(cfg: dict[str, Any], prefix: str = "cfg") -> dict[str, Any]:
    """Fill derived values (``top_k``, sizes of an unknown model) and validate; returns a new dict."""
    cfg = dict(cfg)
    if cfg.get("dict_size") is None and cfg.get("act_size"):
        cfg["dict_size"] = 16 * cfg["act_size"]
    if cfg.get("group_sizes") is None and cfg.get("act_size") and cfg.get("dict_size"):
        cfg["group_sizes"] = geometric_groups(cfg["act_size"], cfg["dict_size"])
    if cfg.get("dict_size") is None or cfg.get("group_sizes") is None:
        raise ConfigError(
            f"{prefix}.dict_size: not set and no preset for model type "
            f"{cfg.get('model_type')!r}; give dict_size and group_sizes (presets: {', '.join(PRESETS)})"
        )
    if cfg.get("top_k") is None and isinstance(cfg["dict_size"], int) and cfg["dict_size"] > 0:
        cfg["top_k"] = default_top_k(cfg["dict_size"])
    dictionary_from_dict(cfg, prefix)  # validates
    return cfg


def dictionary_from_dict(cfg: dict[str, Any], prefix: str = "cfg") -> DictionaryConfig:
    return _build(DictionaryConfig, cfg, prefix)


# ----------------------------------------------------------------------------- params.yaml
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently, so a
    second ``dictionaries:`` block would drop the first; DVC refuses such a file)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                break  # SafeLoader's own error names it
            if key in seen:
                raise ConfigError(
                    f"{self.name}: key {key!r} appears twice in one mapping "
                    f"(lines {seen[key]} and {line}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever YAML says
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def parse_params(
    raw: Any, *, data_root: str | Path = "data", results_root: str | Path = "results"
) -> PipelineConfig:
    """Validate a whole params mapping (as loaded from YAML) into a ``PipelineConfig``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: got {type(raw).__name__}; expected a mapping of sections")
    sections = {"model", "dataset", "extract", "dictionaries", "evaluate", "mine", "browse"}
    unknown = sorted(set(raw) - sections, key=str)
    if unknown:
        raise ConfigError(
            f"{_show(unknown[0])}: unknown section; valid sections are {', '.join(sorted(sections))}"
        )
    model = _build(ModelConfig, raw.get("model"), "model")
    dataset = _build(DatasetConfig, raw.get("dataset"), "dataset")
    extract = _build(ExtractConfig, raw.get("extract"), "extract")
    entries = raw.get("dictionaries") or {}
    if not isinstance(entries, dict):
        _fail("dictionaries", entries, "a mapping of dictionary names to settings")
    dictionaries = {}
    for name, entry in entries.items():
        prefix = f"dictionaries.{_show(name)}"
        _check_name(prefix, name)
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            _fail(prefix, entry, "a mapping of settings")
        cfg = get_default_cfg(model.type)
        cfg.update(entry)
        cfg["name"] = name
        cfg["model_type"] = model.type
        dictionaries[name] = dictionary_from_dict(post_init_cfg(cfg, prefix), prefix)
        _check_against_extract(dictionaries[name], extract, prefix)
    return PipelineConfig(
        model=model,
        dataset=dataset,
        extract=extract,
        dictionaries=dictionaries,
        evaluate=_build(EvaluateConfig, raw.get("evaluate"), "evaluate"),
        mine=_build(MineConfig, raw.get("mine"), "mine"),
        browse=_build(BrowseConfig, raw.get("browse"), "browse"),
        data_root=Path(data_root),
        results_root=Path(results_root),
    )


def _check_against_extract(d: DictionaryConfig, extract: ExtractConfig, prefix: str) -> None:
    """A dictionary can only read what extraction stores."""
    for key, layer in (("layer", d.layer), ("target_layer", d.resolved_target_layer)):
        if layer not in extract.layers:
            _fail(f"{prefix}.{key}", layer, f"one of the extracted layers {extract.layers} (extract.layers)")
    for key in ("source_site", "target_site"):
        if getattr(d, key) not in extract.sites:
            _fail(
                f"{prefix}.{key}",
                getattr(d, key),
                f"one of the extracted sites {extract.sites} (extract.sites)",
            )


def load_params(path: str | Path = "params.yaml", **roots: Any) -> PipelineConfig:
    raw = read_yaml(path)
    if not raw:  # an empty file would silently run the whole default pipeline
        raise ConfigError(
            f"{path}: empty; it needs at least the model, dataset, extract and dictionaries "
            "sections (start from the repository's params.yaml)"
        )
    return parse_params(raw, **roots)
