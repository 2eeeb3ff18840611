#!/usr/bin/env bash
# Every stage of a pipeline in order: `scripts/run_all.sh [PIPELINE.yaml] [gptforge run options]`.
# Re-running skips finished stages and resumes an interrupted one. Under a launcher (LAUNCH=...), each
# stage is its own launch (`--only STAGE`), as multi-process runs take one stage at a time:
#   LAUNCH="accelerate launch --multi_gpu --num_processes 4 -m gptforge.cli" scripts/run_all.sh configs/gpt2-book.yaml
#   LAUNCH="torchrun --nproc_per_node 2 -m gptforge.cli" scripts/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/default.yaml}; shift || true
if [ -z "${LAUNCH:-}" ]; then
  exec ${GPTFORGE:-gptforge} run "$config" "$@"
fi
for stage in $(${GPTFORGE:-gptforge} run "$config" --list-stages "$@"); do
  $LAUNCH run "$config" --only "$stage" "$@"
done
