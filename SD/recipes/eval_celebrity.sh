#!/usr/bin/env bash
# Celebrity forgetting, end to end: train SFD (recipes/celebrity.sh) -> generate with the unlearned
# one-step generator and with the original model (same prompts and seeds) -> evaluate -> table.
# Run from anywhere; extra arguments are KEY=VALUE overrides for train.py (configs/celebrity_<CELEB>.yaml).
# Results: $WORK/metrics/*.json and $WORK/table.md.
#   NUM_GPUS=4 PRESERVE_PROMPTS=data/coco_captions_1k.txt \
#     REFERENCE_IMAGES=data/coco_val2014 INCEPTION_WEIGHTS=data/weights-inception-2015-12-05-6726825d.pth \
#     bash recipes/eval_celebrity.sh
#   CELEB=angelina_jolie CONCEPT="angelina jolie" bash recipes/eval_celebrity.sh
#   SNAPSHOT=runs/.../network-snapshot-000100000 bash recipes/eval_celebrity.sh   (skip training)
set -euo pipefail
SD=$(cd "$(dirname "$0")/.." && pwd)

PYTHON=${PYTHON:-python}
NUM_GPUS=${NUM_GPUS:-4}
CELEB=${CELEB:-brad_pitt}
CONCEPT=${CONCEPT-brad pitt}                        # forgotten; must be in NAMES
SD_MODEL=${SD_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
SNAPSHOT=${SNAPSHOT:-}                              # a generator snapshot: skips training
WORK=${WORK:-runs/eval-$CELEB}
# generation (both models, same prompts and seeds)
SEEDS=${SEEDS:-0-19}                                # the paper: 20 seeds per prompt
RESOLUTION=${RESOLUTION:-512}
GEN_BATCH=${GEN_BATCH:-8}                           # images per forward pass per process
TEACHER_STEPS=${TEACHER_STEPS:-50}
GUIDANCE=${GUIDANCE:-7.5}
CELEB_PROMPTS=${CELEB_PROMPTS:-$SD/eval/celebrity_eval_prompts.txt}      # forgotten and other celebrities
PRESERVE_PROMPTS=${PRESERVE_PROMPTS:-$SD/prompts/remain_prompts_small.txt}  # COCO captions for real runs
# evaluation
NAMES=${NAMES:-$SD/eval/celebrity_names.txt}
CLIP_MODEL=${CLIP_MODEL:-openai/clip-vit-large-patch14}
REFERENCE_IMAGES=${REFERENCE_IMAGES:-}              # real images for FID vs reference (e.g. COCO val2014)
FID_FEATURES=${FID_FEATURES:-inception-v3}
INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-}
EVAL_DEVICE=${EVAL_DEVICE:-auto}
EVAL_BATCH=${EVAL_BATCH:-32}

run_py() {  # one process, or torchrun over NUM_GPUS
  if [ "$NUM_GPUS" -gt 1 ]; then torchrun --standalone --nproc_per_node "$NUM_GPUS" "$@"; else "$PYTHON" "$@"; fi
}

if [ -z "$SNAPSHOT" ]; then
  NUM_GPUS=$NUM_GPUS CELEB=$CELEB PYTHON=$PYTHON bash "$SD/recipes/celebrity.sh" sd_model="$SD_MODEL" run_dir="$WORK/train" "$@"
  SNAPSHOT=$(ls -d "$WORK"/train/network-snapshot-* | sort | tail -n 1)
fi
echo "evaluating generator snapshot $SNAPSHOT"

GEN=(--prompts "$CELEB_PROMPTS" --prompts "$PRESERVE_PROMPTS" --seeds "$SEEDS" --resolution "$RESOLUTION" --batch "$GEN_BATCH")
run_py "$SD/generate.py" --network "$SNAPSHOT" "${GEN[@]}" --outdir "$WORK/images/sfd"
run_py "$SD/generate.py" --network teacher --sd-model "$SD_MODEL" --steps "$TEACHER_STEPS" --guidance "$GUIDANCE" \
  "${GEN[@]}" --outdir "$WORK/images/original"

M=$WORK/metrics
DEV=(--device "$EVAL_DEVICE" --batch "$EVAL_BATCH")
FID=(--features "$FID_FEATURES" --device "$EVAL_DEVICE")
[ -n "$INCEPTION_WEIGHTS" ] && FID+=(--inception-weights "$INCEPTION_WEIGHTS")
CMDS=()
RECORDS=()
for model in original sfd; do
  label=$([ "$model" = sfd ] && echo "SFD (one step)" || echo "original (${TEACHER_STEPS} steps)")
  CMDS+=(celebrity --images "$WORK/images/$model" --prompts "$CELEB_PROMPTS" --forget "$CONCEPT" --names "$NAMES"
         --clip-model "$CLIP_MODEL" "${DEV[@]}" --label "$label" --prompt-set celebrities --out "$M/$model-celebrity.json"
         clip-score --images "$WORK/images/$model" --prompts "$PRESERVE_PROMPTS" --clip-model "$CLIP_MODEL" "${DEV[@]}"
         --label "$label" --prompt-set preserve --out "$M/$model-clip-score.json")
  RECORDS+=("$M/$model-celebrity.json" "$M/$model-clip-score.json")
  if [ -n "$REFERENCE_IMAGES" ]; then
    extra=()
    [ "$model" = sfd ] && extra=(--original-images "$WORK/images/original")
    CMDS+=(fid --images "$WORK/images/$model" --prompts "$PRESERVE_PROMPTS" --reference-images "$REFERENCE_IMAGES"
           "${extra[@]}" "${FID[@]}" --label "$label" --prompt-set preserve --out "$M/$model-fid.json")
    RECORDS+=("$M/$model-fid.json")
  elif [ "$model" = sfd ]; then
    CMDS+=(fid --images "$WORK/images/sfd" --prompts "$PRESERVE_PROMPTS" --original-images "$WORK/images/original"
           "${FID[@]}" --label "$label" --prompt-set preserve --out "$M/sfd-fid.json")
    RECORDS+=("$M/sfd-fid.json")
  fi
done
"$PYTHON" "$SD/evaluate.py" "${CMDS[@]}" table --out "$WORK/table.md" --title "SFD forgetting '$CONCEPT' on SD" "${RECORDS[@]}"
cat "$WORK/table.md"
