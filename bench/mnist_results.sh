#!/usr/bin/env bash
# The MNIST comparison in bench/RESULTS.md: every topology against sync, 3 seeds, 10 epochs, then
# the report that makes its tables and figures, copied into bench/RESULTS.md. 27 runs of 20 s to
# 2 min each on one CPU core.
# Finished runs are skipped, so an interrupted script can be re-run; start it once per free core
# to run lanes in parallel (a per-run lock keeps lanes apart; the last lane writes the report).
#   bash bench/mnist_results.sh [MNIST_DIR] [RUN_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${1:-../shared/data/mnist}
ROOT=${2:-runs/results_issue4}
COMMON=(data.name=mnist "data.root=$MNIST" trainer.max_epochs=10 logger.wandb.enabled=false
  trainer.progress_bar=false "run.root=$ROOT")
DONE_FILES=()

run() {  # run NAME SEED ARGS...
  local name=$1 seed=$2 lock
  shift 2
  local done_file="$ROOT/$name/seed$seed/result.json"
  DONE_FILES+=("$done_file")
  [ -f "$done_file" ] && return
  exec {lock}>"$ROOT/.$name-seed$seed.lock"
  if ! flock -n "$lock"; then  # another lane has it
    exec {lock}>&-
    return
  fi
  if [ ! -f "$done_file" ]; then
    echo "== $name seed $seed"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m mach_lightning.fit "$@" "${COMMON[@]}" \
      "seed=$seed" "name=$name" "run.id=seed$seed" >"$ROOT/$name-seed$seed.log" 2>&1 ||
      echo "   failed: see $ROOT/$name-seed$seed.log"
  fi
  exec {lock}>&-
}

mkdir -p "$ROOT"
for seed in 0 1 2; do
  for k in 2 3 4; do
    run "sync_k$k" "$seed" --config configs/sync.yaml "model.num_components=$k"
  done
  run seq_k2 "$seed" --config configs/seq.yaml model.num_components=2
  run seq_k3 "$seed" --config configs/seq.yaml
  run delayed_k4 "$seed" --config configs/delayed.yaml
  run local_k4 "$seed" --config configs/local.yaml
  run cdni_k4 "$seed" --config configs/cdni.yaml
  run dni_k4 "$seed" --config configs/dni.yaml synth.lr=0.001  # tuned on MNIST (RESULTS.md)
done
missing=0
for f in "${DONE_FILES[@]}"; do [ -f "$f" ] || missing=$((missing + 1)); done
if [ "$missing" -gt 0 ]; then
  echo "$missing runs have no result yet (another lane, or failed): the report waits for them"
else
  python -m mach_lightning.report "$ROOT" --out bench/report_mnist
  python bench/embed_report.py bench/report_mnist/report.md bench/RESULTS.md
fi
