"""A search iteration of the project beside the original release's, on this machine.

    python bench/search_step.py                  # paper supernet: 2 locations x batch 16, 32 x 1st/2nd order
    python bench/search_step.py --batch 16 --locations after_every
    python bench/search_step.py --profile        # top ops of one second-order iteration

One iteration is what train_search.py does per batch (``searching.search_step``):
the architecture step (first order: grad_A L_val; second order: virtual step and
finite difference) and the weight step, at the supernet of the paper (C=16, 8
cells, random 32x32 images), with train_search.py's default flags unless told
otherwise.  For every configuration the original's iteration
(``../shared/baseline/original_step.py search``) runs in its own process right
after the project's, with the same warm-up and number of timed iterations: the
table gives both, the speed-up and the memory ratio (original / project, peak
resident set size of the process), and the project's second/first-order ratio.
A full run takes about half an hour on two cores (the original's second order at
batch 32 alone takes minutes).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.side_by_side import add_side_by_side_flags, find_baseline, original, project, ratio  # noqa: E402

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
parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default="auto",
                    help="channels-last layout (as train_search.py, 'auto': on for the CPU only)")
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute cells in backward (as train_search.py, on by default)")
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast of the weight step (as --amp)")
add_side_by_side_flags(parser)
parser.add_argument("--profile", action="store_true",
                    help="profile one second-order iteration at the first location/batch instead")
parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one config as JSON


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(config: dict) -> dict:
    """Time one project configuration in this process."""
    import torch
    import torch.nn as nn
    from architect import Architect
    from model_search import Network
    from precision import Precision, memory_format
    from searching import search_step

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    fmt = memory_format(config["channels_last"])
    network = Network(config["init_ch"], 10, config["layers"], nn.CrossEntropyLoss(),
                      config["location"], recompute=config["recompute"]).to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    precision = Precision(config["amp"], "bfloat16", device)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=config["order"] == 2)
    batch = config["batch"]

    def images():
        return (torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt),
                torch.randint(0, 10, (batch,), device=device))

    (x, y), (xv, yv) = images(), images()

    def iteration() -> None:
        search_step(network, architect, optimizer, precision, (x, y), (xv, yv), 0.025, 5.0)
        if cuda:
            torch.cuda.synchronize()

    if config.get("profile"):
        from torch.profiler import profile
        iteration()
        with profile(record_shapes=False) as prof:
            iteration()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return {}
    for _ in range(config["warmup"]):
        iteration()
    times = []
    for _ in range(config["steps"]):
        started = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - started)
    result = {"seconds": statistics.median(times), "peak_rss_mb": peak_rss_mb()}
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    import torch
    from precision import resolve_channels_last
    channels_last = resolve_channels_last(args.channels_last, torch.device(args.device))
    base = {"init_ch": args.init_ch, "layers": args.layers, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "channels_last": channels_last,
            "recompute": args.recompute, "amp": args.amp, "device": args.device}
    if args.profile:
        run_one({**base, "location": args.locations[0], "batch": args.batch[0], "order": 2,
                 "profile": True})
        return
    baseline = None
    if args.with_original and args.device == "cpu":
        if (args.init_ch, args.layers) == (16, 8):
            baseline = find_baseline(args.baseline)
        else:
            print("(the original is timed at C=16, 8 cells only: project figures only, no ratios)")
    where = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"cpu ({torch.backends.cpu.get_cpu_capability()}), {args.threads or torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, C={args.init_ch}, {args.layers} cells, "
          f"{'channels_last' if channels_last else 'contiguous'}, "
          f"{'recomputation' if args.recompute else 'no recomputation'}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}; median of {args.steps} after {args.warmup} warm-up")
    header = (f"{'location':<13} {'batch':>5} {'order':>5} | {'project s':>9} {'peak MB':>8} | "
              f"{'original s':>10} {'peak MB':>8} | {'speed-up':>8} {'memory':>7}")
    print(header)
    print("-" * len(header))
    for location in args.locations:
        for batch in args.batch:
            seconds = {}
            for order in args.orders:
                config = {**base, "location": location, "batch": batch, "order": order}
                mine = project(__file__, config)
                theirs = original(baseline, "search", ["--location", location, "--batch", str(batch),
                                                       "--order", str(order)],
                                  args.warmup, args.steps, args.threads)
                seconds[order] = mine["seconds"]
                row = (f"{location:<13} {batch:>5} {order:>5} | {mine['seconds']:>9.2f} "
                       f"{mine['peak_rss_mb']:>8.0f} | ")
                if theirs:
                    row += (f"{theirs['sec_per_iter']:>10.2f} {theirs['peak_rss_mb']:>8.0f} | "
                            f"{ratio(theirs['sec_per_iter'], mine['seconds']):>8} "
                            f"{ratio(theirs['peak_rss_mb'], mine['peak_rss_mb']):>7}")
                if "peak_gpu_mb" in mine:
                    row += f"  (peak GPU {mine['peak_gpu_mb']:.0f} MB)"
                print(row, flush=True)
            if len(seconds) == 2:
                print(f"{location:<13} {batch:>5}       project second/first order: "
                      f"{seconds[2] / seconds[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
