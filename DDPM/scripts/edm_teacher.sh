#!/usr/bin/env bash
# Row "EDM teacher": the EDM network itself (NVIDIA's public class-conditional CIFAR-10 DDPM++, or one
# pretrained here), EDM's Heun sampler with 18 steps (35 NFE), no guidance (the public network has no
# null class). Real scale: EDM_TEACHER=edm-cifar10-32x32-cond-vp.safetensors bash scripts/edm_teacher.sh.
# Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ATTACKS=0  # evaluate.py attack enumerates discrete DDPM timesteps: not available for EDM networks yet
ensure_edm_teacher
sample_and_evaluate edm_teacher "$EDM_TEACHER" --sampler edm --steps "$EDM_STEPS" --guidance 0
