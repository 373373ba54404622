"""A hostile params.yaml (a teammate's branch, a `dvc exp run -S` built from user input) can neither
run a command nor make DVC touch a file outside the project's data/ and results/.

DVC pastes ${...} into `cmd` and `outs` and acts on them (runs the command in a shell, deletes the
outputs) before any stage code runs. So every command is fixed text (the dictionary is named by the
stage's own name, DVC_STAGE), and every stage depends on `check_params`, which refuses the file before
DVC reaches any stage whose outputs it would delete. These tests attack a real project with real
`dvc repro` / `dvc exp run`, with files planted where the hostile output paths point.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, tiny_params

pytestmark = pytest.mark.slow

# Where DVC may write for itself; everything else under the base directory is compared byte for byte.
DVC_OWN = (".git", ".dvc/tmp", ".dvc/cache", "data", "results")


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def dvc_output_paths(root: Path) -> set[Path]:
    """Every output path DVC's own parse of dvc.yaml + params.yaml names (what `dvc repro` would delete)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {Path(out.fs_path) for stage in repo.index.stages for out in stage.outs}


def snapshot(base: Path, project: Path) -> dict[str, str]:
    """Every file under ``base`` (but DVC's and the pipeline's own folders of the project): its hash."""
    skip = [project / p for p in DVC_OWN]
    found = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in filenames:
            path = Path(dirpath, name)
            found[str(path.relative_to(base))] = hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(Path(dirpath).relative_to(base)) + "/"] = "dir"
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory, stories_model_dir):
    """A project six folders below a base directory, its pipeline run by `dvc repro` (so that a hostile
    change is the only thing DVC has left to run), committed to git."""
    base = tmp_path_factory.mktemp("base")
    root = copy_project(base / "a" / "b" / "c" / "d" / "e" / "project")
    params = tiny_params(str(stories_model_dir), steps=20, save_every=20)
    tiny = {k: params["dictionaries"]["tc"][k] for k in ("dict_size", "group_sizes", "top_k", "batch_size")}
    params["transcoder_set"] = {"name": "tcs", "layers": [2], "steps": 20, "dictionary": tiny}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data\n/results\n")
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=root, check=True, capture_output=True)
    return base, root, params


def attack(project, change, command=("repro",)) -> tuple[subprocess.CompletedProcess, dict, dict, set]:
    """Apply ``change`` to a copy of the params, plant a file at every output path DVC would act on
    outside the project, run ``dvc COMMAND``; the snapshots before and after, and the planted paths."""
    import copy

    base, root, params = project
    hostile = copy.deepcopy(params)
    change(hostile)
    (root / "params.yaml").write_text(yaml.safe_dump(hostile, sort_keys=False))
    planted = set()
    if command[0] == "repro":
        outside = [p for p in dvc_output_paths(root) if not p.resolve().is_relative_to(root.resolve())]
        for path in sorted(outside, key=lambda p: -len(p.parts)):  # an output holding others: a folder
            path = path / "planted.txt" if path.is_dir() else path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("a file DVC must not delete\n")
            planted.add(path)
    before = snapshot(base, root)
    try:
        result = dvc(root, *command)
        after = snapshot(base, root)
    finally:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return result, before, after, planted


def refused(result: subprocess.CompletedProcess, key: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Running stage 'check_params'" in out and f"error: {key}" in out, out  # ours, in one line
    assert "Running stage 'train" not in out, "no stage past the check ran"


@pytest.mark.parametrize(
    "where, payload",
    [
        ("dictionaries", ";touch {pwn};#"),
        ("dictionaries", "\ntouch {pwn}\n"),
        ("transcoder_set.name", "$(touch {pwn})"),
    ],
)
def test_a_name_that_is_a_shell_command_is_never_run(project, tmp_path, where, payload):
    pwn = tmp_path / "PWNED"
    name = "a" + payload.format(pwn=pwn)

    def change(p):
        if where == "dictionaries":
            p["dictionaries"][name] = p["dictionaries"]["tc"]  # train@tc is done: this one runs next
        else:
            p["transcoder_set"]["name"] = name

    result, before, after, _ = attack(project, change)
    assert not pwn.exists(), "the name ran as a command"
    refused(result, "dictionaries." if where == "dictionaries" else "transcoder_set.name")
    assert after == before


@pytest.mark.parametrize(
    "refusal, section, key, value",
    [
        ("error: dictionaries.tc.layer", "dictionaries.tc", "layer", "../../../canary"),
        ("error: dictionaries.tc.steps", "dictionaries.tc", "steps", "../../../../canary"),
        ("error: transcoder_set.name", "transcoder_set", "name", "../../../../../canary/ts"),
        # data/models/{type} and data/activations/{type} meet outside: DVC itself refuses to parse
        ("canary' is specified in", "model", "type", "../../../canary"),
    ],
)
def test_an_output_path_that_leaves_the_project_deletes_nothing(project, refusal, section, key, value):
    def change(p):
        for part in section.split("."):
            p = p[part]
        p[key] = value

    result, before, after, planted = attack(project, change)
    assert planted, "the attack points DVC outside the project"
    assert all(p.read_text() == "a file DVC must not delete\n" for p in planted)
    assert after == before, "every file outside data/ and results/ is untouched"
    out = result.stdout + result.stderr
    assert result.returncode != 0 and refusal in out, out
    assert "Running stage 'train" not in out and "Running stage 'prepare" not in out


def test_valid_params_run_past_the_check_and_a_second_repro_does_nothing(project):
    """The check passes a valid file, and its output never changes: a rerun of it (params.yaml
    touched) reruns nothing else."""
    _, root, params = project
    assert dvc(root, "repro").returncode == 0  # whatever the attacks' failed runs left undone
    assert (root / "results" / "stories260K" / "2" / "20" / "tc" / "metrics.json").is_file()
    assert (root / "data" / "params-checked.txt").read_text() == "params.yaml passed mtc's checks\n"
    (root / "params.yaml").write_text("# a comment\n" + yaml.safe_dump(params, sort_keys=False))
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'check_params':"], result.stdout


def test_dvc_exp_run_with_a_hostile_set_value_deletes_nothing(project):
    """Last in this file: a failed `dvc exp run` resets the workspace's outputs."""
    base, root, _ = project
    canary = root.parents[2] / "canary" / "20" / "tc"  # results/stories260K/../../../canary/20/tc
    canary.mkdir(parents=True, exist_ok=True)
    (canary / "config.json").write_text("{}\n")
    result, before, after, _ = attack(
        project, lambda p: None, command=("exp", "run", "-S", "dictionaries.tc.layer=../../../canary")
    )
    assert (canary / "config.json").read_text() == "{}\n"
    params_file = "a/b/c/d/e/project/params.yaml"  # -S wrote it, as asked
    assert {k: v for k, v in after.items() if k != params_file} == {
        k: v for k, v in before.items() if k != params_file
    }
    refused(result, "dictionaries.tc.layer")
