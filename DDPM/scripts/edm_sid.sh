#!/usr/bin/env bash
# Row "SiD one-step (EDM)": SiD distillation of the EDM teacher, nothing forgotten
# (configs/${DATASET}_edm_sfd.yaml with method=sid: SiD's sigma-space settings), one-step samples.
# Real scale: NUM_GPUS=4 EDM_TEACHER=edm-cifar10-32x32-cond-vp.safetensors bash scripts/edm_sid.sh.
# Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ATTACKS=0  # evaluate.py attack enumerates discrete DDPM timesteps: not available for EDM networks yet
ensure_edm_teacher
train_method edm_sid "${DATASET}_edm_sfd.yaml" method=sid "sfd.forget=[]" "sfd.init=$EDM_TEACHER"
sample_and_evaluate edm_sid "$CKPT" --sampler one_step --guidance 0
