"""What the search's diagnostics and its curvature tracking cost, as a share of a search
epoch, on this machine.

    python bench/diagnostics.py            # paper supernet on the CPU (~10 min on 2 cores)
    python bench/diagnostics.py --device cuda --batch 64

On the paper's supernet (C=16, 8 cells, after_every; recomputed cells and, on the
CPU, channels-last, as train_search.py runs it) with random images, it times:

- one search iteration (``searching.search_step``), first and second order; a search
  epoch is estimated as that times the iterations of a CIFAR-10 epoch (25,000 images
  of the weight half / batch);
- the per-epoch diagnostics: ``diagnostics.epoch_diagnostics`` with its log lines and
  metrics.csv columns, and the rewrite of a 50-row metrics.csv;
- one power iteration of the Hessian eigenvalue (one Hessian-vector product over the
  fixed subset, ``--hessian_images`` at the search batch size); an eigenvalue takes at
  most ``--hessian_iterations`` of them (train_search.py's defaults: 256 images, 20).

Times are medians of ``--steps`` repetitions after one untimed warm-up (the power
iteration: the mean over ``--iterations`` in one measurement).
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_search  # noqa: E402
from architect import Architect  # noqa: E402
from model_search import Network  # noqa: E402
from runtime import curvature  # noqa: E402
from runtime.diagnostics import describe, epoch_diagnostics, scalars  # noqa: E402
from runtime.metrics import Metrics  # noqa: E402
from runtime.precision import Precision, memory_format, resolve_channels_last  # noqa: E402
from runtime.searching import search_step  # noqa: E402

DEFAULTS = train_search.parser.parse_args([])
CIFAR10_WEIGHT_HALF = 25_000

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--batch", type=int, default=16, help="search batch size")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--steps", type=int, default=3, help="timed search iterations per order")
parser.add_argument("--hessian_images", type=int, default=DEFAULTS.hessian_images,
                    help="subset size of the eigenvalue (train_search.py's default)")
parser.add_argument("--iterations", type=int, default=1, help="power iterations timed")


def median_seconds(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall time of ``repeats`` calls after one untimed warm-up."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parser.parse_args()
    device = torch.device(args.device)
    channels_last = resolve_channels_last("auto", device)
    fmt = memory_format(channels_last)
    torch.manual_seed(0)
    network = Network(16, 10, 8, nn.CrossEntropyLoss(), "after_every", recompute=True)
    network.to(device, memory_format=fmt)
    precision = Precision(False, "bfloat16", device)

    def images(count: int):
        return (torch.randn(count, 3, 32, 32, device=device).to(memory_format=fmt),
                torch.randint(0, 10, (count,), device=device))

    train, valid = images(args.batch), images(args.batch)
    iterations_per_epoch = CIFAR10_WEIGHT_HALF // args.batch
    print(f"torch {torch.__version__}, {args.device} "
          f"({torch.get_num_threads()} threads), supernet C=16, 8 cells, after_every, batch "
          f"{args.batch}, {'channels-last' if channels_last else 'contiguous'}, cells recomputed "
          f"in backward; a CIFAR-10 search epoch = {iterations_per_epoch} iterations", flush=True)

    epoch_seconds = {}
    for order in (1, 2):
        optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=order == 2)
        network.train()
        step = median_seconds(lambda: search_step(network, architect, optimizer, precision, train,
                                                  valid, 0.025, 5.0), args.steps, device)
        epoch_seconds[order] = step * iterations_per_epoch
        print(f"search iteration, {'first' if order == 1 else 'second'} order: {step:.2f} s "
              f"-> epoch {epoch_seconds[order] / 3600:.2f} h", flush=True)

    def share(seconds: float) -> str:
        return (f"{100 * seconds / epoch_seconds[1]:.2g}% of a first-order epoch, "
                f"{100 * seconds / epoch_seconds[2]:.2g}% of a second-order one")

    previous = network.genotype()

    def diagnose() -> None:
        genotype = network.genotype()
        stats = epoch_diagnostics(network, genotype, previous)
        describe(stats, "epoch 1")
        scalars(stats)

    diagnostics_seconds = median_seconds(diagnose, 20, device)
    stats = epoch_diagnostics(network, network.genotype(), previous)
    with tempfile.TemporaryDirectory() as directory:
        metrics = Metrics(directory)
        row = {"lr": 0.025, "train_loss": 2.0, **scalars(stats)}
        for epoch in range(1, 50):
            metrics.write(epoch, row)
        csv_seconds = median_seconds(lambda: metrics.write(50, row), 20, device)
        metrics.close()
    print(f"per-epoch diagnostics: {1e3 * diagnostics_seconds:.1f} ms (genotype, counts, "
          f"entropies, log lines) + {1e3 * csv_seconds:.1f} ms (metrics.csv at 50 rows) = "
          f"{share(diagnostics_seconds + csv_seconds)}", flush=True)

    subset = [images(min(args.batch, args.hessian_images - start))
              for start in range(0, args.hessian_images, args.batch)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    synchronize(device)
    started = time.perf_counter()
    result = curvature.dominant_eigenvalue(network, subset, args.iterations)
    synchronize(device)
    per_iteration = (time.perf_counter() - started) / result.iterations
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    eigenvalue = per_iteration * DEFAULTS.hessian_iterations
    print(f"eigenvalue on {args.hessian_images} images ({len(subset)} batches of {args.batch}): "
          f"{per_iteration:.1f} s per power iteration = {share(per_iteration)}; at most "
          f"{DEFAULTS.hessian_iterations} iterations (--hessian_iterations): "
          f"{eigenvalue / 60:.1f} min = {share(eigenvalue)}; peak resident memory "
          f"{rss:.1f} GB (before it {rss_before:.1f} GB)", flush=True)


if __name__ == "__main__":
    main()
