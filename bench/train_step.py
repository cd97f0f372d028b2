"""Speed of the final CIFAR network on this machine's CPU: seconds per training step
and evaluation images per second.

    python bench/train_step.py                # about 1-2 minutes on 2 cores
    python bench/train_step.py --profile      # plus the top ops of one training step

The training step is the one train_CIFAR10.py runs (training.train_step): the full
NetworkCIFAR(36, 10, 20, auxiliary=True, Att_DARTS), drop-path 0.2, main plus
auxiliary loss, gradient clipping and an SGD step.  Each figure is the median over
``--steps`` timed repetitions after ``--warmup`` untimed ones.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import training  # noqa: E402
from genotypes import Att_DARTS  # noqa: E402
from model import NetworkCIFAR  # noqa: E402
from precision import Precision, memory_format  # noqa: E402

parser = argparse.ArgumentParser(description="Seconds per training step and evaluation images "
                                             "per second of the full CIFAR network on the CPU.")
parser.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
parser.add_argument("--steps", type=int, default=3, help="timed repetitions (default: %(default)s)")
parser.add_argument("--warmup", type=int, default=1,
                    help="untimed repetitions first (default: %(default)s)")
parser.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: PyTorch's choice; on a busy machine 1 gives "
                         "steadier figures)")
parser.add_argument("--channels_last", action="store_true",
                    help="channels-last memory layout for the network and the images")
parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as the train scripts' --amp")
parser.add_argument("--profile", action="store_true",
                    help="also profile one training step and print the ops taking the most time")


def median_seconds(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = NetworkCIFAR(36, 10, 20, True, Att_DARTS)
    model.drop_path_prob = 0.2
    criterion = nn.CrossEntropyLoss()
    precision = Precision(args.amp, "bfloat16", device)
    layout = memory_format(args.channels_last)
    model.to(device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    images = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    targets = torch.randint(0, 10, (args.batch,), device=device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train() -> None:
        training.train_step(model, images, targets, criterion, optimizer, precision,
                            auxiliary_weight=0.4, grad_clip=5.0)
        synchronize()

    @torch.no_grad()
    def evaluate() -> None:
        with precision.autocast():
            model(images)
        synchronize()

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}"
          f"{', channels-last' if args.channels_last else ''}{', bf16 autocast' if args.amp else ''}")
    model.train()
    train_seconds = median_seconds(train, args.warmup, args.steps)
    print(f"train step: {train_seconds:.3f} s ({args.batch / train_seconds:.1f} images/s)")
    model.eval()
    eval_seconds = median_seconds(evaluate, args.warmup, args.steps)
    print(f"evaluation: {args.batch / eval_seconds:.1f} images/s ({eval_seconds:.3f} s per batch)")

    if args.profile:
        model.train()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            train()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
