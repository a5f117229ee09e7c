#!/usr/bin/env bash
# SFD celebrity forgetting on SD v1.5: "brad pitt" -> "a middle aged man" (SPEC section 3 defaults).
# Run from anywhere; extra arguments go to train.py (e.g. --dry-run, --resume RUN_DIR).
#   REMAIN_PROMPTS=data/aesthetics_6_plus.txt NUM_GPUS=4 bash recipes/celebrity.sh
# Angelina Jolie: CELEB=angelina_jolie CONCEPT="angelina jolie" OVERRIDE="a middle aged woman" bash recipes/celebrity.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=${NUM_GPUS:-4}
BATCH=${BATCH:-8}                                   # global batch (SPEC: 8)
BATCH_PER_GPU=${BATCH_PER_GPU:-$((BATCH / NUM_GPUS))}  # micro-batch; the rest is gradient accumulation
CELEB=${CELEB:-brad_pitt}
CONCEPT=${CONCEPT-brad pitt}
OVERRIDE=${OVERRIDE-a middle aged man}
REMAIN_PROMPTS=${REMAIN_PROMPTS:-prompts/remain_prompts_small.txt}  # use LAION-Aesthetics 6+ captions for real runs
SD_MODEL=${SD_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
INIT_GENERATOR=${INIT_GENERATOR:-teacher}           # or a SiD-LSG generator (UNet folder, or .pkl + --allow-pickle)
OUTDIR=${OUTDIR:-runs/sd-celebrity}

exec torchrun --standalone --nproc_per_node "$NUM_GPUS" train.py \
  --sd-model "$SD_MODEL" --init-generator "$INIT_GENERATOR" \
  --remain-prompts "$REMAIN_PROMPTS" \
  --forget-prompts "prompts/${CELEB}_prompts.txt" --val-prompts "prompts/${CELEB}_prompts_val.txt" \
  --concept-to-forget "$CONCEPT" --concept-to-override "$OVERRIDE" \
  --kappa1 4.5 --kappa2 4.5 --kappa4 4.5 --alpha 1 --t-init 625 --t-min 20 --t-max 980 \
  --lr-fake 3e-6 --lr-gen 1e-6 --w-fake-remain 1 --w-fake-forget 1 --w-gen-remain 1 --w-gen-forget 1 \
  --batch "$BATCH" --batch-gpu "$BATCH_PER_GPU" --duration 100 --snap 5 --state 5 \
  --outdir "$OUTDIR" --desc "$CELEB" "$@"
