"""reproduce.py: the paper's protocol as a resumable pipeline of jobs (runtime/pipeline.py),
its launchers (runtime/launchers.py, runtime/slurm.py), the checks before its first job
(runtime/preflight.py) and result card (runtime/result_card.py).

Quick tier: bad input (one line, nothing lost), what a late stage would refuse refused
at start-up, the state and retry logic with a stand-in launcher, the card's arithmetic,
the held-out split of --holdout_portion, the Slurm request and queue checks on canned
sinfo/squeue answers.  Slow tier, on cifar10-mini images: the tiny preset end to end
with the local launcher, a pipeline killed during a search and restarted, and on a real
one-node Slurm cluster (.ci/start-slurm starts one), from another directory: the same
pipeline, requests Slurm refuses or cannot meet, and jobs dying outside their script."""
import argparse
import json
import os
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from training_helpers import REPO, mini_cifar, one_line_error, script_env

from runtime import pipeline, preflight, result_card, slurm, training
from runtime.errors import UserError
from runtime.launchers import Job, Outcome

# A pipeline small enough for a CPU: 60 training images (30 train the weights of a
# search, 30 its architecture; a selection trains on 30 and scores the other 30), three
# steps per epoch everywhere, two searches and two final trainings.  The searches are
# plain DARTS (no_attention), whose supernet dispatches a third of the ops of the
# default's: what these tests check is the pipeline, and the searches of every location
# are tested in test_search_script.py.
TINY_FLAGS = ["--preset", "tiny", "--workers", "0", "--search_epochs", "2",
              "--search_batchsz", "8", "--search_train_portion", "0.5", "--select_batchsz", "8",
              "--location", "no_attention"]
# What must not depend on interruptions or launchers (times and commands may).
SAME = ("searches", "selected_job", "finals", "test_error")


def reproduce(*args: str, env: dict = None, timeout: float = 600,
              cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=cwd,
                          env={**script_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def options(directory: Path, *args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pipeline.add_reproduce_args(parser)
    return parser.parse_args(["--dir", str(directory), *TINY_FLAGS, *args])


def card_numbers(directory: Path) -> dict:
    card = json.loads((directory / result_card.CARD_JSON).read_text())
    card["selected_job"] = card["selected"]["job"]
    return {key: card[key] for key in SAME}


# -- quick: bad input answers with one line and loses nothing ---------------------------------

@pytest.fixture
def made(tmp_path) -> Path:
    """A pipeline directory with a state file made with TINY_FLAGS."""
    directory = tmp_path / "pipe"
    state = pipeline.PipelineState(str(directory), pipeline.resolve_settings(options(directory)))
    state.save()
    return directory


def test_unknown_preset_is_one_line_and_creates_nothing(tmp_path):
    line = one_line_error(reproduce("--preset", "huge", "--dir", str(tmp_path / "p")))
    assert "--preset 'huge'" in line and "paper" in line and "tiny" in line
    assert not (tmp_path / "p").exists()


def test_other_settings_are_refused_and_the_state_kept(made):
    before = (made / pipeline.STATE).read_bytes()
    line = one_line_error(reproduce("--dir", str(made), *TINY_FLAGS, "--search_epochs", "3"))
    assert "--search_epochs 2, not 3" in line and str(made) in line
    assert (made / pipeline.STATE).read_bytes() == before


def test_slurm_without_sbatch_is_one_line(made, tmp_path):
    before = (made / pipeline.STATE).read_bytes()
    bare = tmp_path / "bin"
    bare.mkdir()
    result = reproduce("--dir", str(made), *TINY_FLAGS, "--launcher", "slurm",
                       env={"PATH": str(bare)})
    assert "sbatch" in one_line_error(result)
    assert (made / pipeline.STATE).read_bytes() == before


def test_slurm_without_submitit_is_one_line(made, tmp_path):
    fake = tmp_path / "fake"
    (fake / "submitit").mkdir(parents=True)
    (fake / "submitit" / "__init__.py").write_text("raise ImportError('no submitit here')\n")
    (fake / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    result = reproduce("--dir", str(made), *TINY_FLAGS, "--launcher", "slurm",
                       env={"PATH": f"{fake}:{os.environ['PATH']}", "PYTHONPATH": str(fake)})
    assert "pip install submitit" in one_line_error(result)


def test_deterministic_reaches_every_job_and_every_script_takes_it(tmp_path):
    import test_CIFAR10
    import train_CIFAR10
    import train_search

    opts = options(tmp_path, "--deterministic")
    settings = pipeline.resolve_settings(opts)
    search = pipeline.search_jobs(settings, opts, str(tmp_path))[0]
    select = pipeline.training_job(settings, opts, str(tmp_path), "select", "select-seed2",
                                   "cell.json", 2)
    test = pipeline.test_job(settings, opts, str(tmp_path), select, "cell.json")
    for job, script in ((search, train_search), (select, train_CIFAR10), (test, test_CIFAR10)):
        assert script.parser.parse_args(job.flags).deterministic is True
    assert "--deterministic" not in pipeline.search_jobs(settings, options(tmp_path), "d")[0].flags


# -- quick: state, retries and the card --------------------------------------------------------

class StandInLauncher:
    """Runs nothing: each job 'exits' with the next code listed for it (0 when none)."""
    name = "stand-in"

    def __init__(self, codes: dict):
        self.codes, self.ran = codes, []

    def run(self, jobs, on_start, on_done, submitted_before) -> None:
        for job in jobs:
            self.ran.append(job.name)
            on_done(job, Outcome((self.codes.get(job.name) or [0]).pop(0), 1.5, ["CPU x"], "cmd"))


def stand_in_jobs(directory: Path) -> list:
    return [Job(name, "search", "train_search.py", ["--seed", "1"], str(directory / name))
            for name in ("search-seed1", "search-seed2", "search-seed3")]


def test_failed_job_is_retried_once_and_finished_jobs_not_rerun(tmp_path):
    state = pipeline.PipelineState(str(tmp_path), {"k": 1})
    launcher = StandInLauncher({"search-seed2": [1, 0]})
    said = []
    jobs = stand_in_jobs(tmp_path)
    pipeline.run_stage(jobs, state, launcher, str(tmp_path), lambda job, d: {"ok": job.name},
                       said.append)
    assert launcher.ran == ["search-seed1", "search-seed2", "search-seed3", "search-seed2"]
    assert any("search-seed2 failed (exit 1)" in line and jobs[1].log_path in line
               and "retrying once" in line for line in said)
    saved = json.loads((tmp_path / pipeline.STATE).read_text())["jobs"]
    assert [saved[job.name]["attempts"] for job in jobs] == [1, 2, 1]
    assert saved["search-seed2"]["seconds"] == 3.0 and saved["search-seed2"]["status"] == "done"
    launcher.ran = []
    pipeline.run_stage(jobs, pipeline.PipelineState(str(tmp_path), {"k": 1}), launcher,
                       str(tmp_path), lambda job, d: {}, said.append)
    assert launcher.ran == []


def test_job_dying_outside_its_script_is_reported_with_the_log_that_holds_why(tmp_path):
    class Dying(StandInLauncher):
        def run(self, jobs, on_start, on_done, submitted_before) -> None:
            for job in jobs:
                on_done(job, Outcome(1, 0.0, command="slurm job 7", log=str(tmp_path / "7.err"),
                                     error="ModuleNotFoundError: No module named 'runtime'"))

    state = pipeline.PipelineState(str(tmp_path), {"k": 1})
    said = []
    with pytest.raises(UserError, match=re.escape(
            "search-seed1 failed twice (ModuleNotFoundError: No module named 'runtime'); see "
            f"{tmp_path / '7.err'}, fix the cause")):
        pipeline.run_stage(stand_in_jobs(tmp_path)[:1], state, Dying({}), str(tmp_path),
                           lambda job, d: {}, said.append)
    assert f"search-seed1 failed (ModuleNotFoundError: No module named 'runtime'); log: " \
           f"{tmp_path / '7.err'}; retrying once" in said
    assert state.job("search-seed1")["log"] == str(tmp_path / "7.err")


def test_job_failing_twice_stops_with_its_log(tmp_path):
    state = pipeline.PipelineState(str(tmp_path), {"k": 1})
    jobs = stand_in_jobs(tmp_path)
    launcher = StandInLauncher({"search-seed3": [2, 2]})
    with pytest.raises(UserError, match="search-seed3 failed twice; see .*search-seed3/job.log"):
        pipeline.run_stage(jobs, state, launcher, str(tmp_path), lambda job, d: {}, print)
    assert state.job("search-seed3")["status"] == "failed" and state.done("search-seed1")
    # A result that cannot be read counts as a failure too.
    state = pipeline.PipelineState(str(tmp_path / "other"), {"k": 1})
    with pytest.raises(UserError, match="search-seed1 failed twice"):
        pipeline.run_stage(jobs[:1], state, StandInLauncher({}), str(tmp_path),
                           lambda job, d: json.loads("not json"), print)


def test_selection_picks_the_best_held_out_score_and_the_lower_seed_on_ties(tmp_path):
    state = pipeline.PipelineState(str(tmp_path), {"k": 1})
    search = stand_in_jobs(tmp_path)
    selection = [Job(j.name.replace("search", "select"), "select", "x", [], j.directory)
                 for j in search]
    for job, accuracy in zip(selection, (40.0, 55.0, 55.0)):
        state.job(job.name)["result"] = {"accuracy": accuracy}
    assert pipeline.select(search, selection, state).name == "search-seed2"


def test_card_holds_mean_std_hours_paper_row_and_commands(tmp_path):
    errors = [3.1, 2.9, 3.3]
    jobs = {f"final-seed{s}": {"stage": "final", "status": "done", "seconds": 1800.0,
                               "devices": ["NVIDIA H100"], "result": {"error": 9.0}}
            for s in (2, 3, 4)}
    jobs.update({f"test-seed{s}": {"stage": "test", "status": "done", "seconds": 36.0,
                                   "devices": ["CPU x"], "result": {"error": e},
                                   "fresh_command": f"python test_CIFAR10.py --seed {s}"}
                 for s, e in zip((2, 3, 4), errors)})
    state = {"settings": {}, "jobs": jobs, "command": "python reproduce.py --preset paper"}
    settings = {**pipeline.PRESETS["paper"], "dataset": "cifar10"}
    card = result_card.Card(str(tmp_path), settings, state,
                            argparse.Namespace(data=str(tmp_path)))
    summary = card.write()
    assert summary["test_error"]["mean"] == pytest.approx(statistics.fmean(errors))
    assert summary["test_error"]["std"] == pytest.approx(statistics.stdev(errors))
    assert [f["test_error"] for f in summary["finals"]] == errors
    assert summary["hours"]["final"] == {"hours": pytest.approx(1.5), "unit": "GPU-hours"}
    assert summary["hours"]["test"] == {"hours": pytest.approx(0.03), "unit": "CPU-hours"}
    text = (tmp_path / result_card.CARD_MD).read_text()
    assert ("trained 100 epoch(s) from scratch on 50% of the training split, on the other 50% "
            "(held-out training images; the test split is never used to select)") in text
    assert "| Att-DARTS, paper | 2.54 ± 0.10 | 3.2 |" in text
    assert f"| this pipeline (3 runs) | {summary['test_error']['text']} |" in text
    assert "`python test_CIFAR10.py --seed 3`" in text
    assert json.loads((tmp_path / result_card.CARD_JSON).read_text())["finals"][1]["seed"] == 3


def test_holdout_portion_trains_and_scores_on_disjoint_parts_of_the_training_split(
        cifar_mini, tmp_path):
    data = mini_cifar(cifar_mini, tmp_path / "data", train=4, val=1)
    args = argparse.Namespace(data=str(data), cutout=True, cutout_length=8, holdout_portion=0.25)
    trained, held_out = training.load_train_and_eval(args, "cifar10")
    assert (len(trained), len(held_out)) == (30, 10)
    assert not set(trained.indices) & set(held_out.indices)
    assert held_out.dataset.root.endswith("train")
    # Held-out images are not augmented: the same tensor every time.
    assert held_out[0][0].equal(held_out[0][0])
    assert not trained.dataset.transform is held_out.dataset.transform


# -- quick: what a late stage would refuse, refused before the first job ------------------------

@pytest.fixture(scope="module")
def folders(cifar_mini, tmp_path_factory) -> dict:
    """Image folders: a good one (60 training images), one without a test split, one
    whose test split lacks a class."""
    root = tmp_path_factory.mktemp("preflight")
    made = {name: mini_cifar(cifar_mini, root / name, train=6, val=1)
            for name in ("good", "train_only", "other_classes")}
    shutil.rmtree(made["train_only"] / "val")
    shutil.rmtree(made["other_classes"] / "val" / "cat")
    return made


@pytest.mark.parametrize("folder, flags, message", [
    ("train_only", [], "the final trainings and the tests need the test split of --data: "
                       ".* has a train/ folder but no test/ or val/ folder"),
    ("other_classes", [], "different classes \\(10 and 9\\), which the final trainings refuse"),
    ("good", ["--final_batchsz", "64"], "--final_batchsz 64 is more than the training split "
                                        "holds per process: 60 of the 60 training images"),
    ("good", ["--holdout_portion", "0.9"], "--select_batchsz 8 is more than the part a "
                                           "selection trains on \\(--holdout_portion 0.9"),
    ("good", ["--partial_channels", "3"], "--partial_channels: partial channels K=3 does not "
                                          "divide the 4 channels"),
    ("good", ["--location", "nowhere"], "--location: unknown attention location 'nowhere'"),
    ("good", ["--final_epochs", "0"], "--final_epochs must be at least 1, got 0"),
])
def test_what_a_late_stage_would_refuse_is_one_line_before_any_job(folders, tmp_path, folder,
                                                                   flags, message):
    directory = tmp_path / "pipe"
    with pytest.raises(UserError, match=message) as raised:
        pipeline.reproduce(options(directory, "--data", str(folders[folder]), *flags))
    assert "\n" not in str(raised.value) and not directory.exists()


def test_extra_flags_are_read_by_their_scripts_own_parsers():
    def flags_set(extra: list) -> dict:
        parser = runpy.run_path(str(REPO / "train_search.py"), run_name="__flags__")["parser"]
        return preflight.flags_set(parser, ["--data", "d", "--epochs", "2", "--seed", "2"], extra)

    assert flags_set(["--arch_lr", "1e-3", "--cutout"]) == {
        "set": {"arch_lr": 1e-3, "cutout": True}, "owned": []}
    # An abbreviation or the default value of a flag the pipeline sets counts too.
    assert flags_set(["--epoch", "3", "--seed=2"])["owned"] == ["epochs", "seed"]
    assert flags_set(["--arch_lrr", "1"]) == {"error": "unrecognized arguments: --arch_lrr 1"}
    assert "invalid float value: 'x'" in flags_set(["--arch_lr", "x"])["error"]


# -- quick: the Slurm request and queue, on canned sinfo and squeue answers ---------------------

def slurm_options(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"partition": None, "time": 1440, "gpus_per_job": 1,
                                 "cpus_per_job": 8, "mem_gb": 32, **flags})


def test_request_is_checked_against_the_nodes_and_time_limit_sinfo_lists(monkeypatch):
    listing = ("gpu*|64|512000|gpu:a100:4(S:0-1)|2-00:00:00\n"
               "gpu*|128|256000|gpu:1|2-00:00:00\n"
               "cpu|128|1024000|(null)|infinite\n")
    monkeypatch.setattr(slurm.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, listing, ""))
    slurm.check_request(slurm_options(gpus_per_job=4, cpus_per_job=64, mem_gb=500, time=2880))
    with pytest.raises(UserError, match=r"no node of Slurm partition gpu can hold a job asking "
                       r"for 8 GPU\(s\).*at most 128 CPUs, 500.0 GB and 4 GPU\(s\) \(sinfo\); "
                       r"lower --gpus_per_job, or choose another --partition"):
        slurm.check_request(slurm_options(gpus_per_job=8))
    # Each fits a node, not together: the three flags are named.
    with pytest.raises(UserError, match="lower --cpus_per_job or --mem_gb or --gpus_per_job"):
        slurm.check_request(slurm_options(gpus_per_job=4, cpus_per_job=128, mem_gb=200))
    with pytest.raises(UserError, match="--time 2881 exceeds the 2880-minute limit of Slurm "
                                        "partition gpu"):
        slurm.check_request(slurm_options(time=2881))
    slurm.check_request(slurm_options(partition="cpu", gpus_per_job=0, time=10 ** 6))
    with pytest.raises(UserError, match="partition cpu .* lower --gpus_per_job,"):
        slurm.check_request(slurm_options(partition="cpu"))
    slurm.check_request(slurm_options(partition="elsewhere"))  # not listed: sbatch answers


def test_queue_watch_reports_waiting_jobs_and_stops_at_a_reason_waiting_cannot_clear(
        monkeypatch):
    queues = iter([{"11": ("RUNNING", "None"), "12": ("PENDING", "Resources")}] * 3 + [
        {"11": ("PREEMPTED", "None"), "12": ("PENDING", "Priority")}] * 2 + [
        {"11": ("RUNNING", "None"), "12": ("PENDING", "Priority")},
        {"12": ("PENDING", "QOSMaxGRESPerJob")}])
    monkeypatch.setattr(slurm, "queue_states", lambda job_ids: next(queues))
    said = []
    watch = slurm.QueueWatch(slurm_options(), said.append)
    waiting = [(Job(f"search-seed{seed}", "search", "x", [], "d"), SimpleNamespace(job_id=job_id))
               for seed, job_id in ((2, "11"), (3, "12"))]

    def poll() -> None:
        watch.next_poll = 0.0
        watch.poll(waiting)

    poll()
    poll()  # the same queue again: nothing new to say
    assert said == ["slurm: search-seed2 (job 11) RUNNING, search-seed3 (job 12) PENDING "
                    "(Resources)"]
    watch.said_at -= slurm.REPORT_EVERY_S
    poll()  # unchanged ten minutes later: said again
    assert len(said) == 2 and said[1] == said[0]
    poll()
    assert said[-1] == "slurm: search-seed3 (job 12) PENDING (Priority)"
    # Job 11 left the queue: ended once a look long enough after the first (for its
    # result file to show up) still finds it out; unless it is requeued meanwhile.
    assert watch.ended("11") is None and watch.ended("12") is None
    poll()
    state, since, last = watch.left["11"]
    watch.left["11"] = (state, last - slurm.RESULT_GRACE_S, last)
    assert watch.ended("11") == "PREEMPTED" and watch.ended("12") is None
    poll()
    assert watch.ended("11") is None
    assert said[-1] == ("slurm: search-seed2 (job 11) RUNNING, search-seed3 (job 12) PENDING "
                        "(Priority)")
    with pytest.raises(UserError, match=r"Slurm job 12 \(search-seed3\) is pending for "
                       r"QOSMaxGRESPerJob, which waiting cannot clear: .* change --gpus_per_job, "
                       r"--cpus_per_job, --mem_gb, --time or --partition"):
        poll()


# -- slow: real pipelines on cifar10-mini images -------------------------------------------------

@pytest.fixture(scope="module")
def data(cifar_mini, tmp_path_factory) -> Path:
    return mini_cifar(cifar_mini, tmp_path_factory.mktemp("reproduce_data"), train=6, val=4)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("uninterrupted") / "pipe"
    result = reproduce("--dir", str(directory), "--data", str(data), *TINY_FLAGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return directory


@pytest.mark.slow
def test_tiny_preset_end_to_end_writes_the_card(uninterrupted, data):
    card = json.loads((uninterrupted / result_card.CARD_JSON).read_text())
    assert [s["seed"] for s in card["searches"]] == [2, 3]
    assert all(s["genotype"]["normal"] and 0 <= s["held_out_accuracy"] <= 100
               and s["held_out_images"] == 30 for s in card["searches"])
    selected = card["selected"]
    best = max(card["searches"], key=lambda s: (s["held_out_accuracy"], -s["seed"]))
    assert selected["job"] == best["job"] and selected["params_M"] > 0 and selected["macs_M"] > 0
    assert all((uninterrupted / path).is_file() for path in selected["drawings"])
    errors = [f["test_error"] for f in card["finals"]]
    assert len(errors) == 2 and card["test_error"]["mean"] == pytest.approx(statistics.fmean(errors))
    # The test script reproduces the last evaluation of the training (the test split).
    assert [f["last_epoch_test_error"] for f in card["finals"]] == pytest.approx(errors)
    for name, job in card["jobs"].items():
        assert job["status"] == "done" and job["attempts"] == 1 and os.path.isfile(job["log"])
    state = json.loads((uninterrupted / pipeline.STATE).read_text())
    # Selection scored on 30 held-out training images, the finals on the 40 test images,
    # and their logs and metrics say so.
    assert state["jobs"]["select-seed2"]["result"]["images"] == 30
    assert state["jobs"]["final-seed2"]["result"]["images"] == 40
    selection = Path(state["jobs"]["select-seed2"]["result"]["run_dir"])
    assert "30 training and 30 held-out training images" in (selection / "log.txt").read_text()
    assert "final held-out top-1 acc" in (selection / "log.txt").read_text()
    assert "held_out_top1_acc" in (selection / "metrics.csv").read_text().splitlines()[0]
    final = Path(state["jobs"]["final-seed2"]["result"]["run_dir"], "log.txt").read_text()
    assert "60 training and 40 test images" in final and "final test top-1 acc" in final
    text = (uninterrupted / result_card.CARD_MD).read_text()
    assert "| DARTS, paper | 2.76 ± 0.09 | 3.3 |" in text and "CPU-hours" in text
    # Rerunning the finished pipeline runs no job again.
    again = reproduce("--dir", str(uninterrupted), "--data", str(data), *TINY_FLAGS)
    assert again.returncode == 0 and "running" not in again.stdout
    assert json.loads((uninterrupted / pipeline.STATE).read_text())["jobs"] == state["jobs"]


@pytest.mark.slow
def test_pipeline_killed_during_a_search_ends_as_an_uninterrupted_one(uninterrupted, data,
                                                                      tmp_path):
    directory = tmp_path / "pipe"
    argv = [sys.executable, str(REPO / "reproduce.py"), "--dir", str(directory), "--data",
            str(data), *TINY_FLAGS]
    # Its own session: the kill reaches the pipeline and the job it runs, nothing else.
    process = subprocess.Popen(argv, cwd=REPO, env=script_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = directory / "jobs" / "search-seed3"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/checkpoint.pt")) and time.time() < deadline:
        assert process.poll() is None, "the pipeline ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    state = json.loads((directory / pipeline.STATE).read_text())
    assert state["jobs"]["search-seed2"]["status"] == "done"
    assert state["jobs"].get("search-seed3", {}).get("status") != "done"
    result = reproduce(*argv[2:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resuming" in (checkpoints / "job.log").read_text()
    assert "search: running search-seed3 " in result.stdout
    assert card_numbers(directory) == card_numbers(uninterrupted)


@pytest.mark.slow
def test_extra_flags_a_stage_would_refuse_are_one_line_at_start_up(tmp_path):
    # Parsed by train_search.py's and train_CIFAR10.py's own parsers, in a child process.
    # --unrolled: the tiny preset's search is first order, but reproduce.py has the flag.
    settings = pipeline.resolve_settings(options(
        tmp_path, "--search_args", "--arch_lr 1e-3 --seed 5 --unrolled",
        "--train_args", "--lrr 0.1"))
    checks = pipeline.flag_checks(settings, options(tmp_path), str(tmp_path))
    with pytest.raises(UserError) as raised:
        preflight.check_flags(checks)
    assert str(raised.value) == (
        "--search_args sets --seed, --unrolled, which reproduce.py sets itself: use its own flags "
        "(reproduce.py --help); --train_args '--lrr 0.1': train_CIFAR10.py says: unrecognized "
        "arguments: --lrr 0.1 (nothing was run)")


def slurm_ready() -> str:
    """Why the Slurm test cannot run here ('' when it can)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm is not installed (no sbatch/sinfo; .ci/run installs slurm-wlm and munge)"
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if states.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc"))
                                         for s in states.stdout.split()):
        return "no Slurm node is up (start one with .ci/start-slurm, as .ci/run does)"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed"
    return ""


@pytest.fixture
def slurm_cluster() -> None:
    reason = slurm_ready()
    if reason:
        pytest.skip(reason)


@pytest.mark.slow
def test_same_pipeline_on_slurm_gives_the_same_card(uninterrupted, data, tmp_path, slurm_cluster):
    # Started from outside the repository: the jobs find it all the same.
    directory = tmp_path / "pipe"
    result = reproduce("--dir", str(directory), "--data", str(data), *TINY_FLAGS,
                       "--launcher", "slurm", "--gpus_per_job", "0", "--cpus_per_job", "1",
                       "--mem_gb", "2", "--time", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    state = json.loads((directory / pipeline.STATE).read_text())
    assert all(job.get("slurm_id") for job in state["jobs"].values())
    assert card_numbers(directory) == card_numbers(uninterrupted)


# -- slow: Slurm's refusals and failures on the test cluster, from another directory -------------

@pytest.mark.slow
def test_slurm_request_no_node_can_hold_is_one_line_before_submitting(data, tmp_path,
                                                                      slurm_cluster):
    # The defaults (1 GPU, 8 CPUs, 32 GB) on the GPU-less 2-core node.
    directory = tmp_path / "pipe"
    line = one_line_error(reproduce("--dir", str(directory), "--data", str(data), *TINY_FLAGS,
                                    "--launcher", "slurm", cwd=tmp_path))
    assert "no node of Slurm partition" in line and "(sinfo)" in line
    assert "lower --cpus_per_job or --mem_gb or --gpus_per_job" in line
    assert not directory.exists()


def probe_job(directory: Path, name: str = "probe") -> Job:
    """A job that ends in a second: visualize.py's help."""
    return Job(name, "test", "visualize.py", ["--help"], str(directory / name), resumable=False)


@pytest.mark.slow
def test_submission_sbatch_refuses_is_one_line_with_its_answer(tmp_path, slurm_cluster, capsys):
    # A partition sinfo does not list: left to sbatch, whose answer is in the line.
    launcher = slurm.SlurmLauncher(slurm_options(gpus_per_job=0, cpus_per_job=1, mem_gb=1,
                                                 partition="nowhere"), str(tmp_path / "slurm"))
    with pytest.raises(UserError) as raised:
        launcher.run([probe_job(tmp_path)], lambda job, job_id: pytest.fail("submitted"),
                     lambda job, outcome: pytest.fail("ran"))
    message = str(raised.value)
    assert message.startswith("Slurm refused probe (0 GPU(s), 1 CPUs, 1 GB, 1440 min in "
                              "partition nowhere): sbatch says ")
    assert "invalid partition" in message.lower() and message.endswith(
        "check --gpus_per_job, --cpus_per_job, --mem_gb, --time or --partition "
        "(nothing was submitted)")
    assert capsys.readouterr().err == ""  # submitit's own print of sbatch's errors is kept out


@pytest.mark.slow
def test_job_pending_for_a_reason_waiting_cannot_clear_is_cancelled(tmp_path, slurm_cluster):
    # More cores than the node has, past the check reproduce.py makes first: Slurm
    # queues the jobs for PartitionConfig.
    launcher = slurm.SlurmLauncher(slurm_options(gpus_per_job=0, time=5, mem_gb=1),
                                   str(tmp_path / "slurm"))
    submitted = []
    with pytest.raises(UserError) as raised:
        launcher.run([probe_job(tmp_path, "probe1"), probe_job(tmp_path, "probe2")],
                     lambda job, job_id: submitted.append(job_id),
                     lambda job, outcome: pytest.fail(f"{job.name} ended: {outcome}"))
    message = str(raised.value)
    assert "is pending for PartitionConfig, which waiting cannot clear" in message
    assert "--cpus_per_job" in message and "8 CPUs" in message
    assert message.endswith(f"(cancelled this stage's Slurm jobs {', '.join(submitted)})")
    assert len(submitted) == 2 and not any(
        state in slurm.ACTIVE_STATES for state, _ in slurm.queue_states(submitted).values())


class Unimportable(slurm.SlurmTask):
    """A task the job's Python cannot import (tests/ is not on its path): the job dies
    unpickling it, before any of our code runs."""


@pytest.mark.slow
def test_jobs_run_from_any_directory_and_a_failure_points_at_a_file_that_exists(
        tmp_path, slurm_cluster, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    launcher = slurm.SlurmLauncher(slurm_options(gpus_per_job=0, cpus_per_job=1, mem_gb=1,
                                                 time=5), str(tmp_path / "slurm"))
    job, outcomes = probe_job(tmp_path), []
    launcher.run([job], lambda job, job_id: None, lambda job, outcome: outcomes.append(outcome))
    assert outcomes[0].returncode == 0 and outcomes[0].log == job.log_path
    assert "usage: visualize.py" in Path(job.log_path).read_text()
    # Dying before its script runs, it points at submitit's log, not at the job.log above.
    monkeypatch.setattr(slurm, "SlurmTask", Unimportable)
    launcher.run([job], lambda job, job_id: None, lambda job, outcome: outcomes.append(outcome))
    died = outcomes[1]
    assert died.returncode != 0
    assert died.error == "ModuleNotFoundError: No module named 'test_reproduce'"
    assert died.log.endswith("_log.err") and "ModuleNotFoundError" in Path(died.log).read_text()
