"""Graphed runs compute what eager runs compute, over epochs whose learning rate and
drop-path probability change, with a fake (tests/fake_cuda.py) that freezes what a
real capture bakes in: a graph replayed after those changed without being captured
anew would keep the values of its capture, as the foreach SGD's ``-lr`` stays in the
captured kernels on a GPU.

The loops are the scripts' own epoch functions (``searching.train_and_validate``,
``training.train_and_test``) over three epochs with a cosine schedule (and, for
training, a rising drop-path probability), evaluation included; the eager run is
the reference, bit for bit.  Each case also runs once with ``StepGraph.reset`` keeping
its graph (a re-capture deliberately missing), which must end elsewhere."""
import argparse
from typing import List

import pytest
import torch
import torch.nn as nn
from fake_cuda import FakeCuda
from torch.utils.data import TensorDataset

from architect import Architect
from genotypes import Att_DARTS
from model import NetworkCIFAR
from model_search import Network
from runtime import data, experiment, searching, training
from runtime.cuda_graphs import StepGraph, run_graphs
from runtime.dispatch import OpCounter
from runtime.experiment import cosine_schedule, resumed_schedule
from runtime.parallel import Runtime
from runtime.precision import Precision

pytestmark = pytest.mark.usefixtures("one_thread")

RUNTIME = Runtime(torch.device("cpu"))
EPOCHS = 3
BATCH = 4


def _images(count: int, size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count, 3, size, size, generator=generator),
                         torch.randint(0, 10, (count,), generator=generator))


def _state(*holders) -> List[torch.Tensor]:
    """Every tensor of the modules and optimizers ``holders``, copied."""
    found = []
    for holder in holders:
        if isinstance(holder, nn.Module):
            found += list(holder.parameters()) + list(holder.buffers())
        else:
            found += [v for s in holder.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone() for t in found]


def _same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _without_recapture(monkeypatch) -> None:
    """The bug the tests must catch: ``reset`` takes the new step but keeps the graph."""
    def keep_graph(self, step=None):
        if step is not None:
            self.step = step
    monkeypatch.setattr(StepGraph, "reset", keep_graph)


def _figures(results: List[dict]) -> list:
    return [(r["train_loss"], r["train_acc"].correct, r.get("valid_loss"),
             r.get("valid_acc", r.get("test")).correct) for r in results]


# -- the fake itself --------------------------------------------------------------------------------

def test_a_replay_keeps_what_its_capture_baked_in(monkeypatch):
    """Learning rate, drop-path probability, a module's mode and the step's closure:
    the capture's values at every replay until ``reset``."""
    fake = FakeCuda().install(monkeypatch)
    module = nn.Linear(2, 1)
    module.drop_path_prob = 0.1
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    fake.holders = [module, optimizer]

    def stepping(scale):
        def step(x):
            lr = optimizer.param_groups[0]["lr"]
            return (x * scale + lr + module.drop_path_prob + 10 * module.training,)
        return step

    graph = StepGraph(stepping(1.0), enabled=True, warmup=0)
    assert float(graph(torch.zeros(()))[0]) == pytest.approx(10.6)
    optimizer.param_groups[0]["lr"], module.drop_path_prob = 0.25, 0.2
    module.eval()
    graph.step = stepping(2.0)
    assert float(graph(torch.ones(()))[0]) == pytest.approx(11.6)  # all as captured
    assert optimizer.param_groups[0]["lr"] == 0.25 and not module.training  # and back
    del module.drop_path_prob  # set after a capture: the class's value is not frozen
    graph.reset(stepping(2.0))
    module.drop_path_prob = 0.3
    assert float(graph(torch.ones(()))[0]) == pytest.approx(2.55)
    assert fake.attempts == 2


def test_a_batch_is_copied_once_straight_into_the_static_inputs(monkeypatch):
    """Once captured, an epoch's batches skip the copy to the device (``to_device``):
    each is copied once, into the graph's static inputs, which the call then uses as
    they are.  The warm-up step, the capture and a batch of another shape go to the
    device as before."""
    FakeCuda().install(monkeypatch)
    moved = []
    to_device = experiment.to_device
    monkeypatch.setattr(experiment, "to_device",
                        lambda *args, **kwargs: moved.append(1) or to_device(*args, **kwargs))
    graph = StepGraph(lambda x, y: ((x.sum(1) - y).sum(), x * 2), enabled=True, warmup=1)
    batches = [(torch.full((2, 3), float(i)), torch.arange(2) + i) for i in range(4)]
    batches.append((torch.ones(1, 3), torch.zeros(1, dtype=torch.long)))
    steps = []

    def step(images, targets):
        steps.append((images is graph._static_inputs[0]) if graph.captured else None)
        return graph(images, targets)

    experiment.run_epoch(batches, step, RUNTIME, False, "test", graph=graph)
    assert len(moved) == 3 and steps == [None, None, True, True, False]
    with OpCounter() as ops:
        fed = graph.feed(to_device, *batches[3])
    assert dict(ops.counts) == {"aten.copy_": 2} and fed[1] is graph._static_inputs[1]
    assert torch.equal(graph(*fed)[1], batches[3][0] * 2)


# -- the search ---------------------------------------------------------------------------------------

def _search(monkeypatch, graphs: bool, unrolled: bool, recapture: bool = True):
    """Three epochs of the search (3 iterations each, 8x8 images, C=4, 3 cells of two
    nodes) and their evaluations on the run's three StepGraphs (one warm-up step each)."""
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "end", steps=2, multiplier=2,
                      image_size=8)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=unrolled)
    fake = FakeCuda().install(monkeypatch)
    fake.holders = [network, optimizer, architect.optimizer]
    if not recapture:
        _without_recapture(monkeypatch)
    lines = []
    step_graphs = run_graphs(graphs, True, lines.append, steps=2)
    for graph in step_graphs:
        graph.warmup = 1
    precision = Precision(False, "bfloat16", RUNTIME.device)
    net = searching.Supernet(network, network, optimizer, architect, precision, *step_graphs, [])
    weight_half, arch_half = _images(3 * BATCH, 8, seed=1), _images(2 * BATCH, 8, seed=2)
    halves = searching.SearchData(
        weight_half, arch_half, 10,
        data.make_loader(weight_half, BATCH, RUNTIME, shuffle=True, workers=0, seed=2, drop_last=True),
        data.CyclingLoader(data.make_loader(arch_half, BATCH, RUNTIME, shuffle=True, workers=0,
                                            seed=3, drop_last=True)),
        data.make_eval_loader(arch_half, BATCH, RUNTIME, workers=0), 0)
    args = argparse.Namespace(grad_clip=5.0, channels_last=False, report_freq=0,
                              arch_warmup_epochs=0)
    scheduler = resumed_schedule(cosine_schedule(EPOCHS, 0.001), optimizer, 0)
    results = [searching.train_and_validate(net, halves, scheduler, epoch, RUNTIME, args,
                                            lines.append) for epoch in range(EPOCHS)]
    assert not lines  # no capture failed
    return _state(network, optimizer, architect.optimizer), _figures(results), fake


@pytest.mark.slow
@pytest.mark.parametrize("unrolled", [False, True], ids=["first_order", "second_order"])
def test_graphed_search_epochs_are_the_eager_ones(monkeypatch, unrolled):
    eager, eager_figures, _ = _search(monkeypatch, graphs=False, unrolled=unrolled)
    graphed, figures, fake = _search(monkeypatch, graphs=True, unrolled=unrolled)
    assert fake.attempts == 2 * EPOCHS  # each epoch's iteration and evaluation, anew
    assert _same(graphed, eager) and figures == eager_figures
    stale, stale_figures, fake = _search(monkeypatch, graphs=True, unrolled=unrolled,
                                         recapture=False)
    assert fake.attempts == 2 and not _same(stale, eager) and stale_figures != eager_figures


# -- training with evaluation ----------------------------------------------------------------------

def _train(monkeypatch, graphs: bool, recapture: bool = True):
    """Three epochs of train_CIFAR10.py's loop (3 steps each, C=4, 3 cells, 16x16
    images) at a rising drop-path probability, each followed by the test split."""
    torch.manual_seed(0)
    network = NetworkCIFAR(4, 10, 3, False, Att_DARTS)
    optimizer = torch.optim.SGD(network.parameters(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    fake = FakeCuda().install(monkeypatch)
    fake.holders = [network, optimizer]
    if not recapture:
        _without_recapture(monkeypatch)
    lines = []
    step_graph, eval_graph = run_graphs(graphs, True, lines.append)
    step_graph.warmup = 1
    train_set, test_set = _images(3 * BATCH, 16, seed=1), _images(2 * BATCH, 16, seed=2)
    run = training.TrainingRun(
        network, network, optimizer, Precision(False, "bfloat16", RUNTIME.device),
        data.make_loader(train_set, BATCH, RUNTIME, shuffle=True, workers=0, seed=2, drop_last=True),
        data.make_eval_loader(test_set, BATCH, RUNTIME, workers=0), step_graph, eval_graph,
        None, lines.append)
    args = argparse.Namespace(grad_clip=5.0, channels_last=False, report_freq=0,
                              auxiliary_weight=0.4, drop_path_prob=0.3, epochs=EPOCHS)
    scheduler = resumed_schedule(cosine_schedule(EPOCHS), optimizer, 0)
    results = []
    for epoch in range(EPOCHS):
        result = training.train_and_test(run, nn.CrossEntropyLoss(), scheduler, epoch, RUNTIME,
                                         args, (1,))
        results.append({**result, "test": run.last_test})
    assert not lines
    return _state(network, optimizer), _figures(results), fake


def test_graphed_training_epochs_are_the_eager_ones(monkeypatch):
    eager, eager_figures, _ = _train(monkeypatch, graphs=False)
    graphed, figures, fake = _train(monkeypatch, graphs=True)
    assert fake.attempts == 2 * EPOCHS
    assert _same(graphed, eager) and figures == eager_figures
    stale, stale_figures, fake = _train(monkeypatch, graphs=True, recapture=False)
    assert fake.attempts == 2 and not _same(stale, eager) and stale_figures != eager_figures
