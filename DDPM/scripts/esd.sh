#!/usr/bin/env bash
# Row "ESD": negative guidance against a frozen copy (configs/${DATASET}_esd.yaml: eta 7.5, 10k
# iterations), rows esd (w = 0) and esd_guided (w = $GUIDANCE; the paper: w = 2, FID 12.68).
# Real scale: NUM_GPUS=1 TEACHER=... bash scripts/esd.sh. Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
train_method esd "${DATASET}_esd.yaml" "baseline.init=$TEACHER" "baseline.forget=[$FORGET]"
evaluate_multistep esd "$CKPT"
