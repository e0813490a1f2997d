#!/usr/bin/env bash
# One row of the README's passkey table: train with experiment=passkey_tiny on 2 processes, score the
# needle grid at 1x, 2x and 4x the trained length, and copy its CSV and heatmap into docs/needle/.
#   scripts/passkey_recipe.sh NAME [training overrides...]
#   scripts/passkey_recipe.sh attn_tiny model=attn_tiny
#   scripts/passkey_recipe.sh rat_tiny-L4 model=rat_tiny model.name=rat_tiny-L4 model.mixer_options.rat.chunk_size=4
# Runs in runs/passkey-NAME (resumed if it holds checkpoints); prints the wall time of each part.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
python="${PYTHON:-.venv/bin/python}"
run_dir="runs/passkey-$name"

start=$(date +%s)
OMP_NUM_THREADS=1 "$python" -m torch.distributed.run --standalone --nproc_per_node=2 launch/train.py \
    experiment=passkey_tiny run_dir="$run_dir" trainer.progress_bar=false "$@"
trained=$(date +%s)
"$python" launch/eval_needle.py ckpt="$run_dir" eval.haystack=filler eval.lengths=[256,512,1024] \
    eval.depths=[0,25,50,75,100] eval.samples=8 eval.variant=passkey eval.scoring=teacher_forced \
    out_dir="$run_dir/eval/recipe" progress_bar=false
done=$(date +%s)

mkdir -p docs/needle
cp "$run_dir/eval/recipe/summary.csv" "docs/needle/passkey-$name.csv"
cp "$run_dir/eval/recipe/heatmap.png" "docs/needle/passkey-$name.png"
echo "passkey-$name: training $(( (trained - start) / 60 ))m $(( (trained - start) % 60 ))s," \
    "evaluation $(( done - trained ))s; docs/needle/passkey-$name.csv"
