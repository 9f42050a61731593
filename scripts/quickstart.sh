#!/usr/bin/env bash
# Set up, then fine-tune SmolLM2 with LoRA on the shipped medical Q&A demo data (CPU, offline, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/loraforge train configs/quickstart.yaml "$@"
echo "(loraforge is installed in .venv/: run 'source .venv/bin/activate' first, or call .venv/bin/loraforge)"
