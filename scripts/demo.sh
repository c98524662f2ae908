#!/usr/bin/env bash
# BlockDrop end to end on generated data, on the CPU, in a few minutes:
# a shapes dataset with easy and hard images (CIFAR-10 format) ->
# pretrain a ResNet-32 -> curriculum learning of the policy -> joint finetuning
# -> test.py, then block usage of easy vs hard test images (paper Sec. 4.3).
#
#   bash scripts/demo.sh [run folder]      (default: runs/demo-<date>-<time>)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
if [ -e "$OUT" ]; then
  echo "demo: $OUT already exists; choose another folder (nothing was overwritten)" >&2
  exit 1
fi
DATA="$OUT/data"
COMMON=(--model R32_C10 --data_dir "$DATA" --device cpu --workers 0 --no_progress)
start=$SECONDS
step() { echo; echo "== $1  [$((SECONDS - start)) s]"; }

step "1/6 shapes dataset: 1500 training and 500 test images, half of them hard"
"$PY" -m scripts.demo_data generate --out "$DATA" --train 1500 --test 500 --seed 0

step "2/6 pretrain the base ResNet-32 (SGD, 6 epochs)"
"$PY" pretrain_resnet.py "${COMMON[@]}" --cv_dir "$OUT/pretrain" --epochs 6 --batch_size 32 \
  --lr 0.02 --milestones 4 5 --test_every 1
BASE=$(ls "$OUT"/pretrain/pk_E_6_A_*.t7)

step "3/6 curriculum learning: one more block for the policy each epoch (15 epochs, K=15)"
"$PY" cl_training.py "${COMMON[@]}" --cv_dir "$OUT/cl" --base_ckpt "$BASE" --max_epochs 14 \
  --batch_size 64 --lr 1e-3 --test_every 7
CL=$(ls "$OUT"/cl/ckpt_E_14_*.t7)

step "4/6 joint finetuning of policy and ResNet (gamma = 5, 3 epochs)"
"$PY" finetune.py "${COMMON[@]}" --cv_dir "$OUT/finetune" --base_ckpt "$BASE" --pretrained "$CL" \
  --max_epochs 2 --batch_size 64 --lr 5e-4 --penalty -5 --test_every 1
FT=$(ls "$OUT"/finetune/ckpt_E_2_*.t7)

step "5/6 test.py on the finetuned checkpoint (chance accuracy: 0.100; all blocks: 15)"
"$PY" test.py --model R32_C10 --data_dir "$DATA" --load "$FT" --workers 0 2>/dev/null

step "6/6 easy vs hard test images under the learned policy"
"$PY" -m scripts.demo_data compare --model R32_C10 --load "$FT" --data_dir "$DATA"

echo
echo "done in $((SECONDS - start)) s. Run folder: $OUT"
echo "  checkpoints:  $BASE"
echo "                $CL"
echo "                $FT"
echo "  metrics:      $OUT/{pretrain,cl,finetune}/metrics.jsonl"
echo "  tensorboard:  tensorboard --logdir $OUT   (event files in */log)"
