#!/usr/bin/env bash
# Rows "SFD two-stage": stage 1 = SiD distillation of all classes (configs/${DATASET}_sid.yaml; row sid,
# the one-step generator before forgetting), stage 2 = SFD from the stage-1 generator EMA and fake score
# (configs/${DATASET}_sfd_2stage.yaml), run twice:
#   sfd_2stage_authors  sfd.stage2_teacher=stage1_fake_score: the authors' code, which (through its
#                       init_ckpt_0 bug) used the stage-1 fake score as the teacher; this produced the
#                       paper's two-stage numbers;
#   sfd_2stage          sfd.stage2_teacher=original: our default, the pretrained teacher.
# One-step samples, no guidance. STAGE1=<stage-1 network-*.safetensors> skips stage 1.
# Real scale: NUM_GPUS=4 TEACHER=... bash scripts/sfd_2stage.sh (2 x 50k iterations + 50k for stage 1).
# Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
STAGE1=${STAGE1:-}
if [ -z "$STAGE1" ]; then
    train_method sid "${DATASET}_sid.yaml" "sfd.init=$TEACHER"
    STAGE1=$CKPT
    sample_and_evaluate sid "$STAGE1" --sampler one_step --guidance 0
fi
echo "stage 1: $STAGE1"
for variant in "sfd_2stage_authors stage1_fake_score" "sfd_2stage original"; do
    read -r row teacher <<< "$variant"
    train_method "$row" "${DATASET}_sfd_2stage.yaml" "sfd.init=$TEACHER" "sfd.init_stage1=$STAGE1" \
        "sfd.stage2_teacher=$teacher" "sfd.forget=[$FORGET]"
    sample_and_evaluate "$row" "$CKPT" --sampler one_step --guidance 0
done
