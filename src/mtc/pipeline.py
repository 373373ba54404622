"""Stage entry points shared by ``stages/*.py`` (DVC) and the ``mtc`` CLI.

Every entry point takes an already validated ``PipelineConfig`` (``load_params`` validates the
whole ``params.yaml`` first) and does one stage's work.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


def train(cfg: PipelineConfig, names: list[str] | str) -> list[Path]:
    from mtc.train import train as run

    dictionaries = [cfg.dictionary(n) for n in ([names] if isinstance(names, str) else names)]
    store = open_store(cfg)
    return run(dictionaries, store, cfg.results_root, tokenizer_dir=cfg.model_dir)


def evaluate(cfg: PipelineConfig, name: str) -> Path:
    from mtc.evaluate import evaluate_run
    from mtc.replacement import evaluate_clt_run

    d, run_dir = resolve_run(cfg, name)
    if d.is_clt:  # its layers' FVU and the replacement model (mtc.replacement)
        return evaluate_clt_run(cfg, run_dir, open_store(cfg))
    return evaluate_run(cfg, d, run_dir, open_store(cfg))


def replace_set(cfg: PipelineConfig) -> Path:
    from mtc.replacement import replace_set

    return replace_set(cfg, open_store(cfg))


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


PARAMS_CHECKED = "params-checked.txt"
"""What the ``check_params`` stage writes into the data root when params.yaml passes every check.
Every other stage depends on it, so ``dvc repro`` runs the check before it deletes any outputs."""


def check_params(cfg: PipelineConfig) -> Path:
    """DVC stage ``check_params``: params.yaml is valid (``run_stage`` has checked it). DVC pastes
    params values into output paths and deletes those outputs before a stage's command runs, so a
    ``layer`` of ``../../x`` would have DVC delete files outside the project before the stage itself
    could refuse it; this stage refuses first. Its output never changes (the same line every time),
    so a params change reruns only the stages that read the changed values."""
    from mtc.results import atomic_write_text

    out = cfg.data_root / PARAMS_CHECKED
    atomic_write_text(out, "params.yaml passed mtc's checks\n")
    return out


def stage_dictionary(cfg: PipelineConfig, argv: list[str], dvc_stage: str | None) -> str:
    """The dictionary a per-dictionary stage script (train, evaluate, mine, browse) works on. By hand
    it is named on the command line (``python stages/train.py tc``). Under DVC the command line holds
    nothing from params.yaml (DVC would paste a name into a shell command before anything checks it):
    the stage's own name says which, in ``DVC_STAGE``: ``train@NAME`` for a ``dictionaries`` entry,
    ``train_set@LAYER`` for that layer's transcoder of ``transcoder_set``, ``train_clt@NAME`` for a
    ``clt`` entry."""
    if len(argv) > 1:
        raise ConfigError(f"one dictionary name expected; got {len(argv)}: {' '.join(argv)}")
    if argv:
        return argv[0]
    if not dvc_stage:
        raise ConfigError(
            "no dictionary named: give its name (python stages/<stage>.py NAME), or run dvc repro"
        )
    group, _, key = dvc_stage.rpartition(":")[2].rpartition("@")
    if not group.endswith("_set"):
        cfg.dictionary(key)  # refuses a name that is not an entry
        return key
    the_set = cfg.transcoder_set
    if the_set is None or not re.fullmatch(r"[0-9]+", key) or int(key) not in the_set.layers:
        raise ConfigError(f"DVC stage {dvc_stage!r}: {key!r} is not a layer of transcoder_set.layers")
    return the_set.member(int(key))


def run_stage(
    stage: Callable[..., object],
    *args: str,
    params: str = "params.yaml",
    dictionary_of: list[str] | None = None,
) -> None:
    """Validate params (and the model's facts), run one stage; a user error ends in one line on
    stderr and exit code 2. ``dictionary_of``: the script's command line, for a per-dictionary stage
    (``stage_dictionary``)."""
    with one_line_exit():
        cfg = load_params(params)
        check_model_facts(cfg)
        if dictionary_of is not None:
            args = (*args, stage_dictionary(cfg, dictionary_of, os.environ.get("DVC_STAGE")))
        result = stage(cfg, *args)
    if result is not None:
        print(f"wrote {result}")
