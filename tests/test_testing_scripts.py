"""test_CIFAR10.py / test_CIFAR100.py / test_imagenet.py: checkpoints in the published
layouts load; mismatched or foreign files give one-line errors."""
from pathlib import Path

import pytest
import torch
from training_helpers import (TINY, mini_cifar, one_line_error, reported_accuracy, run_in_process,
                              run_ok)

import genotypes
from model import NetworkCIFAR


@pytest.fixture(scope="module")
def cifar(cifar_mini, tmp_path_factory) -> Path:
    """10 test images per class of cifar10-mini (and one training image, unused)."""
    return mini_cifar(cifar_mini, tmp_path_factory.mktemp("cifar"), train=1)


@pytest.fixture(scope="module")
def weights() -> dict:
    """The state_dict of a small CIFAR-10 network (with auxiliary head)."""
    torch.manual_seed(0)
    return NetworkCIFAR(4, 10, 3, True, genotypes.Att_DARTS).state_dict()


def _test(cifar: Path, path: Path, *flags: str):
    """test_CIFAR10.py on ``path``, which must fail early (in this process, see
    ``run_in_process``)."""
    return run_in_process("test_CIFAR10.py", "--data", str(cifar), "--model_path", str(path),
                          *TINY, *flags)


@pytest.mark.slow
def test_published_layouts_load_and_agree(cifar, weights, tmp_path):
    """Bare (as trained.pt), DataParallel's 'module.' prefix saved by an old PyTorch
    (the original release's format), and {'state_dict': ...}."""
    layouts = {
        "bare.pt": (weights, {}),
        "module_legacy.pt": ({f"module.{k}": v for k, v in weights.items()},
                             {"_use_new_zipfile_serialization": False}),
        "wrapped.pt": ({"state_dict": weights, "epoch": 3}, {}),
    }
    reports = []
    for name, (checkpoint, options) in layouts.items():
        torch.save(checkpoint, tmp_path / name, **options)
        result = run_ok("test_CIFAR10.py", "--data", str(cifar), "--model_path", str(tmp_path / name),
                        "--auxiliary", *TINY)
        assert "param size" in result.stdout
        reports.append(reported_accuracy(result.stdout))
    assert reports[0][0][3] == 100
    assert reports[1:] == reports[:1] * 2


def test_a_checkpoint_that_does_not_fit_names_the_first_differing_key(cifar, weights, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    error = one_line_error(_test(cifar, path, "--auxiliary", "--init_ch", "6"))
    assert str(path) in error and "'stem.0.weight' has shape (12, 3, 3, 3)" in error
    error = one_line_error(_test(cifar, path))  # without --auxiliary
    assert "unexpected key 'auxiliary_head." in error


@pytest.mark.slow
def test_files_that_are_no_checkpoint_give_one_line(cifar, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    error = one_line_error(_test(cifar, text))
    assert f"{text} is not a readable PyTorch checkpoint" in error
    error = one_line_error(_test(cifar, tmp_path / "missing.pt"))
    assert "missing.pt does not exist" in error
    numbers = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], numbers)
    assert "holds no model state_dict" in one_line_error(_test(cifar, numbers))
