"""Where the jobs of a pipeline (runtime/pipeline.py) run: on this machine, one after
another on the CPU or one per visible GPU at a time (here), or on a Slurm cluster
through submitit (runtime/slurm.py).

A job is one run of a repository script in its own directory.  It is started as a
subprocess, its output appended to ``JOB_DIR/job.log``; a resumable job (a search or
a training) resumes from the ``checkpoint.pt`` of its run directory when one exists.
The command is worked out when the job starts, not when it is submitted, so that a
Slurm job requeued after its time limit or a preemption resumes too.
"""
import glob
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Queue
from typing import Callable, List, Mapping, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_LOG = "job.log"


@dataclass(frozen=True)
class Job:
    """One run of ``script`` with ``flags``, writing under ``directory``.  A resumable
    job gets ``--exp_path directory`` and, once it has a checkpoint, ``--checkpoint_path``."""
    name: str
    stage: str
    script: str
    flags: Sequence[str]
    directory: str
    resumable: bool = True

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, JOB_LOG)

    def run_dir(self) -> Optional[str]:
        """The script's run directory holding a checkpoint (the newest, should there be
        several: a run killed before its first checkpoint leaves one without)."""
        found = sorted(glob.glob(os.path.join(self.directory, "*", "checkpoint.pt")))
        return os.path.dirname(found[-1]) if found else None

    def command(self, resume: bool = True) -> List[str]:
        """The command line: a fresh run, or the resumption of the one under way."""
        argv = [sys.executable, os.path.join(REPO, self.script), *self.flags]
        if self.resumable:
            argv += ["--exp_path", self.directory]
            run_dir = self.run_dir() if resume else None
            if run_dir:
                argv += ["--checkpoint_path", run_dir]
        return argv


@dataclass
class Outcome:
    """How a job's run ended: exit code, wall seconds, the devices it used, the command,
    the file that tells what happened (the job's log; for a Slurm job that died outside
    its script, submitit's log of it) and, for such a job, the error."""
    returncode: int
    seconds: float
    devices: List[str] = field(default_factory=list)
    command: str = ""
    log: str = ""
    error: str = ""


# A launcher reports a job's Slurm id when submitted, and its outcome when it ends.
Started = Callable[[Job, str], None]
Finished = Callable[[Job, Outcome], None]


def run_process(job: Job, env: Optional[Mapping[str, str]] = None) -> Outcome:
    """Run ``job`` to its end as a subprocess in the repository root, its output
    appended to its log."""
    os.makedirs(job.directory, exist_ok=True)
    argv = job.command()
    started = time.time()
    with open(job.log_path, "a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        returncode = subprocess.call(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
    return Outcome(returncode, time.time() - started, command=shlex.join(argv), log=job.log_path)


def gpu_count() -> int:
    """GPUs this process sees (torch is imported only here and in ``device_names``)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_names(gpus: Sequence[int]) -> List[str]:
    """What a job on these GPUs (torch's indices; none: the CPU) ran on."""
    if not gpus:
        return [f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"]
    import torch
    return [torch.cuda.get_device_name(gpu) for gpu in gpus]


def visible_gpus() -> List[str]:
    """This machine's GPUs the jobs may use: CUDA_VISIBLE_DEVICES's, else all of them.
    Each job gets one: its index becomes the job's CUDA_VISIBLE_DEVICES."""
    count = gpu_count()
    if not count:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [gpu.strip() for gpu in listed.split(",")][:count] if listed else [
        str(i) for i in range(count)]


class LocalLauncher:
    """Jobs on this machine: one at a time on the CPU, or one per visible GPU at a time."""

    name = "local"

    def __init__(self) -> None:
        self.gpus = visible_gpus()

    def run(self, jobs: Sequence[Job], on_start: Started, on_done: Finished,
            submitted_before: Optional[Mapping[str, str]] = None) -> None:
        """Run ``jobs``, calling ``on_done(job, outcome)`` as each ends (one at a time)."""
        if not self.gpus:
            for job in jobs:
                outcome = run_process(job)
                outcome.devices = device_names([])
                on_done(job, outcome)
            return
        free: "Queue[str]" = Queue()
        for gpu in self.gpus:
            free.put(gpu)
        lock = threading.Lock()

        def run_on_a_gpu(job: Job) -> None:
            gpu = free.get()
            try:
                # The visible index is this machine's; inside the job it is device 0.
                outcome = run_process(job, {"CUDA_VISIBLE_DEVICES": gpu})
                outcome.devices = device_names([self.gpus.index(gpu)])
            finally:
                free.put(gpu)
            with lock:
                on_done(job, outcome)

        with ThreadPoolExecutor(max_workers=len(self.gpus)) as pool:
            for future in [pool.submit(run_on_a_gpu, job) for job in jobs]:
                future.result()
