"""Partial channel connections and edge normalisation (PC-DARTS) at every attention
location: the connection itself, bad K, every location's forward and gradients, the
recomputed cells against the kept ones in float64 (first and second order), and the
search iteration with the architecture frozen (--arch_warmup_epochs) or not, through
the CPU path of the CUDA-graph step.  PC-DARTS's own computation is the reference of
tests/test_partial_channels_reference.py."""
import argparse
import copy
import itertools

import pytest
import torch
import torch.nn as nn
from test_partial_channels_reference import channel_shuffle as pc_darts_shuffle

from architect import Architect
from model_search import AttLocation, Network, channel_shuffle, node_softmax
from runtime.cuda_graphs import StepGraph
from runtime.errors import UserError
from runtime.precision import Precision
from runtime.searching import check_search_space_flags, search_step, supernet_weight_step

LOCATIONS = [location.value for location in AttLocation]
C, K, LAYERS, SIZE, BATCH = 4, 2, 3, 8, 2
CPU = torch.device("cpu")


def _network(location: str, recompute: bool = False, dtype=torch.float64, **kwargs) -> Network:
    torch.manual_seed(0)
    options = dict(partial_channels=K, edge_norm=True, **kwargs)
    return Network(C, 10, LAYERS, nn.CrossEntropyLoss(), location, image_size=SIZE,
                   recompute=recompute, **options).to(dtype).train()


def _batch(seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=dtype),
            torch.randint(0, 10, (BATCH,), generator=generator))


def test_channel_shuffle_and_edge_softmax_are_pc_darts():
    x = torch.randn(2, 12, 3, 3)
    for groups in (2, 3, 4):
        assert torch.equal(channel_shuffle(x, groups), pc_darts_shuffle(x, groups))
        # Per edge on (B, edges, C, H, W), as the batched cell does it.
        edges = torch.stack([x, 2 * x], dim=1)
        shuffled = channel_shuffle(edges, groups, dim=2)
        assert torch.equal(shuffled[:, 1], pc_darts_shuffle(2 * x, groups))
    logits = torch.randn(14)
    weights = node_softmax(logits, 4)
    assert torch.allclose(weights[5:9], torch.softmax(logits[5:9], -1))
    assert torch.allclose(weights.split([2, 3, 4, 5])[3].sum(), torch.tensor(1.0))


def test_the_bypass_channels_leave_an_edge_unchanged_and_shuffled():
    """With only skip_connect, on a normal edge the output is the input shuffled: the
    mixed C/K channels (the sampled ones, weighted) and the bypass."""
    network = _network("no_attention", dtype=torch.float32)
    cell = network.cells[0]
    h = torch.randn(BATCH, C, SIZE, SIZE)
    first = torch.zeros(5, len(network.space.first_stage))
    first[:, network.space.first_stage.index("skip_connect")] = 1.0
    out = cell._edges_from(h, first[:3], None, None, index=2)  # state 2: normal, stride 1
    assert out.shape == (BATCH, 3, C, SIZE, SIZE)
    for edge in range(3):
        assert torch.equal(out[:, edge], channel_shuffle(h, K))


@pytest.mark.parametrize("K_bad, message", [(3, "does not divide the 4 channels"),
                                            (0, "at least 1"), (8, "does not divide")])
def test_bad_partial_channels_is_one_clear_line(K_bad, message):
    with pytest.raises(ValueError, match=message):
        Network(C, 10, LAYERS, nn.CrossEntropyLoss(), "after_every", partial_channels=K_bad)
    args = argparse.Namespace(init_ch=C, layers=LAYERS, partial_channels=K_bad, edge_norm="auto",
                              arch_warmup_epochs=0, space="darts")
    with pytest.raises(UserError) as error:
        check_search_space_flags(args)
    assert "--partial_channels" in str(error.value) and "\n" not in str(error.value)


def test_edge_norm_follows_partial_channels_unless_given():
    resolved = []
    for K_given, edge_norm in [(1, "auto"), (4, "auto"), (4, False), (1, True)]:
        args = argparse.Namespace(init_ch=8, layers=LAYERS, partial_channels=K_given,
                                  edge_norm=edge_norm, arch_warmup_epochs=15,
                                  lr_warmup_epochs=5, arch_grad_clip=5.0, space="darts")
        check_search_space_flags(args)
        resolved.append(args.edge_norm)
    assert resolved == [False, True, False, True]
    for flag in ("arch_warmup_epochs", "lr_warmup_epochs", "arch_grad_clip"):
        values = {"arch_warmup_epochs": 0, "lr_warmup_epochs": 0, "arch_grad_clip": 0.0, flag: -1}
        with pytest.raises(UserError, match=f"--{flag}"):
            check_search_space_flags(argparse.Namespace(init_ch=8, layers=3, partial_channels=1,
                                                        edge_norm="auto", space="darts", **values))


# Two locations in the quick tier: attentions in the first stage (at C/K) and in the
# second (at C); after a cell's concat: the rest.
@pytest.mark.parametrize("location", [
    location if location in ("double_mixed", "after_every_and_end")
    else pytest.param(location, marks=pytest.mark.slow) for location in LOCATIONS])
def test_every_location_searches_with_partial_channels(location):
    network = _network(location, dtype=torch.float32)
    names = list(network.named_arch_parameters())
    assert names[-2:] == ["edge_weights_normal", "edge_weights_reduce"]
    assert not any(name.startswith("betas") for name in names if "edge" in name)
    x, y = _batch(1, torch.float32)
    loss = network.loss(x, y)
    grads = torch.autograd.grad(loss, network.arch_parameters())
    for name, grad in zip(names, grads):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # The first stage runs on C/K channels of each of the 4 edges leaving state 0; a
    # second stage on all C.
    cell = network.cells[0]
    weights = torch.full((4, len(network.space.first_stage)), 0.1)
    assert cell._ops_from[0](torch.randn(BATCH, 4 * C // K, SIZE, SIZE), weights).shape[2] == C // K
    if network.space.second_stage is not None:
        weights = torch.full((4, len(network.space.second_stage)), 0.1)
        assert cell._attns_from[0](torch.randn(BATCH, 4 * C, SIZE, SIZE), weights).shape[2] == C
    genotype = network.genotype()
    assert len(genotype.normal) == 8 and len(genotype.reduce) == 8


def _gradients(network: Network, unrolled: bool):
    optimizer = torch.optim.SGD(network.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    architect = Architect(network, optimizer, 6e-4, 1e-3, unrolled)
    train, valid = _batch(1), _batch(2)
    if unrolled:
        return architect.second_order_gradient(*train, *valid, 0.1)
    return architect.first_order_gradient(*valid)


@pytest.mark.slow
@pytest.mark.parametrize("location", LOCATIONS)
def test_recomputed_cells_give_the_same_gradients_both_orders(location):
    kept, recomputed = _network(location), _network(location, recompute=True)
    recomputed.load_state_dict(kept.state_dict())
    for unrolled in (False, True):
        for a, b in zip(_gradients(kept, unrolled), _gradients(recomputed, unrolled)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("location, recompute", [("after_every", True), ("double_mixed", False),
                                                 ("end", True)])
def test_frozen_and_bilevel_iterations_through_the_graph_step(location, recompute):
    """The CPU path of the CUDA-graph step (a disabled StepGraph), reset per kind of
    iteration as search_epoch does: frozen iterations leave the architecture and its
    optimizer alone and take two inputs; bilevel ones move every architecture
    parameter, edge weights included."""
    network = _network(location, recompute=recompute, dtype=torch.float32)
    twin = copy.deepcopy(network)
    optimizer = torch.optim.SGD(network.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    architect = Architect(network, optimizer, 6e-4, 1e-3, unrolled=True)
    precision = Precision(False, "bfloat16", CPU)
    graph = StepGraph(None, enabled=False)
    batches = itertools.count(10)
    graph.reset(lambda x, y: supernet_weight_step(network, network, optimizer, precision,
                                                  (x, y), 5.0))
    for _ in range(3):
        graph(*_batch(next(batches), torch.float32))
    assert not architect.optimizer.state
    for a, b in zip(network.arch_parameters(), twin.arch_parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(network.classifier.weight, twin.classifier.weight)
    graph.reset(lambda x, y, xv, yv: search_step(network, architect, optimizer, precision,
                                                 (x, y), (xv, yv), 0.1, 5.0))
    for _ in range(3):
        graph(*_batch(next(batches), torch.float32), *_batch(next(batches), torch.float32))
    for (name, a), b in zip(network.named_arch_parameters().items(), twin.arch_parameters()):
        assert not torch.equal(a, b), name


@pytest.mark.slow
def test_a_pc_darts_search_end_to_end(cifar_mini, tmp_path):
    """train_search.py with K=2, edge normalisation and one frozen epoch: the first
    epoch leaves the architecture alone, the second moves it; the edge weights are
    saved and recorded; a resume with another K or without edge normalisation is one
    error line; the genotype builds a final network."""
    from training_helpers import mini_cifar, one_line_error, only_run_dir, run_in_process

    from genotypes import load_genotype
    from model import NetworkCIFAR

    folder = mini_cifar(cifar_mini, tmp_path / "data", train=4, val=0)
    flags = ["--data", str(folder), "--init_ch", "4", "--layers", "3", "--batchsz", "8",
             "--train_portion", "0.6", "--workers", "0", "--location", "after_every",
             "--partial_channels", "2", "--arch_warmup_epochs", "1"]
    result = run_in_process("train_search.py", *flags, "--exp_path", str(tmp_path / "exp"),
                            "--epochs", "2", env={"ATT_DARTS_TRACE_ARCH": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = [line.split()[-1] for line in result.stdout.splitlines()
              if line.startswith("rank 0 epoch")]
    assert len(hashes) == 6 and len(set(hashes[:3])) == 1 and len(set(hashes[3:])) == 3
    run = only_run_dir(tmp_path / "exp")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["args"]["edge_norm"] is True
    assert state["state_dict"]["edge_weights_normal"].shape == (14,)
    log = (run / "log.txt").read_text()
    assert "(architecture frozen)" in log and "edge normalisation on" in log
    assert '"edge_weights_reduce"' in (run / "arch_history.jsonl").read_text()
    for changed in (["--partial_channels", "1"], ["--no-edge_norm"]):
        refused = run_in_process("train_search.py", *flags, *changed, "--checkpoint_path",
                                 str(run), "--epochs", "3")
        line = one_line_error(refused)
        assert "resume with the run's own flags" in line, line
    bad = run_in_process("train_search.py", *flags[:-4], "--partial_channels", "3", "--exp_path",
                         str(tmp_path / "bad"))
    assert "--partial_channels" in one_line_error(bad)
    network = NetworkCIFAR(8, 10, 5, False, load_genotype(str(run / "genotype.json")))
    assert network(torch.randn(2, 3, 32, 32))[0].shape == (2, 10)
