#!/usr/bin/env bash
# Shared by the paper-table row scripts (source it; do not run it). Everything is a variable with a
# real-scale default; set them in the environment to change a run. Run the scripts from DDPM/.
#
# Rerunning a script does no finished work again (scripts/stage.py decides): a finished training run
# (its config.json's training.n_iters reached) is reused, an interrupted one is resumed in its own run
# folder (train.py --resume), a run that stopped early is never evaluated; complete samples (sample.py's
# settings.json) and metrics written by the same command after their inputs are kept. A run, classifier
# or reference made with other settings than those asked for now stops the script with a message.
# DRY_RUN=1 (or --dry-run) prints the stages, the commands and an estimate of their GPU-hours, runs nothing.
#
#   DATASET=cifar10|stl10|builtin  dataset and config family (configs/${DATASET}_*.yaml)  [cifar10]
#   NUM_GPUS=N        processes per node for torchrun (1 = plain python)                 [1]
#   PYTHON            interpreter                                                        [python]
#   DATA_ROOT         where torchvision datasets are (data.root of train.py, --root of save_dataset.py and
#                     train_classifier.py)                                              [./data, the configs' data.root]
#   OUT               where every row writes                                              [runs/paper-$DATASET]
#   FORGET            the class to forget                                                 [0]
#   TEACHER           pretrained DDPM (network-*.safetensors); empty = pretrain it (800k iterations on
#                     CIFAR-10; DRY_RUN=1 estimates the GPU-hours) into $OUT/teacher
#   CLASSIFIER        dataset classifier; empty = train_classifier.py into $OUT/classifier.safetensors
#   PER_CLASS         generated images per class for UA / FID (the paper: 5000 CIFAR-10, 1300 STL-10) [5000]
#   REF_PER_CLASS     real reference images per kept class (empty = all training images)
#   DDPM_SAMPLER      multi-step sampler of the DDPM rows: ddpm (1000 steps, the paper) or ddim  [ddpm]
#   DDPM_STEPS        DDIM steps when DDPM_SAMPLER=ddim                                    [100]
#   GUIDANCE          classifier-free guidance w of the guided variant of every multi-step row, and of
#                     the labelled guided-SFD row (scripts/sfd_guided.sh) (the paper: ESD/SalUn w = 2)  [2]
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
#   DRY_RUN           1 = print stages, commands and the cost estimate only (as --dry-run)   [0]
#   EST_TRAIN_IMG_S, EST_EVAL_IMG_S, EST_FID_IMG_S, EST_EDM_COST   throughputs the estimate assumes (see
#                     scripts/stage.py: assumptions, not measurements; set your GPU's numbers)
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
DATA_ROOT=${DATA_ROOT:-./data}
DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do [ "$arg" = --dry-run ] && DRY_RUN=1; done
STAGE="$(dirname "${BASH_SOURCE[0]}")/stage.py"
EST_TOTAL=0
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"

stage() { echo "== $*"; }

run() {  # run CMD...: print the command; run it unless DRY_RUN=1
    echo "+ $*"
    if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

launch() {  # launch SCRIPT ARGS...: torchrun with NUM_GPUS processes, or one process
    if [ "$NUM_GPUS" -gt 1 ]; then
        run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" "$@"
    else
        run "$PYTHON" "$@"
    fi
}

estimate() {  # estimate train|sample|fid ARGS...: print a stage's GPU-hours (scripts/stage.py) and add them up
    local line hours
    line=$("$PYTHON" "$STAGE" estimate "$@")
    hours=${line%%$'\t'*}
    EST_TOTAL=$(awk -v a="$EST_TOTAL" -v b="$hours" 'BEGIN { print a + b }')
    printf '   estimate: %.3g GPU-hours (%s)\n' "$hours" "${line#*$'\t'}"
}

finish() {  # on exit: the total of the estimates
    if [ "$1" = 0 ]; then
        printf '== estimate: %.3g GPU-hours in all (about %.3g hours on NUM_GPUS=%s) for the work %s\n' \
            "$EST_TOTAL" "$(awk -v a="$EST_TOTAL" -v n="$NUM_GPUS" 'BEGIN { print a / n }')" "$NUM_GPUS" \
            "$([ "$DRY_RUN" = 1 ] && echo "a run would do (DRY_RUN: nothing was run)" || echo "this run did")"
        echo "   $("$PYTHON" "$STAGE" estimate assumptions)"
    fi
}
trap 'finish $?' EXIT

train_stage() {  # train_stage STAGE_DIR CONFIG OVERRIDES...: reuse, resume or train; sets CKPT (the final snapshot)
    local dir=$1 config=$2 status
    shift 2
    local overrides=("data.root=$DATA_ROOT" "$@")
    stage "train $dir ($config)"
    status=none
    if [ -d "$dir" ]; then status=$("$PYTHON" "$STAGE" status "$dir" --config "$config" "${overrides[@]}"); fi
    case $status in
        finished\ *)
            CKPT=${status#finished }
            echo "   finished: reuse $CKPT"
            return ;;
        unfinished\ *)
            local run_dir=${status#unfinished }
            echo "   unfinished: resume $run_dir"
            estimate train --resume "$run_dir"
            # the run's own config.json: no overrides (a resume with changed settings is refused)
            launch train.py --resume "$run_dir" ;;
        *)
            estimate train "$config" "${overrides[@]}"
            launch train.py --config "$config" --outdir "$dir" "${overrides[@]}" ;;
    esac
    if [ "$DRY_RUN" = 1 ]; then
        CKPT="$dir/<run>/network-<training.n_iters>.safetensors"
        return
    fi
    status=$("$PYTHON" "$STAGE" status "$dir" --config "$config" "${overrides[@]}")
    if [ "${status%% *}" != finished ]; then
        echo "error: train.py ended but $dir holds no run that reached training.n_iters ($status)" >&2
        exit 1
    fi
    CKPT=${status#finished }
}


ensure_teacher() {
    if [ -n "$TEACHER" ]; then echo "teacher: $TEACHER (given)"; return; fi
    train_stage "$OUT/teacher" "configs/${DATASET}_train.yaml" "${TEACHER_ARGS[@]}"
    TEACHER=$CKPT
    echo "teacher: $TEACHER"
}

ensure_edm_teacher() {
    if [ -n "$EDM_TEACHER" ]; then echo "EDM teacher: $EDM_TEACHER (given)"; return; fi
    train_stage "$OUT/edm_teacher/train" "configs/${DATASET}_edm_train.yaml" "${TEACHER_ARGS[@]}"
    EDM_TEACHER=$CKPT
    echo "EDM teacher: $EDM_TEACHER"
}

ensure_classifier() {
    if [ -n "$CLASSIFIER" ]; then return; fi  # given, or made / checked earlier in this script
    CLASSIFIER="$OUT/classifier.safetensors"
    local cmd=(train_classifier.py --dataset "$DATASET" --root "$DATA_ROOT" --out "$CLASSIFIER" "${CLASSIFIER_ARGS[@]}")
    stage "classifier $CLASSIFIER (not in the estimate: one classifier for every row)"
    local status=todo
    # stops on a classifier made by other arguments
    if [ -e "$CLASSIFIER" ]; then status=$("$PYTHON" "$STAGE" product "$CLASSIFIER" "${cmd[@]}"); fi
    if [ "$status" = done ]; then echo "   done: reuse $CLASSIFIER"; return; fi
    run "$PYTHON" "${cmd[@]}"  # writes atomically: a killed run leaves no classifier to reuse
    [ "$DRY_RUN" = 1 ] || "$PYTHON" "$STAGE" record "$CLASSIFIER" "${cmd[@]}"
}

ensure_reference() {  # real training images of the kept classes, the FID reference
    if [ -n "${REF:-}" ]; then return; fi  # made / checked earlier in this script
    REF="$OUT/reference"
    local cmd=(save_dataset.py --dataset "$DATASET" --root "$DATA_ROOT" --out "$REF.tmp" --exclude-class "$FORGET"
               ${REF_PER_CLASS:+--per-class "$REF_PER_CLASS"})
    stage "FID reference $REF"
    local status=todo
    if [ -e "$REF" ]; then status=$("$PYTHON" "$STAGE" product "$REF" "${cmd[@]}"); fi  # stops on one made otherwise
    if [ "$status" = done ]; then echo "   done: reuse $REF"; return; fi
    run rm -rf "$REF.tmp"  # left by a killed save_dataset.py: never consumed
    run "$PYTHON" "${cmd[@]}"
    run mv "$REF.tmp" "$REF"
    [ "$DRY_RUN" = 1 ] || "$PYTHON" "$STAGE" record "$REF" "${cmd[@]}"
}

train_method() {  # train_method ROW CONFIG ARGS...: runs into $OUT/ROW/train; sets CKPT
    train_stage "$OUT/$1/train" "configs/$2" "${@:3}" "${METHOD_ARGS[@]}"
}

metric() {  # metric RESULT INPUT... -- EVALUATE_ARGS...: evaluate.py unless RESULT was written by them after the inputs
    local result=$1 inputs=() status=todo
    shift
    while [ "$1" != -- ]; do inputs+=(--input "$1"); shift; done
    shift
    if [ -e "$result" ]; then status=$("$PYTHON" "$STAGE" metric "$result" "${inputs[@]}" -- "$@"); fi
    if [ "$status" = done ]; then
        echo "   done: reuse $result"
    else
        if [ -n "${METRIC_ESTIMATE:-}" ]; then estimate fid "$METRIC_ESTIMATE" --per-class "$PER_CLASS"; fi
        run "$PYTHON" evaluate.py "$@"
    fi
}

sample_and_evaluate() {  # sample_and_evaluate ROW CKPT SAMPLE_ARGS...: images, ua.json, fid.json in $OUT/ROW
    local row=$1 ckpt=$2
    shift 2
    ensure_classifier
    ensure_reference
    local samples="$OUT/$row/samples" sample_args=(--per-class "$PER_CLASS" "$@")
    local net_config="configs/${DATASET}_train.yaml"
    [[ $row == edm_* ]] && net_config="configs/${DATASET}_edm_train.yaml"
    stage "$row: samples $samples"
    local status=todo
    if [ -e "$samples" ]; then status=$("$PYTHON" "$STAGE" samples "$samples" "$ckpt" "${sample_args[@]}"); fi
    if [ "$status" = done ]; then
        echo "   done: reuse $samples"
    else
        estimate sample "$net_config" "${sample_args[@]}"
        # sample.py keeps the images already there (an interrupted folder is completed, not redone)
        launch sample.py --ckpt "$ckpt" --out "$samples" "${sample_args[@]}"
        [ "$DRY_RUN" = 1 ] || "$PYTHON" "$STAGE" record "$samples" "${sample_args[@]}"
    fi
    stage "$row: UA and FID"
    metric "$OUT/$row/ua.json" "$samples/settings.json" "$CLASSIFIER" -- \
        ua --images "$samples" --classifier "$CLASSIFIER" --forget "$FORGET" --out "$OUT/$row/ua.json"
    local fid_args=(--features "$FID_FEATURES")
    [ "$FID_FEATURES" = classifier ] && fid_args+=(--classifier "$CLASSIFIER" --metrics fid)
    [ -n "$INCEPTION_WEIGHTS" ] && fid_args+=(--inception-weights "$INCEPTION_WEIGHTS")
    METRIC_ESTIMATE=$net_config metric "$OUT/$row/fid.json" "$samples/settings.json" "$CLASSIFIER" "$REF" -- \
        fid --images "$samples" --ref "$REF" --exclude "$FORGET" --out "$OUT/$row/fid.json" --no-progress \
        "${fid_args[@]}"
    if [ "$ATTACKS" = 1 ]; then
        # the attack draws images the way this row samples: same guidance (one-step rows ignore it)
        local guidance
        guidance=$(sampling_guidance "$@")
        stage "$row: attacks (not in the estimate)"
        metric "$OUT/$row/attack.json" "$ckpt" "$CLASSIFIER" -- attack --ckpt "$ckpt" --classifier "$CLASSIFIER" \
            --forget "$FORGET" --out "$OUT/$row/attack.json" ${guidance:+--guidance "$guidance"} "${ATTACK_ARGS[@]}"
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
