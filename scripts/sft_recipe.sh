#!/usr/bin/env bash
# The README's fine-tuning table: pretrain a tiny model on standard-library text, score it on held-out questions
# about long standard-library files (data=qa), fine-tune it there (experiment=sft_tiny), and score it again.
#   scripts/sft_recipe.sh [MODEL [PRETRAIN_STEPS [SFT_STEPS]]]       defaults: rat_tiny 1200 800
# Runs in runs/MODEL-stdlib and runs/sft-MODEL-qa (each resumed if it holds checkpoints); prints the wall time of
# each part; the scores are in each run's eval/qa/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-rat_tiny}
pretrain_steps=${2:-1200}
sft_steps=${3:-800}
python="${PYTHON:-.venv/bin/python}"
torchrun=("$python" -m torch.distributed.run --standalone --nproc_per_node=2)
base="runs/$model-stdlib"
tuned="runs/sft-$model-qa"
score=(eval.samples=64 eval.max_new_tokens=16 eval.loss_examples=512 progress_bar=false)

clock() { date +%s; }
elapsed() { echo "$(( ($2 - $1) / 60 ))m $(( ($2 - $1) % 60 ))s"; }

start=$(clock)
OMP_NUM_THREADS=1 "${torchrun[@]}" launch/train.py model="$model" run_dir="$base" \
    trainer.max_steps="$pretrain_steps" trainer.checkpoint_every="$pretrain_steps" trainer.progress_bar=false
pretrained=$(clock)
"$python" launch/eval_sft.py ckpt="$base" data=qa out_dir="$base/eval/qa" "${score[@]}"
base_scored=$(clock)
OMP_NUM_THREADS=1 "${torchrun[@]}" launch/sft.py experiment=sft_tiny model="$model" init_from="$base" \
    run_dir="$tuned" trainer.max_steps="$sft_steps" trainer.progress_bar=false
tuned_at=$(clock)
"$python" launch/eval_sft.py ckpt="$tuned" data=qa out_dir="$tuned/eval/qa" "${score[@]}"
done=$(clock)
echo "sft recipe ($model): pretraining $(elapsed "$start" "$pretrained"), base scores $(elapsed "$pretrained" "$base_scored")," \
    "fine-tuning $(elapsed "$base_scored" "$tuned_at"), tuned scores $(elapsed "$tuned_at" "$done"), all $(elapsed "$start" "$done")"
