"""train_search.py end to end with the collapse fixes (runtime/collapse_fixes.py), on the tiny image
folder of test_search_script.py (3 iterations per epoch and process): a search with
beta-DARTS, DARTS- and SDARTS-RS at once resumes bit for bit at the right epoch of
their schedules; FairDARTS composes with PC-DARTS and the second order and writes a
threshold cell a final network is built from; SDARTS-ADV runs under --amp and, under torchrun, holds the
same architecture on both processes after every step."""
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_search_script import (DIGEST, STEPS, TRACE, _assert_finite,  # noqa: F401
                                _assert_same_arch, _checkpoint, _ok, _traced_steps, folder,
                                search_flags)
from test_training import _kill_after_first_checkpoint
from training_helpers import (REPO, command, only_run_dir, run_in_process, run_script, script_env,
                              torchrun_command)

from genotypes import load_genotype
from model import NetworkCIFAR

pytestmark = pytest.mark.slow
SMOOTHED = ["--location", "after_every_and_end", "--beta_decay", "5", "--aux_skip",
            "--perturb_alpha", "random"]
FAIR = ["--location", "no_attention", "--relaxation", "sigmoid", "--zero_one_weight", "10",
        "--op_threshold", "0.5", "--partial_channels", "2", "--unrolled", "--aux_skip",
        "--aux_skip_decay", "cosine"]
ADVERSARIAL = ["--location", "end", "--perturb_alpha", "adversarial", "--beta_decay", "50"]


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict:
    """'smoothed', which a test resumes and compares, as its command line, while the
    searches nothing resumes run in this process (``run_in_process``)."""
    base = tmp_path_factory.mktemp("fixes")
    with ThreadPoolExecutor(max_workers=1) as pool:
        smoothed = pool.submit(run_script, "train_search.py",
                               *search_flags(folder, base / "smoothed", 2, *SMOOTHED), env=TRACE)
        results = {name: run_in_process("train_search.py",
                                        *search_flags(folder, base / name, 1, *extra), env=TRACE)
                   for name, extra in (("fair", FAIR), ("adversarial", ADVERSARIAL + ["--amp"]))}
        results["smoothed"] = smoothed.result()
    return {name: (result, base / name) for name, result in results.items()}


def _run(runs: dict, name: str):
    result, exp = runs[name]
    _ok(result)
    return only_run_dir(exp)


def test_fixes_resume_bit_for_bit_at_the_right_epoch(runs, folder, tmp_path):
    straight = _run(runs, "smoothed")
    straight_steps = _traced_steps(runs["smoothed"][0], [1, 2])
    log = (straight / "log.txt").read_text()
    assert ("collapse fixes: beta-DARTS (--beta_decay 5) + DARTS- (--aux_skip, linear decay) + "
            "SDARTS-RS (--perturb_epsilon 0.3)") in log
    assert ("epoch 2/2 collapse fixes: Beta-Decay weight 2.5, auxiliary skip weight 0.5, "
            "perturbation radius 0.165") in log
    exp = tmp_path / "exp"
    flags = search_flags(folder, exp, 2, *SMOOTHED)
    run = _kill_after_first_checkpoint(command("train_search.py", *flags), exp)
    result = run_script("train_search.py", *flags, "--checkpoint_path", str(run), env=TRACE)
    _ok(result)
    assert _traced_steps(result, [2]) == straight_steps[STEPS:]
    _assert_same_arch(run, straight)
    assert ("epoch 2/2 collapse fixes: Beta-Decay weight 2.5, auxiliary skip weight 0.5, "
            "perturbation radius 0.165") in result.stdout
    # Other fixes than the checkpoint's: one line, nothing run.
    refused = run_in_process("train_search.py", *search_flags(folder, exp, 3, *SMOOTHED[:-2]),
                             "--checkpoint_path", str(run))
    assert refused.returncode != 0
    assert "--perturb_alpha random, not none; resume with the run's own flags" in refused.stderr
    assert _checkpoint(run)["epoch"] == 2


def test_fairdarts_search_writes_a_threshold_cell_that_builds(runs):
    run = _run(runs, "fair")
    _assert_finite(run)
    log = (run / "log.txt").read_text()
    assert "FairDARTS (sigmoid relaxation, --zero_one_weight 10, --op_threshold 0.5)" in log
    assert "second order" in log and "alphas_normal (sigmoid)" in log
    assert "edge_weights_normal (softmax)" in log
    data = json.loads((run / "genotype.json").read_text())
    assert all(len(edge) == 4 for edge in data["normal"] + data["reduce"])
    genotype = load_genotype(str(run / "genotype.json"))
    assert genotype.normal_concat == sorted({edge[3] for edge in genotype.normal})
    history = json.loads((run / "arch_history.jsonl").read_text().splitlines()[-1])
    assert all(0 < w < 1 for row in history["arch"]["alphas_normal"] for w in row)
    if genotype.normal and genotype.reduce:
        logits, _ = NetworkCIFAR(4, 10, 5, False, genotype).eval()(torch.randn(2, 3, 32, 32))
        assert torch.isfinite(logits).all()


def test_adversarial_search_under_amp(runs):
    run = _run(runs, "adversarial")
    _assert_finite(run)
    _traced_steps(runs["adversarial"][0], [1])
    log = (run / "log.txt").read_text()
    assert "SDARTS-ADV (--perturb_epsilon 0.3)" in log and "bfloat16" in log
    assert "epoch 1/1 collapse fixes: Beta-Decay weight 0, perturbation radius 0.03" in log


def test_torchrun_adversarial_ranks_agree_after_every_step(folder, tmp_path):
    flags = search_flags(folder, tmp_path / "exp", 1, "--batchsz", "4", *ADVERSARIAL)
    result = subprocess.run(torchrun_command(2, "train_search.py", *flags), cwd=REPO,
                            env={**script_env(), **TRACE}, capture_output=True, text=True,
                            timeout=300)
    _ok(result)
    hashes = _traced_steps(result, [1], ranks=(0, 1))
    assert dict(DIGEST.findall(result.stdout + result.stderr)) == {"0": hashes[-1], "1": hashes[-1]}
    # The processes drew their noise from generators that started alike and ended
    # alike: the same draws (DDP would average different ones into the same weights).
    rng = _checkpoint(only_run_dir(tmp_path / "exp"))["rng"]
    assert torch.equal(rng[0]["torch"], rng[1]["torch"])
