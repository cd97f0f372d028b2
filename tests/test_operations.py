"""Candidate operations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import genotypes
from operations import OPS, FactorizedReduce, ReLUConvBN, is_identity_op

SPEC_PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                   "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
SPEC_OPS = SPEC_PRIMITIVES + ["sep_conv_7x7", "conv_7x1_1x7", "noise"]


def test_primitives_order_matches_spec():
    assert genotypes.PRIMITIVES == SPEC_PRIMITIVES


def test_ops_registry_has_every_spec_op():
    assert set(OPS) == set(SPEC_OPS)
    assert genotypes.OPERATIONS == SPEC_OPS  # the names a genotype file may use


def build_op(name, C, stride, affine):
    return OPS[name](C, stride, affine)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", SPEC_OPS)
def test_op_output_shape(name, stride, affine):
    torch.manual_seed(0)
    C, H, W = 6, 8, 10
    op = build_op(name, C, stride, affine)
    x = torch.randn(2, C, H, W)
    y = op(x)
    assert y.shape == (2, C, H // stride, W // stride)
    assert y.dtype == x.dtype


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", SPEC_OPS)
def test_batchnorm_affine_flag_is_respected(name, affine):
    op = build_op(name, 4, 2, affine)
    bns = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        assert bn.affine is affine


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", SPEC_OPS)
def test_conv_biases_absent(name, stride):
    op = build_op(name, 4, stride, True)
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        assert conv.bias is None, f"{name}: a conv has a bias"
    for helper in (ReLUConvBN(4, 6, 1, 1, 0), FactorizedReduce(4, 6)):
        for conv in (m for m in helper.modules() if isinstance(m, nn.Conv2d)):
            assert conv.bias is None


@pytest.mark.parametrize("stride", [1, 2])
def test_none_is_zero(stride):
    op = build_op("none", 5, stride, True)
    x = torch.randn(3, 5, 8, 8) + 1.0
    y = op(x)
    assert y.shape == (3, 5, 8 // stride, 8 // stride)
    assert torch.count_nonzero(y) == 0
    assert sum(p.numel() for p in op.parameters()) == 0


@pytest.mark.parametrize("stride", [1, 2])
def test_noise_is_fresh_standard_normal_whatever_the_input_and_mode(stride):
    """RobustDARTS's NoiseOp(stride, 0, 1): N(0, 1) of x[:, :, ::stride, ::stride]'s
    shape, the input discarded, in training and evaluation alike; no parameters."""
    op = build_op("noise", 4, stride, True)
    assert sum(p.numel() for p in op.parameters()) == 0 and not list(op.buffers())
    x = torch.randn(64, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    first = op(x)
    torch.manual_seed(0)
    assert torch.equal(op.eval()(x * 100.0), first)  # neither the input nor the mode count
    assert first.shape == x[:, :, ::stride, ::stride].shape and first.dtype == x.dtype
    assert not first.requires_grad
    again = op.train()(x)
    assert not torch.equal(again, first)  # fresh every call
    samples = torch.cat([first.flatten(), again.flatten()])
    assert abs(float(samples.mean())) < 0.05 and abs(float(samples.std()) - 1.0) < 0.05


def test_skip_connect_identity_at_stride_1_and_reduce_at_stride_2():
    x = torch.randn(2, 4, 6, 6)
    op = build_op("skip_connect", 4, 1, True)
    assert torch.equal(op(x), x)
    assert sum(p.numel() for p in op.parameters()) == 0
    assert isinstance(build_op("skip_connect", 4, 2, True), FactorizedReduce)


def test_is_identity_op():
    assert is_identity_op("skip_connect", 1)
    assert not is_identity_op("skip_connect", 2)
    for name in SPEC_OPS:
        if name != "skip_connect":
            assert not is_identity_op(name, 1)


def test_avg_pool_excludes_padding_and_max_pool_pads():
    # In float64: the averages below are exact but for the rounding of a division.
    x = torch.ones(1, 3, 6, 6, dtype=torch.float64)
    # Padding not counted: the mean of ones is one everywhere, borders included
    # (counting the padding would give 4/9 or 6/9 at the borders).
    assert torch.allclose(build_op("avg_pool_3x3", 3, 1, True)(x), x, rtol=1e-12, atol=0)
    y = torch.randn(2, 3, 6, 6)
    assert torch.equal(build_op("max_pool_3x3", 3, 2, True)(y),
                       F.max_pool2d(y, 3, stride=2, padding=1))
    # 3x3 window: the top-left output averages the 2x2 corner (4 values) only.
    z = torch.arange(36.0, dtype=torch.float64).view(1, 1, 6, 6)
    out = build_op("avg_pool_3x3", 1, 1, True)(z)
    assert out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 6 + 7) / 4, rel=1e-12)


def _bn_params(C, affine):
    return 2 * C if affine else 0


@pytest.mark.parametrize("affine", [True, False])
def test_parameter_counts_follow_the_spec_structure(affine):
    C = 8
    expected = {
        "none": 0, "avg_pool_3x3": 0, "max_pool_3x3": 0, "skip_connect": 0,
        "sep_conv_3x3": 2 * (C * 9 + C * C + _bn_params(C, affine)),
        "sep_conv_5x5": 2 * (C * 25 + C * C + _bn_params(C, affine)),
        "sep_conv_7x7": 2 * (C * 49 + C * C + _bn_params(C, affine)),
        "dil_conv_3x3": C * 9 + C * C + _bn_params(C, affine),
        "dil_conv_5x5": C * 25 + C * C + _bn_params(C, affine),
        "conv_7x1_1x7": 2 * 7 * C * C + _bn_params(C, affine),
    }
    for name, count in expected.items():
        op = build_op(name, C, 1, affine)
        assert sum(p.numel() for p in op.parameters()) == count, name
    # FactorizedReduce: two 1x1 convs C -> C/2 and a BN.
    fr = build_op("skip_connect", C, 2, affine)
    assert sum(p.numel() for p in fr.parameters()) == 2 * C * (C // 2) + _bn_params(C, affine)


def test_dil_conv_is_dilated_and_sep_conv_strides_once():
    dil = build_op("dil_conv_5x5", 4, 2, True)
    depthwise = [m for m in dil.modules() if isinstance(m, nn.Conv2d) and m.groups == 4]
    assert len(depthwise) == 1
    assert depthwise[0].dilation == (2, 2) and depthwise[0].padding == (4, 4)
    assert depthwise[0].stride == (2, 2)
    sep = build_op("sep_conv_5x5", 4, 2, True)
    depthwise = [m for m in sep.modules() if isinstance(m, nn.Conv2d) and m.groups == 4]
    assert [m.stride for m in depthwise] == [(2, 2), (1, 1)]
    assert all(m.padding == (2, 2) and m.kernel_size == (5, 5) for m in depthwise)


def test_factorized_reduce_matches_hand_computation():
    torch.manual_seed(0)
    C_in, C_out, H, W = 3, 4, 6, 6
    fr = FactorizedReduce(C_in, C_out, affine=True).double()
    with torch.no_grad():
        fr.bn.running_mean.uniform_(-1, 1)
        fr.bn.running_var.uniform_(0.5, 2.0)
        fr.bn.weight.uniform_(0.5, 1.5)
        fr.bn.bias.uniform_(-1, 1)
    fr.eval()
    x = torch.randn(2, C_in, H, W, dtype=torch.float64)
    y = fr(x)

    w1 = fr.conv_1.weight[:, :, 0, 0]
    w2 = fr.conv_2.weight[:, :, 0, 0]
    bn = fr.bn
    expected = torch.zeros(2, C_out, H // 2, W // 2, dtype=torch.float64)
    for b in range(2):
        for o in range(C_out):
            for i in range(H // 2):
                for j in range(W // 2):
                    if o < C_out // 2:
                        # first half: even pixels
                        v = sum(w1[o, c] * max(x[b, c, 2 * i, 2 * j].item(), 0.0)
                                for c in range(C_in))
                    else:
                        # second half: the input shifted by one pixel in both axes
                        v = sum(w2[o - C_out // 2, c] * max(x[b, c, 2 * i + 1, 2 * j + 1].item(), 0.0)
                                for c in range(C_in))
                    v = (v - bn.running_mean[o]) / torch.sqrt(bn.running_var[o] + bn.eps)
                    expected[b, o, i, j] = v * bn.weight[o] + bn.bias[o]
    assert torch.allclose(y, expected, atol=1e-10)


def test_relu_conv_bn_structure():
    m = ReLUConvBN(4, 6, 3, 2, 1, affine=False)
    x = torch.randn(2, 4, 8, 8)
    assert m(x).shape == (2, 6, 4, 4)
    # ReLU first: negative inputs contribute nothing, so the output is that of zeros,
    # bit for bit.
    m.eval()
    assert torch.equal(m(-x.abs()), m(torch.zeros_like(x)))



def _gradients(op, x, channels_last: bool, bfloat16: bool):
    """Gradients of a fixed projection of op(x) for x and every parameter of ``op``."""
    x = x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        y = op(x)
    direction = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    return torch.autograd.grad(y.float(), [x, *op.parameters()], direction)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"])
def test_gradients_under_amp_are_bfloat16_accurate(name, stride, channels_last):
    """What a --amp search runs (bfloat16 autocast; on the CPU channels-last by
    default) at the supernet's first cells (C=4, 32x32): the gradients are those of
    float32 up to bfloat16 rounding.  With its 8-bit mantissa they come out a few
    percent off (measured 0.4-6%, AVX2 and AVX-512 alike); a quarter is far above that
    and far below a wrong kernel, which is off by its own size.  (oneDNN's bfloat16 weight
    gradient of dilated depthwise convolutions at stride 1 with channels-last operands,
    the weight included, was off by 130% or infinite on AVX-512, and made --amp
    searches NaN at their second step.)"""
    torch.manual_seed(0)
    op = build_op(name, 4, stride, False).train()
    x = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _gradients(op, x, channels_last=False, bfloat16=False)
    if channels_last:  # the weights too, as the search moves its supernet
        op.to(memory_format=torch.channels_last)
    got = _gradients(op, x, channels_last, bfloat16=True)
    expected, got = torch.cat([g.flatten() for g in expected]), torch.cat([g.float().flatten() for g in got])
    error = float((got - expected).norm() / expected.norm())
    assert error < 0.25, f"{error:.3g} off the float32 gradients"
