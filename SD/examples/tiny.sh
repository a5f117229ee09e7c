#!/usr/bin/env bash
# The whole SD pipeline on tiny random models, offline, in about a minute on a CPU: build the models,
# convert a SiD-LSG-style generator pickle, train SFD with the celebrity recipe (2 iterations),
# generate with the snapshot and with the teacher, export a diffusers pipeline folder, evaluate.
# Every command is the one a real run uses (README "Quick start"); only the models and sizes are tiny,
# so every number it prints is meaningless. Run from any directory:
#   bash SD/examples/tiny.sh            # writes runs/sd-tiny in the repository
#   bash SD/examples/tiny.sh DIR        # or DIR (must not exist yet)
set -euo pipefail
SD=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(dirname "$SD")/runs/sd-tiny}
PYTHON=${PYTHON:-python}
if [ -e "$WORK" ]; then
  echo "Error: $WORK exists; remove it or give another folder: bash SD/examples/tiny.sh DIR" >&2
  exit 1
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$SD/examples${PYTHONPATH:+:$PYTHONPATH}"  # evaluate.py fid --features tiny_sd:tiny_features
PROMPTS=$SD/prompts/brad_pitt_prompts_val.txt
step() { printf '\n== %s\n' "$*"; }

step "1/6 tiny random models -> $WORK/models"
"$PYTHON" "$SD/examples/tiny_sd.py" --out "$WORK/models"

step "2/6 convert the SiD-LSG-style generator pickle (restricted unpickler) -> generator_init"
"$PYTHON" "$SD/convert_sid_lsg.py" --pkl "$WORK/models/sid_lsg.pkl" --out "$WORK/generator_init"

step "3/6 train: SFD forgets 'brad pitt' into 'a middle aged man' (celebrity recipe, paper settings, tiny sizes)"
NUM_GPUS=1 PYTHON=$PYTHON bash "$SD/recipes/celebrity.sh" sd_model="$WORK/models/sd" \
  generator_init="$WORK/generator_init" remain_prompts="$SD/prompts/remain_prompts_small.txt" \
  outdir="$WORK/runs" resolution=16 batch=2 duration_kimg=0.004 tick_kimg=0.002 snap_kimg=0.004 \
  state_kimg=0.004 grad_checkpointing=false
SNAPSHOT=$(ls -d "$WORK"/runs/00000-*/network-snapshot-* | tail -n 1)

step "4/6 generate: the one-step generator, and the teacher's own sampler (2 steps here, 50 for real)"
"$PYTHON" "$SD/generate.py" --network "$SNAPSHOT" --prompts "$PROMPTS" --seeds 0-1 --resolution 16 \
  --outdir "$WORK/out/sfd"
"$PYTHON" "$SD/generate.py" --network teacher --sd-model "$WORK/models/sd" --steps 2 --prompts "$PROMPTS" \
  --seeds 0-1 --resolution 16 --outdir "$WORK/out/sd15"

step "5/6 export a diffusers pipeline folder with a model card"
"$PYTHON" "$SD/export.py" --snapshot "$SNAPSHOT" --out "$WORK/export" --license creativeml-openrail-m

step "6/6 evaluate: CLIP score (tiny random CLIP) and FID against the teacher's images (stand-in features)"
"$PYTHON" "$SD/evaluate.py" \
  clip-score --images "$WORK/out/sfd" --prompts "$PROMPTS" --clip-model "$WORK/models/clip" --label SFD \
    --out "$WORK/metrics/sfd-clip.json" \
  fid --images "$WORK/out/sfd" --prompts "$PROMPTS" --original-images "$WORK/out/sd15" \
    --features tiny_sd:tiny_features --label SFD --out "$WORK/metrics/sfd-fid.json"
"$PYTHON" "$SD/evaluate.py" table --out "$WORK/metrics/table.md" "$WORK/metrics/sfd-clip.json" \
  "$WORK/metrics/sfd-fid.json"

step "done: $WORK (runs/, out/, export/, metrics/table.md)"
