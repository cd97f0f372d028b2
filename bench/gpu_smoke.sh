#!/usr/bin/env bash
# The GPU path end to end, for the first GPU a session is lent, and on the CPU with tiny
# sizes.  Every run must end well and compute as expected: on a GPU, graphs on where
# the flags allow them (a fallback to eager steps, or graphs off where they should be
# on, fails the script), off where they must be (--no-cuda_graphs, float16's scaler,
# torchrun); on the CPU, off.
#   search (train_search.py, SEARCH_SIZE):
#     2 epochs with default flags and --workers 2, then resumed from its checkpoint for
#     epoch 3 with --no-cuda_graphs, 4 with --amp --amp_dtype float16, 5 with --amp
#     (bfloat16), 6 with --deterministic; a second-order epoch; 2 epochs with
#     --arch_warmup_epochs 1 --hessian_every 1 (the warm-up graph, then the bilevel one,
#     the eigenvalue after each); an epoch with --partial_channels 4; an epoch written on
#     the CPU (CUDA_VISIBLE_DEVICES= , CPU_SEARCH_SIZE) resumed into graphs for a second;
#     an epoch under torchrun with one process;
#   training with evaluation every epoch (train_CIFAR10.py, TRAIN_SIZE): 2 epochs, then
#     resumed for epoch 3 with --no-cuda_graphs, 4 with float16, 5 with --amp
#     --deterministic.
# Per run it prints whether CUDA graphs were used (or why not), and per epoch the
# training images/s and seconds per iteration; a table of all runs at the end.  The
# whole script stops, failing, once BUDGET seconds (480: 8 minutes) are spent.
#     bash bench/gpu_smoke.sh /path/to/cifar10-mini [output directory]
#     SEARCH_SIZE="--init_ch 4 --layers 3 --batchsz 8" CPU_SEARCH_SIZE="$SEARCH_SIZE" \
#       TRAIN_SIZE="--init_ch 4 --layers 3 --batchsz 8" BUDGET=3600 bash bench/gpu_smoke.sh DATA
# DATA: a folder with train/<class>/ and val/<class>/ images (the device gets only the
# working tree: pass the data's path there).  On a CPU give it a few images per class.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash bench/gpu_smoke.sh DATA [OUTPUT]}
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
SEARCH_SIZE=${SEARCH_SIZE:-}
# Small enough for the host's CPUs, large enough for a capture and replays on the GPU.
CPU_SEARCH_SIZE=${CPU_SEARCH_SIZE:---init_ch 8 --layers 5 --batchsz 16 --train_portion 0.1}
TRAIN_SIZE=${TRAIN_SIZE:---init_ch 16 --layers 8 --batchsz 96}
BUDGET=${BUDGET:-480}
GPU=$(python -c "import torch; print('yes' if torch.cuda.is_available() else 'no')")
python -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU (no CUDA): graphs are expected off')"
SUMMARY="$OUT/summary.txt"
printf '%-54s %-9s %s\n' run graphs "per epoch: img/s, s/it" > "$SUMMARY"

# run TITLE EXPECT DIR COMMAND...: the command under what is left of the budget (its
# output in OUT/*.out, shown when it fails), then what the run under DIR logged
# meanwhile: whether graphs were used, and each epoch's speed.  EXPECT: whether a GPU
# run must use graphs (on) or must not (off); on the CPU every run must not.
run() {
  local title=$1 expect=$2 dir=$3 started=$SECONDS before=0 left=$((BUDGET - SECONDS))
  local output log new modes graphs speeds
  shift 3
  output="$OUT/$(echo "$title" | tr -c 'a-zA-Z0-9' _).out"
  [[ $GPU == yes ]] || expect=off
  if ((left < 10)); then
    echo "== FAILED: out of the ${BUDGET}s budget before: $title"
    exit 1
  fi
  log=$(ls "$dir"/*/log.txt 2>/dev/null | head -n 1 || true)
  [[ -n $log ]] && before=$(wc -l < "$log")
  echo "== $title: $*"
  if ! timeout "$left" "$@" > "$output" 2>&1; then
    tail -n 40 "$output"
    echo "== FAILED: $title (output in $output; exit status 124: out of the ${BUDGET}s budget)"
    exit 1
  fi
  log=$(ls "$dir"/*/log.txt | head -n 1)
  new=$(tail -n +$((before + 1)) "$log")
  if grep -q "continues without CUDA graphs" <<< "$new"; then
    grep "CUDA graphs:" <<< "$new" | sed 's/^/   /'
    echo "== FAILED: $title fell back to eager steps (log: $log)"
    exit 1
  fi
  modes=$(grep -o "CUDA graphs o[nf]\+ ([^)]*)" <<< "$new" | tail -n 1 || true)
  graphs=$([[ $modes == "CUDA graphs on"* ]] && echo used || echo "not used")
  speeds=$(grep -o "epoch [0-9]*/[0-9]* .* \([0-9]* img/s, [0-9.]* s/it\)" <<< "$new" \
           | sed 's/^epoch \([0-9]*\)\/[0-9]* .* \([0-9]* img\/s, [0-9.]* s\/it\)/\1: \2/' \
           | paste -sd ';' - || true)
  echo "   graphs $graphs: $modes"
  echo "   per epoch: ${speeds:-no epoch line}   ($((SECONDS - started)) s)"
  printf '%-54s %-9s %s\n' "$title" "$graphs" "${speeds:-}" >> "$SUMMARY"
  if [[ ($expect == on && $graphs != used) || ($expect == off && $graphs == used) ]]; then
    echo "== FAILED: $title: graphs $graphs, expected $expect (log: $log)"
    exit 1
  fi
}

# shellcheck disable=SC2086  # the size flags are word lists
SEARCH=(python train_search.py --data "$DATA" --workers 2 $SEARCH_SIZE)
run "search, 2 epochs, default flags" on "$OUT/search" \
  "${SEARCH[@]}" --epochs 2 --exp_path "$OUT/search"
RUN=$(ls -d "$OUT"/search/*/ | head -n 1)
run "search resumed: epoch 3, --no-cuda_graphs" off "$OUT/search" \
  "${SEARCH[@]}" --epochs 3 --checkpoint_path "$RUN" --no-cuda_graphs
run "search resumed: epoch 4, --amp --amp_dtype float16" off "$OUT/search" \
  "${SEARCH[@]}" --epochs 4 --checkpoint_path "$RUN" --amp --amp_dtype float16
run "search resumed: epoch 5, --amp (bfloat16)" on "$OUT/search" \
  "${SEARCH[@]}" --epochs 5 --checkpoint_path "$RUN" --amp
run "search resumed: epoch 6, --deterministic" on "$OUT/search" \
  "${SEARCH[@]}" --epochs 6 --checkpoint_path "$RUN" --deterministic
run "search, second order, 1 epoch" on "$OUT/second" \
  "${SEARCH[@]}" --epochs 1 --unrolled --exp_path "$OUT/second"
run "search, --arch_warmup_epochs 1 --hessian_every 1" on "$OUT/warmup" \
  "${SEARCH[@]}" --epochs 2 --arch_warmup_epochs 1 --hessian_every 1 --hessian_images 64 \
  --hessian_iterations 5 --exp_path "$OUT/warmup"
run "search, --partial_channels 4, 1 epoch" on "$OUT/partial" \
  "${SEARCH[@]}" --epochs 1 --partial_channels 4 --exp_path "$OUT/partial"
# shellcheck disable=SC2086
CPU_SEARCH=(python train_search.py --data "$DATA" --workers 2 $CPU_SEARCH_SIZE)
CUDA_VISIBLE_DEVICES="" run "search on the CPU (CUDA hidden), 1 epoch" off "$OUT/cpu" \
  "${CPU_SEARCH[@]}" --epochs 1 --exp_path "$OUT/cpu"
RUN=$(ls -d "$OUT"/cpu/*/ | head -n 1)
run "search resumed into graphs from the CPU: epoch 2" on "$OUT/cpu" \
  "${CPU_SEARCH[@]}" --epochs 2 --checkpoint_path "$RUN"
# shellcheck disable=SC2086
run "search under torchrun, 1 process, 1 epoch" off "$OUT/torchrun" \
  python -m torch.distributed.run --standalone --nproc_per_node 1 train_search.py \
  --data "$DATA" --workers 2 $SEARCH_SIZE --epochs 1 --exp_path "$OUT/torchrun"

# shellcheck disable=SC2086
TRAIN=(python train_CIFAR10.py --data "$DATA" --workers 2 $TRAIN_SIZE)
run "training, 2 epochs, default flags" on "$OUT/train" \
  "${TRAIN[@]}" --epochs 2 --exp_path "$OUT/train"
RUN=$(ls -d "$OUT"/train/*/ | head -n 1)
run "training resumed: epoch 3, --no-cuda_graphs" off "$OUT/train" \
  "${TRAIN[@]}" --epochs 3 --checkpoint_path "$RUN" --no-cuda_graphs
run "training resumed: epoch 4, --amp --amp_dtype float16" off "$OUT/train" \
  "${TRAIN[@]}" --epochs 4 --checkpoint_path "$RUN" --amp --amp_dtype float16
run "training resumed: epoch 5, --amp --deterministic" on "$OUT/train" \
  "${TRAIN[@]}" --epochs 5 --checkpoint_path "$RUN" --amp --deterministic
echo "== smoke: every run succeeded in ${SECONDS}s (outputs in $OUT)"
cat "$SUMMARY"
