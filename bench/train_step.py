"""A training step of the final CIFAR network beside the original release's, on this machine.

    python bench/train_step.py                # about 2 minutes on 2 cores
    python bench/train_step.py --count_only   # ATen ops of one step, both
    python bench/train_step.py --device cuda --batch 96 --also=--amp --also=--channels_last
    python bench/train_step.py --profile      # the top ops of one project training step

The step is the one train_CIFAR10.py runs (``training.train_step``): the full
NetworkCIFAR(36, 10, 20, auxiliary=True, Att_DARTS), drop-path 0.2, main plus
auxiliary loss, gradient clipping and a foreach SGD step on static random 32x32
images; on CUDA captured in a CUDA graph and replayed, as the training scripts do by
default (``cuda_graphs.StepGraph``: its eager warm-up steps and the capture are not
timed).  The original's step (``original_step.py train``) runs in its own process
on the same device right after, with the same warm-up and number of timed steps.
Printed: images/s of both and the speed-up, peak memory of both (resident set on the
CPU, GPU memory allocated on CUDA), the project's evaluation images/s (a no-grad
forward in eval mode, graphed too), and the ATen ops one training step of each
dispatches (on the CPU at batch 2, after a warm-up step; ratio project / original):
on a GPU, where a step is launch-bound, that number is its cost.  ``--also=FLAGS``
adds project rows with FLAGS on top of the command line's, beside the same original
run.  Figures are medians.
"""
import argparse
import json
import os
import shlex
import sys
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.side_by_side import (COUNT_BATCH, add_side_by_side_flags, count_original,  # noqa: E402
                                figure, find_baseline, machine, median_seconds, original,
                                peak_rss_mb, project, ratio, run_one)
from runtime.cuda_graphs import add_cuda_graph_flag  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--batch", type=int, default=32, help="batch size")
parser.add_argument("--steps", type=int, default=3, help="timed repetitions")
parser.add_argument("--warmup", type=int, default=1,
                    help="untimed repetitions first (with CUDA graphs at least the graph's "
                         "eager warm-up steps plus the capture)")
parser.add_argument("--init_ch", type=int, default=36, help="network width C")
parser.add_argument("--layers", type=int, default=20, help="cells")
parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                    help="channels-last memory layout for the project's network and images")
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as the train scripts' --amp")
add_cuda_graph_flag(parser)
add_side_by_side_flags(parser)
parser.add_argument("--also", action="append", default=[], metavar="FLAGS",
                    help="one more project row with these flags added, e.g. --also='--amp "
                         "--channels_last' (repeatable)")
parser.add_argument("--profile", action="store_true",
                    help="profile one project training step and print the ops taking the most time")
parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the project, as JSON

GRAPH_WARMUP = 3  # eager training steps before the capture, as the training scripts'
EVAL_GRAPH_WARMUP = 1
Step = Callable[[], object]


def build(config: Dict, device_name: str, batch: int, graphs: bool) -> Tuple[Step, Step, object]:
    """The project's training step and evaluation forward as the training scripts build
    them, on a static random batch, each wrapped in a StepGraph (eager unless
    ``graphs``); and the network, whose mode the caller sets."""
    import torch
    import torch.nn as nn

    from genotypes import Att_DARTS
    from model import NetworkCIFAR
    from runtime import training
    from runtime.cuda_graphs import StepGraph
    from runtime.precision import Precision, memory_format

    torch.manual_seed(0)
    device = torch.device(device_name)
    layout = memory_format(config["channels_last"])
    network = NetworkCIFAR(config["init_ch"], 10, config["layers"], True, Att_DARTS)
    network.drop_path_prob = 0.2
    network.to(device, memory_format=layout)
    criterion = nn.CrossEntropyLoss()
    precision = Precision(config["amp"], "bfloat16", device)
    optimizer = torch.optim.SGD(network.parameters(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    targets = torch.randint(0, 10, (batch,), device=device)

    def train(x, y):
        return training.train_step(network, x, y, criterion, optimizer, precision,
                                   auxiliary_weight=0.4, grad_clip=5.0)

    @torch.no_grad()
    def forward(x):
        with precision.autocast():
            return network(x)[0]

    train_graph = StepGraph(train, enabled=graphs, warmup=GRAPH_WARMUP)
    eval_graph = StepGraph(forward, enabled=graphs, warmup=EVAL_GRAPH_WARMUP)
    return (lambda: train_graph(images, targets)), (lambda: eval_graph(images)), network


def time_steps(config: Dict) -> Dict:
    """Median seconds of a training step and of an evaluation forward, peak memory."""
    import torch

    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    train, evaluate, network = build(config, config["device"], config["batch"], config["cuda_graphs"])

    def synchronized(step: Step) -> Callable[[], None]:
        def run() -> None:
            step()
            if cuda:
                torch.cuda.synchronize()
        return run

    graphs = config["cuda_graphs"]
    network.train()
    train_warmup = max(config["warmup"], GRAPH_WARMUP + 1) if graphs else config["warmup"]
    result = {"seconds": median_seconds(synchronized(train), train_warmup, config["steps"]),
              "peak_rss_mb": peak_rss_mb()}
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    network.eval()
    eval_warmup = max(config["warmup"], EVAL_GRAPH_WARMUP + 1) if graphs else config["warmup"]
    result["eval_seconds"] = median_seconds(synchronized(evaluate), eval_warmup, config["steps"])
    return result


def count_step(config: Dict) -> int:
    """ATen ops of one eager training step on the CPU at batch 2, after a warm-up one."""
    from runtime.dispatch import OpCounter

    train, _, network = build(config, "cpu", COUNT_BATCH, graphs=False)
    network.train()
    train()
    with OpCounter() as ops:
        train()
    return ops.total


def profile_step(config: Dict) -> None:
    import torch

    train, _, network = build(config, config["device"], config["batch"], graphs=False)
    network.train()
    train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        train()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def resolved(args: argparse.Namespace) -> Dict:
    """The configuration's flags as the training scripts resolve them on ``--device``."""
    import torch

    from runtime.cuda_graphs import use_cuda_graphs

    return {"batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "init_ch": args.init_ch, "layers": args.layers, "threads": args.threads,
            "channels_last": bool(args.channels_last), "device": args.device, "amp": args.amp,
            "cuda_graphs": use_cuda_graphs(args.cuda_graphs, torch.device(args.device))[0],
            "time": not args.count_only, "count": args.count or args.count_only}


def describe(config: Dict) -> str:
    return ", ".join(["channels-last" if config["channels_last"] else "contiguous",
                      "CUDA graphs" if config["cuda_graphs"] else "eager",
                      "bf16 autocast" if config["amp"] else "fp32"])


def variants(args: argparse.Namespace) -> List[Tuple[str, Dict]]:
    """The command line's configuration, then one per --also (its flags added on top)."""
    argv = sys.argv[1:]
    return [("base", resolved(args))] + [
        (extra, resolved(parser.parse_args(argv + shlex.split(extra)))) for extra in args.also]


def images_per_second(batch: int, seconds: Optional[float]) -> str:
    return "-" if not seconds else f"{batch / seconds:.0f}"


def header(args: argparse.Namespace, configs: List[Tuple[str, Dict]]) -> str:
    import torch

    timing = "op counts only" if args.count_only else (
        f"batch {args.batch}, median of {args.steps} after {args.warmup} warm-up (project with "
        f"CUDA graphs: after at least {GRAPH_WARMUP + 1})")
    lines = [f"torch {torch.__version__}, {machine(args.device, args.threads)}, "
             f"NetworkCIFAR({args.init_ch}, 10, {args.layers}, auxiliary, Att_DARTS); {timing}; "
             f"ops: one training step on the CPU at batch {COUNT_BATCH}"]
    lines += [f"  {label}: {describe(config)}" for label, config in configs]
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    columns = (f"{'project s':>9} {'img/s':>6} {'eval/s':>7} {'MB':>7} | {'original s':>10} "
               f"{'img/s':>6} {'MB':>7} | {'speed-up':>8} {'memory':>7} | {'ops':>7} "
               f"{'orig ops':>8} {'ops ratio':>9} | variant")
    lines += [f"(MB: {memory}; eval/s: the project's evaluation images/s; speed-up and memory: "
              f"original / project; ops ratio: project / original)", columns, "-" * len(columns)]
    return "\n".join(lines)


def row(batch: int, label: str, mine: Dict, theirs: Optional[Dict], their_ops: Optional[int],
        memory: str) -> str:
    theirs = theirs or {}
    text = (f"{figure(mine.get('seconds'), 3):>9} {images_per_second(batch, mine.get('seconds')):>6} "
            f"{images_per_second(batch, mine.get('eval_seconds')):>7} {figure(mine.get(memory), 0):>7} | "
            f"{figure(theirs.get('sec_per_iter'), 3):>10} "
            f"{images_per_second(batch, theirs.get('sec_per_iter')):>6} "
            f"{figure(theirs.get(memory), 0):>7} | "
            f"{ratio(theirs.get('sec_per_iter'), mine.get('seconds')):>8} "
            f"{ratio(theirs.get(memory), mine.get(memory)):>7} | {mine.get('ops', '-'):>7} "
            f"{their_ops or '-':>8} {ratio(mine.get('ops'), their_ops):>9} | {label}")
    for who, figures in (("project", mine), ("original", theirs)):
        if "error" in figures:
            text += f"\n    ({who}: {figures['error']})"
    return text


def main() -> None:
    args = parser.parse_args()
    measures = (profile_step, time_steps, count_step)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), *measures)))
        return
    configs = variants(args)
    if args.profile:
        run_one({**configs[0][1], "profile": True}, *measures)
        return
    baseline = find_baseline(args.baseline) if args.with_original else None
    timed_baseline = None if args.count_only else baseline
    if timed_baseline and (args.init_ch, args.layers) != (36, 20):
        timed_baseline = None
        print("(the original is timed at NetworkCIFAR(36, 10, 20) only: no time or memory ratios)")
    print(header(args, configs), flush=True)
    counting = args.count or args.count_only
    size = ["--init_ch", str(args.init_ch), "--layers", str(args.layers)]
    their_ops = count_original(baseline, "train", size) if counting else None
    theirs = original(timed_baseline, "train", ["--batch", str(args.batch)], args.warmup,
                      args.steps, args.threads, args.device)
    memory = "peak_gpu_mb" if args.device == "cuda" else "peak_rss_mb"
    for label, config in configs:
        mine = project(__file__, config)
        print(row(args.batch, label, mine, theirs, their_ops, memory), flush=True)


if __name__ == "__main__":
    main()
