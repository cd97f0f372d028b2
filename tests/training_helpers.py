"""Helpers for the tests of the train_*.py / test_*.py scripts: running them, reading
their reports, and building small image folders."""
import contextlib
import importlib
import io
import os
import random
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# A network small enough for a CPU epoch in a second or two.
TINY = ["--init_ch", "4", "--layers", "3", "--batchsz", "32", "--workers", "0"]
ACCURACY = re.compile(r"top-(\d+) acc ([\d.]+)% \((\d+)/(\d+)\)")


def script_env() -> dict:
    # One thread per process: two cores shared with torchrun's two workers, and the
    # same thread count in every run keeps CPU results bit-identical between runs.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def command(script: str, *args: str) -> List[str]:
    return [sys.executable, str(REPO / script), *args]


def torchrun_command(processes: int, script: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(processes), str(REPO / script), *args]


def run_script(script: str, *args: str, timeout: float = 300,
               env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``script`` in the repository root with ``script_env()`` plus ``env``."""
    return subprocess.run(command(script, *args), cwd=REPO, env={**script_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def _environment(env: Optional[Mapping[str, str]]):
    """``os.environ`` with ``env`` on top, restored afterwards (untouched without ``env``:
    other threads may be reading it)."""
    if not env:
        yield
        return
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # What a fresh interpreter does with a warning: a line on (the redirected) stderr.
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_in_process(script: str, *args: str,
                   env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """``script``'s ``main()`` run in this process as ``run_script`` runs it in its own
    (argv, one intra-op thread, ``run_cli``'s one-line errors and exit code, stdout,
    stderr, warnings printed to stderr), without the seconds a new interpreter takes to
    import torch and torchvision.  For runs that fail early, and for runs no test resumes
    or kills (a resumed run gets a process of its own, so that nothing it needs can hide
    in memory).  The random streams and torch's thread count are restored afterwards."""
    from runtime.errors import run_cli

    module = importlib.import_module(Path(script).stem)
    argv = [str(REPO / script), *args]
    out, err = io.StringIO(), io.StringIO()
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.get_num_threads())
    returncode = 0
    with _environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        warnings.resetwarnings()  # a fresh interpreter's filters, not pytest's
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _print_warning
        sys.argv, argv_before = argv, sys.argv
        torch.set_num_threads(1)  # as script_env's OMP_NUM_THREADS=1
        try:
            run_cli(module.main)
        except SystemExit as exit_:
            returncode = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = argv_before
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    torch.set_num_threads(saved[3])
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


def run_ok(script: str, *args: str, in_process: bool = False) -> subprocess.CompletedProcess:
    """``script`` run to success, as its command line or ``in_process``."""
    result = (run_in_process if in_process else run_script)(script, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def run_files(*names: str) -> Set[str]:
    """What a run directory holds: ``names``, and ``tensorboard/`` exactly when the
    optional tensorboard package is installed (a run writes its event files there)."""
    from runtime.metrics import TENSORBOARD, summary_writer_class

    return set(names) | ({TENSORBOARD} if summary_writer_class() is not None else set())


def reported_accuracy(stdout: str) -> List[Tuple[int, str, int, int]]:
    """(k, percent as printed, correct, total) for each top-k of the last report
    (a train script's 'final test ...' line, a test script's 'test ...' line)."""
    last = [line for line in stdout.splitlines() if "test top-1 acc" in line][-1]
    return [(int(k), pct, int(c), int(n)) for k, pct, c, n in ACCURACY.findall(last)]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a script that failed with a user error."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def rng_entry() -> dict:
    """One process's random state as every checkpoint.pt has held it (its "rng" list
    has one such entry per process)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
            "torch": torch.get_rng_state()}


def only_run_dir(exp: Path) -> Path:
    runs = [path for path in exp.iterdir() if path.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def mini_cifar(source: Path, destination: Path, classes: Sequence[str] = (),
               train: int = 20, val: int = 10) -> Path:
    """A smaller copy (symbolic links) of cifar10-mini: the first ``train``/``val``
    images of each of ``classes`` (default: all ten)."""
    for split, count in (("train", train), ("val", val)):
        for class_dir in sorted((source / split).iterdir()):
            if classes and class_dir.name not in classes:
                continue
            target = destination / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).symlink_to(image)
    return destination


def random_image_folder(destination: Path, classes: int, train: int, val: int,
                        size: Tuple[int, int] = (40, 48)) -> Path:
    """``train/`` and ``val/`` folders of random PNG images (an ImageNet stand-in)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = destination / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return destination


def run_parallel(commands: Mapping[str, Sequence[str]], jobs: int = 2, timeout: float = 300,
                 env: Optional[Mapping[str, str]] = None) -> Dict[str, subprocess.CompletedProcess]:
    """Run several commands (argument lists, in the repository root with ``script_env()``
    plus ``env``), ``jobs`` at a time; their results by name."""
    environment = {**script_env(), **(env or {})}

    def run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=REPO, env=environment, capture_output=True,
                              text=True, timeout=timeout)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in commands.items()}
        return {name: future.result() for name, future in futures.items()}
