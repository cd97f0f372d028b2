"""The supernet's batched candidates (``edges`` > 1: every edge leaving a state in one
module, operations.py / attentions.py) compute exactly what one module per edge
computes: outputs, input and parameter gradients, BN running statistics, eval mode;
and the supernet's state maps to and from the per-edge layout of earlier versions."""
from typing import Dict, List

import pytest
import torch
import torch.nn as nn

from genotypes import ATTN_PRIMITIVES
from model_search import SEARCH_SPACES, AttLocation, MixedOp, Network, build_candidate

EDGES, C, SIZE, BATCH = 3, 8, 8, 4
CANDIDATES = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
              "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7"] + list(ATTN_PRIMITIVES)


def _edge_state(state: Dict[str, torch.Tensor], edge: int, edges: int) -> Dict[str, torch.Tensor]:
    """Edge ``edge``'s block of every entry of a batched module's state."""
    return {k: v.clone() if v.dim() == 0 else v.unflatten(0, (edges, -1))[edge].clone()
            for k, v in state.items()}


def _per_edge_copies(batched: nn.Module, build) -> List[nn.Module]:
    copies = []
    for edge in range(EDGES):
        module = build().double()
        module.load_state_dict(_edge_state(batched.state_dict(), edge, EDGES))
        copies.append(module)
    return copies


def _compare(batched: nn.Module, copies: List[nn.Module], x: torch.Tensor, train: bool) -> None:
    """Output, input gradient and parameter gradients of ``batched`` on ``x`` (every
    edge's input side by side) against the per-edge ``copies``."""
    for module in [batched, *copies]:
        module.train(train)
    x = x.clone().requires_grad_(True)
    out = batched(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    pieces = x.detach().chunk(EDGES, dim=1)
    grads = upstream.chunk(EDGES, dim=1)
    for edge, (module, piece, grad) in enumerate(zip(copies, pieces, grads)):
        piece = piece.clone().requires_grad_(True)
        expected = module(piece)
        torch.testing.assert_close(out.chunk(EDGES, dim=1)[edge], expected, rtol=1e-10, atol=1e-12)
        expected.backward(grad)
        torch.testing.assert_close(x.grad.chunk(EDGES, dim=1)[edge], piece.grad, rtol=1e-10, atol=1e-12)
        batched_grads = _edge_state({n: p.grad for n, p in batched.named_parameters()}, edge, EDGES)
        for name, p in module.named_parameters():
            torch.testing.assert_close(batched_grads[name], p.grad, rtol=1e-10, atol=1e-12,
                                       msg=f"gradient of {name}, edge {edge}")
        statistics = _edge_state(dict(batched.named_buffers()), edge, EDGES)
        for name, buffer in module.named_buffers():
            torch.testing.assert_close(statistics[name], buffer, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", CANDIDATES)
def test_batched_candidate_equals_one_per_edge(name, stride, train):
    out_size = SIZE // stride
    torch.manual_seed(0)
    batched = build_candidate(name, C, stride, out_size, out_size, EDGES).double()
    for m in batched.modules():  # non-trivial statistics, so that eval mode tells edges apart
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    copies = _per_edge_copies(batched, lambda: build_candidate(name, C, stride, out_size, out_size))
    x = torch.randn(BATCH, EDGES * C, SIZE, SIZE, dtype=torch.float64)
    _compare(batched, copies, x, train)


@pytest.mark.parametrize("stage", ["first", "second"])
def test_batched_mixed_op_equals_one_per_edge(stage):
    space = SEARCH_SPACES[AttLocation.AFTER_EVERY]
    candidates = space.first_stage if stage == "first" else space.second_stage
    torch.manual_seed(0)
    batched = MixedOp(candidates, C, 1, SIZE, SIZE, EDGES).double().train()
    copies = _per_edge_copies(batched, lambda: MixedOp(candidates, C, 1, SIZE, SIZE))
    weights = torch.softmax(torch.randn(EDGES, len(candidates), dtype=torch.float64), -1)
    x = torch.randn(BATCH, EDGES * C, SIZE, SIZE, dtype=torch.float64)

    class Bound(nn.Module):  # the module with its edge's weights, output as (B, C, H, W)
        def __init__(self, op, rows):
            super().__init__()
            self.op, self.rows = op, rows

        def forward(self, x):
            return self.op(x, self.rows).flatten(1, 2)

    _compare(Bound(batched, weights), [Bound(c, weights[e:e + 1]) for e, c in enumerate(copies)],
             x, train=True)


# Edges with candidates of their own (RobustDARTS's s1), 'none' among them, in other columns.
OWN_CANDIDATES = [("skip_connect", "dil_conv_3x3", "none"), ("max_pool_3x3", "none", "skip_connect"),
                  ("none", "dil_conv_3x3", "sep_conv_3x3")]


@pytest.mark.parametrize("stride, same_input", [(2, True), (1, False)],
                         ids=["first_stage_stride_2", "second_stage"])
def test_batched_mixed_op_with_each_edges_own_candidates_equals_one_per_edge(stride, same_input):
    """Each distinct candidate runs once, on the edges that have it: the same outputs,
    gradients and statistics as one MixedOp per edge over the edge's own candidates.
    ``same_input``: the edges read one state (the input blocks are equal)."""
    torch.manual_seed(0)
    batched = MixedOp(OWN_CANDIDATES, C, stride, SIZE // stride, SIZE // stride, EDGES,
                      same_input=same_input).double().train()
    copies = [MixedOp(row, C, stride, SIZE // stride, SIZE // stride).double().train()
              for row in OWN_CANDIDATES]
    states = [{} for _ in copies]
    for name, tensor in batched.state_dict().items():
        u, rest = name.split(".", 2)[1:]
        blocks = batched.placements[int(u)]
        for block, (edge, k) in enumerate(blocks):
            states[edge][f"_ops.{k}.{rest}"] = (tensor.clone() if tensor.dim() == 0 else
                                                tensor.unflatten(0, (len(blocks), -1))[block].clone())
    for copy, state in zip(copies, states):
        copy.load_state_dict(state)
    weights = torch.softmax(torch.randn(EDGES, 3, dtype=torch.float64), -1).requires_grad_(True)
    x = torch.randn(BATCH, C, SIZE, SIZE, dtype=torch.float64)
    x = (torch.cat([x] * EDGES, 1) if same_input
         else torch.randn(BATCH, EDGES * C, SIZE, SIZE, dtype=torch.float64)).requires_grad_(True)
    out = batched(x, weights)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    for edge, copy in enumerate(copies):
        piece = x.detach().chunk(EDGES, dim=1)[edge].clone().requires_grad_(True)
        rows = weights.detach()[edge:edge + 1].clone().requires_grad_(True)
        expected = copy(piece, rows)
        torch.testing.assert_close(out[:, edge:edge + 1], expected, rtol=1e-10, atol=1e-12)
        expected.backward(upstream[:, edge:edge + 1])
        torch.testing.assert_close(weights.grad[edge:edge + 1], rows.grad, rtol=1e-10, atol=1e-12)
        if not same_input:  # (with one state, its gradient sums over the edges)
            torch.testing.assert_close(x.grad.chunk(EDGES, dim=1)[edge], piece.grad,
                                       rtol=1e-10, atol=1e-12)
        assert weights.grad[edge, OWN_CANDIDATES[edge].index("none")] == 0  # never run
    for name, p in batched.named_parameters():
        u, rest = name.split(".", 2)[1:]
        blocks = batched.placements[int(u)]
        for block, (edge, k) in enumerate(blocks):
            torch.testing.assert_close(p.grad.unflatten(0, (len(blocks), -1))[block],
                                       copies[edge].get_parameter(f"_ops.{k}.{rest}").grad,
                                       rtol=1e-10, atol=1e-12, msg=name)
    assert batched._weight_index.count(None) == 4  # 4 of the 5 candidates on some edges only


@pytest.mark.parametrize("location, space", [("after_every", "darts"), ("no_attention", "s3"),
                                             ("double_mixed", "darts"), ("double_mixed", "s1")])
def test_per_edge_layout_has_the_per_edge_modules_and_round_trips(location, space):
    """Edge e of a cell in the per-edge layout is a per-edge MixedOp's state (names and
    shapes), and that layout loads back into the same network."""
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), location, image_size=8,
                      operation_space=space).double()
    layout = network.per_edge_layout(network.state_dict())
    cell = network.cells[1]  # a reduction cell: stride-2 edges from the cell inputs
    for edge in range(14):
        stride = 2 if edge in (0, 1, 2, 3, 5, 6, 9, 10) else 1
        candidates = network.edge_candidates["alphas_reduce"][edge]
        expected = MixedOp(candidates, 8, stride, 4, 4).state_dict()
        got = {k[len(f"cells.1._ops.{edge}."):]: v for k, v in layout.items()
               if k.startswith(f"cells.1._ops.{edge}.")}
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
        assert list(got) == list(expected)
    assert cell.reduction
    fresh = Network(4, 10, 3, nn.CrossEntropyLoss(), location, image_size=8,
                    operation_space=space).double()
    fresh.load_state_dict({k: v.clone() for k, v in layout.items()})
    for (name, a), b in zip(network.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
