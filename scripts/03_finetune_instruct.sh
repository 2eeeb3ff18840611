#!/usr/bin/env bash
# Stage "instruct" of a pipeline: `scripts/03_finetune_instruct.sh [PIPELINE.yaml] [gptforge run options]`.
# Skips the stage when it is up to date, resumes it when it was interrupted (add --force to rerun).
# Several GPUs: LAUNCH="accelerate launch --multi_gpu --num_processes 4 -m gptforge.cli" scripts/03_finetune_instruct.sh CONFIG
# (two CPU processes: LAUNCH="torchrun --nproc_per_node 2 -m gptforge.cli").
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/default.yaml}; shift || true
${LAUNCH:-${GPTFORGE:-gptforge}} run "$config" --only instruct "$@"
