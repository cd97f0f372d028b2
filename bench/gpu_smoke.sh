#!/usr/bin/env bash
# The GPU path end to end, for the first GPU a session is lent (under 6 minutes on an
# H100 with cifar10-mini), and on the CPU with tiny sizes (SEARCH_SIZE, TRAIN_SIZE below;
# about 5 minutes on two busy cores with 4 training images per class).
#   1. search: 2 epochs on real images with default flags and --workers 2, then resumed
#      from its checkpoint for a 3rd epoch with --no-cuda_graphs and a 4th with
#      --amp --amp_dtype float16 (graphs off under the scaler); a 1-epoch second-order
#      search (its passes in IEEE float32 inside the captured step);
#   2. training with evaluation every epoch (train_CIFAR10.py, small network): 2 epochs
#      with default flags and --workers 2, resumed the same two ways.
# After each run it prints the run's "CUDA graphs" lines: on or off and why, and the
# one line a failed capture leaves (the run then goes on eagerly).  Any failing run
# stops the script with its exit status.
#     bash bench/gpu_smoke.sh /path/to/cifar10-mini [output directory]
#     SEARCH_SIZE="--init_ch 4 --layers 3 --batchsz 8" TRAIN_SIZE="..." bash bench/gpu_smoke.sh DATA
# DATA: a folder with train/<class>/ and val/<class>/ images (the device gets only the
# working tree: pass the data's path there).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash bench/gpu_smoke.sh DATA [OUTPUT]}
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
SEARCH_SIZE=${SEARCH_SIZE:-}
TRAIN_SIZE=${TRAIN_SIZE:---init_ch 16 --layers 8 --batchsz 96}
python -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU (no CUDA)')"

# run TITLE DIR COMMAND...: the command (its output in OUT/*.out, shown when it fails),
# then what the run under DIR logged meanwhile: its "CUDA graphs" lines (a new run's
# on or off and why; the line of a failed capture, after which the run went on
# eagerly) and its epoch lines.
run() {
  local title=$1 dir=$2 started=$SECONDS before=0 output log
  shift 2
  output="$OUT/$(echo "$title" | tr -c 'a-zA-Z0-9' _).out"
  log=$(ls "$dir"/*/log.txt 2>/dev/null | head -n 1 || true)
  [[ -n $log ]] && before=$(wc -l < "$log")
  echo "== $title: $*"
  if ! "$@" > "$output" 2>&1; then
    tail -n 40 "$output"
    echo "== FAILED: $title (output in $output)"
    exit 1
  fi
  log=$(ls "$dir"/*/log.txt | head -n 1)
  tail -n +$((before + 1)) "$log" | grep "CUDA graphs" | sed 's/^/   /' \
    || echo "   no CUDA graphs line: graphs as the flags say, no capture failed"
  tail -n +$((before + 1)) "$log" | grep "^.\{20\}epoch [0-9]" | cut -c 1-160 | sed 's/^/   /' || true
  echo "   ($((SECONDS - started)) s)"
}

# shellcheck disable=SC2086  # the size flags are word lists
SEARCH=(python train_search.py --data "$DATA" --workers 2 $SEARCH_SIZE)
run "search, 2 epochs, default flags" "$OUT/search" \
  "${SEARCH[@]}" --epochs 2 --exp_path "$OUT/search"
RUN=$(ls -d "$OUT"/search/*/ | head -n 1)
run "search resumed: epoch 3, --no-cuda_graphs" "$OUT/search" \
  "${SEARCH[@]}" --epochs 3 --checkpoint_path "$RUN" --no-cuda_graphs
run "search resumed: epoch 4, --amp --amp_dtype float16" "$OUT/search" \
  "${SEARCH[@]}" --epochs 4 --checkpoint_path "$RUN" --amp --amp_dtype float16
run "search, second order, 1 epoch" "$OUT/second" \
  "${SEARCH[@]}" --epochs 1 --unrolled --exp_path "$OUT/second"

# shellcheck disable=SC2086
TRAIN=(python train_CIFAR10.py --data "$DATA" --workers 2 $TRAIN_SIZE)
run "training, 2 epochs, default flags" "$OUT/train" \
  "${TRAIN[@]}" --epochs 2 --exp_path "$OUT/train"
RUN=$(ls -d "$OUT"/train/*/ | head -n 1)
run "training resumed: epoch 3, --no-cuda_graphs" "$OUT/train" \
  "${TRAIN[@]}" --epochs 3 --checkpoint_path "$RUN" --no-cuda_graphs
run "training resumed: epoch 4, --amp --amp_dtype float16" "$OUT/train" \
  "${TRAIN[@]}" --epochs 4 --checkpoint_path "$RUN" --amp --amp_dtype float16
echo "== smoke: every run succeeded in ${SECONDS}s (outputs in $OUT)"
