"""The benchmarks' op-count path, at a tiny size: the project's count of one step, the
original release's (counted by bench/count_original.py in its own process) and their
ratio make it into the printed table.  The original's part needs ../shared/baseline;
without it the project's part still runs and the test is skipped with the reason.
The end-to-end tests are slow: each count is a fresh process that imports torch and
runs two steps (a minute or more on two busy cores).  bench/collapse.py runs a one-epoch
search from another working directory."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from bench.search_step import row

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO.parent / "shared" / "baseline" / "original_step.py"
# The original's CBAM reduces channels 16-fold: C=16 is its narrowest supernet.
TINY = ["--count_only", "--init_ch", "16", "--layers", "3"]
NUMBER = r"(\d+)"


def table_row(script: str, arguments: List[str], label: str = "base") -> List[str]:
    """The cells of the table row of ``label`` that ``bench/SCRIPT ARGUMENTS`` prints."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *arguments],
                            capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith(f"| {label}")]
    assert len(rows) == 1, result.stdout
    return [cell.split() for cell in rows[0].split("|")][-2]


def check_counts(script: str, arguments: List[str]) -> None:
    """The project's count, and the original's and the ratio when the original is there
    (one run: the project's count is not repeated)."""
    if not BASELINE.is_file():
        mine, *_ = table_row(script, [*arguments, "--no-original"])
        assert re.fullmatch(NUMBER, mine) and int(mine) > 0
        pytest.skip(f"the original's part needs its stopwatch at {BASELINE} (../shared/baseline "
                    f"absent); the project's count ran")
    mine, theirs, ops_ratio = table_row(script, [*arguments, "--baseline", str(BASELINE)])
    assert re.fullmatch(NUMBER, mine) and int(mine) > 0
    assert re.fullmatch(NUMBER, theirs) and int(theirs) > 0
    assert ops_ratio == f"{int(mine) / int(theirs):.2f}x"


def test_row_gives_speed_up_and_memory_as_original_over_project_and_ops_the_other_way():
    line = row(("after_every", 2, 1), "base", {"seconds": 2.0, "peak_rss_mb": 100.0, "ops": 300},
               {"sec_per_iter": 4.0, "peak_rss_mb": 300.0}, 600, "peak_rss_mb")
    cells = [cell.split() for cell in line.split("|")]
    assert cells[3] == ["2.00x", "3.00x"]
    assert cells[4] == ["300", "600", "0.50x"]
    assert cells[5] == ["base"]


def test_row_shows_a_failed_measurement_and_goes_on():
    line = row(("after_every", 2, 2), "--amp", {"error": "search_step.py failed: boom"}, None, None,
               "peak_gpu_mb")
    assert line.splitlines()[1].strip() == "(project: search_step.py failed: boom)"


@pytest.mark.slow
def test_search_step_counts_ops_of_both():
    check_counts("search_step.py", [*TINY, "--locations", "after_every", "--orders", "1"])


@pytest.mark.slow
def test_train_step_counts_ops_of_both():
    check_counts("train_step.py", TINY)


@pytest.mark.slow
def test_collapse_bench_runs_from_another_directory_with_relative_paths(cifar_mini, tmp_path):
    """bench/collapse.py started outside the repository, with --data and --out relative
    to where it was started: its searches (run in the repository) still find both."""
    data = os.path.relpath(cifar_mini, tmp_path)
    tiny = ("--epochs 1 --init_ch 4 --layers 3 --batchsz 4 --hessian_images 8 "
            "--hessian_iterations 1")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "collapse.py"), "--data", data,
                             "--spaces", "s2", "--variants", "darts", "--images_per_class", "3",
                             "--out", "collapse", "--extra", tiny],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "collapse" / "results.json").read_text())
    [epoch] = results["table"]["s2"]["darts"]["epochs"]
    assert epoch["epoch"] == 1 and epoch["eigenvalue"] is not None
    assert (tmp_path / "collapse" / "data-3" / "train" / "airplane").is_dir()
