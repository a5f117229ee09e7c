#!/usr/bin/env bash
# Shared by the paper-table row scripts (source it; do not run it). Everything is a variable with a
# real-scale default; set them in the environment to change a run. Run the scripts from DDPM/.
#
#   DATASET=cifar10|stl10|builtin  dataset and config family (configs/${DATASET}_*.yaml)  [cifar10]
#   NUM_GPUS=N        processes per node for torchrun (1 = plain python)                 [1]
#   PYTHON            interpreter                                                        [python]
#   OUT               where every row writes                                              [runs/paper-$DATASET]
#   FORGET            the class to forget                                                 [0]
#   TEACHER           pretrained DDPM (network-*.safetensors); empty = pretrain it (800k iterations on
#                     CIFAR-10: ~2 days on 8 GPUs) into $OUT/teacher
#   CLASSIFIER        dataset classifier; empty = train_classifier.py into $OUT/classifier.safetensors
#   PER_CLASS         generated images per class for UA / FID (the paper: 5000 CIFAR-10, 1300 STL-10) [5000]
#   REF_PER_CLASS     real reference images per kept class (empty = all training images)
#   DDPM_SAMPLER      multi-step sampler of the DDPM rows: ddpm (1000 steps, the paper) or ddim  [ddpm]
#   DDPM_STEPS        DDIM steps when DDPM_SAMPLER=ddim                                    [100]
#   GUIDANCE          classifier-free guidance w of the guided variant of every multi-step row, and of
#                     the labelled guided-SFD row (scripts/sfd_guided.sh) (SPEC 7: ESD/SalUn w = 2)  [2]
#   GUIDED            1 = every multi-step row (pretrained, Retrain, SA, SalUn, ESD) is sampled twice, the
#                     same protocol for all: ROW unguided (w = 0) and ROW_guided (w = $GUIDANCE); 0 = ROW only [1]
#   FID_FEATURES      inception (the paper's FID) or classifier (features of $CLASSIFIER) [inception]
#   INCEPTION_WEIGHTS local FID Inception weights for offline use (optional)
#   EDM_TEACHER       EDM rows: EDM network (convert_edm.py of NVIDIA's edm-cifar10-32x32-cond-vp.pkl,
#                     see the README); empty = pretrain configs/${DATASET}_edm_train.yaml into $OUT/edm_teacher
#   EDM_STEPS         Heun steps of the EDM teacher's samples (2 * steps - 1 NFE)          [18]
#   ATTACKS           1 = also run evaluate.py attack on each row's model into ROW/attack.json; 0 = skip [1]
#   ATTACK_ARGS       extra evaluate.py attack options, e.g. "--budgets 0,10,50 --n 64"
#   TEACHER_ARGS, METHOD_ARGS, FISHER_ARGS, CLASSIFIER_ARGS   extra arguments (KEY=VALUE overrides for
#                     train.py), e.g. a tiny budget for a smoke test
set -euo pipefail
DATASET=${DATASET:-cifar10}
NUM_GPUS=${NUM_GPUS:-1}
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/paper-$DATASET}
FORGET=${FORGET:-0}
TEACHER=${TEACHER:-}
CLASSIFIER=${CLASSIFIER:-}
PER_CLASS=${PER_CLASS:-5000}
REF_PER_CLASS=${REF_PER_CLASS:-}
DDPM_SAMPLER=${DDPM_SAMPLER:-ddpm}
DDPM_STEPS=${DDPM_STEPS:-100}
GUIDANCE=${GUIDANCE:-2}
GUIDED=${GUIDED:-1}
FID_FEATURES=${FID_FEATURES:-inception}
INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-}
EDM_TEACHER=${EDM_TEACHER:-}
EDM_STEPS=${EDM_STEPS:-18}
ATTACKS=${ATTACKS:-1}
read -r -a ATTACK_ARGS <<< "${ATTACK_ARGS:-}"
read -r -a TEACHER_ARGS <<< "${TEACHER_ARGS:-}"
read -r -a METHOD_ARGS <<< "${METHOD_ARGS:-}"
read -r -a FISHER_ARGS <<< "${FISHER_ARGS:-}"
read -r -a CLASSIFIER_ARGS <<< "${CLASSIFIER_ARGS:-}"
mkdir -p "$OUT"

launch() {  # launch SCRIPT ARGS...: torchrun with NUM_GPUS processes, or one process
    if [ "$NUM_GPUS" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" "$@"
    else
        "$PYTHON" "$@"
    fi
}

newest_snapshot() {  # newest_snapshot DIR: the newest network-*.safetensors of the newest run under DIR
    local run
    run=$(ls -d "$1"/*/ | sort | tail -n 1)
    ls "$run"network-*.safetensors | sort | tail -n 1
}

ensure_teacher() {
    if [ -z "$TEACHER" ]; then
        if ! ls "$OUT"/teacher/*/network-*.safetensors > /dev/null 2>&1; then
            launch train.py --config "configs/${DATASET}_train.yaml" --outdir "$OUT/teacher" "${TEACHER_ARGS[@]}"
        fi
        TEACHER=$(newest_snapshot "$OUT/teacher")
    fi
    echo "teacher: $TEACHER"
}

ensure_edm_teacher() {
    if [ -z "$EDM_TEACHER" ]; then
        if ! ls "$OUT"/edm_teacher/train/*/network-*.safetensors > /dev/null 2>&1; then
            launch train.py --config "configs/${DATASET}_edm_train.yaml" --outdir "$OUT/edm_teacher/train" "${TEACHER_ARGS[@]}"
        fi
        EDM_TEACHER=$(newest_snapshot "$OUT/edm_teacher/train")
    fi
    echo "EDM teacher: $EDM_TEACHER"
}

ensure_classifier() {
    if [ -z "$CLASSIFIER" ]; then
        CLASSIFIER="$OUT/classifier.safetensors"
        [ -f "$CLASSIFIER" ] || "$PYTHON" train_classifier.py --dataset "$DATASET" --out "$CLASSIFIER" "${CLASSIFIER_ARGS[@]}"
    fi
}

ensure_reference() {  # real training images of the kept classes, the FID reference
    REF="$OUT/reference"
    if [ ! -d "$REF" ]; then
        "$PYTHON" save_dataset.py --dataset "$DATASET" --out "$REF.tmp" --exclude-class "$FORGET" \
            ${REF_PER_CLASS:+--per-class "$REF_PER_CLASS"}
        mv "$REF.tmp" "$REF"
    fi
}

train_method() {  # train_method ROW CONFIG ARGS...: runs into $OUT/ROW/train; sets CKPT
    launch train.py --config "configs/$2" --outdir "$OUT/$1/train" "${@:3}" "${METHOD_ARGS[@]}"
    CKPT=$(newest_snapshot "$OUT/$1/train")
}

sample_and_evaluate() {  # sample_and_evaluate ROW CKPT SAMPLE_ARGS...: images, ua.json, fid.json in $OUT/ROW
    local row=$1 ckpt=$2
    shift 2
    ensure_classifier
    ensure_reference
    rm -rf "$OUT/$row/samples"
    launch sample.py --ckpt "$ckpt" --out "$OUT/$row/samples" --per-class "$PER_CLASS" "$@"
    "$PYTHON" evaluate.py ua --images "$OUT/$row/samples" --classifier "$CLASSIFIER" --forget "$FORGET" \
        --out "$OUT/$row/ua.json"
    local fid_args=(--features "$FID_FEATURES")
    [ "$FID_FEATURES" = classifier ] && fid_args+=(--classifier "$CLASSIFIER" --metrics fid)
    [ -n "$INCEPTION_WEIGHTS" ] && fid_args+=(--inception-weights "$INCEPTION_WEIGHTS")
    "$PYTHON" evaluate.py fid --images "$OUT/$row/samples" --ref "$REF" --exclude "$FORGET" \
        --out "$OUT/$row/fid.json" --no-progress "${fid_args[@]}"
    if [ "$ATTACKS" = 1 ]; then
        # the attack draws images the way this row samples: same guidance (one-step rows ignore it)
        local guidance
        guidance=$(sampling_guidance "$@")
        "$PYTHON" evaluate.py attack --ckpt "$ckpt" --classifier "$CLASSIFIER" --forget "$FORGET" \
            --out "$OUT/$row/attack.json" ${guidance:+--guidance "$guidance"} "${ATTACK_ARGS[@]}"
    fi
    echo "$row: $OUT/$row/ua.json $OUT/$row/fid.json"
}

sampling_guidance() {  # sampling_guidance SAMPLE_ARGS...: the value given to --guidance, if any
    while [ $# -gt 0 ]; do
        if [ "$1" = --guidance ]; then echo "$2"; return; fi
        shift
    done
}

evaluate_multistep() {  # evaluate_multistep ROW CKPT: the multi-step protocol of every table (see GUIDED)
    # shellcheck disable=SC2046
    sample_and_evaluate "$1" "$2" $(ddpm_sampler_args) --guidance 0
    if [ "$GUIDED" = 1 ]; then
        # shellcheck disable=SC2046
        sample_and_evaluate "$1_guided" "$2" $(ddpm_sampler_args) --guidance "$GUIDANCE"
    fi
}

ddpm_sampler_args() {
    if [ "$DDPM_SAMPLER" = ddim ]; then echo "--sampler ddim --steps $DDPM_STEPS"; else echo "--sampler ddpm"; fi
}
