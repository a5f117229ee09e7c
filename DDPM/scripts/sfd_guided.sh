#!/usr/bin/env bash
# Row "SFD one-step, guided teacher" (ours, not in the paper): SFD as scripts/sfd.sh, but the teacher's
# score in the generator loss is classifier-free guided with w = $GUIDANCE (sfd.guidance; the fake score
# is trained and evaluated at the same scale, with label dropout, as SiD-LSG does). Compare it with
# pretrained_guided, its distillation target. One-step samples (the guidance is distilled in).
# Real scale: NUM_GPUS=4 TEACHER=... bash scripts/sfd_guided.sh. Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
train_method sfd_guided "${DATASET}_sfd.yaml" "sfd.init=$TEACHER" "sfd.forget=[$FORGET]" "sfd.guidance=$GUIDANCE"
sample_and_evaluate sfd_guided "$CKPT" --sampler one_step --guidance 0
