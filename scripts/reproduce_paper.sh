#!/usr/bin/env bash
# CPU-sized reproduction of the paper's ablations (Ainslie et al. 2023) on the bundled corpus, and issue #16's
# checks beyond it. Resumable stages (re-running skips what is finished; an interrupted training resumes):
#   pretrain   a tiny MHA T5.1.1 (8 heads) trained PRETRAIN_STEPS with eval every EVAL_EVERY and a checkpoint every
#              SAVE_EVERY (all kept), or ORIGINAL=<an existing such MODEL_DIR> (read only, never modified)
#   original   pick the original's length from its validation curve (first saved step where the eval loss improves
#              by < FLAT_NATS per 1000 steps over the next LENGTH_WINDOW steps; ORIGINAL_STEPS=N overrides) and
#              copy that step to ROOT/mha_original
#              (rsqrt schedule, 10k warm-up: constant LR, so step N of a long run = a run of length N)
#   groups     KV groups {1, 2, 4, 8} x α {0, 0.05, 0.1} x SEEDS, mean pooling (G = 8 is the MHA control)
#   methods    conversion methods {mean, first, random, align, svd} for MQA x α {0, 0.05} x SEEDS
#   alpha      α ∈ {0, .0025, .005, .01, .02, .05, .1} x {mean, align, svd} x {MQA, GQA-2} + control, SEEDS
#   finetune   MHA control, GQA-2 and MQA (mean, svd) uptrained at FT_ALPHA, fine-tuned on gqa_wordnet_gloss
#              (constant LR 1e-3, dropout 0.1), ROUGE/BLEU with greedy decoding, SEEDS
#   restart    optimiser restart arms (warm-up, carried state) of the groups sweep; each runs only when its feature
#              exists (OptimizerConfig.restart_warmup_steps; `convert --carry-optimizer-state`); then `continued`
#   report     `continued` (below), then docs/reproduction.md (REPORT_OUT) from whatever stages have run
#   (continued: the original run itself continued to N + α·N, i.e. its saved pre-training checkpoints, scored with
#   the sweeps' eval command, so the control's drift is measured against a model that had no optimiser restart;
#   ROOT/continued, resumable, a few evals)
# Every sweep evaluates each model on the validation split and on the second held-out set (split python_docs).
# Later sweeps reuse finished runs of earlier ones with the same model inputs (`gqa-uptrain sweep --reuse`).
#
# Usage: scripts/reproduce_paper.sh [ROOT (default runs/reproduction)]
# Environment (defaults): SEEDS="0 1 2"  PRETRAIN_SEED=0  PRETRAIN_STEPS=8000  SAVE_EVERY=500  EVAL_EVERY=250
#   ORIGINAL=<MODEL_DIR>  ORIGINAL_STEPS=<N>  FLAT_NATS=0.02  LENGTH_WINDOW=1000
#   FT_ALPHA=0.05  FT_STEPS=300  FT_BATCH=16
#   FT_EVAL_EXAMPLES=200  FT_MODELS=kv8-mean,kv2-mean,kv2-svd,kv1-mean,kv1-svd
#   STAGES="pretrain original groups methods alpha finetune restart report"
#   REPORT_OUT=docs/reproduction.md  PARALLEL=1
#   OTHER_ROOT=<ROOT of the same stages from another PRETRAIN_SEED>: the report checks each conclusion against it
#   SWEEP_GIN: a gin file read after each sweep's own (e.g. smaller grids or eval sizes); SWEEP_ARGS / TRAIN_ARGS:
#   extra flags (no spaces inside one) for every sweep / for pre-training and fine-tuning
# Example: the original already trained elsewhere, two seeds:
#   ORIGINAL=/work/runs/pre_s0 SEEDS="0 1" scripts/reproduce_paper.sh runs/repro_s0
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
# Paths given by the caller are relative to where they ran the script; the defaults to the repository.
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }
ROOT=$( [ -n "${1:-}" ] && from_caller "$1" || echo runs/reproduction )
[ -n "${ORIGINAL:-}" ] && ORIGINAL=$(from_caller "$ORIGINAL")
[ -n "${OTHER_ROOT:-}" ] && OTHER_ROOT=$(from_caller "$OTHER_ROOT")
[ -n "${SWEEP_GIN:-}" ] && SWEEP_GIN=$(from_caller "$SWEEP_GIN")
[ -n "${REPORT_OUT:-}" ] && REPORT_OUT=$(from_caller "$REPORT_OUT")
SEEDS=${SEEDS:-0 1 2}
PRETRAIN_SEED=${PRETRAIN_SEED:-0}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-8000}
SAVE_EVERY=${SAVE_EVERY:-500}
EVAL_EVERY=${EVAL_EVERY:-250}
FLAT_NATS=${FLAT_NATS:-0.02}
LENGTH_WINDOW=${LENGTH_WINDOW:-1000}
FT_ALPHA=${FT_ALPHA:-0.05}
FT_STEPS=${FT_STEPS:-300}
FT_BATCH=${FT_BATCH:-16}
FT_EVAL_EXAMPLES=${FT_EVAL_EXAMPLES:-200}
FT_MODELS=${FT_MODELS:-kv8-mean,kv2-mean,kv2-svd,kv1-mean,kv1-svd}
STAGES=${STAGES:-pretrain original groups methods alpha finetune restart report}
REPORT_OUT=${REPORT_OUT:-docs/reproduction.md}
PARALLEL=${PARALLEL:-1}
read -r -a SWEEP_EXTRA <<< "${SWEEP_ARGS:-}"
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
PY=${PYTHON:-python}
GQA=("$PY" -m gqa_uptrain)

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
# "0 1 2" -> "(0, 1, 2,)" for gin; also accepts commas.
SEEDS_GIN="($(echo "$SEEDS" | tr ',' ' ' | xargs -n1 | sed 's/$/,/' | tr '\n' ' '))"
SEEDS_CSV=$(echo "$SEEDS" | tr ',' ' ' | xargs | tr ' ' ',')
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
SECONDS_FILE="$ROOT/stage_seconds.json"
"$PY" scripts/reproduction_stages.py machine "$ROOT" >/dev/null
SECONDS=0
timed() {  # timed NAME CMD...: run a stage and add its wall time to ROOT/stage_seconds.json
  local name=$1 t0=$SECONDS; shift
  "$@"
  "$PY" - "$SECONDS_FILE" "$name" "$((SECONDS - t0))" <<'EOF'
import json, pathlib, sys
p, name, s = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
d = json.loads(p.read_text()) if p.exists() else {}
d[name] = d.get(name, 0) + s
p.write_text(json.dumps(d, indent=2) + "\n")
EOF
  echo "stage $name done after ${SECONDS}s"
}

# ---- pretrain: the long original
if [ -z "${ORIGINAL:-}" ]; then
  ORIGINAL="$ROOT/pretrain"
  if has_stage pretrain && [ ! -d "$ORIGINAL/checkpoints/$PRETRAIN_STEPS" ]; then
    timed pretrain "${GQA[@]}" train --gin_file=models/t5_1_1/tiny.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR="$ORIGINAL" --gin.TRAIN_STEPS="$PRETRAIN_STEPS" --gin.SAVE_EVERY="$SAVE_EVERY" \
      --gin.KEEP_CHECKPOINTS=1000000 --gin.EVAL_EVERY="$EVAL_EVERY" --gin.BATCH_SIZE=16 --gin.INPUTS_LENGTH=128 \
      --gin.TARGETS_LENGTH=32 --gin.SEED="$PRETRAIN_SEED" --no_progress "${TRAIN_EXTRA[@]}"
  fi
fi
ORIGINAL=$(cd "$ORIGINAL" && pwd)

# ---- original: pick the length from the curve and materialise that step as the sweeps' source
SRC="$ROOT/mha_original"
if has_stage original && [ ! -f "$SRC/original.json" ]; then
  final=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['resolved_train_steps'])" \
          "$ORIGINAL/train_config.json")
  if [ ! -d "$ORIGINAL/checkpoints/$final" ]; then
    echo "error: $ORIGINAL has not finished (no checkpoint at its last step $final); wait for it or resume it" >&2
    exit 1
  fi
  "$PY" scripts/reproduction_stages.py pick-length "$ORIGINAL" --flat "$FLAT_NATS" --window "$LENGTH_WINDOW" \
    --output "$ROOT/length.json" >/dev/null
  STEP=${ORIGINAL_STEPS:-$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" \
                           "$ROOT/length.json")}
  timed original "$PY" scripts/reproduction_stages.py original "$ORIGINAL" "$STEP" "$SRC"
fi

sweep() {  # sweep NAME GIN_FILE [--reuse OTHER ...]
  local name=$1 gin=$2; shift 2
  timed "$name" "${GQA[@]}" sweep --gin_file="$gin" ${SWEEP_GIN:+--gin_file="$SWEEP_GIN"} \
    --gin.SOURCE_CHECKPOINT="$SRC" --gin.SEEDS="$SEEDS_GIN" --root "$ROOT/$name" --parallel "$PARALLEL" "$@" \
    "${SWEEP_EXTRA[@]}"
}
has_stage groups && sweep groups sweeps/repro_groups.gin
has_stage methods && sweep methods sweeps/repro_methods.gin --reuse "$ROOT/groups"
has_stage alpha && sweep alpha sweeps/repro_alpha.gin --reuse "$ROOT/groups" --reuse "$ROOT/methods"

if has_stage finetune; then
  ft_extra=()
  for a in "${TRAIN_EXTRA[@]}"; do ft_extra+=(--extra="$a"); done
  timed finetune "$PY" scripts/reproduction_stages.py finetune "$ROOT" --seeds "$SEEDS_CSV" --alpha "$FT_ALPHA" \
    --steps "$FT_STEPS" --batch "$FT_BATCH" --eval_examples "$FT_EVAL_EXAMPLES" --models "$FT_MODELS" "${ft_extra[@]}"
fi

if has_stage restart; then
  # Issue #16 part 1 is built on another branch; each arm runs only once its feature is in the tree.
  if "$PY" -c "import dataclasses, sys; from gqa_uptrain.optim import OptimizerConfig; \
sys.exit('restart_warmup_steps' not in {f.name for f in dataclasses.fields(OptimizerConfig)})" 2>/dev/null; then
    sweep restart_warmup sweeps/repro_restart_warmup.gin --reuse "$ROOT/groups"
  else
    echo "restart: OptimizerConfig.restart_warmup_steps not found; warm-up arm skipped"
  fi
  convert_help=$("${GQA[@]}" convert --help 2>/dev/null || true)  # not piped into grep -q: pipefail + SIGPIPE
  if [[ "$convert_help" == *"--carry-optimizer-state"* ]]; then
    sweep restart_carry sweeps/repro_restart_carry.gin --reuse "$ROOT/groups"
  else
    echo "restart: convert has no --carry-optimizer-state; carried-state arm skipped"
  fi
fi

# The original continued for the same steps as uptraining (reference for the restart shock); needs a sweep.
continued() {
  if [ -f "$SRC/original.json" ] && compgen -G "$ROOT/*/sweep.json" >/dev/null; then
    timed continued "$PY" scripts/reproduction_stages.py continued "$ROOT" --original "$ORIGINAL"
  fi
}
has_stage restart && continued

if has_stage report; then
  continued
  rerun=()  # settings the report repeats in the command it gives for each stage not yet run
  for v in SWEEP_GIN SWEEP_ARGS TRAIN_ARGS PARALLEL; do
    [ -n "${!v:-}" ] && [ "$v=${!v}" != "PARALLEL=1" ] && rerun+=(--rerun_env "$v=${!v}")
  done
  "$PY" scripts/reproduction_report.py "$ROOT" --out "$REPORT_OUT" --original "$ORIGINAL" \
    ${OTHER_ROOT:+--other_root "$OTHER_ROOT"} "${rerun[@]}"
fi
