"""Reproduce the paper's table in one command: the DARTS protocol, as stages of jobs.

    python reproduce.py --preset paper --data data                  # this machine
    python reproduce.py --preset paper --launcher slurm --partition gpu --time 1440
    python reproduce.py --preset tiny --data ../shared/data/cifar10-mini   # a CPU, minutes

Searches with N seeds -> each found cell trained briefly and scored on a held-out part
of the training split -> the best cell trained from scratch with K seeds -> tests ->
mean ± std of the test error, in PIPELINE_DIR/RESULTS.md and results.json.  Rerun the
same command to continue a pipeline that stopped (see runtime/pipeline.py).
"""
import argparse
import shlex
import sys

from runtime import pipeline
from runtime.errors import run_cli

parser = argparse.ArgumentParser(
    description="Search N times, select the best cell on held-out data, train it K times and "
                "test: the paper's protocol as resumable jobs, locally or on Slurm.")
pipeline.add_reproduce_args(parser)


def main() -> None:
    args = parser.parse_args()
    args.command_line = shlex.join(["python", *sys.argv])
    pipeline.reproduce(args)


if __name__ == "__main__":
    run_cli(main)
