"""Whole-step CUDA graphs (cuda_graphs.py): when they are used, that the CPU path is
the plain step, and, on a GPU, that replayed steps compute what eager steps compute.

The GPU tests skip without CUDA (CI has none); run them on a GPU machine with
``python -m pytest tests/test_cuda_graphs.py``."""
import argparse
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from architect import Architect
from genotypes import Att_DARTS
from model import NetworkCIFAR
from model_search import Network
from runtime.cuda_graphs import (StepGraph, add_cuda_graph_flag, resolve_cuda_graphs, run_graphs,
                                 use_cuda_graphs)
from runtime.errors import UserError
from runtime.parallel import Runtime
from runtime.precision import Precision
from runtime.searching import resolve_recompute, search_step
from runtime.training import train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_graphs_are_used_for_one_cuda_device_only():
    assert use_cuda_graphs("auto", CUDA, 1)[0] is True
    assert use_cuda_graphs(False, CUDA, 1) == (False, "as requested")
    on_cpu, why = use_cuda_graphs("auto", CPU, 1)
    assert on_cpu is False and "cpu" in why
    assert use_cuda_graphs(True, CPU, 1)[0] is False
    several, why = use_cuda_graphs("auto", CUDA, 2)
    assert several is False and "2 devices" in why
    scaled, why = use_cuda_graphs("auto", CUDA, 1, scaled=True)
    assert scaled is False and "scaler" in why
    parser = argparse.ArgumentParser()
    add_cuda_graph_flag(parser)
    assert parser.parse_args([]).cuda_graphs == "auto"
    assert parser.parse_args(["--no-cuda_graphs"]).cuda_graphs is False


def test_graphs_are_off_under_torchrun_whatever_its_size(tmp_path):
    """torchrun --nproc_per_node 1 with one CUDA device: a DDP-wrapped model on one
    device, which must not be captured (DDP's eager iterations, the search's
    collectives).  A process group of world size 1 (gloo), as the review had."""
    args = argparse.Namespace(cuda_graphs="auto", amp=False, amp_dtype="bfloat16")
    runtime = Runtime(CUDA, rank=0, world_size=1, local_rank=0)
    assert resolve_cuda_graphs(args, runtime)[:2] == (True, False)  # no process group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        on, strict, why = resolve_cuda_graphs(args, runtime)
        assert (on, strict) == (False, False) and "off under torchrun" in why
        args.cuda_graphs = True
        with pytest.raises(UserError, match="^--cuda_graphs cannot be used under torchrun"):
            resolve_cuda_graphs(args, runtime)
        args.cuda_graphs = False
        assert resolve_cuda_graphs(args, runtime)[0] is False
    finally:
        dist.destroy_process_group()


def test_recomputation_defaults_to_the_cpu_only():
    assert resolve_recompute("auto", CPU)[0] is True
    off, why = resolve_recompute("auto", CUDA)
    assert off is False and "--recompute" in why
    assert resolve_recompute(True, CUDA) == (True, "as requested")
    assert resolve_recompute(False, CPU) == (False, "as requested")


def test_a_disabled_graph_is_the_step_itself():
    calls = []

    def step(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return x * 2

    graph = StepGraph(step, enabled=False)
    for i in range(5):
        x = torch.full((2,), float(i))
        assert torch.equal(graph(x), x * 2)
    assert len(calls) == 5 and graph.captures == 0 and not graph.captured
    graph.reset(lambda x: x + 1)
    assert torch.equal(graph(torch.ones(1)), torch.full((1,), 2.0))


# -- on a GPU ---------------------------------------------------------------------------

def _supernet_pair(unrolled: bool):
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "after_every", image_size=16).to(CUDA)
    pairs = []
    for capturable in (False, True):
        net = copy.deepcopy(network)
        optimizer = torch.optim.SGD(net.weights(), 0.025, momentum=0.9, weight_decay=3e-4,
                                    foreach=True)
        pairs.append((net, optimizer, Architect(net, optimizer, 3e-4, 1e-3, unrolled,
                                                capturable=capturable)))
    return pairs


def _cuda_batches(count: int, size: int, batch: int = 8):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=generator).to(CUDA),
             torch.randint(0, 10, (batch,), generator=generator).to(CUDA)) for _ in range(count)]


@needs_cuda
@pytest.mark.parametrize("unrolled", [False, True])
def test_replayed_search_iterations_match_eager_ones(unrolled):
    (eager, eager_opt, eager_arch), (graphed, graphed_opt, graphed_arch) = _supernet_pair(unrolled)
    precision = Precision(False, "bfloat16", CUDA)
    torch.backends.cudnn.benchmark = False

    def iteration(x, y, xv, yv):
        return search_step(graphed, graphed_arch, graphed_opt, precision, (x, y), (xv, yv),
                           0.025, 5.0)

    # One eager warm-up, a capture, then replays: 3 iterations, 2 of them from the graph.
    graph = StepGraph(iteration, enabled=True, warmup=1)
    batches = _cuda_batches(6, 16)
    for i in range(3):
        train, valid = batches[2 * i], batches[2 * i + 1]
        search_step(eager, eager_arch, eager_opt, precision, train, valid, 0.025, 5.0)
        graph(*train, *valid)
    torch.cuda.synchronize()
    assert graph.captures == 1
    for a, b in zip(eager.arch_parameters(), graphed.arch_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager.weights(), graphed.weights()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@needs_cuda
def test_replayed_training_steps_match_eager_ones_and_drop_path_stays_random():
    torch.manual_seed(0)
    eager = NetworkCIFAR(8, 10, 5, True, Att_DARTS).to(CUDA).train()
    graphed = copy.deepcopy(eager)
    criterion, precision = nn.CrossEntropyLoss(), Precision(False, "bfloat16", CUDA)
    optimizers = [torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, foreach=True)
                  for net in (eager, graphed)]
    graph = StepGraph(lambda x, y: train_step(graphed, x, y, criterion, optimizers[1], precision,
                                              0.4, 5.0), enabled=True, warmup=1)
    for images, targets in _cuda_batches(3, 32):
        train_step(eager, images, targets, criterion, optimizers[0], precision, 0.4, 5.0)
        graph(images, targets)
    torch.cuda.synchronize()
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)

    # Drop-path masks drawn inside a graph are new at every replay.
    graphed.drop_path_prob = 0.5
    forward = StepGraph(lambda x: graphed(x)[0].clone(), enabled=True, warmup=1)
    x = _cuda_batches(1, 32, batch=16)[0][0]
    with torch.no_grad():
        outputs = [forward(x).clone() for _ in range(4)]
    assert forward.captures == 1
    assert not torch.equal(outputs[1], outputs[2]) and not torch.equal(outputs[2], outputs[3])


@needs_cuda
def test_a_graphed_evaluation_runs_other_shapes_eagerly():
    torch.manual_seed(0)
    network = NetworkCIFAR(8, 10, 5, False, Att_DARTS).to(CUDA).eval()
    graph = StepGraph(lambda x: network(x)[0], enabled=True, warmup=1)
    batches = [x for x, _ in _cuda_batches(3, 32)] + [torch.randn(3, 3, 32, 32, device=CUDA)]
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(graph(x).clone(), network(x)[0], rtol=1e-5, atol=1e-6)
    assert graph.captures == 1


@needs_cuda
def test_a_real_failed_capture_leaves_the_stream_as_it_was():
    """A step that reads a tensor back inside the capture: CUDA refuses the copy, the
    capture's end then fails too, and the fallback runs on the stream that was current
    (torch.cuda.graph alone would leave its capture stream current)."""
    lines = []
    graph, _ = run_graphs(True, False, lines.append)
    graph.reset(lambda x: (x * float(x.sum()),))
    graph.warmup = 1
    x = torch.ones(4, device=CUDA)
    before = torch.cuda.current_stream()
    outputs = [graph(x)[0] for _ in range(3)]
    assert torch.cuda.current_stream() == before
    assert all(torch.equal(out, x * 4) for out in outputs)
    assert len(lines) == 1 and "capturing the step failed (" in lines[0] and not graph.enabled
