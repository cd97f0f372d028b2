"""The paper's protocol as one resumable pipeline of jobs (reproduce.py):

1. search: train_search.py once per seed;
2. select: each found cell trained briefly from scratch on part of the training split
   and scored on the held-out rest (``--holdout_portion``; never the test split);
3. final: the best-scoring cell trained from scratch once per seed;
4. test: test_CIFAR10/100.py (test_imagenet.py) on each final network's ``trained.pt``;

then the mean ± std of the test errors, in the result card (runtime/result_card.py).

Every job runs in its own directory, ``PIPELINE_DIR/jobs/<stage>-seed<seed>``.  The
pipeline's state is ``PIPELINE_DIR/state.json``, rewritten atomically after each job:
the settings it was made with, and each job's status, result, time and command.
Running the same command again continues: finished jobs are kept, an interrupted one
resumes from its checkpoint, and a failed one is retried once.  Jobs are seeded and
resume bit for bit, so a pipeline killed anywhere ends as an uninterrupted one.
"""
import argparse
import json
import os
import re
import shlex
from typing import Any, Callable, Dict, List, Mapping, Sequence

from genotypes import check_space
from runtime import launchers, preflight, result_card, slurm
from runtime.atomic import atomic_write_text
from runtime.errors import UserError
from runtime.launchers import Job, Outcome

STATE = "state.json"
# Every stage's sizes.  Sources (README, "Reproducing the paper's table"): the search
# is train_search.py's defaults (SPEC.md, the paper README's `--unrolled`); the
# selection follows DARTS (Liu et al. 2019: 4 searches, each cell trained
# 100 epochs, scored on held-out data) with the final network of the paper README;
# the final trainings are the paper README's train_CIFAR command (600 epochs, C=36,
# 20 cells, auxiliary, cutout), 10 seeds as DARTS' reported mean ± std.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": dict(searches=4, search_epochs=50, search_init_ch=16, search_layers=8,
                  search_batchsz=64, search_train_portion=0.5, unrolled=True,
                  select_epochs=100, select_init_ch=36, select_layers=20, select_batchsz=96,
                  holdout_portion=0.5,
                  finals=10, final_epochs=600, final_init_ch=36, final_layers=20,
                  final_batchsz=96),
    # PC-DARTS's search on ImageNet and the Att-DARTS/DARTS ImageNet training (README,
    # "Reproducing the paper's table"): one search with train_search.py's preset of that
    # name (its samples of 10% and 2.5% of every class, not --search_train_portion), 128
    # images per process (PC-DARTS's 1024 over 8 GPUs: --gpus_per_job 8); a single cell
    # needs no real selection, so one epoch scores it on 5% of the training split; one
    # final training with train_ImageNet.py's defaults, as both papers report one.
    "pc_darts_imagenet": dict(searches=1, search_epochs=50, search_init_ch=16, search_layers=8,
                              search_batchsz=128, search_train_portion=0.5, unrolled=False,
                              select_epochs=1, select_init_ch=48, select_layers=14,
                              select_batchsz=128, holdout_portion=0.05,
                              finals=1, final_epochs=250, final_init_ch=48, final_layers=14,
                              final_batchsz=128),
    # A search step of even a tiny supernet is slow on a CPU: its weights see a
    # tenth of the training split.
    "tiny": dict(searches=2, search_epochs=1, search_init_ch=4, search_layers=3,
                 search_batchsz=16, search_train_portion=0.1, unrolled=False,
                 select_epochs=1, select_init_ch=4, select_layers=3, select_batchsz=16,
                 holdout_portion=0.5,
                 finals=2, final_epochs=1, final_init_ch=4, final_layers=3, final_batchsz=16),
}
TRAIN_SCRIPTS = {"cifar10": ("train_CIFAR10.py", "test_CIFAR10.py"),
                 "cifar100": ("train_CIFAR100.py", "test_CIFAR100.py"),
                 "imagenet": ("train_ImageNet.py", "test_imagenet.py")}
TEST_ERROR = re.compile(r"test top-1 acc ([\d.]+)% \((\d+)/(\d+)\), error ([\d.]+)%")


# -- settings ------------------------------------------------------------------------------

def add_reproduce_args(parser: argparse.ArgumentParser) -> None:
    """reproduce.py's flags: the preset, every stage's overrides, where jobs run."""
    parser.add_argument("--preset", default="paper",
                        help=f"settings of every stage: {', '.join(PRESETS)} (default: %(default)s)")
    parser.add_argument("--dir", default=None,
                        help="pipeline directory: state, jobs, result card; rerunning the "
                             "command with it continues the pipeline (default: exp/reproduce-PRESET)")
    parser.add_argument("--dataset", default=None, choices=sorted(TRAIN_SCRIPTS),
                        help="default: imagenet for --preset pc_darts_imagenet, else cifar10")
    parser.add_argument("--data", default="data", help="dataset root, as for every script")
    parser.add_argument("--seed", type=int, default=2,
                        help="seed of the first search and final training; the others count up")
    parser.add_argument("--workers", type=int, default=None, help="loader workers of every job")
    parser.add_argument("--deterministic", action="store_true",
                        help="every job with --deterministic (repeatable numbers on GPUs)")
    parser.add_argument("--location", default=None, help="train_search.py's --location")
    parser.add_argument("--space", default=None,
                        help="train_search.py's --space (default: its own, darts)")
    parser.add_argument("--unrolled", action=argparse.BooleanOptionalAction, default=None,
                        help="second-order search (the preset's: paper on, tiny off)")
    parser.add_argument("--partial_channels", type=int, default=None,
                        help="train_search.py's --partial_channels K")
    parser.add_argument("--search_args", default="",
                        help="more train_search.py flags, as one string: '--arch_lr 6e-4 ...'")
    parser.add_argument("--train_args", default="",
                        help="more flags of the selection and final trainings, as one string")
    stages = parser.add_argument_group("stage sizes (default: the preset's)")
    for key, value in PRESETS["paper"].items():
        if key != "unrolled":
            stages.add_argument(f"--{key}", type=type(value), default=None)
    parser.add_argument("--launcher", default="local",
                        help="local (this machine: one job at a time on the CPU, or one per "
                             "visible GPU) or slurm (a Slurm job each, through submitit)")
    slurm.add_slurm_args(parser)


def resolve_settings(options: argparse.Namespace) -> Dict[str, Any]:
    """The preset with the flags given on top; every value a job's results depend on."""
    if options.preset not in PRESETS:
        raise UserError(f"unknown --preset {options.preset!r}; valid: {', '.join(PRESETS)}")
    settings = dict(PRESETS[options.preset])
    for key in settings:
        if getattr(options, key, None) is not None:
            settings[key] = getattr(options, key)
    dataset = options.dataset or ("imagenet" if options.preset == "pc_darts_imagenet" else "cifar10")
    if options.preset == "pc_darts_imagenet" and dataset != "imagenet":
        raise UserError(f"--preset {options.preset} searches and trains on ImageNet, not "
                        f"{dataset}: leave out --dataset, or choose another preset")
    settings.update(dataset=dataset, seed=options.seed, location=options.location,
                    space=options.space, partial_channels=options.partial_channels,
                    search_args=options.search_args, train_args=options.train_args)
    if options.space is not None:
        check_space(options.space)
    for key, value in PRESETS["paper"].items():
        if type(value) is int and settings[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {settings[key]}")
    return settings


def check_same_settings(path: str, made_with: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """A pipeline continues only under the settings it was made with."""
    for key, value in settings.items():
        if made_with.get(key) != value:
            raise UserError(f"{path} was made with --{key} {made_with.get(key)}, not {value}: "
                            f"rerun with its own settings, or give another --dir")


# -- state -----------------------------------------------------------------------------------

class PipelineState:
    """``state.json``: the settings and, per job, status, result, seconds, devices,
    attempts and the last command; rewritten atomically on every change."""

    def __init__(self, directory: str, settings: Dict[str, Any]):
        self.directory = directory
        self.path = os.path.join(directory, STATE)
        self.data: Dict[str, Any] = {"settings": settings, "jobs": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.data = json.load(f)
            except (OSError, ValueError) as error:
                raise UserError(f"{self.path} is not a pipeline state file ({error}); "
                                f"give another --dir") from None
            check_same_settings(self.path, self.data.get("settings", {}), settings)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")

    def job(self, name: str) -> Dict[str, Any]:
        return self.data["jobs"].setdefault(name, {"status": "pending", "attempts": 0,
                                                   "seconds": 0.0})

    def done(self, name: str) -> bool:
        return self.job(name)["status"] == "done"

    def result(self, name: str) -> Any:
        return self.job(name).get("result")

    def record(self, job: Job, outcome: Outcome, result: Any, status: str) -> None:
        entry = self.job(job.name)
        entry.update(stage=job.stage, status=status, log=outcome.log or job.log_path,
                     devices=outcome.devices, error=outcome.error,
                     command=outcome.command, fresh_command=shlex.join(job.command(resume=False)))
        entry["attempts"] += 1
        entry["seconds"] += outcome.seconds
        if result is not None:
            entry["result"] = result
        self.save()


# -- stages ----------------------------------------------------------------------------------

def job_dir(directory: str, name: str) -> str:
    """A job's own directory: deterministic, so a rerun finds the job's run and checkpoint."""
    return os.path.join(directory, "jobs", name)


def common_flags(settings: Mapping[str, Any], options: argparse.Namespace, stage: str) -> List[str]:
    """Data, network size and batch of a ``stage`` ('search', 'select' or 'final')."""
    flags = ["--data", options.data, "--init_ch", str(settings[f"{stage}_init_ch"]),
             "--layers", str(settings[f"{stage}_layers"]),
             "--batchsz", str(settings[f"{stage}_batchsz"])]
    flags += ["--deterministic"] if options.deterministic else []
    return flags + (["--workers", str(options.workers)] if options.workers is not None else [])


def search_jobs(settings: Mapping[str, Any], options: argparse.Namespace, directory: str) -> List[Job]:
    """One train_search.py per seed, with the dataset, order, location and extra search
    flags (ImageNet: the sample of train_search.py's --imagenet_sample instead of
    --train_portion, and its --preset where this pipeline's preset is one of them)."""
    from runtime.searching import SEARCH_PRESETS
    flags = common_flags(settings, options, "search") + [
        "--dataset", settings["dataset"], "--epochs", str(settings["search_epochs"])]
    if settings["dataset"] != "imagenet":
        flags += ["--train_portion", str(settings["search_train_portion"])]
    flags += ["--preset", options.preset] if options.preset in SEARCH_PRESETS else []
    flags += ["--unrolled"] if settings["unrolled"] else []
    flags += ["--location", settings["location"]] if settings["location"] else []
    flags += ["--space", settings["space"]] if settings.get("space") else []
    if settings["partial_channels"] is not None:
        flags += ["--partial_channels", str(settings["partial_channels"])]
    flags += shlex.split(settings["search_args"])
    return [Job(f"search-seed{seed}", "search", "train_search.py", flags + ["--seed", str(seed)],
                job_dir(directory, f"search-seed{seed}"))
            for seed in range(settings["seed"], settings["seed"] + settings["searches"])]


def training_job(settings: Mapping[str, Any], options: argparse.Namespace, directory: str,
                 stage: str, name: str, genotype_path: str, seed: int,
                 extra: Sequence[str] = ()) -> Job:
    """A selection or final training of the cell in ``genotype_path``."""
    flags = common_flags(settings, options, stage) + [
        "--arch_path", genotype_path, "--epochs", str(settings[f"{stage}_epochs"]),
        "--seed", str(seed), "--auxiliary",
        *(["--cutout"] if settings["dataset"] != "imagenet" else []), *extra,
        *shlex.split(settings["train_args"])]
    return Job(name, stage, TRAIN_SCRIPTS[settings["dataset"]][0], flags, job_dir(directory, name))


def test_job(settings: Mapping[str, Any], options: argparse.Namespace, directory: str,
             final: Job, genotype_path: str) -> Job:
    """The test script on the ``trained.pt`` of a finished final training."""
    name = final.name.replace("final", "test", 1)
    run_dir = final.run_dir() or ""
    flags = common_flags(settings, options, "final") + [
        "--arch_path", genotype_path, "--auxiliary",
        "--model_path", os.path.join(run_dir, "trained.pt")]
    return Job(name, "test", TRAIN_SCRIPTS[settings["dataset"]][1], flags,
               job_dir(directory, name), resumable=False)


# -- what a finished job found ---------------------------------------------------------------

def search_result(job: Job, directory: str) -> Dict[str, Any]:
    """The genotype a search kept, copied to ``cells/<job>.json`` for the trainings."""
    run_dir = job.run_dir()
    source = os.path.join(run_dir or "", "genotype.json")
    with open(source) as f:
        genotype = json.load(f)
    cell = os.path.join(directory, "cells", f"{job.name}.json")
    atomic_write_text(cell, json.dumps(genotype, indent=1) + "\n")
    return {"genotype": genotype, "genotype_path": cell, "run_dir": run_dir}


def training_result(job: Job, directory: str) -> Dict[str, Any]:
    """The last evaluation of a training: held-out accuracy (selection) or test accuracy."""
    from runtime.experiment import CHECKPOINT, load_torch_file
    run_dir = job.run_dir()
    last = load_torch_file(os.path.join(run_dir or "", CHECKPOINT))["last_test"]
    accuracy = 100.0 * last["correct"][0] / last["total"]
    return {"accuracy": accuracy, "error": 100.0 - accuracy, "images": last["total"],
            "run_dir": run_dir}


def test_result(job: Job, directory: str) -> Dict[str, Any]:
    """The test error the test script printed (its last report in the job's log)."""
    with open(job.log_path) as f:
        found = TEST_ERROR.findall(f.read())
    if not found:
        raise ValueError(f"no test result in {job.log_path}")
    accuracy, correct, total, error = found[-1]
    return {"accuracy": float(accuracy), "error": float(error), "images": int(total)}


# -- running ---------------------------------------------------------------------------------

def run_stage(jobs: Sequence[Job], state: PipelineState, launcher: Any, directory: str,
              collect: Callable[[Job, str], Any], say: Callable[[str], None]) -> None:
    """Run the jobs not done yet; a failed job is reported and retried once."""
    pending = [job for job in jobs if not state.done(job.name)]
    if not pending:
        return
    for attempt in (1, 2):
        say(f"{pending[0].stage}: running {', '.join(job.name for job in pending)} "
            f"({launcher.name})")

        failed: List[Job] = []

        def started(job: Job, slurm_id: str) -> None:
            state.job(job.name)["slurm_id"] = slurm_id
            state.save()

        def finished(job: Job, outcome: Outcome) -> None:
            result = None
            if outcome.returncode == 0:
                try:
                    result = collect(job, directory)
                except (OSError, ValueError, KeyError, TypeError, UserError) as error:
                    say(f"{job.name}: finished without its result ({error})")
            state.record(job, outcome, result, "done" if result is not None else "failed")
            if result is None:
                failed.append(job)
                again = "retrying once" if attempt == 1 else "giving up"
                how = outcome.error or f"exit {outcome.returncode}"
                say(f"{job.name} failed ({how}); log: {state.job(job.name)['log']}; {again}")

        launcher.run(pending, started, finished,
                     {job.name: state.job(job.name).get("slurm_id") for job in pending
                      if state.job(job.name).get("slurm_id")})
        pending = failed
        if not pending:
            return
    last = state.job(pending[0].name)
    why = f" ({last['error']})" if last.get("error") else ""
    raise UserError(f"{pending[0].name} failed twice{why}; see {last['log']}, fix the cause "
                    f"and rerun the same command to continue")


def make_launcher(options: argparse.Namespace, directory: str, say: Callable[[str], None]) -> Any:
    """``--launcher``'s launcher: Slurm's checks for sbatch, submitit and what each job
    asks of the partition first."""
    if options.launcher == "local":
        return launchers.LocalLauncher()
    if options.launcher == "slurm":
        launcher = slurm.SlurmLauncher(options, os.path.join(directory, "slurm"), say)
        slurm.check_request(options)
        return launcher
    raise UserError(f"unknown --launcher {options.launcher!r}; valid: local, slurm")


def flag_checks(settings: Mapping[str, Any], options: argparse.Namespace,
                directory: str) -> List[preflight.FlagCheck]:
    """--search_args and --train_args with the flags the pipeline gives their scripts
    (a search's, a selection's: the most of any training), each optional one included:
    what reproduce.py has a flag for, it sets itself."""
    every = {**settings, "search_args": "", "train_args": "", "unrolled": True,
             "location": settings["location"] or "end", "partial_channels": 1}
    options = argparse.Namespace(**{**vars(options), "workers": 0})
    search = search_jobs(every, options, directory)[0]
    selection = training_job(every, options, directory, "select", "select-check",
                             os.path.join(directory, "cells", "check.json"), settings["seed"],
                             ["--holdout_portion", "0.5"])
    resume = ["--checkpoint_path", directory]
    return [("--search_args", search.script, search.command(resume=False)[2:] + resume,
             settings["search_args"]),
            ("--train_args", selection.script, selection.command(resume=False)[2:] + resume,
             settings["train_args"])]


def select(search: Sequence[Job], selection: Sequence[Job], state: PipelineState) -> Job:
    """The search whose cell scored best on held-out data (ties: the lower seed)."""
    scores = [state.result(job.name)["accuracy"] for job in selection]
    return search[scores.index(max(scores))]


def reproduce(options: argparse.Namespace, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or continue) the whole pipeline; returns the card's data."""
    settings = resolve_settings(options)
    directory = os.path.abspath(options.dir or os.path.join("exp", f"reproduce-{options.preset}"))
    options.data = os.path.abspath(options.data)
    state = PipelineState(directory, settings)
    launcher = make_launcher(options, directory, say)
    # Every stage's needs, before the first job: nothing is written until they are met.
    processes = max(1, options.gpus_per_job) if options.launcher == "slurm" else 1
    preflight.check(settings, options, flag_checks(settings, options, directory), processes)
    state.data["command"] = getattr(options, "command_line", "")
    state.save()
    card = result_card.Card(directory, settings, state.data, options)

    search = search_jobs(settings, options, directory)
    run_stage(search, state, launcher, directory, search_result, say)
    card.write()
    selection = [training_job(settings, options, directory, "select",
                              job.name.replace("search", "select", 1),
                              state.result(job.name)["genotype_path"], settings["seed"],
                              ["--holdout_portion", str(settings["holdout_portion"])])
                 for job in search]
    run_stage(selection, state, launcher, directory, training_result, say)
    chosen = select(search, selection, state)
    state.data["selected"] = chosen.name
    state.save()
    card.write()
    genotype_path = state.result(chosen.name)["genotype_path"]
    finals = [training_job(settings, options, directory, "final", f"final-seed{seed}",
                           genotype_path, seed)
              for seed in range(settings["seed"], settings["seed"] + settings["finals"])]
    run_stage(finals, state, launcher, directory, training_result, say)
    card.write()
    tests = [test_job(settings, options, directory, job, genotype_path) for job in finals]
    run_stage(tests, state, launcher, directory, test_result, say)
    summary = card.write()
    say(f"done: test error {summary['test_error']['text']}; card: "
        f"{os.path.join(directory, result_card.CARD_MD)}")
    return summary
