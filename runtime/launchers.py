"""Where the jobs of a pipeline (runtime/pipeline.py) run: on this machine, one after
another on the CPU or one per visible GPU at a time, or on a Slurm cluster through
submitit.

A job is one run of a repository script in its own directory.  It is started as a
subprocess, its output appended to ``JOB_DIR/job.log``; a resumable job (a search or
a training) resumes from the ``checkpoint.pt`` of its run directory when one exists.
The command is worked out when the job starts, not when it is submitted, so that a
Slurm job requeued after its time limit or a preemption resumes too.
"""
import argparse
import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Queue
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from runtime.errors import UserError

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
    """How a job's run ended: exit code, wall seconds, the devices it used, the command."""
    returncode: int
    seconds: float
    devices: List[str] = field(default_factory=list)
    command: str = ""


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
    return Outcome(returncode, time.time() - started, command=shlex.join(argv))


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


# -- Slurm -----------------------------------------------------------------------------------

def add_slurm_args(parser: argparse.ArgumentParser) -> None:
    """What every Slurm job of the pipeline asks for."""
    group = parser.add_argument_group("Slurm (with --launcher slurm)")
    group.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    group.add_argument("--time", type=int, default=24 * 60,
                       help="time limit of each job in minutes; a job that reaches it is "
                            "requeued and resumes from its checkpoint (default: %(default)s)")
    group.add_argument("--gpus_per_job", type=int, default=1,
                       help="GPUs per job; more than one runs the job as one process group, a "
                            "process per GPU (default: %(default)s)")
    group.add_argument("--cpus_per_job", type=int, default=8,
                       help="CPU cores per job, shared by its processes (default: %(default)s)")
    group.add_argument("--mem_gb", type=int, default=32, help="memory per job in GB "
                                                              "(default: %(default)s)")


ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "COMPLETING"}


class SlurmTask:
    """What a Slurm job runs: ``job``'s script, one process per task.  Several tasks
    form one torch.distributed process group (the environment torchrun would give).
    Checkpointable: on a time limit or a preemption submitit requeues it, and the
    requeued run resumes from the job's checkpoint."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self) -> Dict[str, Any]:
        import submitit
        environment = submitit.JobEnvironment()
        env = {}
        if environment.num_tasks > 1:
            distributed = submitit.helpers.TorchDistributedEnvironment()
            env = {"MASTER_ADDR": distributed.master_addr,
                   "MASTER_PORT": str(distributed.master_port),
                   "RANK": str(distributed.rank), "WORLD_SIZE": str(distributed.world_size),
                   "LOCAL_RANK": str(distributed.local_rank),
                   "LOCAL_WORLD_SIZE": str(distributed.local_world_size)}
        if environment.global_rank > 0:
            # Only rank 0 writes the job's log, as only rank 0 writes in the scripts.
            returncode = subprocess.call(self.job.command(), cwd=REPO, env={**os.environ, **env},
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            return vars(Outcome(returncode, 0.0))
        outcome = run_process(self.job, env)
        # Slurm lists the GPUs it gave the job; without any, torch need not be imported.
        outcome.devices = device_names(range(gpu_count()) if os.environ.get(
            "CUDA_VISIBLE_DEVICES") else [])
        return vars(outcome)

    def checkpoint(self) -> Any:
        import submitit
        return submitit.helpers.DelayedSubmission(self)


class SlurmLauncher:
    """Each job is a Slurm job submitted through submitit; waits for a stage's jobs."""

    name = "slurm"

    def __init__(self, options: argparse.Namespace, folder: str):
        if shutil.which("sbatch") is None:
            raise UserError("--launcher slurm needs Slurm's sbatch on PATH, and it is not "
                            "there: run on the cluster's login node, or use --launcher local")
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs the submitit package: pip install "
                            "submitit") from None
        self.submitit = submitit
        self.folder = folder
        self.options = options

    def executor(self, job: Job) -> Any:
        options = self.options
        executor = self.submitit.AutoExecutor(folder=os.path.join(self.folder, "%j"),
                                              cluster="slurm")
        tasks = max(1, options.gpus_per_job)
        parameters = dict(name=job.name, timeout_min=options.time, nodes=1,
                          tasks_per_node=tasks, cpus_per_task=max(1, options.cpus_per_job // tasks),
                          mem_gb=options.mem_gb,
                          # USR2 this long before the limit: submitit requeues the job.
                          slurm_signal_delay_s=min(120, 15 * options.time))
        if options.gpus_per_job > 0:
            parameters["gpus_per_node"] = options.gpus_per_job
        if options.partition:
            parameters["slurm_partition"] = options.partition
        executor.update_parameters(**parameters)
        return executor

    def run(self, jobs: Sequence[Job], on_start: Started, on_done: Finished,
            submitted_before: Optional[Mapping[str, str]] = None) -> None:
        """Submit every job, record its Slurm id (``on_start(job, id)``), then wait for
        each in turn (``on_done(job, outcome)``).  A job whose earlier submission
        (``submitted_before[name]``: its id) is still queued or running is waited for,
        not submitted again: a restarted pipeline does not run a job twice at once."""
        handles = []
        for job in jobs:
            earlier = (submitted_before or {}).get(job.name)
            if earlier and slurm_job_active(earlier):
                handle = self.submitit.SlurmJob(folder=os.path.join(self.folder, "%j"),
                                                job_id=earlier)
            else:
                os.makedirs(job.directory, exist_ok=True)
                handle = self.executor(job).submit(SlurmTask(job))
                on_start(job, handle.job_id)
            handles.append((job, handle))
        for job, handle in handles:
            try:
                outcome = Outcome(**handle.results()[0])
            except Exception as error:  # the job died outside our code: report, retry
                tail = str(error).strip().splitlines()[-1:] or [type(error).__name__]
                outcome = Outcome(1, 0.0, command=f"slurm job {handle.job_id}: {tail[0]}")
            on_done(job, outcome)


def slurm_job_active(job_id: str) -> bool:
    """Whether Slurm still has the job queued, running or requeued (squeue knows it)."""
    listed = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                            capture_output=True, text=True)
    return listed.returncode == 0 and listed.stdout.strip() in ACTIVE_STATES


def make_launcher(options: argparse.Namespace, pipeline_dir: str) -> Any:
    """``--launcher``'s launcher; Slurm's checks for sbatch and submitit first."""
    if options.launcher == "local":
        return LocalLauncher()
    if options.launcher == "slurm":
        return SlurmLauncher(options, os.path.join(pipeline_dir, "slurm"))
    raise UserError(f"unknown --launcher {options.launcher!r}; valid: local, slurm")
