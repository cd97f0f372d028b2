"""PC-DARTS's partial channels (--partial_channels K) against every channel (K=1), side by
side in one process on this machine: search memory, iteration time, the largest batch
at K that fits the memory K=1 needs, and the ATen ops one iteration dispatches.

    python bench/partial_channels.py                      # K=4 vs 1, batch 64, C=16, 8 cells
    python bench/partial_channels.py --layers 5 --time_batch 16   # shorter
    python bench/partial_channels.py --dataset imagenet --location after_every \
        --batch 16 --time_batch 8                         # the ImageNet search: K=2 vs 1

One iteration is train_search.py's (``searching.search_step``: architecture step, then
weight step), first order, cells kept for backward (the GPU default), random images:
32x32 and 10 classes for the CIFAR supernet, 224x224 and 1000 classes for the ImageNet
one (``--dataset imagenet``: ``NetworkImageNet``, K defaulting to the one of
train_search.py's --preset pc_darts_imagenet).  Memory: the peak bytes of tensor storages alive during the iteration, followed
op by op (``complexity.LiveTensorBytes``: weights, optimizer state and batches
included), exact and independent of the machine's load.  Time: the median of
``--steps`` iterations after a warm-up, K=1 and K alternating so that a shared CPU's
load falls on both alike.  Ops: ``dispatch.OpCounter`` over one iteration at batch 2.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from architect import Architect  # noqa: E402
from model_search import Network, NetworkImageNet  # noqa: E402
from runtime.complexity import LiveTensorBytes  # noqa: E402
from runtime.dispatch import OpCounter  # noqa: E402
from runtime.precision import Precision  # noqa: E402
from runtime.searching import SEARCH_PRESETS, search_step  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--dataset", choices=["cifar10", "imagenet"], default="cifar10",
                    help="which supernet: CIFAR's, or ImageNet's (stride-8 stem, 224x224 images)")
parser.add_argument("--partial_channels", type=int, default=None,
                    help="K compared with K=1 (default: 4, PC-DARTS's CIFAR K; with --dataset "
                         "imagenet the K of --preset pc_darts_imagenet)")
parser.add_argument("--location", default="no_attention", help="attention location")
parser.add_argument("--batch", type=int, default=64, help="batch of the memory comparison")
parser.add_argument("--time_batch", type=int, default=32, help="batch of the timed iterations")
parser.add_argument("--init_ch", type=int, default=16, help="supernet width C")
parser.add_argument("--layers", type=int, default=8, help="supernet cells")
parser.add_argument("--steps", type=int, default=3, help="timed iterations per K (median)")
parser.add_argument("--batch_step", type=int, default=8, help="granularity of the largest batch")

CPU = torch.device("cpu")
SIZE = {"cifar10": 32, "imagenet": 224}
CLASSES = {"cifar10": 10, "imagenet": 1000}
Iteration = Callable[[int], None]


def iteration_of(args: argparse.Namespace, K: int) -> Tuple[Network, Iteration]:
    """A supernet with K partial channels (edge normalisation with K > 1) and a function
    running one search iteration on random batches of a given size."""
    torch.manual_seed(0)
    supernet = NetworkImageNet if args.dataset == "imagenet" else Network
    network = supernet(args.init_ch, CLASSES[args.dataset], args.layers, nn.CrossEntropyLoss(),
                       args.location, image_size=SIZE[args.dataset], partial_channels=K,
                       edge_norm=K > 1).train()
    optimizer = torch.optim.SGD(network.weights(), 0.1, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    architect = Architect(network, optimizer, 6e-4, 1e-3, unrolled=False)
    precision = Precision(False, "bfloat16", CPU)

    def run(batch: int) -> None:
        size = SIZE[args.dataset]
        images = torch.randn(2, batch, 3, size, size)
        targets = torch.randint(0, CLASSES[args.dataset], (2, batch))
        search_step(network, architect, optimizer, precision, (images[0], targets[0]),
                    (images[1], targets[1]), 0.1, 5.0)
    return network, run


def peak_bytes(network: Network, run: Iteration, batch: int) -> int:
    state = [t for group in (network.parameters(), network.buffers()) for t in group]
    with LiveTensorBytes(state) as live:
        run(batch)
    return live.peak


def largest_batch(network: Network, run: Iteration, budget: int, start: int, step: int) -> int:
    """The largest multiple of ``step`` whose iteration peaks within ``budget`` bytes,
    searched from ``start`` (a guess) by measuring."""
    batch = max(step, start // step * step)
    fits = peak_bytes(network, run, batch) <= budget
    while True:
        candidate = batch + step if fits else batch - step
        if candidate < step:
            return 0
        candidate_fits = peak_bytes(network, run, candidate) <= budget
        if fits and not candidate_fits:
            return batch
        if not fits and candidate_fits:
            return candidate
        batch = candidate


def op_count(run: Iteration) -> int:
    run(2)  # lazy state (optimizers) first
    with OpCounter() as ops:
        run(2)
    return ops.total


def main() -> None:
    args = parser.parse_args()
    if args.partial_channels is None:
        args.partial_channels = (SEARCH_PRESETS["pc_darts_imagenet"]["partial_channels"]
                                 if args.dataset == "imagenet" else 4)
    K = args.partial_channels
    started = time.time()
    runs: Dict[int, Tuple[Network, Iteration]] = {k: iteration_of(args, k) for k in (1, K)}
    memory = {k: peak_bytes(*runs[k], args.batch) for k in (1, K)}
    # Memory grows about linearly with the batch: a first guess, then measurements.
    guess = int(args.batch * memory[1] / memory[K])
    biggest = largest_batch(*runs[K], memory[1], guess, args.batch_step)
    biggest_memory = peak_bytes(*runs[K], biggest)
    seconds: Dict[int, list] = {1: [], K: []}
    for k in (1, K):
        runs[k][1](args.time_batch)  # warm-up
    for _ in range(args.steps):
        for k in (1, K):
            tick = time.perf_counter()
            runs[k][1](args.time_batch)
            seconds[k].append(time.perf_counter() - tick)
    ops = {k: op_count(runs[k][1]) for k in (1, K)}
    median = {k: statistics.median(seconds[k]) for k in (1, K)}
    mib = 2 ** 20
    print(f"partial channels K={K} vs K=1: {args.dataset} supernet ({SIZE[args.dataset]}x"
          f"{SIZE[args.dataset]} images), {args.location}, C={args.init_ch}, {args.layers} cells, "
          f"first order, cells kept; {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the end, {time.time() - started:.0f}s in all")
    print(f"| | K=1 | K={K} | K={K} / K=1 |")
    print("|---|---|---|---|")
    print(f"| peak memory, batch {args.batch} (MiB) | {memory[1] / mib:.0f} | {memory[K] / mib:.0f} "
          f"| {memory[K] / memory[1]:.2f} |")
    print(f"| iteration time, batch {args.time_batch} (s, median of {args.steps}) | "
          f"{median[1]:.2f} | {median[K]:.2f} | {median[K] / median[1]:.2f} |")
    print(f"| ATen ops per iteration | {ops[1]} | {ops[K]} | {ops[K] / ops[1]:.2f} |")
    print(f"| largest batch within K=1's memory at batch {args.batch} | {args.batch} | {biggest} "
          f"({biggest_memory / mib:.0f} MiB) | {biggest / args.batch:.2f} |")


if __name__ == "__main__":
    main()
