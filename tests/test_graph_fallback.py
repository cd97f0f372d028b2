"""The CUDA-graph path on the CPU, with fakes standing in for torch.cuda's streams,
``CUDAGraph`` and ``graph`` (tests/fake_cuda.py): the capture mode, a failed capture
(at the first capture and at a later epoch's) in the search and the training loops,
what a failed capture leaves behind, one private pool at a time, resuming across
modes and device counts, and the second order's passes in IEEE float32."""
import argparse
import itertools
import os
from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn as nn
from fake_cuda import FAILURE, ROOT_CAUSE, SECONDARY, FakeCuda
from torch.utils.data import DataLoader, TensorDataset

from architect import Architect
from genotypes import Att_DARTS
from model import NetworkCIFAR
from model_search import Network
from runtime import parallel, searching
from runtime.cuda_graphs import StepGraph, run_graphs
from runtime.errors import UserError
from runtime.experiment import load_optimizer_state, restore, restore_rng, rng_state
from runtime.parallel import Runtime
from runtime.precision import (CUBLAS_WORKSPACE, IEEE_FLOAT32, Precision, exact_float32,
                               float32_settings, kernel_choice)
from runtime.training import train_epoch

# Small tensors: one thread is as fast, and immune to the thread contention of a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
RUNTIME = Runtime(CPU)


def _batches(count: int, size: int, batch: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, 10, (batch,), generator=generator)) for _ in range(count)]


def _loader(batches) -> DataLoader:
    images = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    return DataLoader(TensorDataset(images, targets), batch_size=batches[0][0].size(0))


def _state(module: nn.Module, *optimizers) -> List[torch.Tensor]:
    return [t.detach().clone() for t in itertools.chain(
        module.parameters(), module.buffers(),
        *[[v for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
          for o in optimizers])]


def test_capture_is_thread_local(monkeypatch):
    """Pin-memory threads call CUDA during a capture: only a thread_local capture
    survives them."""
    fake = FakeCuda().install(monkeypatch)
    graph = StepGraph(lambda x: (x * 2,), enabled=True, warmup=1)
    for i in range(4):
        x = torch.full((3,), float(i))
        assert torch.equal(graph(x)[0], x * 2)
    assert fake.modes == ["thread_local"] and graph.captures == 1


# -- the search loop ----------------------------------------------------------------------

_EAGER = {}


def _eager(run, monkeypatch):
    """``run``'s eager result, computed once for the module: the reference."""
    if run not in _EAGER:
        _EAGER[run] = run(monkeypatch, graphs=False)
    return _EAGER[run]


def _search(monkeypatch, graphs: bool, fail_at=(), strict: bool = False):
    """2 search epochs of 3 iterations (first order) and their evaluations, on the run's
    two StepGraphs (one warm-up step: each epoch captures its second iteration);
    returns (state, log lines, fake, Adam's step counts)."""
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "end", image_size=8)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=True)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=False)
    fake = FakeCuda(fail_at).install(monkeypatch)
    fake.holders = [network, optimizer, architect.optimizer]
    lines = []
    step_graph, eval_graph = run_graphs(graphs, strict, lines.append)
    step_graph.warmup = 1
    args = argparse.Namespace(grad_clip=5.0, channels_last=False, report_freq=0)
    precision = Precision(False, "bfloat16", CPU)
    loader, arch = _loader(_batches(3, 8)), itertools.cycle(_batches(2, 8, seed=1))
    for epoch in range(2):
        searching.search_epoch(network, architect, optimizer, loader, arch, 0.025 / (epoch + 1),
                               precision, RUNTIME, args, lines.append, step_graph)
        searching.evaluate_supernet(network, loader, precision, RUNTIME, False, eval_graph)
    steps = [int(s["step"]) for s in architect.optimizer.state.values()]
    return _state(network, optimizer, architect.optimizer), lines, fake, steps


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 3], ids=["first_capture", "next_epoch"])
def test_a_failed_search_capture_falls_back_to_eager_steps(monkeypatch, fail_at):
    """Capture 1 is epoch 1's iteration, 2 its evaluation, 3 epoch 2's iteration.
    The run goes on eagerly, ends where an eager run ends (the step whose capture
    failed ran once), and says so in one line."""
    eager, eager_lines, _, _ = _eager(_search, monkeypatch)
    graphed, lines, fake, steps = _search(monkeypatch, graphs=True, fail_at=[fail_at])
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert steps and set(steps) == {6}  # 2 epochs of 3 architecture steps, none twice
    assert fake.attempts == fail_at and fake.modes == ["thread_local"] * fail_at
    failures = [line for line in lines if "CUDA graphs" in line]
    assert len(failures) == 1 and "--no-cuda_graphs" in failures[0]
    assert "continues without CUDA graphs" in failures[0] and FAILURE in failures[0]
    assert not any("CUDA graphs" in line for line in eager_lines)


@pytest.mark.slow
def test_graphs_hold_one_pool_and_no_gradients_at_a_capture(monkeypatch):
    _, lines, fake, _ = _search(monkeypatch, graphs=True)
    assert fake.attempts == 4 and not lines  # two iterations and two evaluations captured
    assert fake.alive_at_capture == [0, 0, 0, 0]
    assert fake.grads_at_capture == [0, 0, 0, 0]


@pytest.mark.slow
def test_an_explicit_cuda_graphs_stops_at_a_failed_capture(monkeypatch):
    with pytest.raises(UserError, match="--no-cuda_graphs") as error:
        _search(monkeypatch, graphs=True, fail_at=[3], strict=True)
    assert "capturing the step failed" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("strict", [False, True])
def test_a_failed_capture_runs_that_step_eagerly_once(monkeypatch, strict):
    """The quick tier's check of the fallback (the loops' are below, slow)."""
    fake = FakeCuda(fail_at=[2]).install(monkeypatch)
    total, lines = torch.zeros(()), []

    def step(x):
        total.add_(x.sum())
        return (total.clone(),)

    fake.holders = [nn.Module()]
    fake.holders[0].register_buffer("total", total)
    graph, evaluation = run_graphs(True, strict, lines.append)
    graph.reset(step)
    graph.warmup = 1
    for epoch in range(2):
        graph.reset()
        for _ in range(3):
            if strict and epoch == 1:
                with pytest.raises(UserError, match="--no-cuda_graphs"):
                    graph(torch.ones(2))
                return
            graph(torch.ones(2))
    # 6 steps of 2 each, none lost or applied twice; epoch 1 captured, epoch 2 eager.
    assert float(total) == 12.0 and graph.captures == 1 and fake.attempts == 2
    assert not graph.enabled and not evaluation.enabled and fake.alive() == 0
    assert len(lines) == 1 and "--no-cuda_graphs" in lines[0]


def test_a_failed_replay_runs_that_step_eagerly_once(monkeypatch):
    FakeCuda().install(monkeypatch)
    calls, lines = [], []

    def step(x):
        calls.append(1)
        return (x + 1,)

    graph, _ = run_graphs(True, False, lines.append)
    graph.reset(step)
    graph.warmup = 0
    graph(torch.zeros(2))  # captured (one fake run) and replayed (another)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self: (_ for _ in ()).throw(RuntimeError("launch failed")))
    calls.clear()
    for _ in range(3):
        assert torch.equal(graph(torch.ones(2))[0], torch.full((2,), 2.0))
    assert len(calls) == 3 and not graph.captured and not graph.enabled
    assert len(lines) == 1 and "replaying the step failed" in lines[0]


def test_a_failed_capture_leaves_the_process_as_it_found_it(monkeypatch):
    """The step fails inside the capture (an op CUDA does not permit while capturing), so
    the capture's end fails too, with the first error as its context.  torch 2.14 ends
    the capture before it leaves the capture stream: our own stream context puts the
    stream that was current back, where the eager fallback runs.  The log names the
    root cause, the failed graph is reset and dropped, and the architecture's Adam
    (created capturable for the graphs) takes the eager step again."""
    fake = FakeCuda(step_fails_at=[1]).install(monkeypatch)
    streams, lines = [], []

    def step(x):
        streams.append(fake.current)
        return (x + 1,)

    graph, _ = run_graphs(True, False, lines.append)
    graph.reset(fake.failing_step(step))
    graph.warmup = 0
    params = [nn.Parameter(torch.zeros(3))]
    adam = torch.optim.Adam(params, 0.1, foreach=True, capturable=True)
    # What a capturable step leaves: its counters on the parameters' device.
    adam.state[params[0]] = {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3),
                             "exp_avg_sq": torch.zeros(3)}
    graph.group.capturable.append(adam)
    assert torch.equal(graph(torch.ones(2))[0], torch.full((2,), 2.0))
    assert fake.current is fake.default and streams == [fake.default]
    assert fake.attempts == 1 and fake.dropped == 1 and fake.alive() == 0
    assert not graph.captured and not graph.enabled
    assert len(lines) == 1 and lines[0].index(ROOT_CAUSE) < lines[0].index(f"then RuntimeError: {SECONDARY}")
    assert adam.param_groups[0]["capturable"] is False
    params[0].grad = torch.ones(3)
    adam.step()  # eager, on the CPU (a capturable Adam refuses CPU tensors)
    assert float(adam.state[params[0]]["step"]) == 6.0


def test_the_search_registers_its_capturable_adam_with_the_graphs():
    lines = []
    import train_search

    args = train_search.parser.parse_args(["--init_ch", "4", "--layers", "3", "--no-recompute",
                                           "--no-edge_norm", "--no-channels_last",
                                           "--cuda_graphs"])
    graphs = run_graphs(True, False, lines.append, steps=2)
    net = searching.build_supernet(args, "end", RUNTIME, SimpleNamespace(num_classes=10), graphs)
    group = net.architect.optimizer.param_groups[0]
    assert group["capturable"] is True
    net.frozen_graph.group.fail("capturing the step", RuntimeError(FAILURE))
    assert group["capturable"] is False and len(lines) == 1


def test_the_hessian_runs_with_no_graph_held(monkeypatch):
    """--hessian_every: the double backward does not share the card with the graphs'
    pools (their graphs dropped first)."""
    fake = FakeCuda().install(monkeypatch)
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "end", image_size=8)
    graph, eval_graph = run_graphs(True, False, print)
    graph.reset(lambda x: (network(x),))
    graph.warmup = 0
    x = _batches(1, 8)[0][0]
    with torch.no_grad():
        graph(x)
    assert graph.captured and fake.alive() == 1
    alive = []

    def eigenvalue(*args, **kwargs):
        alive.append(fake.alive())
        return searching.curvature.Eigenvalue(1.0, 1, 0.0, True)

    monkeypatch.setattr(searching.curvature, "dominant_eigenvalue", eigenvalue)
    net = SimpleNamespace(network=network, graph=graph, eval_graph=eval_graph,
                          hessian_batches=_batches(1, 8))
    searching.measure_curvature(net, SimpleNamespace(hessian_images=4),
                                argparse.Namespace(hessian_iterations=2), lambda line: None)
    assert alive == [0] and not graph.captured


# -- the training loop ----------------------------------------------------------------------

def _train(monkeypatch, graphs: bool, fail_at=()):
    torch.manual_seed(0)
    network = NetworkCIFAR(4, 10, 3, False, Att_DARTS)
    optimizer = torch.optim.SGD(network.parameters(), 0.025, momentum=0.9, foreach=True)
    fake = FakeCuda(fail_at).install(monkeypatch)
    fake.holders = [network, optimizer]
    lines = []
    step_graph, _ = run_graphs(graphs, False, lines.append)
    step_graph.warmup = 1
    args = argparse.Namespace(grad_clip=5.0, channels_last=False, report_freq=0,
                              auxiliary_weight=0.4)
    loader = _loader(_batches(3, 32))
    for _ in range(2):
        train_epoch(network, loader, nn.CrossEntropyLoss(), optimizer,
                    Precision(False, "bfloat16", CPU), RUNTIME, args, lines.append, step_graph)
    return _state(network, optimizer), lines, fake


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 2], ids=["first_capture", "next_epoch"])
def test_a_failed_training_capture_falls_back_to_eager_steps(monkeypatch, fail_at):
    eager, _, _ = _eager(_train, monkeypatch)
    graphed, lines, fake = _train(monkeypatch, graphs=True, fail_at=[fail_at])
    assert fake.attempts == fail_at
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert len(lines) == 1 and "--no-cuda_graphs" in lines[0]


# -- resuming across modes --------------------------------------------------------------------

MODES = {"cpu": (False, "bfloat16"), "graphs": (True, "bfloat16"), "float16": (False, "float16")}


def _architecture(capturable: bool):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    return params, torch.optim.Adam(params, 3e-4, betas=(0.5, 0.999), weight_decay=1e-3,
                                    foreach=True, capturable=capturable)


def _checkpoint(mode: str):
    """What a run in ``mode`` saves after two Adam steps: a graph run's param_groups
    say capturable (its step counters load onto the CPU from any device); a float16
    run saves its scaler's state, the others an empty one."""
    params, optimizer = _architecture(capturable=False)
    for i in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (i + 1))
        optimizer.step()
    state = optimizer.state_dict()
    state["param_groups"][0]["capturable"] = MODES[mode][0]
    state["param_groups"][0]["foreach"] = None
    amp_dtype = MODES[mode][1]
    scaler = Precision(amp_dtype == "float16", amp_dtype, CPU).scaler
    if scaler.is_enabled():  # a float16 run's scale moves away from its start
        scaler.scale(torch.ones(()))
        scaler.update(1024.0)
    network = nn.Linear(2, 2)
    return ({"state_dict": network.state_dict(), "arch_optimizer": state,
             "scaler": scaler.state_dict(), "rng": [rng_state()]},
            [p.detach().clone() for p in params], network)


@pytest.mark.parametrize("saved", sorted(MODES))
@pytest.mark.parametrize("resumed", sorted(MODES))
def test_a_checkpoint_resumes_in_any_mode(saved, resumed):
    state, weights, network = _checkpoint(saved)
    capturable, amp_dtype = MODES[resumed]
    params, optimizer = _architecture(capturable)
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    precision = Precision(amp_dtype == "float16", amp_dtype, CPU)
    restore(state, "checkpoint.pt", network, {"arch_optimizer": optimizer}, precision,
            RUNTIME, seed=0)
    group = optimizer.param_groups[0]
    assert group["capturable"] is capturable and group["foreach"] is True
    steps = [s["step"] for s in optimizer.state.values()]
    assert all(s.dtype == torch.float32 and s.device == CPU and float(s) == 2 for s in steps)
    if resumed == "float16":  # from float32/bfloat16: a fresh scaler; from float16: its own
        assert precision.scaler.get_scale() == (1024.0 if saved == "float16" else 65536.0)
    if not capturable:  # Adam refuses capturable steps on the CPU
        for p in params:
            p.grad = torch.full_like(p, 0.3)
        optimizer.step()
        assert all(float(s) == 3 for s in steps)


def test_a_capturable_run_moves_the_step_counters_to_the_parameters():
    params, optimizer = _architecture(capturable=False)
    optimizer.state[params[0]]["step"] = torch.tensor(4.0, dtype=torch.float64)
    state = optimizer.state_dict()
    _, resumed = _architecture(capturable=True)
    load_optimizer_state(resumed, state)
    step = resumed.state[resumed.param_groups[0]["params"][0]]["step"]
    assert step.dtype == torch.float32 and float(step) == 4.0


def test_a_checkpoint_of_two_gpus_resumes_where_one_is_visible(monkeypatch):
    """A checkpoint written by a run that saw two GPUs (DataParallel, torchrun, another
    CUDA_VISIBLE_DEVICES), resumed where one is visible: torch.cuda.set_rng_state_all
    indexed torch.cuda.default_generators by position (an IndexError).  The fake: one
    default generator (a CPU one), CUDA's lazy initialisation done."""
    generator = torch.Generator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (generator,))
    for name, value in {"_lazy_init": lambda: None, "is_initialized": lambda: True,
                        "_lazy_call": lambda callback, **kwargs: callback()}.items():
        monkeypatch.setattr(torch.cuda.random, name, value)
    runtime = Runtime(torch.device("cuda"))
    states = [torch.Generator().manual_seed(seed).get_state() for seed in (1, 2)]
    with pytest.raises(IndexError):  # what resuming did
        torch.cuda.set_rng_state_all(states)
    restore_rng([{**rng_state(), "cuda": states}], runtime, seed=0)  # the earlier layout
    assert torch.equal(generator.get_state(), states[0])
    generator.manual_seed(3)
    saved = rng_state(parallel.cuda_devices(runtime))  # the devices the run uses
    assert len(saved["cuda_devices"]) == 1
    assert torch.equal(saved["cuda_devices"][0], generator.get_state())
    restore_rng([{**saved, "cuda_devices": states}], runtime, seed=0)
    assert torch.equal(generator.get_state(), states[0])
    seeded = generator.manual_seed(4).get_state()
    restore_rng([rng_state()], runtime, seed=0)  # a CPU run's checkpoint: no device state
    assert torch.equal(generator.get_state(), seeded)


# -- the second order in IEEE float32 ------------------------------------------------------------

@pytest.mark.parametrize("unrolled", [False, True])
def test_second_order_passes_run_in_ieee_float32(monkeypatch, tf32_allowed, unrolled):
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "end", image_size=8)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=unrolled)
    seen = []
    loss = Architect._loss

    def recording(self, *args):
        seen.append(float32_settings())
        return loss(self, *args)

    monkeypatch.setattr(Architect, "_loss", recording)
    train, valid = _batches(2, 8)
    architect.step(*train, *valid, 0.025)
    # Second order: virtual step, validation at w', both perturbed gradients.
    assert seen == ([IEEE_FLOAT32] * 4 if unrolled else [tf32_allowed])
    assert float32_settings() == tf32_allowed


def test_the_float32_settings_come_back_after_an_error(tf32_allowed):
    with pytest.raises(RuntimeError, match="boom"):
        with exact_float32():
            assert float32_settings() == IEEE_FLOAT32
            raise RuntimeError("boom")
    assert float32_settings() == tf32_allowed


def test_deterministic_kernels_only_inside_the_run():
    """--deterministic: cuDNN's deterministic algorithms, no benchmarking, PyTorch's
    deterministic mode, cuBLAS's workspace setting; all as before once the run ends
    (the tests run the scripts' functions in one process).  Without it cuDNN
    benchmarks on a GPU."""
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              os.environ.get(CUBLAS_WORKSPACE[0]))
    with kernel_choice(True, torch.device("cuda")):
        assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ[CUBLAS_WORKSPACE[0]] == (before[3] or CUBLAS_WORKSPACE[1])
    assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
            os.environ.get(CUBLAS_WORKSPACE[0])) == before
    with kernel_choice(False, torch.device("cuda")):
        assert cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with kernel_choice(False, CPU):
        assert not cudnn.benchmark
