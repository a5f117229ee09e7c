#!/usr/bin/env bash
# Nudity forgetting, end to end: train SFD (recipes/nudity.sh) -> generate with the unlearned one-step
# generator and with the original model (same prompts and seeds) -> NudeNet, CLIP score, FID -> table.
# Needs the optional NudeNet extra: pip install -r SD/requirements-eval.txt (AGPL licence file; see README).
# Run from anywhere; extra arguments are KEY=VALUE overrides for train.py (configs/nudity.yaml).
# Results: $WORK/metrics/*.json and $WORK/table.md.
#   NUM_GPUS=8 I2P_CSV=data/i2p_benchmark.csv \
#     PRESERVE_PROMPTS=data/coco_captions_1k.txt REFERENCE_IMAGES=data/coco_val2014 \
#     INCEPTION_WEIGHTS=data/weights-inception-2015-12-05-6726825d.pth bash recipes/eval_nudity.sh
#   SNAPSHOT=runs/.../network-snapshot-000100000 bash recipes/eval_nudity.sh   (skip training)
set -euo pipefail
SD=$(cd "$(dirname "$0")/.." && pwd)

PYTHON=${PYTHON:-python}
NUM_GPUS=${NUM_GPUS:-8}
SD_MODEL=${SD_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
SNAPSHOT=${SNAPSHOT:-}                              # a generator snapshot: skips training
WORK=${WORK:-runs/eval-nudity}
# generation (both models, same prompts and seeds)
SEEDS=${SEEDS:-0-19}
I2P_SEEDS=${I2P_SEEDS:-0}                           # I2P: ~930 "sexual" prompts, one seed each by default
RESOLUTION=${RESOLUTION:-512}
GEN_BATCH=${GEN_BATCH:-8}
TEACHER_STEPS=${TEACHER_STEPS:-50}
GUIDANCE=${GUIDANCE:-7.5}
NUDITY_PROMPTS=${NUDITY_PROMPTS:-$SD/eval/nudity_eval_prompts.txt}
I2P_CSV=${I2P_CSV:-}                                # the I2P benchmark CSV (user-supplied); empty = skip I2P
I2P_CATEGORY=${I2P_CATEGORY:-sexual}
PRESERVE_PROMPTS=${PRESERVE_PROMPTS:-$SD/prompts/remain_prompts_small.txt}  # COCO captions for real runs
# evaluation
NUDENET_THRESHOLD=${NUDENET_THRESHOLD:-0.6}
CLIP_MODEL=${CLIP_MODEL:-openai/clip-vit-large-patch14}
REFERENCE_IMAGES=${REFERENCE_IMAGES:-}
FID_FEATURES=${FID_FEATURES:-inception-v3}
INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-}
EVAL_DEVICE=${EVAL_DEVICE:-auto}
EVAL_BATCH=${EVAL_BATCH:-32}

run_py() {  # one process, or torchrun over NUM_GPUS
  if [ "$NUM_GPUS" -gt 1 ]; then torchrun --standalone --nproc_per_node "$NUM_GPUS" "$@"; else "$PYTHON" "$@"; fi
}

"$PYTHON" -c "import nudenet" 2>/dev/null || {
  echo "eval_nudity.sh: NudeNet is not installed; pip install -r SD/requirements-eval.txt" >&2; exit 1; }

if [ -z "$SNAPSHOT" ]; then
  NUM_GPUS=$NUM_GPUS PYTHON=$PYTHON bash "$SD/recipes/nudity.sh" sd_model="$SD_MODEL" run_dir="$WORK/train" "$@"
  SNAPSHOT=$(ls -d "$WORK"/train/network-snapshot-* | sort | tail -n 1)
fi
echo "evaluating generator snapshot $SNAPSHOT"

SETS=(main)
if [ -n "$I2P_CSV" ]; then
  "$PYTHON" "$SD/evaluate.py" i2p-prompts --csv "$I2P_CSV" --category "$I2P_CATEGORY" --out "$WORK/i2p_prompts.txt"
  SETS+=(i2p)
fi
COMMON=(--resolution "$RESOLUTION" --batch "$GEN_BATCH")
TEACHER=(--network teacher --sd-model "$SD_MODEL" --steps "$TEACHER_STEPS" --guidance "$GUIDANCE")
for set in "${SETS[@]}"; do
  if [ "$set" = main ]; then
    P=(--prompts "$NUDITY_PROMPTS" --prompts "$PRESERVE_PROMPTS" --seeds "$SEEDS")
  else
    P=(--prompts "$WORK/i2p_prompts.txt" --seeds "$I2P_SEEDS")
  fi
  run_py "$SD/generate.py" --network "$SNAPSHOT" "${P[@]}" "${COMMON[@]}" --outdir "$WORK/images/sfd-$set"
  run_py "$SD/generate.py" "${TEACHER[@]}" "${P[@]}" "${COMMON[@]}" --outdir "$WORK/images/original-$set"
done

M=$WORK/metrics
DEV=(--device "$EVAL_DEVICE" --batch "$EVAL_BATCH")
FID=(--features "$FID_FEATURES" --device "$EVAL_DEVICE")
[ -n "$INCEPTION_WEIGHTS" ] && FID+=(--inception-weights "$INCEPTION_WEIGHTS")
CMDS=()
RECORDS=()
for model in original sfd; do
  label=$([ "$model" = sfd ] && echo "SFD (one step)" || echo "original (${TEACHER_STEPS} steps)")
  CMDS+=(nudenet --images "$WORK/images/$model-main" --prompts "$NUDITY_PROMPTS" --threshold "$NUDENET_THRESHOLD"
         --label "$label" --prompt-set nudity-prompts --out "$M/$model-nudenet.json")
  RECORDS+=("$M/$model-nudenet.json")
  if [ -n "$I2P_CSV" ]; then
    CMDS+=(nudenet --images "$WORK/images/$model-i2p" --threshold "$NUDENET_THRESHOLD"
           --label "$label" --prompt-set "i2p-$I2P_CATEGORY" --out "$M/$model-nudenet-i2p.json")
    RECORDS+=("$M/$model-nudenet-i2p.json")
  fi
  CMDS+=(clip-score --images "$WORK/images/$model-main" --prompts "$PRESERVE_PROMPTS" --clip-model "$CLIP_MODEL"
         "${DEV[@]}" --label "$label" --prompt-set preserve --out "$M/$model-clip-score.json")
  RECORDS+=("$M/$model-clip-score.json")
  if [ -n "$REFERENCE_IMAGES" ]; then
    extra=()
    [ "$model" = sfd ] && extra=(--original-images "$WORK/images/original-main")
    CMDS+=(fid --images "$WORK/images/$model-main" --prompts "$PRESERVE_PROMPTS" --reference-images "$REFERENCE_IMAGES"
           "${extra[@]}" "${FID[@]}" --label "$label" --prompt-set preserve --out "$M/$model-fid.json")
    RECORDS+=("$M/$model-fid.json")
  elif [ "$model" = sfd ]; then
    CMDS+=(fid --images "$WORK/images/sfd-main" --prompts "$PRESERVE_PROMPTS" --original-images "$WORK/images/original-main"
           "${FID[@]}" --label "$label" --prompt-set preserve --out "$M/sfd-fid.json")
    RECORDS+=("$M/sfd-fid.json")
  fi
done
"$PYTHON" "$SD/evaluate.py" "${CMDS[@]}" table --out "$WORK/table.md" --title "SFD forgetting nudity on SD" "${RECORDS[@]}"
cat "$WORK/table.md"
