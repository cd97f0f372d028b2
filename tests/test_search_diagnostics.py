"""train_search.py's diagnostics, curvature tracking and early stopping end to end, and
the metrics.csv of search and training runs.

Every search is a subprocess with one thread (C=4, 3 cells) on 40 training images
(4 per class) split 24/16 by --train_portion 0.6: at batch 8 (under torchrun: two
processes at batch 4) every process takes 3 iterations per epoch.  The eigenvalue is
measured on 8 images with one power iteration (what is checked here is how it enters
the search; its value is checked in test_curvature.py).  The Hessian rule is
forced (--early_stop_ratio 1e-9, window 1, from epoch 1) so that it stops at the
second epoch, keeping the first epoch's genotype; --early_stop skip:0 stops after
the first epoch."""
import csv
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from training_helpers import (REPO, TINY, mini_cifar, only_run_dir, run_in_process, run_script,
                              script_env, torchrun_command)

from genotypes import Att_DARTS, genotype_from_dict, load_genotype
from model import NetworkCIFAR
from runtime.complexity import count_macs
from runtime.diagnostics import changed_edges

TINY_SEARCH = ["--init_ch", "4", "--layers", "3", "--batchsz", "8", "--train_portion", "0.6",
               "--workers", "0"]
HESSIAN = ["--hessian_every", "1", "--hessian_images", "8", "--hessian_iterations", "1"]
FORCED_HESSIAN_STOP = ["--early_stop", "hessian", "--early_stop_window", "1",
                       "--early_stop_after", "0", "--early_stop_ratio", "1e-9"]
EIGENVALUES = re.compile(r"rank (\d+): hessian eigenvalues (\[.*\])$", re.MULTILINE)
ARCH_PREFIXES = ("alphas_", "betas_", "gammas_")


@pytest.fixture(scope="module")
def folder(cifar_mini, tmp_path_factory) -> Path:
    """train/ with 4 images of each of the 10 classes; val/ with 2 (for a training run)."""
    return mini_cifar(cifar_mini, tmp_path_factory.mktemp("diagnostics_data"), train=4, val=2)


def _flags(folder: Path, exp: Path, epochs: int, *extra: str) -> list:
    return ["--data", str(folder), "--exp_path", str(exp), *TINY_SEARCH, "--epochs", str(epochs),
            *extra]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def _resumed_search(folder: Path, exp: Path) -> list:
    """One first-order epoch with the eigenvalue and the forced Hessian rule (its
    checkpoint kept as exp/epoch_1.pt), resumed for a second epoch (where the rule
    stops), then resumed again with room for a third."""
    flags = _flags(folder, exp, 1, *HESSIAN, *FORCED_HESSIAN_STOP)
    results = [run_script("train_search.py", *flags)]
    for epochs in ("2", "3"):
        if results[-1].returncode != 0:
            break
        if epochs == "2":
            shutil.copy(only_run_dir(exp) / "checkpoint.pt", exp / "epoch_1.pt")
        flags[flags.index("--epochs") + 1] = epochs
        results.append(run_script("train_search.py", *flags,
                                  "--checkpoint_path", str(only_run_dir(exp))))
    return results


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(2, "train_search.py", *args), cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict:
    """name -> (result(s), exp directory):

    - 'plain': one first-order epoch with the defaults (diagnostics only);
    - 'resumed': ``_resumed_search`` (three results);
    - 'torchrun': first order on two processes, the eigenvalue, --early_stop skip:0;
    - 'second_amp': second order under --amp, the eigenvalue, --early_stop skip:0;
    - 'training': one epoch of train_CIFAR10.py.

    The resumed search and torchrun run as command lines, one after the other in a
    thread, while the runs nothing resumes run in this process (``run_in_process``)."""
    base = tmp_path_factory.mktemp("diagnostics_runs")
    with ThreadPoolExecutor(max_workers=1) as pool:
        resumed = pool.submit(_resumed_search, folder, base / "resumed")
        torchrun = pool.submit(_torchrun, *_flags(folder, base / "torchrun", 2, *HESSIAN,
                                                  "--early_stop", "skip:0", "--batchsz", "4"))
        runs = {
            "second_amp": run_in_process("train_search.py", *_flags(
                folder, base / "second_amp", 2, "--unrolled", "--amp", *HESSIAN, "--early_stop",
                "skip:0")),
            "plain": run_in_process("train_search.py", *_flags(folder, base / "plain", 1)),
            "training": run_in_process("train_CIFAR10.py", "--data", str(folder), "--epochs", "1",
                                       "--exp_path", str(base / "training"), *TINY,
                                       "--batchsz", "8"),
            "resumed": resumed.result(), "torchrun": torchrun.result()}
    return {name: (result, base / name) for name, result in runs.items()}


def _run_of(runs: dict, name: str) -> Path:
    result, exp = runs[name]
    _ok(result)
    return only_run_dir(exp)


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def _arch(run: Path) -> dict:
    return {k: v for k, v in _checkpoint(run)["state_dict"].items() if k.startswith(ARCH_PREFIXES)}


def _history(run: Path) -> list:
    return [json.loads(line) for line in (run / "arch_history.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _epoch_genotype(run: Path, epoch: int):
    return genotype_from_dict(_history(run)[epoch - 1]["genotype"])


def _resumed(runs: dict) -> Path:
    results, exp = runs["resumed"]
    assert len(results) == 3
    for result in results:
        _ok(result)
    return only_run_dir(exp)


@pytest.mark.slow
def test_every_epoch_logs_and_records_the_diagnostics(runs):
    plain = _run_of(runs, "plain")
    log = (plain / "log.txt").read_text()
    assert re.search(r"genotype (un)?changed since the initial architecture", log)
    assert "diagnostics: row entropy (1 uniform, 0 one-hot) alphas_normal mean" in log
    assert "diagnostics: edges per attention module normal Identity" in log
    assert "hessian" not in log.replace("'hessian_", "")  # off by default
    assert "per-epoch metrics in metrics.csv" in log
    assert "hessian" not in _history(plain)[0] and "hessian_eigenvalue" not in _metrics(plain)[0]

    run = _resumed(runs)  # two epochs, the second in a resumed process
    assert re.search(r"genotype (un)?changed since epoch 1", (run / "log.txt").read_text())
    history = _history(run)
    for record in history:
        genotype = genotype_from_dict(record["genotype"])
        stats = record["diagnostics"]
        assert stats["parameter_free"]["normal"] == sum(
            op in ("skip_connect", "max_pool_3x3", "avg_pool_3x3") for op, _, _ in genotype.normal)
        assert stats["skip_connect"]["reduce"] == sum(op == "skip_connect" for op, _, _ in genotype.reduce)
        assert sum(stats["attention"]["reduce"].values()) == 8
        assert set(stats["entropy"]) == set(record["arch"])
    assert history[1]["diagnostics"]["edges_changed"] == changed_edges(
        genotype_from_dict(history[1]["genotype"]), genotype_from_dict(history[0]["genotype"]))
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert [float(row["valid_acc"]) for row in rows] == [r["valid_acc"] for r in history]
    assert [int(row["edges_changed"]) for row in rows] == [r["diagnostics"]["edges_changed"]
                                                           for r in history]
    assert {"entropy_betas_reduce_min", "parameter_free_normal", "attention_normal_CBAM"} <= set(rows[0])


@pytest.mark.slow
def test_measuring_the_eigenvalue_changes_no_search_result(runs):
    """An epoch with --hessian_every 1 ends on bitwise the architecture (and weights) of
    the same epoch without it."""
    plain, hessian = _run_of(runs, "plain"), _resumed(runs)
    a = _checkpoint(plain)["state_dict"]
    b = torch.load(hessian.parent / "epoch_1.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], _arch(hessian)[k]) for k in _arch(hessian))  # epoch 2 moved on
    assert _history(plain)[0]["arch"] == _history(hessian)[0]["arch"]


@pytest.mark.slow
def test_the_hessian_rule_stops_on_the_eigenvalues_of_both_processes_of_a_resumed_search(runs):
    """The first process measured epoch 1; the resumed one measures epoch 2 and stops
    on both (epoch 1's from the checkpoint), keeping epoch 1's genotype; resumed again,
    the search stays stopped."""
    plain, run = _run_of(runs, "plain"), _resumed(runs)
    log = (run / "log.txt").read_text()
    assert "on a fixed subset of 8 images" in log
    assert log.count("hessian: dominant eigenvalue") == 3  # the setting, then two epochs
    history = _history(run)
    first, second = (r["hessian"]["eigenvalue"] for r in history)
    assert [r["hessian"]["iterations"] for r in history] == [1, 1]
    assert (f"early stop after epoch 2: the dominant Hessian eigenvalue's mean magnitude grew "
            f"{abs(second) / abs(first):.3g}x (> --early_stop_ratio 1e-09), from "
            f"{abs(first):.4g} over epochs 1-1 to {abs(second):.4g} over epochs 2-2; keeping "
            f"the genotype of epoch 1") in log
    assert history[1]["early_stop"]["kept_epoch"] == 1 and "early_stop" not in history[0]
    assert load_genotype(str(run / "genotype.json")) == _epoch_genotype(plain, 1) == \
        _epoch_genotype(run, 1)
    assert _checkpoint(run)["early_stop"]["kept_epoch"] == 1
    rows = _metrics(run)
    assert [float(row["hessian_eigenvalue"]) for row in rows] == [first, second]
    # The third process: nothing to do, the genotype of epoch 1 stays.
    assert _checkpoint(run)["epoch"] == 2 and len(history) == 2 and len(rows) == 2
    assert "this search stopped early after epoch 2" in log
    assert log.count("final genotype") == 3
    assert log.count("early stop after epoch") == 1


@pytest.mark.slow
def test_skip_rule_with_second_order_amp_and_recomputed_cells(runs):
    run = _run_of(runs, "second_amp")
    log = (run / "log.txt").read_text()
    assert "autocast bfloat16" in log and "recomputed in backward, second order" in log
    assert log.count("hessian: dominant eigenvalue") == 2
    assert "early stop after epoch 1: the normal cell of epoch 1 holds" in log
    assert "epoch 2/2" not in log
    assert _checkpoint(run)["epoch"] == 1 and len(_metrics(run)) == 1
    assert load_genotype(str(run / "genotype.json")) == _epoch_genotype(run, 1)


@pytest.mark.parametrize("flags, needle", [
    (["--early_stop", "skip:two"], "--early_stop: expected skip:N"),
    (["--early_stop", "hessian"], "--hessian_every"),
    (["--hessian_every", "1", "--hessian_images", "1"], "--hessian_images"),
    (["--hessian_every", "-1"], "--hessian_every"),
])
def test_bad_flags_are_one_line_errors_before_anything_starts(folder, tmp_path, flags, needle):
    import train_search
    from runtime import searching
    from runtime.errors import UserError

    args = train_search.parser.parse_args(_flags(folder, tmp_path / "exp", 1, *flags))
    with pytest.raises(UserError, match=needle) as error:
        searching.search(args)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_torchrun_ranks_hold_the_same_eigenvalue_and_stop_together(runs):
    result, exp = runs["torchrun"]
    _ok(result)
    found = dict(EIGENVALUES.findall(result.stdout))
    assert set(found) == {"0", "1"}, result.stdout[-2000:]
    assert found["0"] == found["1"]  # printed with every digit (repr)
    run = only_run_dir(exp)
    log = (run / "log.txt").read_text()
    assert "early stop after epoch 1" in log
    assert [r["hessian"]["eigenvalue"] for r in _history(run)] == json.loads(found["0"])
    assert sorted(p.name for p in exp.rglob("metrics.csv")) == ["metrics.csv"]
    assert load_genotype(str(run / "genotype.json")) == _epoch_genotype(run, 1)


@pytest.mark.slow
def test_training_logs_its_macs_and_writes_metrics_csv(runs):
    run = _run_of(runs, "training")
    macs = count_macs(NetworkCIFAR(4, 10, 3, False, Att_DARTS), (3, 32, 32))
    assert f"{macs / 1e6:.1f} M multiply-accumulates per 32x32 image" in (run / "log.txt").read_text()
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == ["1"]
    assert {"lr", "train_loss", "train_acc", "test_top1_acc", "best_acc"} <= set(rows[0])


@pytest.mark.slow
def test_plot_search_draws_the_diagnostics(runs, tmp_path):
    from runtime import figures

    history = _history(_resumed(runs))
    figures.plot_diagnostics(history, str(tmp_path / "diagnostics.png"))
    figures.plot_attention(history, figures.attention_names(history),
                               str(tmp_path / "attention.png"))
    assert figures.attention_names(history) == ["Identity", "SE", "BAM", "CBAM", "GE_theta-plus",
                                                    "DoubleAttention"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("diagnostics.png", "attention.png"))


@pytest.mark.slow
def test_bench_collapse_tabulates_a_search_from_its_history(runs):
    """bench/collapse.py's table, read back from a real search's arch_history.jsonl: a
    row per epoch with the normal cell's skip connections and the eigenvalue, then the
    final normal cell."""
    from bench.collapse import read_history, report

    run = _resumed(runs)
    history = _history(run)
    epochs = read_history(str(run))
    assert [e["epoch"] for e in epochs] == [1, 2]
    for epoch, record in zip(epochs, history):
        assert epoch["skip_connect"] == record["diagnostics"]["skip_connect"]["normal"]
        assert epoch["eigenvalue"] == record["hessian"]["eigenvalue"] != 0
    result = {"run_dir": str(run), "seconds": 12.0, "returncode": 0, "epochs": epochs}
    failed = {"run_dir": "/nowhere", "seconds": 1.0, "returncode": 1, "epochs": []}
    lines = report({"s3": {"darts": result, "beta": failed}}, ["darts", "beta"]).splitlines()
    assert "## space s3: skip connections in the normal cell" in lines[1]
    for epoch in epochs:
        value = f"{epoch['eigenvalue']:.3g}{'' if epoch['converged'] else '*'}"
        assert f"| {epoch['epoch']} | {epoch['skip_connect']} ({value}) | - |" in lines
    final = ", ".join(f"{op}<-{source}" for op, source, _ in history[-1]["genotype"]["normal"])
    assert f"| darts | {final} | 12 |" in lines
    assert "| beta | failed, see /nowhere | 1 |" in lines
