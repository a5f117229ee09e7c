#!/usr/bin/env bash
# SFD nudity forgetting on SD v1.5 with the paper's settings (configs/nudity.yaml).
# A thin launcher: GPU count and config here, everything else in the config or as KEY=VALUE
# arguments (passed to train.py with --dry-run, --resume RUN_DIR, ...). Run from any directory;
# relative paths in arguments are relative to where you are.
#   NUM_GPUS=8 bash SD/recipes/nudity.sh
#   ADAPTER=lora bash SD/recipes/nudity.sh        # LoRA mode on one GPU (configs/*_lora.yaml)
set -euo pipefail
SD=$(cd "$(dirname "$0")/.." && pwd)
ADAPTER=${ADAPTER:-full}  # full = the paper's setting; lora = configs/*_lora.yaml (one consumer GPU)
case "$ADAPTER" in
  full) SUFFIX=""; DEFAULT_GPUS=8 ;;
  lora) SUFFIX="_lora"; DEFAULT_GPUS=1 ;;
  *) echo "ADAPTER must be full or lora, got '$ADAPTER'" >&2; exit 2 ;;
esac
NUM_GPUS=${NUM_GPUS:-$DEFAULT_GPUS}
PYTHON=${PYTHON:-python}
if [ "$NUM_GPUS" -gt 1 ]; then  # one process: plain python, so an error is one line, not torchrun's report
  exec torchrun --standalone --nproc_per_node "$NUM_GPUS" "$SD/train.py" --config "$SD/configs/nudity$SUFFIX.yaml" "$@"
fi
exec "$PYTHON" "$SD/train.py" --config "$SD/configs/nudity$SUFFIX.yaml" "$@"
