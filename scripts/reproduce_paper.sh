#!/usr/bin/env bash
# CPU-sized reproduction of the paper's ablations (Ainslie et al. 2023) on the bundled corpus.
#   1. pre-train a tiny MHA T5.1.1 (8 heads) from scratch: "the original checkpoint" and its step count
#   2. sweep KV groups {1, 2, 8} x α {0, 0.05, 0.1} x 3 seeds with mean pooling (MHA = control)
#   3. sweep conversion methods {mean, first, random, align, svd} for MQA x α {0, 0.05} x 3 seeds
#   4. write docs/reproduction.md from the results (tables, plots, which orderings hold)
# Re-running resumes: finished stages are skipped. About an hour on 2 CPU cores.
# Usage: scripts/reproduce_paper.sh [ROOT (default runs/reproduction)] ; PRETRAIN_STEPS=1000 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/reproduction}
STEPS=${PRETRAIN_STEPS:-1000}
mkdir -p "$ROOT"
SECONDS=0
if [ ! -d "$ROOT/mha_original/checkpoints/$STEPS" ]; then
  gqa-uptrain train --gin_file=models/t5_1_1/tiny.gin --gin_file=runs/pretrain.gin \
    --gin.MODEL_DIR="$ROOT/mha_original" --gin.TRAIN_STEPS="$STEPS" --gin.SAVE_EVERY="$STEPS" \
    --gin.EVAL_EVERY="$STEPS" --gin.BATCH_SIZE=16 --gin.INPUTS_LENGTH=128 --gin.TARGETS_LENGTH=32 --gin.SEED=0 \
    --no_progress
fi
echo "pre-training done after ${SECONDS}s"
gqa-uptrain sweep --gin_file=sweeps/repro_groups.gin --gin.SOURCE_CHECKPOINT="$ROOT/mha_original" --root "$ROOT/groups"
echo "groups sweep done after ${SECONDS}s"
gqa-uptrain sweep --gin_file=sweeps/repro_methods.gin --gin.SOURCE_CHECKPOINT="$ROOT/mha_original" --root "$ROOT/methods"
echo "methods sweep done after ${SECONDS}s"
python scripts/reproduction_report.py "$ROOT" --out docs/reproduction.md --seconds "$SECONDS"
