#!/usr/bin/env bash
# SFD celebrity forgetting on SD v1.5 with the paper's settings (configs/celebrity_<CELEB>.yaml).
# A thin launcher: GPU count and config here, everything else in the config or as KEY=VALUE
# arguments (passed to train.py with --dry-run, --resume RUN_DIR, ...). Run from any directory;
# relative paths in arguments are relative to where you are.
#   NUM_GPUS=4 bash SD/recipes/celebrity.sh
#   NUM_GPUS=4 CELEB=angelina_jolie bash SD/recipes/celebrity.sh
#   NUM_GPUS=4 bash SD/recipes/celebrity.sh generator_init=my/sid-lsg-folder remain_prompts=my/captions.txt
#   ADAPTER=lora bash SD/recipes/celebrity.sh        # LoRA mode on one GPU (configs/*_lora.yaml)
set -euo pipefail
SD=$(cd "$(dirname "$0")/.." && pwd)
ADAPTER=${ADAPTER:-full}  # full = the paper's setting; lora = configs/*_lora.yaml (one consumer GPU)
case "$ADAPTER" in
  full) SUFFIX=""; DEFAULT_GPUS=4 ;;
  lora) SUFFIX="_lora"; DEFAULT_GPUS=1 ;;
  *) echo "ADAPTER must be full or lora, got '$ADAPTER'" >&2; exit 2 ;;
esac
NUM_GPUS=${NUM_GPUS:-$DEFAULT_GPUS}
CELEB=${CELEB:-brad_pitt}
PYTHON=${PYTHON:-python}
if [ "$NUM_GPUS" -gt 1 ]; then  # one process: plain python, so an error is one line, not torchrun's report
  exec torchrun --standalone --nproc_per_node "$NUM_GPUS" "$SD/train.py" --config "$SD/configs/celebrity_$CELEB$SUFFIX.yaml" "$@"
fi
exec "$PYTHON" "$SD/train.py" --config "$SD/configs/celebrity_$CELEB$SUFFIX.yaml" "$@"
