#!/usr/bin/env bash
# Row "SFD one-step (EDM)": SFD forgetting $FORGET from the EDM teacher (configs/${DATASET}_edm_sfd.yaml:
# SiD in sigma space, the DDPM tree's four terms and weights), one-step samples, no guidance.
# Real scale: NUM_GPUS=4 EDM_TEACHER=edm-cifar10-32x32-cond-vp.safetensors bash scripts/edm_sfd.sh.
# Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ATTACKS=0  # evaluate.py attack enumerates discrete DDPM timesteps: not available for EDM networks yet
ensure_edm_teacher
train_method edm_sfd "${DATASET}_edm_sfd.yaml" "sfd.init=$EDM_TEACHER" "sfd.forget=[$FORGET]"
sample_and_evaluate edm_sfd "$CKPT" --sampler one_step --guidance 0
