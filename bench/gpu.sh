#!/usr/bin/env bash
# One prepared GPU benchmark, the project beside the original release on the same card,
# within a fixed time budget (BUDGET seconds, 350 by default: under 6 minutes):
#   1. search, batch 64, C=16, 8 cells, after_every, first and second order, as
#      train_search.py runs on CUDA (CUDA graphs, no recomputation): fp32 and --amp
#      rows, plus --recompute (second order) and --no-cuda_graphs (first order)
#      rows for comparison;
#   2. training step of NetworkCIFAR(36, 10, 20, auxiliary, Att_DARTS), batch 96,
#      graphs on: fp32 and --amp, each contiguous and channels-last, plus fp32 eager
#      (--no-cuda_graphs); evaluation images/s too;
#   3. search no_attention, both orders.
# Every table shows the original's seconds and peak GPU memory beside the project's,
# and the ratios.  Each command runs under `timeout` with what is left of the
# budget; sections after it are skipped with a message.  Estimated 4-6 minutes
# (the original's second-order iteration alone takes ~7 s on an H200, so its
# 1 warm-up + 2 timed iterations take ~25 s per table).
#     bash bench/gpu.sh
#     BASELINE=.shared/baseline/original_step.py bash bench/gpu.sh
#     COUNTS=1 bash bench/gpu.sh   # ATen op counts too (on the CPU; about +1-2 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

BASELINE=${BASELINE:-../shared/baseline/original_step.py}
BUDGET=${BUDGET:-350}
COUNT=--no-count
[[ ${COUNTS:-0} == 1 ]] && COUNT=--count
[[ -f $BASELINE ]] || echo "warning: no original at $BASELINE (set BASELINE=...): project figures only"

# run TITLE COMMAND...: the command under what is left of the budget, or a skip message.
run() {
  local title=$1 left=$((BUDGET - SECONDS))
  shift
  if ((left < 30)); then
    echo "== $title: skipped, ${SECONDS}s of the ${BUDGET}s budget spent"
    return
  fi
  echo "== $title (at ${SECONDS}s)"
  timeout "$left" "$@" || echo "(stopped with exit status $?: out of the ${BUDGET}s budget, or failed)"
}

SEARCH=(python bench/search_step.py --device cuda --batch 64 --warmup 1 --steps 2
        --baseline "$BASELINE" $COUNT)
run "search after_every: fp32, bf16 autocast; --recompute (order 2), --no-cuda_graphs (order 1)" \
  "${SEARCH[@]}" --locations after_every --orders 1 2 \
  --also=--amp --also="--recompute --orders 2" --also="--no-cuda_graphs --orders 1"
run "train batch 96: fp32 and bf16 autocast, contiguous and channels-last; fp32 eager" \
  python bench/train_step.py --device cuda --batch 96 --warmup 1 --steps 5 \
  --baseline "$BASELINE" $COUNT \
  --also=--channels_last --also=--amp --also="--amp --channels_last" --also=--no-cuda_graphs
run "search no_attention: fp32" "${SEARCH[@]}" --locations no_attention --orders 1 2
echo "== done in ${SECONDS}s"
