"""Stage entry points shared by ``stages/*.py`` (DVC) and the ``mtc`` CLI.

Every entry point takes an already validated ``PipelineConfig`` (``load_params`` validates the
whole ``params.yaml`` first) and does one stage's work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from mtc.config import ConfigError, DictionaryConfig, PipelineConfig, dictionary_from_dict, load_params
from mtc.errors import one_line_exit


def check_model_facts(cfg: PipelineConfig) -> None:
    """Check layers, sites and widths against the model's own config, when it is on disk already
    (the prepared model directory, or a local ``model.name``): before any stage does work."""
    from mtc.config import looks_local
    from mtc.models import read_architecture

    candidates = [cfg.model_dir]
    local = Path(cfg.model.name).expanduser()
    if looks_local(cfg.model.name) or local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"model.name: {cfg.model.name!r} is not a model directory (no config.json); point it at "
                "a Hugging Face model directory, a hub id, or packaged:<name>"
            )
        candidates.append(local)
    model_dir = next((d for d in candidates if (d / "config.json").is_file()), None)
    if model_dir is None:
        return  # a hub or packaged model not prepared yet: prepare_model checks after loading it
    arch = read_architecture(model_dir)
    arch.check_context_size(cfg.dataset.context_size)
    for i, layer in enumerate(cfg.extract.layers):
        arch.check_layer(layer, f"extract.layers[{i}]")
        for site in cfg.extract.sites:
            arch.check_site(site, layer, "extract.sites")
    for name, d in cfg.dictionaries.items():
        if d.act_size is not None and d.act_size != arch.d_model:
            raise ConfigError(
                f"dictionaries.{name}.act_size: got {d.act_size}; {cfg.model.name} has width {arch.d_model}"
            )


def resolve_run(cfg: PipelineConfig, name: str) -> tuple[DictionaryConfig, Path]:
    """A params.yaml dictionary entry and its run directory; or, when ``name`` is not an entry but
    a run directory (one ``mtc import`` wrote, say), the dictionary config recorded in it."""
    from mtc.results import CONFIG_FILE, finished_run_record, run_dir_of

    if name in cfg.dictionaries or not (Path(name) / CONFIG_FILE).is_file():
        d = cfg.dictionary(name)
        return d, run_dir_of(d, cfg.results_root)
    record = finished_run_record(Path(name))
    known = {f.name for f in dataclasses.fields(DictionaryConfig)}
    return dictionary_from_dict({k: v for k, v in record.items() if k in known}, name), Path(name)


def open_store(cfg: PipelineConfig):
    """The store for these params; refuses one made from other model/dataset settings."""
    from mtc.provenance import store_provenance
    from mtc.store import ActivationStore, check_provenance

    store = ActivationStore(cfg.store_dir)
    expected = store_provenance(cfg, store.provenance.get("bos_token_id"))
    expected.pop("model_source")
    check_provenance(store, expected)
    return store


def prepare_model(cfg: PipelineConfig) -> Path:
    from mtc.models import prepare

    out = prepare(cfg)
    check_model_facts(cfg)  # a hub model's facts are known only once it is here
    return out


def extract(cfg: PipelineConfig) -> Path:
    from mtc.extract import extract as run

    return run(cfg)


def train(cfg: PipelineConfig, names: list[str]) -> list[Path]:
    from mtc.train import train as run

    dictionaries = [cfg.dictionary(n) for n in names]
    store = open_store(cfg)
    return run(dictionaries, store, cfg.results_root, tokenizer_dir=cfg.model_dir)


def evaluate(cfg: PipelineConfig, name: str) -> Path:
    from mtc.evaluate import evaluate_run

    return evaluate_run(cfg, *resolve_run(cfg, name), open_store(cfg))


def summarize_set(cfg: PipelineConfig) -> Path:
    from mtc.evaluate import summarize_set

    return summarize_set(cfg)


def mine(cfg: PipelineConfig, name: str) -> Path:
    from mtc.mine import mine_run

    return mine_run(cfg, *resolve_run(cfg, name), open_store(cfg))


def browse(cfg: PipelineConfig, name: str) -> Path:
    from mtc.browse import build_site
    from mtc.results import run_dir_of

    return build_site(run_dir_of(cfg.dictionary(name), cfg.results_root), cfg=cfg.browse)


def run_stage(stage: Callable[..., object], *args: str, params: str = "params.yaml") -> None:
    """Validate params (and the model's facts), run one stage; a user error ends in one line on
    stderr and exit code 2."""
    with one_line_exit():
        cfg = load_params(params)
        check_model_facts(cfg)
        result = stage(cfg, *args)
    if result is not None:
        print(f"wrote {result}")
