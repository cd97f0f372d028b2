"""Running the original release beside the project, for the benchmarks' ratios.

The original's modules (``../shared/baseline/original``, patched only to run with
current PyTorch) share names with the project's, so every measurement runs in a
process of its own: ``original_step.py`` times the original, ``count_original.py``
counts its ops, the benchmark script itself (``--one``) times and counts the
project.  Only ratios measured in one run on one machine mean anything: machines of
the same nominal size differ several-fold in absolute speed."""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINE = os.environ.get(
    "BASELINE", os.path.join(os.path.dirname(REPO), "shared", "baseline", "original_step.py"))
COUNT_ORIGINAL = os.path.join(REPO, "bench", "count_original.py")
# Op counts do not depend on the batch size: the smallest batch BatchNorm accepts.
COUNT_BATCH = 2


class MeasurementFailed(RuntimeError):
    """A measuring process failed; the message ends with its error output."""


def run_json(command: Sequence[str], hide_gpus: bool = False) -> Dict:
    """Run ``command`` in the repository root; the JSON object its last line prints.
    ``hide_gpus``: run it with no CUDA device visible (the original's modules move
    everything to a visible GPU, which a CPU op count must not)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if hide_gpus else None
    result = subprocess.run(list(command), capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise MeasurementFailed(f"{os.path.basename(command[1])} failed: {lines[-1]}\n"
                                f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def project(script: str, config: Dict) -> Dict:
    """One project configuration, timed and/or counted by ``script --one CONFIG`` in its
    own process; ``{"error": ...}`` when that fails, so a table goes on with its other rows."""
    try:
        return run_json([sys.executable, script, "--one", json.dumps(config)])
    except MeasurementFailed as error:
        print(error, file=sys.stderr, flush=True)
        return {"error": str(error).splitlines()[0]}


def original(baseline: Optional[str], what: str, arguments: List[str], warmup: int, iters: int,
             threads: Optional[int], device: str) -> Optional[Dict]:
    """The original's figures (``sec_per_iter``, ``peak_rss_mb``, on CUDA ``peak_gpu_mb``),
    timed by its stopwatch on ``device``; None without the stopwatch."""
    if baseline is None:
        return None
    command = [sys.executable, baseline, what, *arguments, "--warmup", str(warmup),
               "--iters", str(iters), "--device", device]
    if threads:
        command += ["--threads", str(threads)]
    try:
        return run_json(command)
    except MeasurementFailed as error:
        print(error, file=sys.stderr, flush=True)
        return {"error": str(error).splitlines()[0]}


def count_original(baseline: Optional[str], what: str, arguments: List[str]) -> Optional[int]:
    """The ATen ops of one step of the original (``count_original.py``, on the CPU);
    None without the stopwatch or when counting fails."""
    if baseline is None:
        return None
    command = [sys.executable, COUNT_ORIGINAL, what, "--baseline", baseline,
               "--batch", str(COUNT_BATCH), *arguments]
    try:
        return run_json(command, hide_gpus=True)["ops"]
    except MeasurementFailed as error:
        print(error, file=sys.stderr, flush=True)
        return None


def machine(device: str, threads: Optional[int]) -> str:
    """The card's name, or the CPU's vector extension and thread count: the header of a
    table, since absolute figures only compare on one machine."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return (f"cpu ({torch.backends.cpu.get_cpu_capability()}), "
            f"{threads or torch.get_num_threads()} threads")


def find_baseline(path: str) -> Optional[str]:
    """The stopwatch's absolute path (the measuring processes run in the repository
    root, wherever the benchmark was started), or None with a note when it is absent."""
    if os.path.isfile(path):
        return os.path.abspath(path)
    print(f"(the original release's stopwatch {path} is not there: project figures only, "
          f"no ratios)", flush=True)
    return None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def figure(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def add_side_by_side_flags(parser: argparse.ArgumentParser) -> None:
    """--threads, --device, --baseline, --no-original, --no-count and --count_only,
    for both benchmarks."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both (none: PyTorch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both are timed (op counts always run on the CPU)")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="the original release's stopwatch, original_step.py "
                             "(default: $BASELINE, else ../shared/baseline/original_step.py)")
    parser.add_argument("--no-original", dest="with_original", action="store_false",
                        help="measure the project only")
    parser.add_argument("--count", action=argparse.BooleanOptionalAction, default=True,
                        help=f"count the ATen ops one step dispatches (on the CPU, batch "
                             f"{COUNT_BATCH}, after a warm-up step), the project's and the original's")
    parser.add_argument("--count_only", action="store_true",
                        help="op counts only, no timing")


def median_seconds(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Median wall-clock seconds of ``steps`` calls after ``warmup`` untimed ones
    (``step`` waits for its device itself)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(config: Dict, profile: Callable[[Dict], None], time: Callable[[Dict], Dict],
            count: Callable[[Dict], int]) -> Dict:
    """Time and/or count one project configuration in this process (counting last: its
    CPU network must not show in the timed run's peak memory); ``profile`` instead when
    the configuration asks for it."""
    import torch

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    if config.get("profile"):
        profile(config)
        return {}
    result = time(config) if config["time"] else {}
    if config["count"]:
        result["ops"] = count(config)
    return result
