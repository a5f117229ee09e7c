#!/usr/bin/env bash
# Row "Retrain": pretraining from scratch without class $FORGET (configs/${DATASET}_retrain.yaml: the
# teacher's 800k-iteration recipe), 1000-step sampling; rows retrain (w = 0, the paper: FID 7.94) and retrain_guided.
# Real scale: NUM_GPUS=8 bash scripts/retrain.sh. Variables: see scripts/common.sh.
source "$(dirname "$0")/common.sh"
train_method retrain "${DATASET}_retrain.yaml" "baseline.forget=[$FORGET]"
evaluate_multistep retrain "$CKPT"
