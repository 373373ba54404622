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
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from mtc.errors import ConfigError

Site = Literal["resid_pre", "resid_mid", "mlp_out", "resid_post"]
DType = Literal["float32", "bfloat16", "float16"]
Kind = Literal["transcoder", "sae", "clt"]
InputNorm = Literal["token", "global"]
FeatureInit = Literal["data", "random"]
DecoderInit = Literal["random", "own_layer"]
TopkScope = Literal["layer", "shared"]
MatmulDType = Literal["float32", "bfloat16"]
SITES, DTYPES, KINDS, INPUT_NORMS, MATMUL_DTYPES = map(get_args, (Site, DType, Kind, InputNorm, MatmulDType))

# Presets of the seed: activation width, dictionary size and Matryoshka groups (geometric).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {"act_size": 768, "dict_size": 12288, "group_sizes": [768, 1536, 3072, 6912]},
    "gemma-2-2b": {"act_size": 2304, "dict_size": 36864, "group_sizes": [2304, 4608, 9216, 20736]},
    "SmolLM2-135M-Instruct": {"act_size": 576, "dict_size": 9216, "group_sizes": [576, 1152, 2304, 5184]},
    "gemma-3-270m": {"act_size": 640, "dict_size": 10240, "group_sizes": [640, 1280, 2560, 5760]},
}


# ----------------------------------------------------------------------------- constraints
# Every field's constraint lives in its type: ``Literal`` choices, ``X | None`` for optional values,
# and these markers in ``Annotated``. ``check_config`` reads them; a class's ``validate`` holds only
# the rules that tie fields together.
def _show(key: Any) -> str:
    """A key as it can be printed on one line: plain when it is a plain name, else its repr."""
    return str(key) if re.fullmatch(r"[\w.\-\[\]]+", str(key)) else repr(key)


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}: got {value!r}; expected {expected}")


@dataclass(frozen=True)
class AtLeast:
    """An integer >= ``minimum``."""

    minimum: int

    def expects(self) -> str:
        return f"an integer >= {self.minimum}"

    def ok(self, value: Any) -> bool:
        return value >= self.minimum


@dataclass(frozen=True)
class Between:
    """A finite number in (low, high], or [low, high] when ``low_open`` is false."""

    low: float
    high: float
    low_open: bool = True

    def expects(self) -> str:
        return f"a number in {'(' if self.low_open else '['}{self.low}, {self.high}]"

    def ok(self, value: Any) -> bool:
        above_low = self.low < value if self.low_open else self.low <= value
        return above_low and value <= self.high


@dataclass(frozen=True)
class Matches:
    """A string matched whole by ``pattern``, described as ``description``."""

    pattern: str
    description: str

    def expects(self) -> str:
        return self.description

    def ok(self, value: Any) -> bool:
        return re.fullmatch(self.pattern, value) is not None


@dataclass(frozen=True)
class Expect:
    """What to call the expected value in the message (lists, or what null means)."""

    description: str


class ExistsWhenLocal:
    """A path meant for this disk (``looks_local``) must exist."""


NonEmpty = Matches(r"(?s)\s*\S.*", "a non-empty string")
SafeName = Matches(  # whole string: "name\n" is no name (re.match with $ let it through)
    r"[A-Za-z0-9][A-Za-z0-9._-]*(?<!\.lock)",  # NAME.lock is a lock file's name, which DVC ignores
    "a name of letters, digits, '.', '_' or '-', not ending in .lock (it becomes a directory name)",
)
DeviceName = Matches(r"auto|cpu|cuda(:\d+)?|mps", "auto, cpu, cuda, cuda:N or mps")
Device = Annotated[str, DeviceName]
Name = Annotated[str, SafeName]
Text = Annotated[str, NonEmpty]
Count = Annotated[int, AtLeast(1)]
Index = Annotated[int, AtLeast(0)]

_BASE_EXPECTS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _base_ok(value: Any, base: Any) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, base)


def check_value(key: str, value: Any, hint: Any, expect: str | None = None) -> None:
    """Check one value against its declared type, failing with one line that names ``key``."""
    marks: list = []
    if get_origin(hint) is Annotated:
        hint, *marks = get_args(hint)
        expect = next((m.description for m in marks if isinstance(m, Expect)), expect)
    if get_origin(hint) in (Union, types.UnionType):  # X | None
        if value is None:
            return
        [hint] = [a for a in get_args(hint) if a is not type(None)]
        return check_value(key, value, hint, expect)
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            _fail(key, value, expect or "one of " + ", ".join(get_args(hint)))
        return
    if get_origin(hint) is list:
        if not isinstance(value, list) or not value:
            _fail(key, value, expect or "a non-empty list")
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", item, get_args(hint)[0])
        return
    limits = [m for m in marks if hasattr(m, "ok")]
    expected = expect or next((m.expects() for m in limits), _BASE_EXPECTS.get(hint, str(hint)))
    if not _base_ok(value, hint) or not all(m.ok(value) for m in limits):
        _fail(key, value, expected)
    if any(isinstance(m, ExistsWhenLocal) for m in marks) and looks_local(value):
        if not Path(value).expanduser().exists():
            raise ConfigError(
                f"{key}: {value!r} does not exist (relative paths start at the working directory)"
            )


def check_config(obj: Any, prefix: str) -> None:
    """Every field of dataclass ``obj`` against its type, then the class's own cross-field rules."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in fields(obj):
        check_value(f"{prefix}.{f.name}", getattr(obj, f.name), hints[f.name])
    if hasattr(obj, "validate"):
        obj.validate(prefix)


def _build(cls, section: Any, prefix: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name, and check it."""
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
    check_config(obj, prefix)
    return obj


# ----------------------------------------------------------------------------- stage configs
@dataclass
class ModelConfig:
    """Which causal LM to read activations from."""

    name: Annotated[str, NonEmpty, ExistsWhenLocal()] = "packaged:SmolLM2-135M-Instruct"
    """Hub id (``gpt2``, ``google/gemma-2-2b``), a local model directory, or ``packaged:<name>``
    for a model that ships inside an installed package (the offline default)."""
    type: Name = "SmolLM2-135M-Instruct"
    """Short name used in paths: ``data/models/{type}``, ``results/{type}/...`` and presets."""
    revision: Text | None = None
    """Hub revision (branch, tag or commit); ignored for local and packaged models."""
    dtype: DType = "float32"
    """dtype of the forward pass during extraction."""
    device: Device = "auto"
    """``auto`` (cuda when present, else cpu), ``cpu`` or ``cuda[:N]``."""


def looks_local(path: str) -> bool:
    """A path meant for this disk (as opposed to a hub id such as ``NeelNanda/pile-10k``)."""
    return path.startswith((".", "/", "~")) or path.endswith((".txt", ".jsonl", ".json", ".raw"))


@dataclass
class DatasetConfig:
    """Text to run the model over."""

    path: Annotated[str, NonEmpty, ExistsWhenLocal()] = "builtin:pydoc-topics"
    """``builtin:pydoc-topics`` (Python's own documentation text, in every install), a local
    ``.txt``/``.jsonl`` file or directory of them, a ``datasets.save_to_disk`` directory, or a hub
    dataset id such as ``NeelNanda/pile-10k``."""
    split: Text = "train"
    text_field: Text = "text"
    """Field holding the text in jsonl files and hub/saved datasets."""
    n_tokens: Count = 100_000
    """Tokens to extract (rounded down to whole context windows)."""
    context_size: Annotated[int, AtLeast(2)] = 128
    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token."""
    holdout_fraction: Annotated[float, Between(0.0, 0.5)] = 0.05
    """Share of windows (the last ones) kept out of training, for evaluate and mine."""
    shuffle_seed: Index | None = None
    """Put the documents in a seeded random order before packing (null: the source's order). A
    corpus sorted by source (english-mix) otherwise trains on its first sources and holds out
    its last one. Local and builtin text is shuffled whole; a hub dataset streams through a
    10,000-document shuffle buffer."""

    def validate(self, p: str) -> None:
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

    layers: Annotated[list[Index], Expect("a non-empty list of layer indices")] = field(
        default_factory=lambda: [8]
    )
    sites: Annotated[list[Site], Expect("a non-empty list of sites")] = field(
        default_factory=lambda: ["resid_mid", "mlp_out"]
    )
    dtype: DType = "bfloat16"
    """Storage dtype. bfloat16 is kept as its raw 16 bits in a uint16 zarr array (zarr 3 has no
    bfloat16); the store's attrs say so and the reader turns the bits back into bfloat16."""
    batch_size: Count = 16
    """Windows per forward pass."""
    chunk_rows: Count = 4096
    """Rows (tokens) per zarr chunk, rounded to whole windows: the unit of reading."""
    shard_rows: Count = 65536
    """Rows per shard file, rounded to whole chunks: the unit of writing and of resuming. Memory
    while extracting is about 2-3 shards x sites x d_model x 2 bytes."""


@dataclass
class DictionaryConfig:
    """One Matryoshka BatchTopK transcoder (source site -> target site) or SAE (source = target)."""

    name: Name = "dictionary"
    kind: Kind = "transcoder"
    layer: Index = 8
    """Source layer; also the target layer unless ``target_layer`` is given."""
    source_layer: Index | None = None
    target_layer: Index | None = None
    source_site: Site = "resid_mid"
    target_site: Site = "mlp_out"
    act_size: Count | None = None
    """Width of the activations; filled from the store (or the preset) when left out."""
    dict_size: Count = 9216
    group_sizes: Annotated[list[Count], Expect("a non-empty list of positive integers")] = field(
        default_factory=lambda: [576, 1152, 2304, 5184]
    )
    top_k: Count | None = None
    """Active features per token; defaults to round(dict_size / 200)."""
    lr: Annotated[float, Between(0.0, 1.0)] = 3e-4
    adam_beta2: Annotated[float, Between(0.0, 0.99999)] = 0.999
    """Adam's second-moment decay (the reference recipe uses 0.99)."""
    batch_size: Count = 4096
    steps: Count = 1000
    save_every: Count = 1000
    seed: Index = 0
    aux_penalty: Annotated[float, Between(0.0, 1e3, low_open=False)] = 1 / 32
    """Weight of the auxiliary loss that revives dead features."""
    top_k_aux: Count = 512
    aux_budget: Annotated[float, Between(0.0, 1e3)] | None = None
    """null: the auxiliary loss reads every row of the batch (its cost grows with the dead count).
    A number bounds its cost as a share of one encoder matmul (0.15: at most 0.15): it then reads
    as many evenly spaced rows as that allows once many features are dead (docs/training.md)."""
    n_batches_to_dead: Count = 5
    """A feature that stays silent this many batches counts as dead for the auxiliary loss."""
    threshold_momentum: Annotated[float, Between(0.0, 1.0)] = 0.01
    """EMA rate of the inference threshold learned from the batch top-k."""
    calibration_rows: Index = 65536
    """Training rows over which the inference threshold is set at the end of training, so that
    inference L0 matches ``top_k`` (0: keep the moving average learned during training)."""
    input_norm: InputNorm = "token"
    """``token``: each source row is divided by its own RMS before encoding (an SAE scales its
    output back by it); ``global``: one scale for every row, so rare huge rows dominate the loss."""
    skip_connection: Annotated[bool | None, Expect("true, false or null (on for transcoders)")] = None
    """A learned linear map from the (normalised) source to the output beside the features (a
    "skip transcoder"): the MLP's linear part stops costing features. null: on for transcoders
    (held-out FVU 0.413 against 0.462 without, docs/quality.md), off for SAEs (it would learn the
    identity)."""
    feature_init: FeatureInit | None = None
    """How features start. ``data``: each at one training row (encoder at its source direction,
    decoder at what the skip connection leaves of its target, bias so that all fire at first);
    ``random``: random unit directions (an SAE's encoder the decoder's transpose). null: data for
    transcoders (held-out FVU 0.314 against 0.412 at lr 3e-4, docs/quality.md), random for SAEs. At
    lr 2e-3 a random start keeps more features alive (0.3 % dead against 6.8 %)."""
    outlier_norm_ratio: Annotated[float, Between(1.0, 1e9)] | None = 100.0
    """Leave out of training every row whose target norm is more than this many times the target
    site's mean norm (null: train on every row). Some ``mlp_out`` sites have a handful of rows
    hundreds of times larger than the rest (SmolLM2 layer 11: 34 of 141k English rows, each the
    token right after BOS, hold 88 % of the variance); in the loss they pull a transcoder onto
    themselves (held-out FVU 2.86 with them, 0.39 without, docs/quality.md). Frequent large rows
    (layer 2's " the": 1.8 % of rows above 20x the median) stay under 100x the mean."""
    max_grad_norm: Annotated[float, Between(0.0, 1e9)] | None = None
    """Clip the global gradient norm to this (off when null)."""
    shuffle_chunks: Count = 16
    """Store chunks mixed together when shuffling training rows."""
    device: Device = "auto"
    matmul_dtype: MatmulDType = "float32"
    """dtype of the encoder matmul in training (bfloat16: faster on CPUs and GPUs with bf16 units;
    weights, gradients and optimizer state stay float32)."""
    save_activation_samples: bool = False
    sample_collection_freq: Count = 1000
    max_samples_per_feature: Count = 100
    sample_context_size: Count = 20
    sample_activation_threshold: Annotated[float, Between(0.0, 1e9, low_open=False)] = 0.1
    wandb_project: Text | None = None
    """Log to wandb when set and wandb is configured (WANDB_API_KEY, or WANDB_MODE=offline)."""
    model_type: Name | None = None
    """Filled from ``model.type``; names the results directory."""
    layers: Annotated[list[Index], Expect("a list of consecutive layer indices")] | None = None
    """A cross-layer transcoder's layers (``clt`` section only): it reads ``resid_mid`` at each
    and writes ``mlp_out`` at it and every later one; ``layer`` is the first."""
    decoder_init: DecoderInit = "random"
    """How a cross-layer transcoder's decoders start: ``random`` over all the layers a feature
    writes to, or ``own_layer`` (its own layer only, zero beyond)."""
    topk_scope: TopkScope = "layer"
    """A cross-layer transcoder's BatchTopK budget: ``layer`` (``top_k`` codes per token at every
    layer) or ``shared`` (``top_k`` times its layer count per token, over all layers at once)."""

    def validate(self, p: str) -> None:
        if self.kind == "clt":
            self._validate_clt(p)
        elif self.layers is not None:
            _fail(f"{p}.layers", self.layers, "left out (only a cross-layer transcoder, in clt:, has layers)")
        elif self.topk_scope != "layer" or self.decoder_init != "random":
            key = "topk_scope" if self.topk_scope != "layer" else "decoder_init"
            _fail(f"{p}.{key}", getattr(self, key), "left out (a cross-layer transcoder's setting, in clt:)")
        if self.source_layer is not None and self.source_layer != self.layer:
            _fail(
                f"{p}.source_layer", self.source_layer, f"the same as {p}.layer ({self.layer}), or left out"
            )
        if self.kind == "sae" and (
            self.source_site != self.target_site or self.resolved_target_layer != self.layer
        ):
            _fail(
                f"{p}.target_site",
                self.target_site,
                f"the source site '{self.source_site}' at the same layer for kind sae "
                "(use kind transcoder otherwise)",
            )
        if sum(self.group_sizes) != self.dict_size:
            raise ConfigError(
                f"{p}.group_sizes: {self.group_sizes} sums to {sum(self.group_sizes)}, "
                f"but {p}.dict_size is {self.dict_size}; they must be equal"
            )
        if self.top_k is not None and self.top_k >= self.dict_size:
            _fail(f"{p}.top_k", self.top_k, f"an integer in [1, dict_size={self.dict_size})")
        if self.skip_connection and self.kind == "sae":
            _fail(f"{p}.skip_connection", True, "false for kind sae (it would learn the identity)")

    def _validate_clt(self, p: str) -> None:
        if self.layers is None:
            _fail(f"{p}.kind", "clt", "transcoder or sae here (a cross-layer transcoder goes under clt:)")
        if not self.layers or self.layers != list(range(self.layers[0], self.layers[0] + len(self.layers))):
            _fail(f"{p}.layers", self.layers, "consecutive ascending layer indices, e.g. [0, 1, 2]")
        fixed = {
            "source_site": "resid_mid",
            "target_site": "mlp_out",
            "skip_connection": False,
            "feature_init": "random",
            "save_activation_samples": False,
            "target_layer": None,
        }
        for key, value in fixed.items():
            if getattr(self, key) not in (value, None):
                _fail(f"{p}.{key}", getattr(self, key), f"{value} or left out for a cross-layer transcoder")

    @property
    def resolved_target_layer(self) -> int:
        return self.layer if self.target_layer is None else self.target_layer

    @property
    def has_skip(self) -> bool:
        return self.kind == "transcoder" if self.skip_connection is None else self.skip_connection

    @property
    def is_clt(self) -> bool:
        return self.kind == "clt"

    def keys(self) -> list[tuple[int, str]]:
        """The store's (layer, site) arrays it trains from: source then target, layer by layer."""
        if self.is_clt:
            return [(layer, site) for layer in self.layers for site in ("resid_mid", "mlp_out")]
        return [(self.layer, self.source_site), (self.resolved_target_layer, self.target_site)]

    @property
    def init_from_data(self) -> bool:
        return self.kind == "transcoder" if self.feature_init is None else self.feature_init == "data"

    @property
    def k(self) -> int:
        return self.top_k if self.top_k is not None else default_top_k(self.dict_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["top_k"] = self.k
        d["target_layer"] = self.resolved_target_layer
        d["source_layer"] = self.layer
        return d


@dataclass
class EvaluateConfig:
    batch_size: Count = 4096
    """Held-out rows per evaluation batch (FVU, L0, feature frequencies)."""
    device: Device = "auto"
    n_ce_sequences: Index = 64
    """Held-out windows run through the model with the dictionary spliced in (the spliced-loss
    metrics); 0 skips them. Capped at the number of held-out windows."""
    ce_batch_size: Count = 8
    """Windows per forward pass of the spliced-loss evaluation."""
    dtype: DType = "float32"
    """dtype of the model's forward passes in the spliced-loss evaluation."""


@dataclass
class MineConfig:
    max_samples_per_feature: Count = 20
    """Top-activating contexts kept per feature."""
    sample_context_size: Count = 20
    """Tokens of context kept around (mostly before) the activating token."""
    sample_activation_threshold: Annotated[float, Between(0.0, 1e9, low_open=False)] = 0.1
    batch_size: Count = 4096
    device: Device = "auto"
    quantile_bands: Count = 4
    """The feature's firings are cut into this many activation quantile bands (lowest first) ..."""
    samples_per_band: Count = 3
    """... and this many random contexts are kept from each: the tail below the top contexts."""
    histogram_bins: Count = 20
    """Bins of each feature's activation histogram, from 0 to its largest activation."""
    n_logit_tokens: Count = 10
    """Tokens listed as most promoted and most suppressed by each feature's decoder direction."""
    seed: Index = 0
    """Seed of the random choice of quantile samples."""


@dataclass
class BrowseConfig:
    max_feature_pages: Index | None = None
    """Feature pages written at most (features that fired, lowest index, i.e. earliest group, first);
    null: a page for every feature that fired. The index lists every feature either way."""
    contexts_per_feature: Count = 10
    """Top-activating contexts shown on a feature page (the quantile samples are shown as well)."""


@dataclass(frozen=True)
class TranscoderSet:
    """``transcoder_set``: one transcoder per layer, named ``{name}-L{layer}``."""

    name: str
    layers: list[int]
    steps: int

    def member(self, layer: int) -> str:
        return f"{self.name}-L{layer}"


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
    transcoder_set: TranscoderSet | None = None
    clts: dict[str, DictionaryConfig] = field(default_factory=dict)
    """``clt``: the cross-layer transcoders, by name."""
    data_root: Path = Path("data")
    results_root: Path = Path("results")

    def dictionary(self, name: str) -> DictionaryConfig:
        """A ``dictionaries`` entry, a transcoder set's member or a ``clt`` entry, by name."""
        found = self.dictionaries.get(name) or self.clts.get(name)
        if found is None:
            known = [*self.dictionaries, *self.clts]
            raise ConfigError(f"dictionaries.{name}: no such dictionary; known: {', '.join(known) or 'none'}")
        return found

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
    """The seed's helper: fill derived values (``top_k``, sizes of an unknown model) and validate;
    returns a new dict."""
    return dataclasses.asdict(dictionary_from_dict(_with_derived(cfg, prefix), prefix))


def _with_derived(cfg: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``cfg`` with the values derived from others filled in: sizes of an unknown model, ``top_k``."""
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
    return cfg


def dictionary_from_dict(cfg: dict[str, Any], prefix: str = "cfg") -> DictionaryConfig:
    return _build(DictionaryConfig, cfg, prefix)


# ----------------------------------------------------------------------------- params.yaml
def read_yaml(path: str | Path) -> Any:
    """A YAML file read exactly as DVC reads it (ruamel.yaml's safe loader: YAML 1.2), so that mtc
    and DVC never see two different values in one params.yaml. PyYAML reads YAML 1.1, where
    ``steps: 040`` is 32, ``1:00`` is 60 and ``yes`` is true; DVC, and so mtc, read 40, "1:00" and
    "yes". A key given twice in one mapping is refused (DVC refuses such a file too)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    try:
        return YAML(typ="safe").load(text)
    except DuplicateKeyError as e:
        key = re.search(r'duplicate key "(.*?)" with value', str(e.problem))
        raise ConfigError(
            f"{path}: key {key.group(1) if key else '?'!r} appears twice in one mapping "
            f"(line {e.problem_mark.line + 1}); keep one"
        ) from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or next(iter(str(e).splitlines()), type(e).__name__)
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(str(problem).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


def parse_params(
    raw: Any, *, data_root: str | Path = "data", results_root: str | Path = "results"
) -> PipelineConfig:
    """Validate a whole params mapping (as loaded from YAML) into a ``PipelineConfig``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: got {type(raw).__name__}; expected a mapping of sections")
    sections = {
        "model",
        "dataset",
        "extract",
        "dictionaries",
        "transcoder_set",
        "clt",
        "evaluate",
        "mine",
        "browse",
    }
    unknown = sorted(set(raw) - sections, key=str)
    if unknown:
        raise ConfigError(
            f"{_show(unknown[0])}: unknown section; valid sections are {', '.join(sorted(sections))}"
        )
    model = _build(ModelConfig, raw.get("model"), "model")
    if model.type == "sets":  # results/sets/ holds the transcoder sets' summaries
        _fail("model.type", model.type, "any name but 'sets' (results/sets/ holds the transcoder sets)")
    dataset = _build(DatasetConfig, raw.get("dataset"), "dataset")
    extract = _build(ExtractConfig, raw.get("extract"), "extract")
    entries = raw.get("dictionaries") or {}
    if not isinstance(entries, dict):
        _fail("dictionaries", entries, "a mapping of dictionary names to settings")
    dictionaries = {}
    for name, entry in entries.items():
        prefix = f"dictionaries.{_show(name)}"
        check_value(prefix, name, Name)
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            _fail(prefix, entry, "a mapping of settings")
        dictionaries[name] = _dictionary_entry({**entry, "name": name}, model.type, extract, prefix)
        if dictionaries[name].is_clt:
            _fail(
                f"{prefix}.kind", "clt", "transcoder or sae here (a cross-layer transcoder goes under clt:)"
            )
    transcoder_set, members = _transcoder_set(raw.get("transcoder_set"), model.type, extract)
    for member in members:
        if member.name in dictionaries:
            raise ConfigError(
                f"transcoder_set: its layer-{member.layer} transcoder is named {member.name}, "
                f"like the dictionaries entry; rename one"
            )
        dictionaries[member.name] = member
    clts = _clt_section(raw.get("clt"), model.type, extract)
    for name in clts:
        if name in dictionaries:
            raise ConfigError(f"clt.{name}: a dictionary of that name exists already; rename one")
    return PipelineConfig(
        model=model,
        dataset=dataset,
        extract=extract,
        dictionaries=dictionaries,
        evaluate=_build(EvaluateConfig, raw.get("evaluate"), "evaluate"),
        mine=_build(MineConfig, raw.get("mine"), "mine"),
        browse=_build(BrowseConfig, raw.get("browse"), "browse"),
        transcoder_set=transcoder_set,
        clts=clts,
        data_root=Path(data_root),
        results_root=Path(results_root),
    )


def _dictionary_entry(entry: dict, model_type: str, extract: ExtractConfig, prefix: str) -> DictionaryConfig:
    """One dictionary from its params settings over the model type's preset (``source_layer``
    alone stands for ``layer``)."""
    if "layer" not in entry and "source_layer" in entry:
        entry = {**entry, "layer": entry["source_layer"]}
    cfg = {**get_default_cfg(model_type), **entry, "model_type": model_type}
    d = dictionary_from_dict(_with_derived(cfg, prefix), prefix)
    _check_against_extract(d, extract, prefix)
    return d


def _transcoder_set(
    section: Any, model_type: str, extract: ExtractConfig
) -> tuple[TranscoderSet | None, list[DictionaryConfig]]:
    """``transcoder_set``: one transcoder per layer of ``layers`` (``resid_mid`` -> ``mlp_out`` unless
    ``dictionary`` says otherwise), named ``{name}-L{layer}``, trained for ``steps`` with the
    ``dictionary`` settings. dvc.yaml gives each layer its own stages and tracks ``name``, ``steps``
    and ``dictionary`` but not ``layers``: adding a layer runs only that layer's stages."""
    p = "transcoder_set"
    if section is None:
        return None, []
    if not isinstance(section, dict):
        _fail(p, section, "a mapping of name, layers, steps and dictionary")
    unknown = sorted(set(section) - {"name", "layers", "steps", "dictionary"}, key=str)
    if unknown:
        raise ConfigError(
            f"{p}.{_show(unknown[0])}: unknown key; valid keys are dictionary, layers, name, steps "
            "(dictionary settings go under dictionary)"
        )
    for key in ("name", "layers", "steps"):  # dvc.yaml's set stages read all three
        if key not in section:
            raise ConfigError(f"{p}.{key}: missing; dvc.yaml's set stages need name, layers and steps")
    name, layers, shared = section["name"], section["layers"], section.get("dictionary") or {}
    check_value(f"{p}.name", name, Name)
    check_value(f"{p}.steps", section["steps"], Count)
    if not isinstance(layers, list):
        _fail(f"{p}.layers", layers, "a list of layer indices (empty: no set)")
    for i, layer in enumerate(layers):
        check_value(f"{p}.layers[{i}]", layer, Index)
        if layer not in extract.layers:
            _fail(f"{p}.layers[{i}]", layer, f"one of the extracted layers {extract.layers} (extract.layers)")
    if not isinstance(shared, dict):
        _fail(f"{p}.dictionary", shared, "a mapping of dictionary settings")
    for key in ("name", "layer", "source_layer", "target_layer", "steps"):
        if key in shared:
            _fail(f"{p}.dictionary.{key}", shared[key], f"left out: the set gives each transcoder its {key}")
    the_set = TranscoderSet(name, list(layers), section["steps"])
    entries = [
        {
            "kind": "transcoder",
            **shared,
            "name": the_set.member(layer),
            "layer": layer,
            "steps": the_set.steps,
        }
        for layer in layers
    ]
    members = [_dictionary_entry(entry, model_type, extract, f"{p}.dictionary") for entry in entries]
    return the_set, members


def _clt_section(section: Any, model_type: str, extract: ExtractConfig) -> dict[str, DictionaryConfig]:
    """``clt``: one cross-layer transcoder per entry (name -> settings, ``layers`` and ``steps``
    required: dvc.yaml's clt stages read them). Keys left out come from the model type's preset, as
    for ``dictionaries``; ``dict_size``, ``group_sizes`` and ``top_k`` are per layer."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        _fail("clt", section, "a mapping of cross-layer transcoder names to settings ({} for none)")
    clts = {}
    for name, entry in section.items():
        p = f"clt.{_show(name)}"
        check_value(p, name, Name)
        if not isinstance(entry, dict):
            _fail(p, entry, "a mapping of settings")
        for key in ("layers", "steps"):
            if key not in entry:
                raise ConfigError(f"{p}.{key}: missing; dvc.yaml's clt stages need layers and steps")
        for key in ("layer", "source_layer", "target_layer", "kind"):
            if key in entry:
                _fail(f"{p}.{key}", entry[key], "left out: a cross-layer transcoder's layers are in layers")
        layers = entry["layers"]
        check_value(f"{p}.layers", layers, Annotated[list[Index], Expect("a list of layer indices")])
        if not layers:
            _fail(f"{p}.layers", layers, "a non-empty list of consecutive layers")
        for i, layer in enumerate(layers):
            if layer not in extract.layers:
                _fail(
                    f"{p}.layers[{i}]",
                    layer,
                    f"one of the extracted layers {extract.layers} (extract.layers)",
                )
        clt_entry = {"skip_connection": False, "feature_init": "random", **entry, "kind": "clt"}
        clts[name] = _dictionary_entry(
            {**clt_entry, "name": name, "layer": layers[0]}, model_type, extract, p
        )
    return clts


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
