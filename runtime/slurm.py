"""The Slurm launcher of a pipeline (runtime/pipeline.py): each job a Slurm job,
submitted through submitit.

Before the first submission, what each job asks for (``--gpus_per_job``,
``--cpus_per_job``, ``--mem_gb``, ``--time``) is checked against the nodes and the time
limit of its partition, as sinfo lists them.  A submission that Slurm refuses, or a job
pending for a reason that waiting cannot clear (the request exceeds what the
partition, its nodes, the QOS or the account allow one job), stops the pipeline with
one line naming Slurm's answer and the flags to change, once the stage's jobs are
cancelled.  While jobs wait for a reason that can clear (Resources, Priority, ...),
the pipeline says so: when a job's state changes, and every ten minutes.

A job runs in the repository root with the repository on its PYTHONPATH, whatever the
directory the pipeline was started from: the job's Python unpickles the task (a class
of the ``runtime`` package) before any of our code runs.  A job that dies there, or is
killed, is reported with submitit's own log of it, which holds the traceback.
"""
import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from runtime.errors import UserError
from runtime.launchers import (REPO, Finished, Job, Outcome, Started, device_names, gpu_count,
                               run_process)

REQUEST_FLAGS = "--gpus_per_job, --cpus_per_job, --mem_gb, --time or --partition"
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "COMPLETING"}
# Pending reasons that stay as long as the cluster's configuration does: the request
# exceeds what the partition, a node, the QOS or the association allow one job
# (Slurm's job_reason_codes page).  Resources, Priority, ReqNodeNotAvail (nodes down or
# reserved), QOSGrp* and the like clear with time.
HOPELESS_REASONS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                    "BadConstraints", "InvalidQOS", "InvalidAccount", "AccountNotAllowed",
                    "QOSNotAllowed", "MaxMemPerLimit"}
HOPELESS_LIMIT = re.compile(r"(QOS|Assoc)Max\w*Per(Job|Node)|QOSMin")
REPORT_EVERY_S = 600  # how often an unchanged queue of waiting jobs is reported again
FIRST_POLL_S, POLL_MAX_S = 2.0, 60.0  # squeue is asked after 2 s, then less often
RESULT_GRACE_S = 15.0  # how long an ended job's result file may lag (submitit's wait)


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


def tasks_and_cpus(options: argparse.Namespace) -> Tuple[int, int]:
    """A job's tasks (one per GPU, at least one) and the CPU cores of each."""
    tasks = max(1, options.gpus_per_job)
    return tasks, max(1, options.cpus_per_job // tasks)


def describe_request(options: argparse.Namespace) -> str:
    tasks, cpus = tasks_and_cpus(options)
    where = f" in partition {options.partition}" if options.partition else ""
    return (f"{options.gpus_per_job} GPU(s), {tasks * cpus} CPUs, {options.mem_gb} GB, "
            f"{options.time} min{where}")


# -- the request against the partition (sinfo) -----------------------------------------------

def sinfo_minutes(text: str) -> Optional[int]:
    """sinfo's time limit ([days-]hours:minutes:seconds) in minutes; None: unlimited."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", text.strip())
    if not match:
        return None
    days, hours, minutes, _ = (int(group or 0) for group in match.groups())
    return (days * 24 + hours) * 60 + minutes


def partition_limits(partition: Optional[str]) -> Optional[Tuple[str, List[Tuple[int, int, int]],
                                                                  Optional[int]]]:
    """The partition's name, each of its nodes' (CPUs, memory in MB, GPUs) and its time
    limit in minutes (None: unlimited), as sinfo lists them (``partition`` None: the
    cluster's default); None where sinfo does not answer or does not list it."""
    try:
        listed = subprocess.run(["sinfo", "-h", "-a", "-N", "-o", "%P|%c|%m|%G|%l"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split("|") for line in listed.stdout.splitlines() if line.count("|") == 4]
    if listed.returncode or not rows:
        return None
    name = partition or next((row[0][:-1] for row in rows if row[0].endswith("*")), None)
    nodes, limit = [], None
    for part, cpus, memory, gres, time_limit in rows:
        if part.rstrip("*") != name or not (cpus.isdigit() and memory.isdigit()):
            continue
        gpus = sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.append((int(cpus), int(memory), gpus))
        limit = sinfo_minutes(time_limit)
    return (name, nodes, limit) if nodes else None


def check_request(options: argparse.Namespace) -> None:
    """Refuse, before anything is submitted, a job no node of the partition can hold, or
    longer than its time limit.  Where sinfo does not list the partition, sbatch answers."""
    found = partition_limits(options.partition)
    if found is None:
        return
    name, nodes, limit = found
    if limit is not None and options.time > limit:
        raise UserError(f"--time {options.time} exceeds the {limit}-minute limit of Slurm "
                        f"partition {name} (sinfo): lower --time (a job that reaches it is "
                        f"requeued and resumes from its checkpoint), or choose another --partition")
    tasks, cpus = tasks_and_cpus(options)
    asked = (tasks * cpus, options.mem_gb * 1024, options.gpus_per_job)
    if any(all(has >= wants for has, wants in zip(node, asked)) for node in nodes):
        return
    most = [max(node[i] for node in nodes) for i in range(3)]
    names = ("--cpus_per_job", "--mem_gb", "--gpus_per_job")
    flags = [flag for flag, has, wants in zip(names, most, asked) if has < wants] or names
    raise UserError(f"no node of Slurm partition {name} can hold a job asking for "
                    f"{describe_request(options)}: its nodes have at most {most[0]} CPUs, "
                    f"{most[1] / 1024:.1f} GB and {most[2]} GPU(s) (sinfo); lower "
                    f"{' or '.join(flags)}, or choose another --partition")


# -- the queue (squeue) ----------------------------------------------------------------------

def queue_states(job_ids: Sequence[str]) -> Optional[Dict[str, Tuple[str, str]]]:
    """squeue's (state, reason) of each job it lists (an ended one for a few minutes);
    None when squeue does not answer."""
    try:
        listed = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids),
                                 "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if listed.returncode and "Invalid job id" not in listed.stderr:  # none of them is known
        return None
    states = {}
    for line in listed.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        states[job_id.strip()] = (state.strip(), reason.strip())
    return states


def slurm_job_active(job_id: str) -> bool:
    """Whether Slurm still has the job queued, running or requeued."""
    return (queue_states([job_id]) or {}).get(job_id, ("", ""))[0] in ACTIVE_STATES


def cannot_clear(reason: str) -> bool:
    return reason in HOPELESS_REASONS or bool(HOPELESS_LIMIT.match(reason))


def cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True)


class QueueWatch:
    """What squeue says of a stage's jobs, asked after 2 s and then less and less often:
    reports the jobs that wait, stops (UserError) at a reason that waiting cannot clear,
    and tells when a job has left the queue."""

    def __init__(self, options: argparse.Namespace, say: Callable[[str], None]):
        self.options, self.say = options, say
        self.interval, self.next_poll = FIRST_POLL_S, time.time() + FIRST_POLL_S
        self.states: Dict[str, Tuple[str, str]] = {}
        # Jobs seen out of the queue: their state, when first and last seen so.
        self.left: Dict[str, Tuple[str, float, float]] = {}
        self.said, self.said_at = "", 0.0

    def poll(self, waiting: Sequence[Tuple[Job, Any]]) -> None:
        now = time.time()
        if now < self.next_poll:
            return
        self.next_poll, self.interval = now + self.interval, min(POLL_MAX_S, 1.5 * self.interval)
        listed = queue_states([handle.job_id for _, handle in waiting])
        if listed is None:
            return  # squeue did not answer: ask again later
        for job, handle in waiting:
            state, reason = listed.get(handle.job_id, ("", ""))
            if state == "PENDING" and cannot_clear(reason):
                raise UserError(f"Slurm job {handle.job_id} ({job.name}) is pending for "
                                f"{reason}, which waiting cannot clear: what each job asks for "
                                f"({describe_request(self.options)}) exceeds what the partition, "
                                f"its nodes, the QOS or the account allow; change "
                                f"{REQUEST_FLAGS}")
            if state in ACTIVE_STATES:  # again, where a requeue followed a preemption
                self.left.pop(handle.job_id, None)
            else:
                since = self.left.get(handle.job_id, ("", now))[1]
                self.left[handle.job_id] = (state or "no longer listed by squeue", since, now)
        self.states = listed
        self.report(waiting, now)

    def report(self, waiting: Sequence[Tuple[Job, Any]], now: float) -> None:
        """One line on the jobs still queued or running, when it changes (and every
        REPORT_EVERY_S while one of them is pending)."""
        parts, pending = [], False
        for job, handle in waiting:
            state, reason = self.states.get(handle.job_id, ("", ""))
            if state in ACTIVE_STATES:
                pending |= state == "PENDING"
                why = f" ({reason})" if state == "PENDING" and reason not in ("", "None") else ""
                parts.append(f"{job.name} (job {handle.job_id}) {state}{why}")
        line = "slurm: " + ", ".join(parts)
        if parts and (line != self.said or pending and now - self.said_at >= REPORT_EVERY_S):
            self.say(line)
            self.said, self.said_at = line, now

    def ended(self, job_id: str) -> Optional[str]:
        """The state of a job squeue has shown out of the queue for RESULT_GRACE_S: long
        enough for its result files to have shown up (a shared file system may lag), or
        for a requeue to have put it back; None until then."""
        state, since, last = self.left.get(job_id, ("", 0.0, 0.0))
        return state if state and last - since >= RESULT_GRACE_S else None


# -- the jobs ----------------------------------------------------------------------------------

def failure_line(error: Exception) -> str:
    """The exception that ended a job's traceback as submitit relays it, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    if raised:
        return raised[-1]
    return lines[0] if lines else type(error).__name__


def submitit_log(handle: Any) -> str:
    """submitit's log of the job's first task where it exists (its error stream holds
    the traceback), else the job's submitit folder."""
    paths = handle.task(0).paths
    for path in (paths.stderr, paths.stdout):
        if path.exists():
            return str(path)
    return str(paths.folder)


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

    def __init__(self, options: argparse.Namespace, folder: str,
                 say: Callable[[str], None] = print):
        if shutil.which("sbatch") is None:
            raise UserError("--launcher slurm needs Slurm's sbatch on PATH, and it is not "
                            "there: run on the cluster's login node, or use --launcher local")
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs the submitit package: pip install "
                            "submitit") from None
        self.submitit, self.folder, self.options, self.say = submitit, folder, options, say

    def executor(self, job: Job) -> Any:
        options = self.options
        executor = self.submitit.AutoExecutor(folder=os.path.join(self.folder, "%j"),
                                              cluster="slurm")
        tasks, cpus = tasks_and_cpus(options)
        parameters = dict(name=job.name, timeout_min=options.time, nodes=1,
                          tasks_per_node=tasks, cpus_per_task=cpus, mem_gb=options.mem_gb,
                          # USR2 this long before the limit: submitit requeues the job.
                          slurm_signal_delay_s=min(120, 15 * options.time),
                          # Independent of the submitting directory: the job's Python
                          # imports the runtime package to unpickle its task.
                          slurm_additional_parameters={"chdir": REPO},
                          slurm_setup=[f"export PYTHONPATH={shlex.quote(REPO)}"
                                       "${PYTHONPATH:+:$PYTHONPATH}"])
        if options.gpus_per_job > 0:
            parameters["gpus_per_node"] = options.gpus_per_job
        if options.partition:
            parameters["slurm_partition"] = options.partition
        executor.update_parameters(**parameters)
        return executor

    def submit(self, job: Job, on_start: Started, earlier: Optional[str]) -> Any:
        """The job's Slurm job: its earlier submission while still queued or running (a
        restarted pipeline does not run a job twice at once), else a new one."""
        if earlier and slurm_job_active(earlier):
            return self.submitit.SlurmJob(folder=os.path.join(self.folder, "%j"), job_id=earlier)
        os.makedirs(job.directory, exist_ok=True)
        try:
            # submitit prints sbatch's errors before raising them: they are in our line.
            with contextlib.redirect_stderr(io.StringIO()):
                handle = self.executor(job).submit(SlurmTask(job))
        except self.submitit.core.utils.FailedJobError as error:
            answer = "; ".join(re.sub(r"^sbatch: error: ", "", line.strip())
                               for line in str(error).splitlines() if line.strip())
            raise UserError(f"Slurm refused {job.name} ({describe_request(self.options)}): "
                            f"sbatch says {answer!r}; check {REQUEST_FLAGS}") from None
        on_start(job, handle.job_id)
        return handle

    def run(self, jobs: Sequence[Job], on_start: Started, on_done: Finished,
            submitted_before: Optional[Dict[str, str]] = None) -> None:
        """Submit every job, record its Slurm id (``on_start(job, id)``), then wait for
        them all, calling ``on_done(job, outcome)`` as each ends.  A refusal or a request
        that cannot be met cancels the stage's jobs still queued or running, and stops."""
        waiting: List[Tuple[Job, Any]] = []
        try:
            for job in jobs:
                waiting.append((job, self.submit(job, on_start,
                                                 (submitted_before or {}).get(job.name))))
            self.wait(waiting, on_done)
        except UserError as error:
            cancelled = [handle.job_id for _, handle in waiting]
            cancel(cancelled)
            done = (f"cancelled this stage's Slurm jobs {', '.join(cancelled)}" if cancelled
                    else "nothing was submitted")
            raise UserError(f"{error} ({done})") from None

    def wait(self, waiting: List[Tuple[Job, Any]], on_done: Finished) -> None:
        """Until every job of ``waiting`` has ended (removed from it as they do)."""
        watch = QueueWatch(self.options, self.say)
        while waiting:
            watch.poll(waiting)
            for entry in list(waiting):
                outcome = self.outcome(*entry, watch)
                if outcome is not None:
                    waiting.remove(entry)
                    on_done(entry[0], outcome)
            if waiting:
                time.sleep(1)

    def outcome(self, job: Job, handle: Any, watch: QueueWatch) -> Optional[Outcome]:
        """How the job ended, once every task's result file is there or it has left the
        queue without them; None while it runs or waits."""
        if all(handle.task(i).paths.result_pickle.exists() for i in range(handle.num_tasks)):
            try:
                return Outcome(**handle.results()[0])
            except Exception as error:  # it died in submitit's wrapper, outside our task
                return Outcome(1, 0.0, command=f"slurm job {handle.job_id}",
                               log=submitit_log(handle), error=failure_line(error))
        state = watch.ended(handle.job_id)
        if state is None:
            return None
        return Outcome(1, 0.0, command=f"slurm job {handle.job_id}", log=submitit_log(handle),
                       error=f"ended {state} without a result")
