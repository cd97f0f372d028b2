"""Shared test setup: the ../shared folder (pytest.ini puts the repository root on sys.path).

Tests needing files from ../shared take one of the fixtures below; they skip
(with the reason) when the folder or file is absent.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the shared folder ../shared is absent or incomplete)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the repository (``REPO/../shared``)."""
    return _require(SHARED, "shared folder")


@pytest.fixture(scope="session")
def reference_state_dict_json(shared_dir) -> Path:
    """Keys and shapes of NetworkCIFAR(36, 10, 20, True, Att_DARTS)'s state_dict."""
    return _require(shared_dir / "reference" / "state_dict_cifar10_Att_DARTS.json",
                    "reference state_dict listing")


@pytest.fixture(scope="session")
def cifar_mini(shared_dir) -> Path:
    """The small CIFAR-10 ImageFolder tree (train/ and val/ with one folder per class)."""
    return _require(shared_dir / "data" / "cifar10-mini", "cifar10-mini data set")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored afterwards): recorded values are
    compared bit for bit or nearly, and the order of a parallel reduction may
    depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tf32_allowed():
    """TF32 allowed for convolutions (cuDNN's default) and matrix products; yields
    those settings (``precision.float32_settings``) and restores the ones before."""
    import torch

    from runtime.precision import float32_settings

    before = float32_settings()
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    yield float32_settings()
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before[1:]


# Parametrizations left out of the quick tier (``-m "not slow"``) where a faster case
# of the same test stays in it; whole tests are marked with @pytest.mark.slow.
SLOW_CASES = (
    "test_architect.py::test_first_order_gradient_is_the_validation_gradient[after_every_and_end]",
    "test_architect.py::test_search_iterations_move_only_what_they_should[first_order-recomputed]",
    "test_architect.py::test_search_iterations_move_only_what_they_should[second_order-recomputed]",
    "test_host_sync.py::test_search_iterations_never_wait_for_the_device[False-False-True]",
    "test_loop_reference.py::test_one_search_epoch_matches_the_recorded_one[2]",
    "test_model_search.py::test_recomputed_cells_give_the_same_gradients_and_statistics[double_mixed]",
    "test_model_search.py::test_forward_backward[double_mixed]",
    "test_plot_search.py::test_cli_writes_every_plot[after_every_and_end]",
    "test_plot_search.py::test_cli_writes_every_plot[mixed_with_operation]",
    *(f"test_supernet_reference.py::test_supernet_matches_the_recorded_values[{location}]"
      for location in ("end", "after_every_and_end", "mixed_with_operation", "double_mixed")),
)


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker process gets its share of the cores for torch's
    intra-op threads: two workers with two threads each on two cores would only take
    turns."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


# The modules whose end-to-end runs take longest, started first: pytest-xdist hands each
# worker a whole module at a time, and a long module started last leaves the other
# workers idle while it runs.  The order changes nothing else.
RUN_FIRST = ("test_reproduce.py", "test_search_script.py", "test_search_diagnostics.py",
             "test_imagenet_search.py", "test_collapse_fixes_search.py", "test_training.py",
             "test_bench.py", "test_partial_channels.py")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.nodeid.endswith(SLOW_CASES):
            item.add_marker(pytest.mark.slow)
    first = {name: rank for rank, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))
