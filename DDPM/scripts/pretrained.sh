#!/usr/bin/env bash
# Row "pretrained DDPM": the teacher itself, 1000-step ancestral sampling, no guidance (SPEC 7: FID 4.84
# on CIFAR-10 classes 1-9). Real scale: NUM_GPUS=8 bash scripts/pretrained.sh (pretrains 800k
# iterations unless TEACHER=... is given). Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
# shellcheck disable=SC2046
sample_and_evaluate pretrained "$TEACHER" $(ddpm_sampler_args) --guidance 0
