"""No step of a loop waits for the device.

A GPU step that reads a tensor back to Python (``.item()``, ``bool(t)``, ``nonzero``,
a device-to-host copy) stalls the launch queue every iteration, and cannot be held
in a CUDA graph.  On a CPU there is no device to wait for, so these tests run the
steps under ``dispatch.HostSyncGuard``, which fails on the ops that would wait: the
search iteration of both orders (recomputed or not, fp32 and bf16 autocast), the
training step with drop-path and the auxiliary head, and evaluation forwards, three
steps each, with the loops' running metrics."""
import pytest
import torch
import torch.nn as nn

from architect import Architect
from genotypes import Att_DARTS
from model import NetworkCIFAR
from model_search import Network
from runtime.dispatch import HostSyncError, HostSyncGuard, OpCounter
from runtime.experiment import EpochMetrics
from runtime.precision import Precision
from runtime.searching import search_step
from runtime.training import train_step

CPU = torch.device("cpu")


def _batches(count: int, size: int, batch: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, 10, (batch,), generator=generator)) for _ in range(count)]


def _adam_steps(architect: Architect):
    """Adam's step counters: host numbers on a GPU too (no ``capturable``), read by
    its update without waiting for the device."""
    return [state["step"] for state in architect.optimizer.state.values()]


def test_the_guard_catches_what_waits():
    x = torch.randn(4)
    for reads_back in (lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: x.nonzero(),
                       lambda: float(x.max()), lambda: x[x > 0]):
        with pytest.raises(HostSyncError):
            with HostSyncGuard():
                reads_back()
    with HostSyncGuard():  # device-side arithmetic and reductions are fine
        (x * 2).sum().sqrt()
    host = torch.tensor(3.0)
    with HostSyncGuard([host]):
        assert host.item() == 3.0


@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("recompute, amp", [(False, False),
                                             pytest.param(True, True, marks=pytest.mark.slow)])
def test_search_iterations_never_wait_for_the_device(unrolled, recompute, amp):
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "after_every_and_end", image_size=8,
                      recompute=recompute)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=unrolled)
    precision = Precision(amp, "bfloat16", CPU)
    batches = _batches(8, 8)
    # The first iteration creates the optimizers' state.
    search_step(network, architect, optimizer, precision, batches[0], batches[1], 0.025, 5.0)
    metrics = EpochMetrics(CPU)
    before = [p.detach().clone() for p in network.arch_parameters()]
    with HostSyncGuard(_adam_steps(architect)):
        for i in range(3):
            train, valid = batches[2 + 2 * i], batches[3 + 2 * i]
            loss, logits = search_step(network, architect, optimizer, precision, train, valid,
                                       0.025, 5.0)
            metrics.update(loss, logits, train[1])
    assert metrics.seen == 12 and torch.isfinite(metrics.loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, network.arch_parameters()))


def test_training_steps_never_wait_for_the_device():
    torch.manual_seed(0)
    network = NetworkCIFAR(4, 10, 5, True, Att_DARTS)
    network.drop_path_prob = 0.2
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    criterion = nn.CrossEntropyLoss()
    precision = Precision(False, "bfloat16", CPU)
    batches = _batches(4, 32)
    train_step(network, *batches[0], criterion, optimizer, precision, 0.4, 5.0)
    metrics = EpochMetrics(CPU)
    with HostSyncGuard():
        for images, targets in batches[1:]:
            loss, logits = train_step(network, images, targets, criterion, optimizer, precision,
                                      0.4, 5.0)
            metrics.update(loss, logits, targets)
        network.eval()
        evaluation = EpochMetrics(CPU, (1, 5))
        with torch.no_grad():
            for images, targets in batches:
                logits, _ = network(images)
                evaluation.update(None, logits, targets)
    assert metrics.seen == 12 and evaluation.seen == 16


def test_the_op_counter_counts_kernels_not_views():
    x = torch.randn(4, 4, requires_grad=True)
    with OpCounter() as ops:
        y = (x.t().reshape(16) * 2).sum()
        y.backward()
    assert ops.counts["aten.mul"] >= 1 and ops.counts["aten.sum"] == 1
    assert "aten.t" not in ops.counts and "aten.view" not in ops.counts
    assert ops.total == sum(ops.counts.values())
