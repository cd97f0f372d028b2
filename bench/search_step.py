"""Seconds per search iteration and peak memory of the supernet on this machine's CPU.

    python bench/search_step.py                    # paper supernet, batch 16 and 32 (~10 min)
    python bench/search_step.py --batch 16 --locations after_every
    python bench/search_step.py --profile          # top ops of one second-order iteration

One iteration is what train_search.py does per batch: the architecture step
(first order: grad_A L_val; second order: virtual step + finite difference) and
the weight step.  Every configuration runs in its own process so its peak memory
(peak resident set size, and its growth over the process after building the
network) is its own.  Times are medians of ``--steps`` iterations after
``--warmup`` untimed ones.  The second/first-order ratio is computed from figures
measured in this same run.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--batch", type=int, nargs="+", default=[16, 32], help="batch sizes")
parser.add_argument("--locations", nargs="+", default=["after_every", "no_attention"],
                    help="attention locations")
parser.add_argument("--init_ch", type=int, default=16, help="supernet width C")
parser.add_argument("--layers", type=int, default=8, help="supernet cells")
parser.add_argument("--steps", type=int, default=3, help="timed iterations")
parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default="auto",
                    help="channels-last layout (as train_search.py, 'auto': on for the CPU only)")
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute cells in backward (as train_search.py, on by default)")
parser.add_argument("--amp", action="store_true", help="bfloat16 autocast of the weight step (as train_search.py --amp)")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--profile", action="store_true",
                    help="profile one second-order iteration at the first location/batch instead")
parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one config as JSON


# The original release on a 2-core CPU machine like CI's (second order, after_every,
# C=16, 8 cells): seconds per iteration and peak memory (MB) by batch size.
ORIGINAL_SECOND_ORDER = {16: (48.7, 6200), 32: (75.0, None)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(config: dict) -> dict:
    """Time one configuration in this process."""
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
    rss_before = peak_rss_mb()

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
    peak = peak_rss_mb()
    result = {"seconds": statistics.median(times), "peak_rss_mb": peak, "growth_mb": peak - rss_before}
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
    device = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"cpu, {args.threads or torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device}, C={args.init_ch}, {args.layers} cells, "
          f"{'channels_last' if channels_last else 'contiguous'}, "
          f"{'cells recomputed in backward' if args.recompute else 'no recomputation'}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}; median of {args.steps} after {args.warmup} warm-up")
    header = (f"{'location':<14} {'batch':>5} {'order':>6} {'s/iter':>8} {'peak RSS MB':>12} "
              f"{'growth MB':>10} {'peak GPU MB':>12}")
    print(header)
    print("-" * len(header))
    for location in args.locations:
        for batch in args.batch:
            seconds = {}
            for order in (1, 2):
                config = {**base, "location": location, "batch": batch, "order": order}
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)],
                                     capture_output=True, text=True, check=True, cwd=REPO)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                seconds[order] = result["seconds"]
                print(f"{location:<14} {batch:>5} {'2nd' if order == 2 else '1st':>6} "
                      f"{result['seconds']:>8.2f} {result['peak_rss_mb']:>12.0f} "
                      f"{result['growth_mb']:>10.0f} {result.get('peak_gpu_mb', float('nan')):>12.0f}",
                      flush=True)
            print(f"{location:<14} {batch:>5} {'ratio':>6} {seconds[2] / seconds[1]:>8.2f}  "
                  f"(second / first order)", flush=True)
            original = ORIGINAL_SECOND_ORDER.get(batch)
            if (original and location == "after_every" and args.device == "cpu"
                    and (args.init_ch, args.layers) == (16, 8)):
                memory = (f", {original[1] / result['peak_rss_mb']:.2f}x less peak memory than its "
                          f"{original[1] / 1000:.1f} GB" if original[1] else "")
                print(f"{'':<14} {batch:>5} {'orig.':>6} {original[0] / seconds[2]:>8.2f}x faster "
                      f"than the original's {original[0]} s per second-order iteration{memory} "
                      f"(its figures: a 2-core machine)", flush=True)


if __name__ == "__main__":
    main()
