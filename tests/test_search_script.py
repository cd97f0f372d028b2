"""train_search.py end to end on a tiny image folder: what a search writes,
every --location, resume, one-line errors, torchrun, and plot_search.py on the result.

Every search is a subprocess with one thread (C=4, 3 cells, batch 16, 4 images per
class: each half of the 40 training images gives one batch)."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from genotypes import genotype_from_dict, genotype_to_dict, load_genotype
from model import NetworkCIFAR
from training_helpers import (REPO, command, mini_cifar, one_line_error, only_run_dir, rng_entry,
                              run_parallel, run_script, script_env, torchrun_command)

LOCATIONS = ["after_every", "end", "after_every_and_end", "mixed_with_operation",
             "double_mixed", "no_attention"]
TINY_SEARCH = ["--init_ch", "4", "--layers", "3", "--batchsz", "16", "--workers", "0"]
ARCH_PREFIXES = ("alphas_", "betas_", "gammas_")
HISTORY_KEYS = {"epoch", "lr", "train_acc", "valid_acc", "arch", "candidates", "genotype"}
DIGEST = re.compile(r"^rank (\d+): architecture sha256 ([0-9a-f]+)$", re.MULTILINE)
# Any download attempt fails at once instead of reaching (or waiting for) the network.
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(scope="module")
def folder(cifar_mini, tmp_path_factory) -> Path:
    """train/ with 4 images of each of the 10 classes of cifar10-mini."""
    return mini_cifar(cifar_mini, tmp_path_factory.mktemp("search_data"), train=4, val=0)


def search_flags(folder: Path, exp: Path, epochs: int = 1, *extra: str) -> list:
    return ["--data", str(folder), "--exp_path", str(exp), *TINY_SEARCH, "--epochs", str(epochs),
            *extra]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def _arch_state(run: Path) -> dict:
    state = _checkpoint(run)["state_dict"]
    arch = {k: v for k, v in state.items() if k.startswith(ARCH_PREFIXES)}
    assert arch
    return arch


def _assert_same_arch(run_a: Path, run_b: Path) -> None:
    a, b = _arch_state(run_a), _arch_state(run_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (run_a / "genotype.json").read_text() == (run_b / "genotype.json").read_text()


@pytest.fixture(scope="module")
def searches(folder, tmp_path_factory) -> dict:
    """The single-process searches, two at a time: name -> (result, exp directory).
    'first'/'second': one epoch of first/second order at after_every; one first-order
    epoch at every other location; 'two_epochs': 'first' for two epochs;
    'not_recomputed': 'second' with --no-recompute."""
    base = tmp_path_factory.mktemp("searches")
    specs = {"first": (1, []), "second": (1, ["--unrolled"]), "two_epochs": (2, []),
             "amp": (1, ["--unrolled", "--amp", "--channels_last"]),
             "not_recomputed": (1, ["--unrolled", "--no-recompute"])}
    specs.update({loc: (1, ["--location", loc]) for loc in LOCATIONS if loc != "after_every"})
    commands = {name: command("train_search.py", *search_flags(folder, base / name, epochs, *extra))
                for name, (epochs, extra) in specs.items()}
    results = run_parallel(commands)
    return {name: (results[name], base / name) for name in commands}


def _run_of(searches: dict, name: str) -> Path:
    result, exp = searches[name]
    _ok(result)
    return only_run_dir(exp)


# -- 6. what a search writes -------------------------------------------------------------

@pytest.mark.parametrize("name", ["first", "second"])
def test_search_writes_genotype_log_history_and_checkpoint(searches, name):
    run = _run_of(searches, name)
    genotype = load_genotype(str(run / "genotype.json"))
    network = NetworkCIFAR(8, 10, 5, False, genotype)
    network.eval()
    logits, _ = network(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()

    log = (run / "log.txt").read_text()
    assert "epoch 1/1" in log and "genotype" in log
    assert ("second order" if name == "second" else "first order") in log

    lines = (run / "arch_history.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert HISTORY_KEYS <= set(record)
    assert record["epoch"] == 1
    assert genotype_from_dict(record["genotype"]) == genotype
    assert set(record["arch"]) == set(record["candidates"])
    assert {"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"} <= set(record["arch"])
    for key, rows in record["arch"].items():
        assert len(rows) == 14 and all(len(row) == len(record["candidates"][key]) for row in rows)
        assert all(abs(sum(row) - 1) < 1e-4 for row in rows)

    checkpoint = _checkpoint(run)
    assert checkpoint["epoch"] == 1
    assert checkpoint["args"]["unrolled"] is (name == "second")
    assert genotype_from_dict(checkpoint["genotype"]) == genotype


def test_search_moves_the_architecture(searches):
    """First and second order end in different places; a second epoch moves on."""
    first, second = _arch_state(_run_of(searches, "first")), _arch_state(_run_of(searches, "second"))
    two = _arch_state(_run_of(searches, "two_epochs"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], two[k]) for k in first)


def test_recomputing_cells_does_not_change_the_search(searches):
    """The default (cells recomputed in backward, channels-last on the CPU) and
    --no-recompute take the same architecture step up to float32 rounding.  Adam
    normalises the step, so an entry whose gradient is ~0 may step by up to the
    learning rate either way: those are bounded by 2 x arch_lr, all others agree."""
    recomputed, plain = _run_of(searches, "second"), _run_of(searches, "not_recomputed")
    assert "channels-last layout, cells recomputed in backward" in (recomputed / "log.txt").read_text()
    assert "cells kept for backward" in (plain / "log.txt").read_text()
    a, b = _arch_state(recomputed), _arch_state(plain)
    arch_lr = _checkpoint(recomputed)["args"]["arch_lr"]  # one architecture step in this search
    differences = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
    assert float(differences.max()) <= 2 * arch_lr + 1e-6
    assert float((differences > 1e-6).float().mean()) < 0.05


# -- 7. every location -----------------------------------------------------------------------

@pytest.mark.parametrize("location", LOCATIONS)
def test_every_location_searches(searches, location):
    run = _run_of(searches, "first" if location == "after_every" else location)
    genotype = load_genotype(str(run / "genotype.json"))
    record = json.loads((run / "arch_history.jsonl").read_text())
    prefixes = {key.split("_")[0] for key in record["arch"]}
    expected = {"alphas"}
    if location in ("after_every", "after_every_and_end", "double_mixed"):
        expected.add("betas")
    if location in ("end", "after_every_and_end"):
        expected.add("gammas")
    assert prefixes == expected
    has_bottleneck = location in ("end", "after_every_and_end")
    assert bool(genotype.normal_bottleneck) == has_bottleneck
    assert bool(genotype.reduce_bottleneck) == has_bottleneck
    assert _checkpoint(run)["args"]["location"] == location
    network = NetworkCIFAR(4, 10, 3, False, genotype).eval()
    assert network(torch.randn(2, 3, 32, 32))[0].shape == (2, 10)


# -- 8. resume ---------------------------------------------------------------------------------

def test_one_epoch_search_extended_to_two_matches_a_two_epoch_search(searches, folder, tmp_path):
    """A finished 1-epoch search, resumed with --epochs 2, ends where a 2-epoch search
    does (the first epoch runs at the initial learning rate in both)."""
    straight = _run_of(searches, "two_epochs")
    run = tmp_path / "exp" / "extended"
    shutil.copytree(_run_of(searches, "first"), run)
    result = run_script("train_search.py", *search_flags(folder, tmp_path / "unused", 2),
                        "--checkpoint_path", str(run / "checkpoint.pt"))
    _ok(result)
    assert _checkpoint(run)["epoch"] == 2
    _assert_same_arch(run, straight)
    assert len((run / "arch_history.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "unused").exists() or not any((tmp_path / "unused").iterdir())


def test_interrupted_search_resumes_where_it_stopped(searches, folder, tmp_path):
    """A 2-epoch search killed after its first checkpoint and resumed with the same
    flags ends bit-identical to an uninterrupted one."""
    from test_training import _kill_after_first_checkpoint  # the final-training tests' helper

    straight = _run_of(searches, "two_epochs")
    exp = tmp_path / "exp"
    flags = search_flags(folder, exp, 2)
    run = _kill_after_first_checkpoint(command("train_search.py", *flags), exp)
    assert len((run / "arch_history.jsonl").read_text().splitlines()) == 1
    result = run_script("train_search.py", *flags, "--checkpoint_path", str(run))
    _ok(result)
    assert only_run_dir(exp) == run
    assert _checkpoint(run)["epoch"] == 2
    _assert_same_arch(run, straight)
    straight_history = [json.loads(line) for line in (straight / "arch_history.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (run / "arch_history.jsonl").read_text().splitlines()]
    assert [r["arch"] for r in history] == [r["arch"] for r in straight_history]



def test_a_checkpoint_in_the_earlier_layout_resumes(folder, tmp_path):
    """A checkpoint.pt as train_search.py wrote it before the search became a library
    (built here key by key, after one epoch of a --location no_attention search)
    resumes for a second epoch."""
    import torch.nn as nn

    import train_search
    from model_search import Network

    flags = search_flags(folder, tmp_path / "unused", 2, "--location", "no_attention")
    args = train_search.parser.parse_args(flags)
    args.channels_last = True  # the search stored --channels_last auto resolved (CPU: on)
    torch.manual_seed(args.seed)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "no_attention")
    weight_optimizer = torch.optim.SGD(network.weights(), args.lr, momentum=args.momentum,
                                       weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(weight_optimizer, 1.0, eta_min=args.lr_min)
    arch_optimizer = torch.optim.Adam(network.arch_parameters(), lr=args.arch_lr,
                                      betas=(0.5, 0.999), weight_decay=args.arch_wd)
    network.loss(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])).backward()
    weight_optimizer.step()
    arch_optimizer.step()
    scheduler.step()
    run = tmp_path / "exp" / "earlier"
    run.mkdir(parents=True)
    arch = {k: v.detach().clone() for k, v in network.named_arch_parameters().items()}
    torch.save({
        "state_dict": network.state_dict(), "weight_optimizer": weight_optimizer.state_dict(),
        "arch_optimizer": arch_optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "epoch": 1,
        "arch_batches": {"cycle": 0, "position": 1}, "rng": [rng_entry()], "args": vars(args),
        "genotype": genotype_to_dict(network.genotype()),
    }, run / "checkpoint.pt")

    _ok(run_script("train_search.py", *flags, "--checkpoint_path", str(run)))
    checkpoint = _checkpoint(run)
    assert checkpoint["epoch"] == 2
    assert not (tmp_path / "unused").exists()
    assert "resuming" in (run / "log.txt").read_text()
    assert json.loads((run / "arch_history.jsonl").read_text())["epoch"] == 2
    assert any(not torch.equal(checkpoint["state_dict"][k], v) for k, v in arch.items())
    load_genotype(str(run / "genotype.json"))

# -- 9. one-line errors -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def errors(searches, folder, tmp_path_factory) -> dict:
    """Runs that must fail with a one-line error, two at a time: name -> result."""
    base = tmp_path_factory.mktemp("search_errors")
    first = _run_of(searches, "first")
    (base / "empty").mkdir()
    (base / "not_a_checkpoint.pt").write_text("this is not a checkpoint\n")
    from genotypes import Att_DARTS
    network = NetworkCIFAR(4, 10, 3, False, Att_DARTS)
    # The resumable checkpoint.pt of a train_CIFAR10.py run (training.py's keys).
    torch.save({"state_dict": network.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {},
                "epoch": 1, "best_acc": 10.0, "last_test": 10.0, "args": {"init_ch": 4, "layers": 3},
                "genotype": genotype_to_dict(Att_DARTS), "rng": []},
               base / "train_checkpoint.pt")
    ok_flags = search_flags(folder, base / "exp", 1)
    commands = {
        "location": command("train_search.py", *ok_flags, "--location", "everywhere"),
        "no_data": command("train_search.py", *search_flags(base / "empty", base / "exp", 1)),
        "unreadable": command("train_search.py", *ok_flags,
                              "--checkpoint_path", str(base / "not_a_checkpoint.pt")),
        "other_init_ch": command("train_search.py", *ok_flags, "--init_ch", "8",
                                 "--checkpoint_path", str(first / "checkpoint.pt")),
        "train_checkpoint": command("train_search.py", *ok_flags,
                                    "--checkpoint_path", str(base / "train_checkpoint.pt")),
    }
    results = run_parallel(commands, timeout=60, env=OFFLINE)
    results["base"] = base
    return results


def test_unknown_location_lists_the_valid_ones(errors):
    line = one_line_error(errors["location"])
    assert "everywhere" in line
    for location in LOCATIONS:
        assert location in line


def test_missing_data_offline_says_where_to_put_it(errors):
    line = one_line_error(errors["no_data"])
    empty = os.path.abspath(errors["base"] / "empty")
    assert empty in line
    assert "download" in line and "train/" in line


@pytest.mark.parametrize("name", ["unreadable", "other_init_ch", "train_checkpoint"])
def test_bad_checkpoint_is_one_line(errors, name):
    line = one_line_error(errors[name])
    assert "checkpoint" in line or ".pt" in line
    if name == "other_init_ch":
        assert "--init_ch" in line
    if name == "train_checkpoint":
        assert "search checkpoint" in line


# -- 10. torchrun ---------------------------------------------------------------------------------

def _digests(result) -> dict:
    found = dict(DIGEST.findall(result.stdout + result.stderr))
    assert set(found) == {"0", "1"}, result.stdout[-2000:] + result.stderr[-2000:]
    return found


def _torchrun(*args: str):
    return subprocess.run(torchrun_command(2, "train_search.py", *args), cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def torchrun_search(folder, tmp_path_factory):
    """One epoch on 2 CPU processes (gloo): batch 8, so each process gets one batch
    of each half."""
    exp = tmp_path_factory.mktemp("torchrun") / "exp"
    flags = search_flags(folder, exp, 1) + ["--batchsz", "8"]
    return flags, _torchrun(*flags), exp


def test_torchrun_ranks_agree_and_write_once(torchrun_search):
    _, result, exp = torchrun_search
    _ok(result)
    digests = _digests(result)
    assert digests["0"] == digests["1"]
    run = only_run_dir(exp)
    assert sorted(p.name for p in exp.rglob("genotype.json")) == ["genotype.json"]
    assert len((run / "arch_history.jsonl").read_text().splitlines()) == 1
    assert _checkpoint(run)["epoch"] == 1


def test_torchrun_search_resumes_for_a_second_epoch(torchrun_search):
    flags, result, exp = torchrun_search
    _ok(result)
    run = only_run_dir(exp)
    resume_flags = list(flags)
    resume_flags[resume_flags.index("--epochs") + 1] = "2"
    resumed = _torchrun(*resume_flags, "--checkpoint_path", str(run / "checkpoint.pt"))
    _ok(resumed)
    digests = _digests(resumed)
    assert digests["0"] == digests["1"]
    assert only_run_dir(exp) == run
    assert _checkpoint(run)["epoch"] == 2
    assert len((run / "arch_history.jsonl").read_text().splitlines()) == 2


# -- 11. plot_search.py on a real search ------------------------------------------------------------

def test_plot_search_on_a_finished_search(searches, tmp_path):
    run = _run_of(searches, "two_epochs")
    out = tmp_path / "plots"
    result = run_script("plot_search.py", str(run), "--out_dir", str(out))
    _ok(result)
    names = sorted(p.name for p in out.glob("*.png"))
    expected = {f"{k}.png" for k in json.loads((run / "arch_history.jsonl").read_text().splitlines()[0])["arch"]}
    assert expected | {"curves.png"} <= set(names)
    for name in names:
        with Image.open(out / name) as image:
            image.load()
            assert image.width > 200 and image.height > 200, name
            extrema = image.convert("L").getextrema()
            assert extrema[0] < extrema[1], f"{name} is blank"


def test_second_order_search_under_amp_and_channels_last(searches):
    """--amp (bfloat16 autocast on the CPU) and --channels_last are accepted by the
    search and give a usable genotype."""
    result, exp = searches["amp"]
    _ok(result)
    run = only_run_dir(exp)
    genotype = load_genotype(str(run / "genotype.json"))
    assert all(len(edge) == 3 and edge[2] for edge in genotype.normal)
    assert "autocast bfloat16" in (run / "log.txt").read_text()
