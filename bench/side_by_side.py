"""Running the original release beside the project, for the benchmarks' ratios.

The original's modules (``../shared/baseline/original``, patched only to run on a
CPU) share names with the project's, so every measurement runs in a process of its
own: ``original_step.py`` for the original, the benchmark script itself (``--one``)
for the project.  Only ratios measured in one run on one machine mean anything:
machines of the same nominal size differ several-fold in absolute speed."""
import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINE = os.path.join(os.path.dirname(REPO), "shared", "baseline", "original_step.py")


def last_json_line(output: str) -> Dict:
    return json.loads(output.strip().splitlines()[-1])


def run_json(command: Sequence[str]) -> Dict:
    """Run ``command`` in the repository root; the JSON object its last line prints."""
    result = subprocess.run(list(command), capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} ... failed:\n{result.stderr[-3000:]}")
    return last_json_line(result.stdout)


def project(script: str, config: Dict) -> Dict:
    """One project configuration, timed by ``script --one CONFIG`` in its own process."""
    return run_json([sys.executable, script, "--one", json.dumps(config)])


def original(baseline: Optional[str], what: str, arguments: List[str], warmup: int, iters: int,
             threads: Optional[int]) -> Optional[Dict]:
    """The original's figures (``sec_per_iter``, ``peak_rss_mb``), or None without it."""
    if baseline is None:
        return None
    command = [sys.executable, baseline, what, *arguments, "--warmup", str(warmup),
               "--iters", str(iters)]
    if threads:
        command += ["--threads", str(threads)]
    return run_json(command)


def find_baseline(path: str) -> Optional[str]:
    if os.path.isfile(path):
        return path
    print(f"(the original release's stopwatch {path} is not there: project figures only, "
          f"no ratios)", flush=True)
    return None


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def add_side_by_side_flags(parser: argparse.ArgumentParser) -> None:
    """--threads, --device, --baseline and --no-original, for both benchmarks."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both (none: PyTorch's choice)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (the original runs on the CPU only)")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="the original release's stopwatch, original_step.py")
    parser.add_argument("--no-original", dest="with_original", action="store_false",
                        help="time the project only")
