#!/usr/bin/env bash
# Row "Selective Amnesia": Fisher on the teacher's samples (fisher.py; real scale 1000 samples, every
# 10th timestep, FISHER_ARGS to change), then configs/${DATASET}_sa.yaml (gamma 1, lambda 10, lr 1e-4,
# 20k iterations); rows sa (w = 0) and sa_guided (w = $GUIDANCE). Real scale: NUM_GPUS=1 TEACHER=... bash scripts/sa.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
FISHER="$OUT/sa/fisher.safetensors"
mkdir -p "$OUT/sa"
[ -f "$FISHER" ] || "$PYTHON" fisher.py --ckpt "$TEACHER" --out "$FISHER" --samples 1000 --timesteps-stride 10 "${FISHER_ARGS[@]}"
train_method sa "${DATASET}_sa.yaml" "baseline.init=$TEACHER" "baseline.sa_fisher=$FISHER" "baseline.forget=[$FORGET]"
evaluate_multistep sa "$CKPT"
