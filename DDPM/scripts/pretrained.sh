#!/usr/bin/env bash
# Row "pretrained DDPM": the teacher itself, 1000-step ancestral sampling; rows pretrained (w = 0, the paper: FID 4.84
# on CIFAR-10 classes 1-9) and pretrained_guided (w = $GUIDANCE). Real scale: NUM_GPUS=8 bash scripts/pretrained.sh (pretrains 800k
# iterations unless TEACHER=... is given). Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
evaluate_multistep pretrained "$TEACHER"
