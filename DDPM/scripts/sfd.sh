#!/usr/bin/env bash
# Row "SFD one-step": SFD forgetting $FORGET (configs/${DATASET}_sfd.yaml: 50k iterations, batch 128
# on CIFAR-10, ~1 day on 4 GPUs), sampled with the one-step generator, no guidance.
# Real scale: NUM_GPUS=4 TEACHER=... bash scripts/sfd.sh. Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
train_method sfd "${DATASET}_sfd.yaml" "sfd.init=$TEACHER" "sfd.forget=[$FORGET]"
sample_and_evaluate sfd "$CKPT" --sampler one_step --guidance 0
