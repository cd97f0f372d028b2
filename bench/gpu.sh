#!/usr/bin/env bash
# One prepared GPU benchmark (about 5 minutes on one H100-class GPU):
# search seconds/iteration and peak GPU memory at the paper's settings
# (batch 64, C=16, 8 cells, after_every), first and second order, fp32 and
# --amp (bf16), with and without --channels_last (cells recomputed in backward,
# the search's default), and fp32 without recomputation; then training
# seconds/step of NetworkCIFAR(36, 10, 20, auxiliary, Att_DARTS) at batch 96.
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

for amp in "" "--amp"; do
  for layout in "--no-channels_last" "--channels_last"; do
    echo "== search: ${amp:-fp32} ${layout}"
    python bench/search_step.py --device cuda --batch 64 --locations after_every \
      --steps 5 --warmup 2 $amp $layout
  done
done
echo "== search: fp32 contiguous --no-recompute"
python bench/search_step.py --device cuda --batch 64 --locations after_every \
  --steps 5 --warmup 2 --no-recompute
for amp in "" "--amp"; do
  for layout in "" "--channels_last"; do
    echo "== train: ${amp:-fp32} ${layout:-contiguous}"
    python bench/train_step.py --device cuda --batch 96 --steps 10 --warmup 3 $amp $layout
  done
done
