"""Shared fixtures: the real 1 MB stories260K model and a small store extracted from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MTC_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets"
STORIES = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "corpora" / "tinyshakespeare" / "input.txt"


def tiny_params(model_name: str | None = None, **dictionary) -> dict:
    """params.yaml content for a fast pipeline on stories260K (or a tiny random model dir)."""
    entry = {
        "kind": "transcoder",
        "layer": 2,
        "source_site": "resid_mid",
        "target_site": "mlp_out",
        "dict_size": 256,
        "group_sizes": [32, 64, 160],
        "top_k": 8,
        "lr": 0.003,
        "batch_size": 512,
        "steps": 150,
        "save_every": 50,
    }
    entry.update(dictionary)
    return {
        "model": {"name": model_name or str(STORIES), "type": "stories260K"},
        "dataset": {
            "path": str(SHAKESPEARE) if SHAKESPEARE.is_file() else "builtin:pydoc-topics",
            "n_tokens": 32768,
            "context_size": 64,
            "holdout_fraction": 0.1,
        },
        "extract": {"layers": [2], "sites": ["resid_mid", "mlp_out"], "chunk_rows": 1024},
        "dictionaries": {"tc": entry},
        "transcoder_set": {"name": "tcs", "layers": [], "steps": 100, "dictionary": {}},  # dvc.yaml reads it
        "clt": {},  # dvc.yaml reads it too
        "evaluate": {"batch_size": 1024, "n_ce_sequences": 8, "ce_batch_size": 8},
        "mine": {"max_samples_per_feature": 5, "sample_context_size": 12, "batch_size": 1024},
        "browse": {"max_feature_pages": 24},  # dvc.yaml's browse stage depends on the section
    }


@pytest.fixture(scope="session")
def stories_model_dir(tmp_path_factory) -> Path:
    """stories260K when ../shared has it; else a tiny random Llama with the same tokenizer shape."""
    if STORIES.is_dir():
        return STORIES
    from tests.helpers import tiny_random_llama_dir

    return tiny_random_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, stories_model_dir):
    """A PipelineConfig whose model is prepared and whose store is extracted (shared, read-only)."""
    from mtc import pipeline
    from mtc.config import parse_params

    root = tmp_path_factory.mktemp("pipeline")
    cfg = parse_params(
        tiny_params(str(stories_model_dir)), data_root=root / "data", results_root=root / "results"
    )
    pipeline.prepare_model(cfg)
    pipeline.extract(cfg)
    return cfg


@pytest.fixture
def trained_transcoder(tiny_pipeline, tmp_path):
    """The tiny transcoder trained into a fresh results root."""
    import dataclasses

    from mtc import pipeline

    cfg = dataclasses.replace(tiny_pipeline, results_root=tmp_path / "results")
    [run_dir] = pipeline.train(cfg, ["tc"])
    return cfg, run_dir


def copy_project(dest: Path) -> Path:
    """The files `dvc repro` needs, in a fresh git + DVC repository at ``dest``."""
    import subprocess
    import sys

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", dest / ".dvcignore")  # lock files beside runs are not results
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")  # the project's cache settings
    return dest
