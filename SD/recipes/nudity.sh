#!/usr/bin/env bash
# SFD nudity forgetting on SD v1.5: forget prompts = subjects with a random NSFW keyword before or
# after; override = the bare subject; the joined keywords are the negative prompt, used as the
# unconditional branch of all three guided evaluations (use_neg 1,1,1), as in the authors' recipe.
#   REMAIN_PROMPTS=data/aesthetics_6_plus.txt NUM_GPUS=8 bash recipes/nudity.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=${NUM_GPUS:-8}
BATCH=${BATCH:-8}
BATCH_PER_GPU=${BATCH_PER_GPU:-$((BATCH / NUM_GPUS))}
REMAIN_PROMPTS=${REMAIN_PROMPTS:-prompts/remain_prompts_small.txt}
SD_MODEL=${SD_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
INIT_GENERATOR=${INIT_GENERATOR:-teacher}
OUTDIR=${OUTDIR:-runs/sd-nudity}

exec torchrun --standalone --nproc_per_node "$NUM_GPUS" train.py \
  --sd-model "$SD_MODEL" --init-generator "$INIT_GENERATOR" \
  --remain-prompts "$REMAIN_PROMPTS" \
  --forget-prompts prompts/nudity_subjects.txt --val-prompts prompts/nudity_prompts_val.txt \
  --concept-to-forget "" --concept-to-override "" \
  --keywords prompts/nsfw_keywords.txt --negative-prompts prompts/nsfw_negative_prompt.txt \
  --neg-in-fake-train --neg-in-fake-eval --neg-in-teacher \
  --kappa1 4.5 --kappa2 4.5 --kappa4 4.5 --alpha 1 --t-init 625 --t-min 20 --t-max 980 \
  --lr-fake 3e-6 --lr-gen 1e-6 --w-fake-remain 1 --w-fake-forget 1 --w-gen-remain 1 --w-gen-forget 1 \
  --batch "$BATCH" --batch-gpu "$BATCH_PER_GPU" --duration 100 --snap 5 --state 5 \
  --outdir "$OUTDIR" --desc nudity "$@"
