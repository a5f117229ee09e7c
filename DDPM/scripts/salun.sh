#!/usr/bin/env bash
# Row "SalUn": saliency mask (top 50%) + random-label unlearning (configs/${DATASET}_salun.yaml:
# 500 iterations, lr 1e-4), rows salun (w = 0) and salun_guided (w = $GUIDANCE; the paper: w = 2, FID 11.25).
# Real scale: NUM_GPUS=1 TEACHER=... bash scripts/salun.sh. Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
train_method salun "${DATASET}_salun.yaml" "baseline.init=$TEACHER" "baseline.forget=[$FORGET]"
evaluate_multistep salun "$CKPT"
