"""A damaged or missing run directory ends every command that reads it in one line naming the file and
what to run, exit code 2, nothing written; a torn last line of the training log is dropped on resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_params

STEPS = 20
RUN = f"results/stories260K/2/{STEPS}/tc"


def write_project(root, tiny_pipeline, **dictionary):
    """params.yaml and the shared data (a link) in ``root``; returns the parsed params."""
    from mtc.config import parse_params

    root.mkdir(parents=True, exist_ok=True)
    raw = tiny_params(tiny_pipeline.model.name, steps=STEPS, save_every=10, **dictionary)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "data").symlink_to(tiny_pipeline.data_root.resolve())
    return parse_params(raw, data_root=root / "data", results_root=root / "results")


@pytest.fixture(scope="module")
def finished(tiny_pipeline, tmp_path_factory):
    """A project whose run is trained, evaluated and mined (read-only: tests damage copies)."""
    from mtc import pipeline

    root = tmp_path_factory.mktemp("finished") / "project"
    cfg = write_project(root, tiny_pipeline)
    pipeline.train(cfg, ["tc"])
    pipeline.evaluate(cfg, "tc")
    pipeline.mine(cfg, "tc")
    return root


@pytest.fixture
def project(finished, tiny_pipeline, tmp_path):
    """A copy of the finished project to damage."""
    root = tmp_path / "project"
    write_project(root, tiny_pipeline)
    shutil.copytree(finished / "results", root / "results", ignore=shutil.ignore_patterns("*.lock"))
    return root


@pytest.fixture
def mtc(monkeypatch, capsys):
    """``mtc ARGS...`` in this process (the CLI's own error path, without a start-up) from ``cwd``."""
    from mtc import cli

    def run(cwd, *args):
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["mtc", *map(str, args)])
        with pytest.raises(SystemExit) as stop:
            cli.main()
        return subprocess.CompletedProcess(args, stop.value.code, "", capsys.readouterr().err)

    return run


def one_line(result, *parts):
    """Exit code 2 and one ``error:`` line holding every part (evaluate may warn before it)."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(part in errors[0] for part in parts), result.stderr


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix != ".lock")


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "a truncated dictionary.safetensors": (
        lambda run: truncate(run / "dictionary.safetensors"),
        "dictionary.safetensors: damaged or truncated",
    ),
    "a missing dictionary.json": (lambda run: (run / "dictionary.json").unlink(), "dictionary.json: missing"),
    "a truncated config.json": (
        lambda run: truncate(run / "config.json"),
        "config.json: damaged or truncated",
    ),
}
COMMANDS = {
    "evaluate NAME": ["evaluate", "tc"],
    "evaluate RUN_DIR": ["evaluate", RUN],
    "mine NAME": ["mine", "tc"],
    "mine RUN_DIR": ["mine", RUN],
    "export saelens": ["export", RUN, "exported", "--format", "saelens"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_ends_each_reader_in_one_line_naming_the_file_and_the_fix(
    project, mtc, damage, command
):
    spoil, message = DAMAGE[damage]
    spoil(project / RUN)
    before = listing(project)
    one_line(
        mtc(project, *COMMANDS[command]),
        message,
        f"delete {RUN} and train again (mtc train tc, or dvc repro -f train@tc)",
    )
    assert listing(project) == before, "nothing written"


def test_evaluate_before_training_says_to_train_first(finished, tiny_pipeline, tmp_path, mtc):
    root = tmp_path / "project"
    write_project(root, tiny_pipeline)
    one_line(mtc(root, "evaluate", "tc"), f"{RUN}: no run here", "train it first (mtc train tc")
    assert not (root / "results").exists()


MINED = "activation_samples/mined"
MINED_DAMAGE = {
    "a truncated mined samples.safetensors": (f"{MINED}/samples.safetensors", "mine again (mtc mine tc"),
    "a truncated mined meta.json": (f"{MINED}/meta.json", "mine again (mtc mine tc"),
    "a truncated metrics.json": ("metrics.json", "evaluate again (mtc evaluate tc"),
}


@pytest.mark.parametrize("damage", MINED_DAMAGE)
def test_damaged_mined_samples_or_metrics_end_browse_in_one_line(project, mtc, damage):
    file, fix = MINED_DAMAGE[damage]
    truncate(project / RUN / file)
    before = listing(project)
    one_line(mtc(project, "browse", RUN), f"{RUN}/{file}: damaged or truncated", fix)
    assert listing(project) == before, "nothing written"


def crashed_after_step_10(project, finished, last_log_line):
    """The state a kill -9 while the run logs step 20 leaves: config.json without completed_at, the
    step-10 checkpoint, the log's step-10 line and ``last_log_line`` (without a newline)."""
    from mtc.results import read_json, write_config

    run, done = project / RUN, finished / RUN
    shutil.rmtree(run)
    shutil.copytree(done / "checkpoints", run / "checkpoints")
    write_config(run, read_json(done / "config.json"), completed=False)
    first, second = (done / "training_log.jsonl").read_text().splitlines()
    (run / "training_log.jsonl").write_text(first + "\n" + last_log_line(second))
    return run


def test_a_torn_last_log_line_is_dropped_on_resume(project, finished, mtc):
    run = crashed_after_step_10(project, finished, lambda line: line[: len(line) // 2])
    checkpoint = run / "checkpoints" / "step_10" / "state.json"
    saved = checkpoint.stat().st_mtime_ns
    assert mtc(project, "train", "tc").returncode == 0
    assert checkpoint.stat().st_mtime_ns == saved, "resumed from step 10, not started over"
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20], "whole JSON lines, step 20 logged once"
    assert (run / "dictionary.safetensors").read_bytes() == (
        finished / RUN / "dictionary.safetensors"
    ).read_bytes()


def test_a_damaged_log_line_before_the_last_is_refused_in_one_line(project, finished, mtc):
    run = crashed_after_step_10(project, finished, lambda line: line + "\n")
    log = run / "training_log.jsonl"
    log.write_text("{not json\n" + log.read_text())
    one_line(mtc(project, "train", "tc"), f"{RUN}/training_log.jsonl: line 1 is not a log record")
    assert not (run / "dictionary.safetensors").exists()
