"""The faster code paths of the supernet and the ops compute what the plain ones do:
the depthwise convolution with a forward-convolution input gradient, the poolings
shared by the edges leaving one state, BN statistics frozen for the architect."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_search import SEARCH_SPACES, AttLocation, MixedOp, Network, SearchCell
from operations import DepthwiseConv2d, DepthwiseConvolution
from runtime.recompute import batch_statistics_only

# (kernel, dilation, stride): every depthwise convolution of the search space and
# the NASNet ops, with stride 2 as on reduction edges.
GEOMETRIES = [(k, d, s) for k, d in ((3, 1), (5, 1), (7, 1), (3, 2), (5, 2)) for s in (1, 2)]


@pytest.mark.parametrize("kernel, dilation, stride", GEOMETRIES)
@pytest.mark.parametrize("size", [7, 8])  # odd sizes: stride 2 rounds up
def test_depthwise_convolution_gradients_match_pytorch(kernel, dilation, stride, size):
    """float64: the same output and gradients as F.conv2d, and gradcheck/gradgradcheck
    pass (double backward, as the exact-Hessian tests use, goes through it)."""
    torch.manual_seed(0)
    padding = dilation * (kernel - 1) // 2
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, size, size, dtype=torch.float64).to(memory_format=memory_format)
        x.requires_grad_()
        w = torch.randn(3, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)

        def fast(x, w):
            return DepthwiseConvolution.apply(x, w, stride, padding, dilation)

        y = fast(x, w)
        expected = F.conv2d(x, w, None, stride, padding, dilation, 3)
        grad = torch.randn_like(expected)
        assert torch.allclose(y, expected, rtol=0, atol=1e-12)
        for got, want in zip(torch.autograd.grad(y, (x, w), grad),
                             torch.autograd.grad(expected, (x, w), grad)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # Numerical derivatives (slow): once per geometry.
    if size == 7:
        assert torch.autograd.gradcheck(fast, (x, w))
        assert torch.autograd.gradgradcheck(fast, (x, w))


def test_depthwise_convolution_backward_runs_in_its_forward_autocast_state():
    """A float32 forward differentiated inside a bfloat16 autocast region (what the
    architect does under --amp) gets the float32 gradients, bit for bit."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(4, 5, 1, 4, dilation=2)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    grad = torch.randn(2, 4, 9, 9)
    expected = torch.autograd.grad(conv(x), [x, conv.weight], grad)
    y = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(y, [x, conv.weight], grad)
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got, expected))


def test_depthwise_conv2d_keeps_the_conv2d_layout():
    conv = DepthwiseConv2d(8, 3, 2, 1)
    assert isinstance(conv, nn.Conv2d) and conv.groups == 8 and conv.bias is None
    assert list(conv.state_dict()) == ["weight"] and conv.weight.shape == (8, 1, 3, 3)
    with pytest.raises(AssertionError):
        DepthwiseConv2d(8, 3, 1, 0)  # not 'same' padding


def _cell(location: str = "after_every") -> SearchCell:
    torch.manual_seed(0)
    return SearchCell(SEARCH_SPACES[AttLocation(location)], 4, 4, 8, 8, 4, False, False, 8, 8)


def test_edges_leaving_a_state_keep_their_own_pooling_statistics():
    """In training mode the pooling BN of every edge leaving a state ends with the
    statistics it would have had as a BN of its own fed the pooled state."""
    cell = _cell().double().train()
    s0, s1 = torch.randn(4, 8, 8, 8, dtype=torch.float64), torch.randn(4, 8, 8, 8, dtype=torch.float64)
    first = torch.softmax(torch.randn(14, 8, dtype=torch.float64), -1)
    second = torch.softmax(torch.randn(14, 6, dtype=torch.float64), -1)
    reference = _cell().double().train()
    reference.load_state_dict(cell.state_dict())
    cell(s0, s1, first, second, None)
    poolings = ((0, nn.MaxPool2d(3, 1, 1)), (1, nn.AvgPool2d(3, 1, 1, count_include_pad=False)))
    edges = len(cell.layout.edges_leaving[1])  # the four edges leaving the cell input s1
    with torch.no_grad():
        h = reference.preprocess1(s1)
        for position, pool in poolings:
            before = reference._ops_from[1]._ops[position][1]
            got = cell._ops_from[1]._ops[position][1]
            for edge in range(edges):
                expected = nn.BatchNorm2d(4, affine=False).double()
                expected.running_mean.copy_(before.running_mean.view(edges, -1)[edge])
                expected.running_var.copy_(before.running_var.view(edges, -1)[edge])
                expected(pool(h))
                assert torch.allclose(got.running_mean.view(edges, -1)[edge], expected.running_mean,
                                      rtol=1e-14, atol=1e-15)
                assert torch.allclose(got.running_var.view(edges, -1)[edge], expected.running_var,
                                      rtol=1e-14, atol=1e-15)
            assert int(got.num_batches_tracked) == 1


def test_batch_statistics_only_leaves_running_statistics_and_restores_tracking():
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "after_every", image_size=16).train()
    norms = [m for m in network.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images = torch.randn(4, 3, 16, 16)
    expected = network(images)
    network.load_state_dict(before)
    with batch_statistics_only(norms):
        got = network(images)
    assert torch.equal(got, expected)  # batch statistics either way
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    with pytest.raises(ZeroDivisionError):
        with batch_statistics_only(norms):
            1 / 0
    assert all(norm.track_running_stats for norm in norms)


def test_mixed_op_alone_equals_its_weighted_candidates():
    """Outside a cell a one-edge MixedOp is sum_k w_k candidate_k(x)."""
    torch.manual_seed(0)
    op = MixedOp(SEARCH_SPACES[AttLocation.AFTER_EVERY].first_stage, 4, 1, 8, 8).double().train()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    weights = torch.softmax(torch.randn(8, dtype=torch.float64), -1)
    state = {k: v.clone() for k, v in op.state_dict().items()}
    got = op(x, weights[None]).flatten(1, 2)
    op.load_state_dict(state)
    expected = sum(weights[k] * candidate(x) for k, candidate in zip(op._weight_index, op._ops))
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
