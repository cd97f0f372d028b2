"""A search iteration of the project beside the original release's, on this machine.

    python bench/search_step.py                  # paper supernet: 2 locations x batch 16, 32 x 1st/2nd order
    python bench/search_step.py --batch 16 --locations after_every
    python bench/search_step.py --count_only --batch 2   # ATen ops per iteration, both
    python bench/search_step.py --device cuda --batch 64 --also=--amp   # fp32 and bf16 rows
    python bench/search_step.py --profile        # top ops of one second-order iteration
    python bench/search_step.py --batch 16 --orders 1 --no-original \
        --also='--perturb_alpha adversarial'     # what a collapse fix adds (its flags)

One iteration is what train_search.py does per batch (``searching.search_step``):
the architecture step (first order: grad_A L_val; second order: virtual step and
finite difference) and the weight step, at the supernet of the paper (C=16, 8
cells, random 32x32 images), with train_search.py's defaults for the device unless
told otherwise: on the CPU channels-last and recomputation; on CUDA neither, and the
whole iteration captured in a CUDA graph and replayed (``cuda_graphs.StepGraph``,
static batches; its 3 eager warm-up steps and the capture are untimed).

For every (location, batch, order) the original's iteration
(``original_step.py search``) runs in its own process on the same device, with the
same warm-up and number of timed iterations: the table gives both, the speed-up and
the memory ratio (original / project; peak resident set size on the CPU, peak GPU
memory allocated on CUDA), and the project's second/first-order ratio.  Beside
them, the ATen ops one iteration dispatches (``dispatch.OpCounter``, on the CPU at
batch 2 with the row's flags, after a warm-up iteration): on a GPU, where a step is
launch-bound, that number is its cost; the ratio is project / original.
``--also=FLAGS`` adds project rows with FLAGS on top of the command line's (their own
--locations/--orders narrow where they appear), each beside the same original run.
A full CPU run takes about half an hour on two cores, the op counts (--no-count
leaves them out) several minutes more.
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
from runtime.collapse_fixes import EARLIER_FLAGS as PLAIN_FIXES  # noqa: E402
from runtime.collapse_fixes import add_variant_flags  # noqa: E402
from runtime.cuda_graphs import add_cuda_graph_flag  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--batch", type=int, nargs="+", default=[16, 32], help="batch sizes")
parser.add_argument("--locations", nargs="+", default=["after_every", "no_attention"],
                    help="attention locations")
parser.add_argument("--orders", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                    help="first and/or second order")
parser.add_argument("--init_ch", type=int, default=16, help="supernet width C")
parser.add_argument("--layers", type=int, default=8, help="supernet cells")
parser.add_argument("--steps", type=int, default=2, help="timed iterations (median)")
parser.add_argument("--warmup", type=int, default=1,
                    help="untimed iterations first (with CUDA graphs at least the graph's "
                         "eager warm-up steps plus the capture)")
parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default="auto",
                    help="channels-last layout (as train_search.py, 'auto': on for the CPU only)")
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default="auto",
                    help="recompute cells in backward (as train_search.py, 'auto': on for the CPU only)")
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast of the weight step (as --amp)")
add_cuda_graph_flag(parser)
add_side_by_side_flags(parser)
add_variant_flags(parser)  # train_search.py's collapse fixes (runtime/collapse_fixes.py)
parser.add_argument("--also", action="append", default=[], metavar="FLAGS",
                    help="one more project row per configuration, with these flags added, e.g. "
                         "--also='--amp' or --also='--recompute --orders 2' (repeatable)")
parser.add_argument("--profile", action="store_true",
                    help="profile one second-order iteration at the first location/batch instead")
parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one config as JSON

LR, GRAD_CLIP = 0.025, 5.0
GRAPH_WARMUP = 3  # eager steps before the capture, as train_search.py's StepGraph
Step = Callable[[], object]


def build(config: Dict, device_name: str, batch: int, graphs: bool) -> Step:
    """The project's search iteration as train_search.py builds it, on static random
    batches, wrapped in a StepGraph (eager unless ``graphs``)."""
    import torch
    import torch.nn as nn

    from architect import Architect
    from model_search import Network
    from runtime.collapse_fixes import Variant
    from runtime.cuda_graphs import StepGraph
    from runtime.precision import Precision, memory_format
    from runtime.searching import search_step

    torch.manual_seed(0)
    device = torch.device(device_name)
    fmt = memory_format(config["channels_last"])
    fixes = argparse.Namespace(**config["fixes"], epochs=2)
    network = Network(config["init_ch"], 10, config["layers"], nn.CrossEntropyLoss(),
                      config["location"], recompute=config["recompute"],
                      relaxation=fixes.relaxation, aux_skip=fixes.aux_skip
                      ).to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(network.weights(), LR, momentum=0.9, weight_decay=3e-4, foreach=True)
    precision = Precision(config["amp"], "bfloat16", device)
    variant = Variant(fixes, network)
    variant.start_epoch(1)  # every schedule away from zero
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=config["order"] == 2,
                          capturable=graphs, variant=variant)

    def images() -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt),
                torch.randint(0, 10, (batch,), device=device))

    inputs = (*images(), *images())

    def iteration(x, y, xv, yv):
        return search_step(network, architect, optimizer, precision, (x, y), (xv, yv), LR, GRAD_CLIP)

    graph = StepGraph(iteration, enabled=graphs, warmup=GRAPH_WARMUP)
    return lambda: graph(*inputs)


def time_iterations(config: Dict) -> Dict:
    """Median seconds per iteration and peak memory of the configuration, in this process."""
    import torch

    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    step = build(config, config["device"], config["batch"], config["cuda_graphs"])

    def iteration() -> None:
        step()
        if cuda:
            torch.cuda.synchronize()

    # The graph's eager steps and its capture are not timed.
    warmup = max(config["warmup"], GRAPH_WARMUP + 1) if config["cuda_graphs"] else config["warmup"]
    result = {"seconds": median_seconds(iteration, warmup, config["steps"]),
              "peak_rss_mb": peak_rss_mb()}
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def count_iteration(config: Dict) -> int:
    """ATen ops of one eager iteration on the CPU at batch 2, after a warm-up one."""
    from runtime.dispatch import OpCounter

    step = build(config, "cpu", COUNT_BATCH, graphs=False)
    step()
    with OpCounter() as ops:
        step()
    return ops.total


def profile_iteration(config: Dict) -> None:
    from torch.profiler import profile

    step = build(config, config["device"], config["batch"], graphs=False)
    step()
    with profile(record_shapes=False) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def resolved(args: argparse.Namespace) -> Dict:
    """The configuration's flags as train_search.py resolves them on ``--device``."""
    import torch

    from runtime.cuda_graphs import use_cuda_graphs
    from runtime.precision import resolve_channels_last
    from runtime.searching import resolve_recompute

    device = torch.device(args.device)
    return {"init_ch": args.init_ch, "layers": args.layers, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "amp": args.amp, "device": args.device,
            "channels_last": resolve_channels_last(args.channels_last, device),
            "recompute": resolve_recompute(args.recompute, device)[0],
            "cuda_graphs": use_cuda_graphs(args.cuda_graphs, device)[0],
            "time": not args.count_only, "count": args.count or args.count_only,
            "fixes": {flag: getattr(args, flag) for flag in PLAIN_FIXES}}


def describe(config: Dict) -> str:
    from runtime.collapse_fixes import describe as describe_fixes
    return ", ".join([
        "channels-last" if config["channels_last"] else "contiguous",
        "recomputation" if config["recompute"] else "no recomputation",
        "CUDA graphs" if config["cuda_graphs"] else "eager",
        "bf16 autocast" if config["amp"] else "fp32",
        describe_fixes(argparse.Namespace(**config["fixes"]))])


def variants(args: argparse.Namespace) -> List[Tuple[str, argparse.Namespace]]:
    """The command line's configuration, then one per --also (its flags added on top)."""
    argv = sys.argv[1:]
    return [("base", args)] + [(extra, parser.parse_args(argv + shlex.split(extra)))
                               for extra in args.also]


def header(args: argparse.Namespace, configs: List[Tuple[str, argparse.Namespace, Dict]]) -> str:
    import torch

    timing = "op counts only" if args.count_only else (
        f"median of {args.steps} after {args.warmup} warm-up (project with CUDA graphs: after at "
        f"least {GRAPH_WARMUP + 1})")
    lines = [f"torch {torch.__version__}, {machine(args.device, args.threads)}, C={args.init_ch}, "
             f"{args.layers} cells; {timing}; ops: one iteration on the CPU at batch {COUNT_BATCH}"]
    lines += [f"  {label}: {describe(config)}" for label, _, config in configs]
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    columns = (f"{'location':<13} {'batch':>5} {'order':>5} | {'project s':>9} {'MB':>7} | "
               f"{'original s':>10} {'MB':>7} | {'speed-up':>8} {'memory':>7} | "
               f"{'ops':>7} {'orig ops':>8} {'ops ratio':>9} | variant")
    lines += [f"(MB: {memory}; speed-up and memory: original / project; ops ratio: project / original)",
              columns, "-" * len(columns)]
    return "\n".join(lines)


def row(key: Tuple[str, int, int], label: str, mine: Dict, theirs: Optional[Dict],
        their_ops: Optional[int], memory: str) -> str:
    location, batch, order = key
    theirs = theirs or {}
    text = (f"{location:<13} {batch:>5} {order:>5} | {figure(mine.get('seconds')):>9} "
            f"{figure(mine.get(memory), 0):>7} | {figure(theirs.get('sec_per_iter')):>10} "
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
    measures = (profile_iteration, time_iterations, count_iteration)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), *measures)))
        return
    configs = [(label, v, resolved(v)) for label, v in variants(args)]
    if args.profile:
        run_one({**configs[0][2], "location": args.locations[0], "batch": args.batch[0], "order": 2,
                 "profile": True}, *measures)
        return
    baseline = find_baseline(args.baseline) if args.with_original else None
    timed_baseline = None if args.count_only else baseline
    if timed_baseline and (args.init_ch, args.layers) != (16, 8):
        timed_baseline = None
        print("(the original is timed at C=16, 8 cells only: no time or memory ratios)")
    counting = args.count or args.count_only
    memory = "peak_gpu_mb" if args.device == "cuda" else "peak_rss_mb"
    print(header(args, configs), flush=True)
    for location in args.locations:
        for batch in args.batch[:1] if args.count_only else args.batch:
            seconds: Dict[Tuple[str, int], float] = {}
            for order in args.orders:
                count_here = counting and batch == args.batch[0]
                their_ops = count_original(baseline, "search", [
                    "--location", location, "--order", str(order), "--init_ch", str(args.init_ch),
                    "--layers", str(args.layers)]) if count_here else None
                theirs = original(timed_baseline, "search", [
                    "--location", location, "--batch", str(batch), "--order", str(order)],
                    args.warmup, args.steps, args.threads, args.device)
                for label, v, config in configs:
                    if location not in v.locations or order not in v.orders or batch not in v.batch:
                        continue
                    mine = project(__file__, {**config, "location": location, "batch": batch,
                                              "order": order, "count": config["count"] and count_here})
                    if "seconds" in mine:
                        seconds[(label, order)] = mine["seconds"]
                    print(row((location, batch, order), label, mine, theirs, their_ops, memory),
                          flush=True)
            for label, _, _ in configs:
                if (label, 1) in seconds and (label, 2) in seconds:
                    print(f"{location:<13} {batch:>5}       project second/first order "
                          f"({label}): {seconds[(label, 2)] / seconds[(label, 1)]:.2f}", flush=True)


if __name__ == "__main__":
    main()
