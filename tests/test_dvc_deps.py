"""dvc.yaml lists, for every stage, exactly the code that stage runs: its script, and every module of
``src/mtc`` its import closure reaches. A module missing from a stage's deps would leave results
DVC never recomputes after a code change; one listed but never imported reruns a stage for nothing.

The closure is read from the source (``ast``): a stage script imports ``mtc.pipeline``; from the
pipeline, the modules its top level imports plus those imported inside the stage's own entry
function and the pipeline functions it calls; from any other module, every import it makes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SRC = REPO / "src" / "mtc"
STAGES = ["check_params", "prepare_model", "extract", "train", "evaluate", "mine", "browse"]
SCRIPT_OF = {
    **{s: s for s in STAGES},
    **{f"{s}_set": s for s in ("train", "evaluate", "mine", "browse")},
    "summarize_set": "summarize_set",
    "train_clt": "train",
    "evaluate_clt": "evaluate",
    "replace_set": "replace_set",
}


def imported_modules(nodes) -> set[str]:
    """Modules of the package imported anywhere in ``nodes``."""
    found = set()
    for node in nodes:
        for n in ast.walk(node):
            if (
                isinstance(n, ast.ImportFrom)
                and n.module
                and (n.module == "mtc" or n.module.startswith("mtc."))
            ):
                if n.module == "mtc":
                    found |= {a.name for a in n.names if (SRC / f"{a.name}.py").is_file()}
                else:
                    found.add(n.module.split(".")[1])
            elif isinstance(n, ast.Import):
                found |= {a.name.split(".")[1] for a in n.names if a.name.startswith("mtc.")}
    return found


def module_closure(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imported_modules([ast.parse((SRC / f"{module}.py").read_text())])
    return seen


def pipeline_entry_imports(entry: str) -> set[str]:
    """What the pipeline imports at its top level and in ``entry`` (and the pipeline functions
    ``entry`` calls), plus ``run_stage``, through which every stage script runs."""
    tree = ast.parse((SRC / "pipeline.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    reached, todo = set(), [entry, "run_stage"]
    while todo:
        name = todo.pop()
        if name in reached or name not in functions:
            continue
        reached.add(name)
        todo += [
            c.func.id
            for c in ast.walk(functions[name])
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
        ]
    return imported_modules(top + [functions[f] for f in reached]) - {"pipeline"}


def code_closure(stage: str) -> set[str]:
    script = ast.parse((REPO / "stages" / f"{stage}.py").read_text())
    assert imported_modules([script]) == {"pipeline"}, f"stages/{stage}.py imports only mtc.pipeline"
    modules = module_closure(pipeline_entry_imports(stage)) | {"pipeline"}
    return {f"src/mtc/{m}.py" for m in modules} | {f"stages/{stage}.py"}


def declared_code_deps(dvc_yaml: Path, stage: str) -> set[str]:
    spec = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]
    deps = spec.get("do", spec)["deps"]
    return {d for d in deps if d.startswith(("src/", "stages/"))}


@pytest.mark.parametrize("stage", list(SCRIPT_OF))
def test_dvc_yaml_lists_exactly_the_code_each_stage_imports(stage):
    expected, declared = code_closure(SCRIPT_OF[stage]), declared_code_deps(REPO / "dvc.yaml", stage)
    assert not expected - declared, (
        f"{stage}: imported but missing from dvc.yaml deps: {sorted(expected - declared)}"
    )
    assert not declared - expected, (
        f"{stage}: in dvc.yaml deps but never imported: {sorted(declared - expected)}"
    )


def test_the_check_fails_when_an_import_is_not_declared(tmp_path):
    """The check itself can fail: drop one module from a stage's deps."""
    text = (REPO / "dvc.yaml").read_text()
    spec = yaml.safe_load(text)
    spec["stages"]["train"]["do"]["deps"].remove("src/mtc/samples.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    assert "src/mtc/samples.py" in code_closure("train") - declared_code_deps(tmp_path / "dvc.yaml", "train")
