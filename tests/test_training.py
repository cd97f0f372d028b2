"""train_CIFAR10.py / train_CIFAR100.py / train_ImageNet.py: runs end to end on small
image folders, the test scripts reproduce their accuracy, resume, torchrun, errors.

Every training run takes at least 3 steps per epoch and process (the runs log each
step, --report_freq 1, and the tests check the count): the second step is where a
loop's state carried from one step to the next first matters."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from training_helpers import (REPO, TINY, command, mini_cifar, one_line_error, only_run_dir,
                              random_image_folder, reported_accuracy, rng_entry, run_files,
                              run_in_process, run_ok, run_script, script_env, torchrun_command)

import genotypes
from model import NetworkCIFAR
from runtime.data import ShardSampler
from runtime.parallel import Runtime


@pytest.fixture(scope="module")
def cifar(cifar_mini, tmp_path_factory) -> Path:
    """20 training and 10 test images per class of cifar10-mini."""
    return mini_cifar(cifar_mini, tmp_path_factory.mktemp("cifar"))


def _state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


EVERY_STEP = ["--report_freq", "1"]


def _steps_per_epoch(log: str) -> list:
    """The step count of every epoch a run logged (its 'train step N/M' lines)."""
    steps = [(int(n), int(m)) for n, m in re.findall(r"train step (\d+)/(\d+)", log)]
    totals = [m for n, m in steps if n == m]
    assert [n for n, _ in steps] == [n for m in totals for n in range(1, m + 1)], steps
    return totals


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in
    sessions of their own, so killing a process group would miss them)."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    pending = [pid]
    while pending:
        current = pending.pop()
        pending += children.get(current, [])
        try:
            os.kill(current, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_after_first_checkpoint(cmd: list, exp: Path) -> Path:
    """Start a run and kill it (all its processes) as soon as its first checkpoint
    is written, as a preempted job would be; returns the run directory."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("stopping a run mid-way needs Linux's /proc")
    stderr = exp.parent / f"{exp.name}.stderr"
    with open(stderr, "w") as errors:
        process = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL,
                                   stderr=errors)
    deadline = time.time() + 240
    try:
        while not list(exp.glob("*/checkpoint.pt")):
            assert process.poll() is None, stderr.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.02)
    finally:
        _kill_tree(process.pid)
        process.wait()
    run = only_run_dir(exp)
    assert _state_dict(run / "checkpoint.pt")["epoch"] == 1
    assert not (run / "trained.pt").exists()
    return run


@pytest.fixture(scope="module")
def cifar10_run(cifar, tmp_path_factory):
    """One epoch of `train_CIFAR10.py --arch Att_DARTS --auxiliary --cutout`:
    (flags, stdout, run directory)."""
    exp = tmp_path_factory.mktemp("cifar10_run") / "exp"
    flags = ["--data", str(cifar), "--arch", "Att_DARTS", "--auxiliary", "--cutout", "--epochs", "1",
             "--exp_path", str(exp), *TINY, *EVERY_STEP]
    return flags, run_ok("train_CIFAR10.py", *flags).stdout, only_run_dir(exp)


@pytest.mark.slow
def test_cifar10_run_writes_its_files_and_the_test_script_reproduces_its_accuracy(cifar, cifar10_run):
    _, stdout, run = cifar10_run
    assert run.name.startswith("train_CIFAR10-")
    assert {p.name for p in run.iterdir()} == run_files("log.txt", "trained.pt", "best.pt",
                                                        "checkpoint.pt", "genotype.json",
                                                        "metrics.csv")
    log = (run / "log.txt").read_text()
    for expected in ("'cutout': True", "param size", "epoch 1/1 lr 2.500000e-02", "final test top-1"):
        assert expected in log
    assert _steps_per_epoch(log) == [6]  # 200 images, batch 32
    # trained.pt: the bare state_dict of the network, in the published layout.
    weights = _state_dict(run / "trained.pt")
    reference = NetworkCIFAR(4, 10, 3, True, genotypes.Att_DARTS).state_dict()
    assert list(weights) == list(reference)
    assert all(weights[k].shape == reference[k].shape for k in reference)

    final = reported_accuracy(stdout)
    assert final[0][3] == 100  # the whole test split
    assert final == reported_accuracy(log)
    tested = run_ok("test_CIFAR10.py", "--data", str(cifar), "--arch", "Att_DARTS", "--auxiliary",
                    "--model_path", str(run / "trained.pt"), *TINY)
    assert reported_accuracy(tested.stdout) == final


@pytest.mark.slow
def test_arch_path_genotype_json_wins_over_arch(cifar, tmp_path):
    genotype_file = tmp_path / "genotype.json"
    genotypes.save_genotype(genotypes.DARTS_V2, str(genotype_file))
    exp = tmp_path / "exp"
    trained = run_ok("train_CIFAR10.py", "--data", str(cifar), "--arch", "Att_DARTS",
                     "--arch_path", str(genotype_file), "--epochs", "1", "--exp_path", str(exp),
                     *TINY, in_process=True)
    run = only_run_dir(exp)
    assert genotypes.load_genotype(str(run / "genotype.json")) == genotypes.load_genotype(str(genotype_file))
    tested = run_ok("test_CIFAR10.py", "--data", str(cifar), "--arch_path", str(genotype_file),
                    "--model_path", str(run / "trained.pt"), *TINY, in_process=True)
    assert reported_accuracy(tested.stdout) == reported_accuracy(trained.stdout)


@pytest.mark.slow
def test_cifar100_on_a_folder_takes_the_class_count_from_it(cifar_mini, tmp_path):
    folder = mini_cifar(cifar_mini, tmp_path / "three", classes=("bird", "cat", "dog"), val=5)
    exp = tmp_path / "exp"
    # With mixed precision and channels-last too (bfloat16 autocast on the CPU).
    fast = ["--amp", "--channels_last"]
    trained = run_ok("train_CIFAR100.py", "--data", str(folder), "--auxiliary", "--epochs", "1",
                     "--exp_path", str(exp), *fast, *TINY, "--batchsz", "16", *EVERY_STEP,
                     in_process=True)
    run = only_run_dir(exp)
    assert _steps_per_epoch((run / "log.txt").read_text()) == [3]  # 60 images, batch 16
    weights = _state_dict(run / "trained.pt")
    assert weights["classifier.weight"].shape[0] == 3
    assert weights["auxiliary_head.classifier.weight"].shape[0] == 3
    final = reported_accuracy(trained.stdout)
    assert final[0][3] == 15
    assert "autocast bfloat16" in (run / "log.txt").read_text()
    tested = run_ok("test_CIFAR100.py", "--data", str(folder), "--auxiliary",
                    "--model_path", str(run / "trained.pt"), *fast, *TINY, in_process=True)
    assert reported_accuracy(tested.stdout) == final


@pytest.mark.slow
def test_imagenet_train_and_test_on_an_image_folder(tmp_path):
    folder = random_image_folder(tmp_path / "imagenet", classes=3, train=4, val=2)
    exp = tmp_path / "exp"
    small = ["--init_ch", "8", "--layers", "3", "--batchsz", "4", "--workers", "0"]
    trained = run_ok("train_ImageNet.py", "--data", str(folder), "--auxiliary", "--epochs", "2",
                     "--exp_path", str(exp), *small, *EVERY_STEP, in_process=True)
    log = (only_run_dir(exp) / "log.txt").read_text()
    assert _steps_per_epoch(log) == [3, 3]  # 12 images, batch 4
    # The step decay is what the run used: lr 0.1, then 0.1 * 0.97.
    assert "epoch 1/2 lr 1.000000e-01" in log and "epoch 2/2 lr 9.700000e-02" in log
    assert "'label_smooth': 0.1" in log
    final = reported_accuracy(trained.stdout)
    assert [(k, total) for k, _, _, total in final] == [(1, 6), (5, 6)]
    assert final[1][2] == 6  # three classes: every target is in the top 5
    tested = run_ok("test_imagenet.py", "--data", str(folder), "--auxiliary",
                    "--model_path", str(only_run_dir(exp) / "trained.pt"), *small, in_process=True)
    assert reported_accuracy(tested.stdout) == final


def test_cifar_defaults_follow_the_published_setup():
    import test_CIFAR100
    import train_CIFAR10
    args = train_CIFAR10.parser.parse_args([])
    assert (args.batchsz, args.lr, args.momentum, args.wd, args.epochs, args.init_ch, args.layers,
            args.auxiliary_weight, args.cutout, args.cutout_length, args.drop_path_prob,
            args.grad_clip, args.seed, args.data, args.arch, args.auxiliary) == (
        96, 0.025, 0.9, 3e-4, 600, 36, 20, 0.4, False, 16, 0.2, 5.0, 2, "data", "Att_DARTS", False)
    args = test_CIFAR100.parser.parse_args(["--model_path", "x.pt"])
    assert (args.init_ch, args.layers, args.batchsz) == (36, 20, 96)


def test_imagenet_uses_label_smoothing_and_the_step_decay():
    import train_ImageNet
    args = train_ImageNet.parser.parse_args([])
    criterion = train_ImageNet.build_criterion(args)
    assert criterion.label_smoothing == 0.1
    # Two formulas of one quantity, compared in float64.
    logits, target = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64), torch.tensor([0])
    smoothed = 0.9 * torch.nn.functional.cross_entropy(logits, target) - 0.1 * torch.log_softmax(
        logits, 1).mean()
    assert criterion(logits, target).item() == pytest.approx(smoothed.item(), rel=1e-12)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train_ImageNet.build_scheduler(optimizer, args)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.97 ** 2, rel=1e-12)
    assert (args.batchsz, args.wd, args.epochs, args.init_ch, args.layers, args.drop_path_prob,
            args.seed) == (128, 3e-5, 250, 48, 14, 0.0, 0)


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(cifar, tmp_path):
    flags = ["--data", str(cifar), "--auxiliary", "--cutout", "--epochs", "2", *TINY, *EVERY_STEP]
    reference = run_ok("train_CIFAR10.py", *flags, "--exp_path", str(tmp_path / "reference"),
                       in_process=True)
    exp = tmp_path / "interrupted"
    run = _kill_after_first_checkpoint(command("train_CIFAR10.py", *flags, "--exp_path", str(exp)), exp)
    resumed = run_ok("train_CIFAR10.py", *flags, "--exp_path", str(tmp_path / "unused"),
                     "--checkpoint_path", str(run / "checkpoint.pt"))
    assert not (tmp_path / "unused").exists()  # the resumed run writes into its own directory
    assert reported_accuracy(resumed.stdout) == reported_accuracy(reference.stdout)
    expected = _state_dict(only_run_dir(tmp_path / "reference") / "trained.pt")
    weights = _state_dict(run / "trained.pt")
    assert list(weights) == list(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    log = (run / "log.txt").read_text()
    assert "resuming" in log and log.count("final test") == 1
    # The resumed part of the log: the whole second epoch (the killed run may have
    # logged some of its steps before "resuming").
    assert _steps_per_epoch(log.split("resuming")[1]) == [6]  # 200 images, batch 32
    # Cosine from 0.025 over 2 epochs; drop-path 0.2 ramped from 0.
    assert "epoch 2/2 lr 1.250000e-02 drop_path 0.1000" in log
    assert log.count("epoch 1/2 lr") == log.count("epoch 2/2 lr") == 1



@pytest.mark.slow
def test_a_checkpoint_in_the_earlier_layout_resumes(cifar, tmp_path):
    """A checkpoint.pt as the train scripts wrote it before training shared its loop with
    the search (built here key by key, after the first of two epochs) resumes."""
    import train_CIFAR10

    flags = ["--data", str(cifar), "--auxiliary", "--epochs", "2", "--exp_path",
             str(tmp_path / "unused"), *TINY]
    args = train_CIFAR10.parser.parse_args(flags)
    torch.manual_seed(args.seed)
    network = NetworkCIFAR(4, 10, 3, True, genotypes.Att_DARTS)
    optimizer = torch.optim.SGD(network.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2.0, eta_min=0.0)
    logits, logits_aux = network(torch.randn(4, 3, 32, 32))
    (logits.sum() + logits_aux.sum()).backward()
    optimizer.step()
    scheduler.step()
    run = tmp_path / "exp" / "earlier"
    run.mkdir(parents=True)
    torch.save({
        "state_dict": network.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "epoch": 1,
        "best_acc": 10.0, "last_test": {"topk": (1,), "correct": [10], "total": 100},
        "args": vars(args), "genotype": genotypes.genotype_to_dict(genotypes.Att_DARTS),
        "rng": [rng_entry()],
    }, run / "checkpoint.pt")

    resumed = run_ok("train_CIFAR10.py", *flags, *EVERY_STEP,
                     "--checkpoint_path", str(run / "checkpoint.pt"))
    assert not (tmp_path / "unused").exists()
    assert reported_accuracy(resumed.stdout)[0][3] == 100
    assert _state_dict(run / "checkpoint.pt")["epoch"] == 2
    log = (run / "log.txt").read_text()
    assert "resuming" in log and "epoch 2/2 lr 1.250000e-02" in log
    assert _steps_per_epoch(log) == [6]
    assert (run / "trained.pt").exists()

@pytest.mark.slow
def test_resume_refuses_a_foreign_checkpoint_or_other_flags(cifar10_run):
    flags, _, run = cifar10_run
    error = one_line_error(run_in_process("train_CIFAR10.py", *flags,
                                          "--checkpoint_path", str(run / "trained.pt")))
    assert "trained.pt is not a resumable training checkpoint" in error
    error = one_line_error(run_in_process("train_CIFAR10.py", *flags, "--lr", "0.1",
                                          "--checkpoint_path", str(run)))
    assert "--lr 0.025, not 0.1" in error


@pytest.mark.slow
def test_missing_data_offline_is_one_line_saying_what_and_where(tmp_path):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    started = time.time()
    error = one_line_error(run_in_process("train_CIFAR10.py", "--data", str(empty), "--epochs",
                                          "1", "--exp_path", str(tmp_path / "exp"), *TINY))
    assert time.time() - started < 90
    assert "CIFAR10" in error and str(empty) in error
    assert not (tmp_path / "exp").exists()
    error = one_line_error(run_in_process("train_ImageNet.py", "--data", str(empty), "--epochs",
                                          "1", "--exp_path", str(tmp_path / "exp"), *TINY))
    assert str(empty / "train") in error


@pytest.mark.slow
def test_torchrun_run_and_its_resume_write_once_and_test_the_whole_split(cifar_mini, tmp_path):
    # 15 test images: two processes cannot split them evenly.
    folder = mini_cifar(cifar_mini, tmp_path / "three", classes=("bird", "cat", "dog"), val=5)
    exp = tmp_path / "exp"
    flags = ["--data", str(folder), "--auxiliary", "--epochs", "2", "--exp_path", str(exp),
             *TINY, "--batchsz", "8", *EVERY_STEP]
    run = _kill_after_first_checkpoint(torchrun_command(2, "train_CIFAR10.py", *flags), exp)
    assert len(_state_dict(run / "checkpoint.pt")["rng"]) == 2  # each process's random streams
    resumed = subprocess.run(torchrun_command(2, "train_CIFAR10.py", *flags,
                                              "--checkpoint_path", str(run / "checkpoint.pt")),
                             cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_run_dir(exp) == run
    assert {p.name for p in run.iterdir()} == run_files("best.pt", "checkpoint.pt", "genotype.json",
                                                        "log.txt", "metrics.csv", "trained.pt")
    log = (run / "log.txt").read_text()
    assert log.count("epoch 1/2 lr") == 1 and log.count("epoch 2/2 lr") == 1
    assert log.count("final test") == 1 and "2 process(es)" in log
    # 60 images: 30 per process, in batches of 8.
    assert _steps_per_epoch(log.split("resuming")[1]) == [3]
    final = reported_accuracy(resumed.stdout)
    assert final[0][3] == 15  # every test image counted exactly once over both processes
    tested = run_ok("test_CIFAR10.py", "--data", str(folder), "--auxiliary",
                    "--model_path", str(run / "trained.pt"), *TINY, "--batchsz", "8",
                    in_process=True)
    assert reported_accuracy(tested.stdout) == final


def test_evaluation_shards_cover_every_image_once():
    shards = [list(ShardSampler(range(7), Runtime(torch.device("cpu"), rank, 2))) for rank in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]


@pytest.mark.slow
def test_device_loader_run_resumes_bit_for_bit_and_logs_its_speed(cifar, tmp_path):
    """--device_loader (the GPU's default) on the CPU: batches augmented on the device,
    3+ steps per epoch, a run extended from 1 to 2 epochs equal to a 2-epoch run (the
    extension with --deterministic: on the CPU the same numbers)."""
    flags = ["--data", str(cifar), "--auxiliary", "--cutout", "--device_loader", *TINY, *EVERY_STEP]
    # The two runs nothing resumes run in this process; the resumed one as a command line.
    reference = run_ok("train_CIFAR10.py", *flags, "--epochs", "2",
                       "--exp_path", str(tmp_path / "reference"), in_process=True)
    run_ok("train_CIFAR10.py", *flags, "--epochs", "1", "--exp_path", str(tmp_path / "part"),
           in_process=True)
    run = only_run_dir(tmp_path / "part")
    resumed = run_ok("train_CIFAR10.py", *flags, "--epochs", "2",
                     "--checkpoint_path", str(run / "checkpoint.pt"), "--deterministic")
    assert reported_accuracy(resumed.stdout) == reported_accuracy(reference.stdout)
    expected = _state_dict(only_run_dir(tmp_path / "reference") / "trained.pt")
    weights = _state_dict(run / "trained.pt")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    log = (run / "log.txt").read_text()
    assert "device loader on (as requested)" in log and "CUDA graphs off" in log
    assert "deterministic kernels (--deterministic)" in log.split("resuming")[1]
    assert _steps_per_epoch(log) == [6, 6]  # 200 images, batch 32
    assert len(re.findall(r"time [\d.]+s \d+ img/s, [\d.]+ s/it, eta \d+:\d\d:\d\d", log)) == 2
    last_epoch = next(line for line in log.splitlines() if "epoch 2/2 lr" in line)
    assert last_epoch.endswith("eta 0:00:00")
