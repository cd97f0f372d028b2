"""reproduce.py: the paper's protocol as a resumable pipeline of jobs (runtime/pipeline.py),
its launchers (runtime/launchers.py) and result card (runtime/result_card.py).

Quick tier: bad input (one line, nothing lost), the state and retry logic with a
stand-in launcher, the card's arithmetic, the held-out split of --holdout_portion.
Slow tier, on cifar10-mini images: the tiny preset end to end with the local launcher,
a pipeline killed during a search and restarted, and the same pipeline on a real
one-node Slurm cluster (.ci/start-slurm starts one)."""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_helpers import REPO, mini_cifar, one_line_error, script_env

from runtime import pipeline, result_card, training
from runtime.errors import UserError
from runtime.launchers import Job, Outcome

# A pipeline small enough for a CPU: 60 training images (30 train the weights of a
# search, 30 its architecture; a selection trains on 30 and scores the other 30), three
# steps per epoch everywhere, two searches and two final trainings.
TINY_FLAGS = ["--preset", "tiny", "--workers", "0", "--search_epochs", "2",
              "--search_batchsz", "8", "--search_train_portion", "0.5", "--select_batchsz", "8"]
# What must not depend on interruptions or launchers (times and commands may).
SAME = ("searches", "selected_job", "finals", "test_error")


def reproduce(*args: str, env: dict = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=REPO,
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
    card = result_card.Card(str(tmp_path), {"dataset": "cifar10"}, state,
                            argparse.Namespace(data=str(tmp_path)))
    summary = card.write()
    assert summary["test_error"]["mean"] == pytest.approx(statistics.fmean(errors))
    assert summary["test_error"]["std"] == pytest.approx(statistics.stdev(errors))
    assert [f["test_error"] for f in summary["finals"]] == errors
    assert summary["hours"]["final"] == {"hours": pytest.approx(1.5), "unit": "GPU-hours"}
    assert summary["hours"]["test"] == {"hours": pytest.approx(0.03), "unit": "CPU-hours"}
    text = (tmp_path / result_card.CARD_MD).read_text()
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
    assert all(s["genotype"]["normal"] and 0 <= s["selection_score"] <= 100
               for s in card["searches"])
    selected = card["selected"]
    best = max(card["searches"], key=lambda s: (s["selection_score"], -s["seed"]))
    assert selected["job"] == best["job"] and selected["params_M"] > 0 and selected["macs_M"] > 0
    assert all((uninterrupted / path).is_file() for path in selected["drawings"])
    errors = [f["test_error"] for f in card["finals"]]
    assert len(errors) == 2 and card["test_error"]["mean"] == pytest.approx(statistics.fmean(errors))
    # The test script reproduces the last evaluation of the training (the test split).
    assert [f["last_epoch_test_error"] for f in card["finals"]] == pytest.approx(errors)
    for name, job in card["jobs"].items():
        assert job["status"] == "done" and job["attempts"] == 1 and os.path.isfile(job["log"])
    state = json.loads((uninterrupted / pipeline.STATE).read_text())
    # Selection scored on 30 held-out training images, the finals on the 40 test images.
    assert state["jobs"]["select-seed2"]["result"]["images"] == 30
    assert state["jobs"]["final-seed2"]["result"]["images"] == 40
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


@pytest.mark.slow
def test_same_pipeline_on_slurm_gives_the_same_card(uninterrupted, data, tmp_path):
    reason = slurm_ready()
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "pipe"
    result = reproduce("--dir", str(directory), "--data", str(data), *TINY_FLAGS,
                       "--launcher", "slurm", "--gpus_per_job", "0", "--cpus_per_job", "1",
                       "--mem_gb", "2", "--time", "10")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    state = json.loads((directory / pipeline.STATE).read_text())
    assert all(job.get("slurm_id") for job in state["jobs"].values())
    assert card_numbers(directory) == card_numbers(uninterrupted)
