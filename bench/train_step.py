"""A training step of the final CIFAR network beside the original release's, on this machine.

    python bench/train_step.py                # about 2 minutes on 2 cores
    python bench/train_step.py --profile      # the top ops of one project training step

The step is the one train_CIFAR10.py runs (``training.train_step``): the full
NetworkCIFAR(36, 10, 20, auxiliary=True, Att_DARTS), drop-path 0.2, main plus
auxiliary loss, gradient clipping and an SGD step on random 32x32 images.  The
original's step (``../shared/baseline/original_step.py train``) runs in its own
process right after the project's, with the same warm-up and number of timed
steps; the project's evaluation speed (images/s of a no-grad forward) is printed
too.  Figures are medians.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.side_by_side import add_side_by_side_flags, find_baseline, original, project, ratio  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--batch", type=int, default=32, help="batch size")
parser.add_argument("--steps", type=int, default=3, help="timed repetitions")
parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
parser.add_argument("--channels_last", action="store_true",
                    help="channels-last memory layout for the project's network and images")
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as the train scripts' --amp")
add_side_by_side_flags(parser)
parser.add_argument("--profile", action="store_true",
                    help="profile one project training step and print the ops taking the most time")
parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the project, as JSON


def median_seconds(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_one(config: dict) -> dict:
    """Time the project's training step and evaluation in this process."""
    import torch
    import torch.nn as nn
    import training
    from genotypes import Att_DARTS
    from model import NetworkCIFAR
    from precision import Precision, memory_format

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    network = NetworkCIFAR(36, 10, 20, True, Att_DARTS)
    network.drop_path_prob = 0.2
    criterion = nn.CrossEntropyLoss()
    precision = Precision(config["amp"], "bfloat16", device)
    layout = memory_format(config["channels_last"])
    network.to(device, memory_format=layout)
    optimizer = torch.optim.SGD(network.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    images = torch.randn(config["batch"], 3, 32, 32, device=device).contiguous(memory_format=layout)
    targets = torch.randint(0, 10, (config["batch"],), device=device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train() -> None:
        training.train_step(network, images, targets, criterion, optimizer, precision,
                            auxiliary_weight=0.4, grad_clip=5.0)
        synchronize()

    @torch.no_grad()
    def evaluate() -> None:
        with precision.autocast():
            network(images)
        synchronize()

    network.train()
    if config.get("profile"):
        train()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            train()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return {}
    train_seconds = median_seconds(train, config["warmup"], config["steps"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    network.eval()
    eval_seconds = median_seconds(evaluate, config["warmup"], config["steps"])
    return {"seconds": train_seconds, "peak_rss_mb": peak, "eval_seconds": eval_seconds}


def main() -> None:
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    config = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "threads": args.threads, "channels_last": args.channels_last,
              "device": args.device, "amp": args.amp}
    if args.profile:
        run_one({**config, "profile": True})
        return
    import torch
    baseline = find_baseline(args.baseline) if args.with_original and args.device == "cpu" else None
    where = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"cpu ({torch.backends.cpu.get_cpu_capability()}), {args.threads or torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, NetworkCIFAR(36, 10, 20, auxiliary, Att_DARTS), "
          f"batch {args.batch}{', channels-last' if args.channels_last else ''}"
          f"{', bf16 autocast' if args.amp else ''}; median of {args.steps} after {args.warmup} warm-up")
    mine = project(__file__, config)
    print(f"project:  train step {mine['seconds']:.3f} s ({args.batch / mine['seconds']:.1f} images/s), "
          f"peak {mine['peak_rss_mb']:.0f} MB; evaluation {args.batch / mine['eval_seconds']:.1f} images/s",
          flush=True)
    theirs = original(baseline, "train", ["--batch", str(args.batch)], args.warmup, args.steps,
                      args.threads)
    if theirs:
        print(f"original: train step {theirs['sec_per_iter']:.3f} s, peak {theirs['peak_rss_mb']:.0f} MB")
        print(f"speed-up {ratio(theirs['sec_per_iter'], mine['seconds'])}, memory "
              f"{ratio(theirs['peak_rss_mb'], mine['peak_rss_mb'])} (original / project)")


if __name__ == "__main__":
    main()
