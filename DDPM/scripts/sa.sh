#!/usr/bin/env bash
# Row "Selective Amnesia": Fisher on the teacher's samples (fisher.py; real scale 1000 samples, every
# 10th timestep, FISHER_ARGS to change), then configs/${DATASET}_sa.yaml (gamma 1, lambda 10, lr 1e-4,
# 20k iterations); rows sa (w = 0) and sa_guided (w = $GUIDANCE). Real scale: NUM_GPUS=1 TEACHER=... bash scripts/sa.sh.
source "$(dirname "$0")/common.sh"
ensure_teacher
FISHER="$OUT/sa/fisher.safetensors"
stage "Fisher $FISHER (not in the estimate: 1000 DDIM samples and their gradients, small beside training)"
status=todo
if [ -e "$FISHER" ]; then
    status=$("$PYTHON" "$STAGE" product "$FISHER" --ckpt "$TEACHER" --samples 1000 --timesteps-stride 10 \
        "${FISHER_ARGS[@]}")
fi
if [ "$status" = done ]; then
    echo "   done: reuse $FISHER"
else
    # fisher.py writes in place: into a temporary name, renamed when complete (a killed run is never used)
    run mkdir -p "$OUT/sa"
    run "$PYTHON" fisher.py --ckpt "$TEACHER" --out "$OUT/sa/fisher.partial.safetensors" --samples 1000 \
        --timesteps-stride 10 "${FISHER_ARGS[@]}"
    run mv "$OUT/sa/fisher.partial.safetensors" "$FISHER"
    [ "$DRY_RUN" = 1 ] || "$PYTHON" "$STAGE" record "$FISHER" --ckpt "$TEACHER" --samples 1000 --timesteps-stride 10 \
        "${FISHER_ARGS[@]}"
fi
train_method sa "${DATASET}_sa.yaml" "baseline.init=$TEACHER" "baseline.sa_fisher=$FISHER" "baseline.forget=[$FORGET]"
evaluate_multistep sa "$CKPT"
