"""Property: whatever names, layers, steps and set names params.yaml holds, DVC never gets a command
that holds one of them, and no output DVC would delete lies outside data/ and results/ unless mtc's
check refuses the file first; and DVC runs that check before every other stage.

Each example goes through DVC's own parse of the real dvc.yaml (the stage graph `dvc repro` plans
from) and through the stage validation `check_params` runs (load_params, check_model_facts). A few
hostile files also go through a real `dvc repro --dry`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mtc.config import ConfigError
from tests.conftest import copy_project, tiny_params

FIXED_COMMANDS = {
    f"python stages/{s}.py"
    for s in (
        "check_params",
        "prepare_model",
        "extract",
        "train",
        "evaluate",
        "mine",
        "browse",
        "summarize_set",
        "replace_set",
    )
}
HOSTILE = [
    "..",
    ".",
    "../x",
    "../../../../../../etc",
    "a/../../b",
    "/tmp/abs",
    "~",
    "a;id",
    "a\nid",
    "x\n",
    "$(id)",
    "`id`",
    "a b",
    "-rf",
    "a@b",
    "a:b",
    "${model.type}",
    "",
]
text = st.one_of(
    st.sampled_from(HOSTILE), st.text(max_size=10), st.from_regex(r"[A-Za-z0-9][\w.-]{0,6}", fullmatch=True)
)
layer = st.one_of(st.integers(-2, 40), st.sampled_from([2, 3]), text)


@pytest.fixture(scope="module")
def project(tmp_path_factory, stories_model_dir):
    root = copy_project(tmp_path_factory.mktemp("fuzz") / "project")
    (root / "data").mkdir()
    (root / "data" / "params-checked.txt").write_text("params.yaml passed mtc's checks\n")
    return root, str(stories_model_dir)


def hostile_params(
    model_dir, model_type, name, dict_layer, steps, set_name, set_layers, clt_name, clt_layers, clt_steps
) -> dict:
    params = tiny_params(model_dir)
    params["model"]["type"] = model_type
    params["dictionaries"] = {name: {**params["dictionaries"]["tc"], "layer": dict_layer, "steps": steps}}
    params["transcoder_set"].update(name=set_name, layers=set_layers)
    # a CLT's outputs hold its name, its first layer (${item.layers[0]}) and its steps
    settings = {k: v for k, v in params["dictionaries"][name].items() if k not in ("kind", "layer", "steps")}
    params["clt"] = {clt_name: {**settings, "layers": clt_layers, "steps": clt_steps}}
    return params


def dvc_plan(root: Path):
    """DVC's own stage graph for this project: each stage's command and output paths, and whether
    check_params comes before it; None where DVC itself refuses the file (an error, or one of its
    own assertions, as for a matrix key '': either way before it runs or deletes anything)."""
    import networkx as nx
    from dvc.repo import Repo

    cwd = os.getcwd()
    os.chdir(root)
    try:
        with Repo(str(root)) as repo:
            graph, stages = repo.index.graph, list(repo.index.stages)
    except Exception:  # DVC refuses in many ways; test_the_plan_of_valid_params_is_read: not always
        return None
    finally:
        os.chdir(cwd)
    checks = [s for s in stages if s.name == "check_params"]
    assert checks, "dvc.yaml has a check_params stage"
    before = {s: s is checks[0] or nx.has_path(graph, s, checks[0]) for s in stages}
    return [(s.addressing, s.cmd, [Path(o.fs_path) for o in s.outs], before[s]) for s in stages]


def mtc_accepts(root: Path) -> bool:
    """What check_params decides (run_stage: load_params, then check_model_facts)."""
    from mtc.config import load_params
    from mtc.pipeline import check_model_facts

    try:
        check_model_facts(load_params(root / "params.yaml", data_root=root / "data"))
    except ConfigError as e:
        assert "\n" not in str(e)
        return False
    return True


def test_the_plan_of_valid_params_is_read(project):
    """The property below is not vacuous: DVC parses a valid file, every stage after the check."""
    root, model_dir = project
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir)))
    plan = dvc_plan(root)
    assert plan is not None and len(plan) > 5 and all(after for *_, after in plan)
    assert mtc_accepts(root)


@settings(
    max_examples=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: an example takes ~0.6 s
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    model_type=st.one_of(st.just("stories260K"), text),
    name=st.one_of(st.just("tc"), text),
    dict_layer=layer,
    steps=st.one_of(st.integers(-1, 10**6), text),
    set_name=st.one_of(st.just("tcs"), text),
    set_layers=st.lists(layer, max_size=2, unique_by=str),
    clt_name=st.one_of(st.just("c"), text),
    clt_layers=st.one_of(st.just([2]), st.lists(layer, min_size=1, max_size=2)),
    clt_steps=st.one_of(st.integers(-1, 10**6), text),
)
def test_no_params_value_reaches_a_command_or_an_output_outside_the_project(
    project, model_type, name, dict_layer, steps, set_name, set_layers, clt_name, clt_layers, clt_steps
):
    root, model_dir = project
    params = hostile_params(
        model_dir, model_type, name, dict_layer, steps, set_name, set_layers, clt_name, clt_layers, clt_steps
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    plan = dvc_plan(root)
    if plan is None:
        return  # DVC refuses to parse the file (an overlap, a name it cannot interpolate): nothing runs
    for stage, cmd, _, after_check in plan:
        assert cmd in FIXED_COMMANDS, (stage, cmd)
        assert after_check, f"{stage} can run before check_params"
    if not mtc_accepts(root):
        return  # check_params fails, and DVC stops before any stage whose outputs it would delete
    inside = [(root / "data").resolve(), (root / "results").resolve()]
    for stage, _, outs, _ in plan:
        for out in outs:
            assert any(out.resolve().is_relative_to(d) for d in inside), (stage, out)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["dictionaries"].update({"a;touch PWNED;#": p["dictionaries"]["tc"]}),
        lambda p: p["transcoder_set"].update(name="$(touch PWNED)", layers=[2]),
        lambda p: p["dictionaries"]["tc"].update(layer="../../../x"),
        lambda p: p["clt"].update({"$(touch PWNED)": {"layers": ["../../x"], "steps": 1}}),
    ],
)
def test_dvc_repro_dry_prints_only_fixed_commands(project, change):
    root, model_dir = project
    params = tiny_params(model_dir)
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--dry"], cwd=root, capture_output=True, text=True
    )
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("> ")]
    assert commands and commands[0] == "python stages/check_params.py", result.stdout + result.stderr
    assert set(commands) <= FIXED_COMMANDS, commands
    assert not (root / "PWNED").exists()
