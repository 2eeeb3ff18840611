#!/usr/bin/env bash
# Every stage of a pipeline in order: `scripts/run_all.sh [PIPELINE.yaml] [gptforge run options]`.
# Re-running skips finished stages and resumes an interrupted one. Several GPUs:
# LAUNCH="accelerate launch --multi_gpu --num_processes 4 -m gptforge.cli" scripts/run_all.sh configs/gpt2-book.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/default.yaml}; shift || true
${LAUNCH:-${GPTFORGE:-gptforge}} run "$config" "$@"
