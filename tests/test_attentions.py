"""Attention modules, checked against straightforward re-computations."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import genotypes
from attentions import ATTENTIONS, build_attention, global_max_pool, upgrade_legacy_keys
from runtime.dispatch import OpCounter
from runtime.precision import kernel_choice

SPEC_ATTN_PRIMITIVES = ["Identity", "SE", "BAM", "CBAM", "GE_theta-plus", "DoubleAttention"]
NON_IDENTITY = SPEC_ATTN_PRIMITIVES[1:]
R = 16


def test_attn_primitives_order_matches_spec():
    assert genotypes.ATTN_PRIMITIVES == SPEC_ATTN_PRIMITIVES
    assert set(ATTENTIONS) == set(SPEC_ATTN_PRIMITIVES)


def test_unknown_attention_raises_listing_valid_names():
    with pytest.raises((KeyError, ValueError)) as info:
        build_attention("Squeeze", 16, 4, 4)
    for name in SPEC_ATTN_PRIMITIVES:
        assert name in str(info.value)


@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (3, 16, 5, 7)])
@pytest.mark.parametrize("name", SPEC_ATTN_PRIMITIVES)
def test_keeps_shape(name, shape):
    torch.manual_seed(0)
    B, C, H, W = shape
    att = build_attention(name, C, H, W)
    x = torch.randn(*shape)
    assert att(x).shape == x.shape
    att.eval()
    assert att(x).shape == x.shape


def test_identity_returns_input():
    att = build_attention("Identity", 8, 4, 4)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(att(x), x)
    assert len(list(att.parameters())) == 0


@pytest.mark.parametrize("name", NON_IDENTITY)
def test_gradient_reaches_input_and_every_parameter(name):
    torch.manual_seed(0)
    B, C, H, W = 4, 32, 6, 6
    att = build_attention(name, C, H, W).double().train()
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    (att(x) * torch.randn(B, C, H, W, dtype=torch.float64)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = list(att.named_parameters())
    assert params
    for pname, p in params:
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, f"{name}.{pname} got a zero gradient"


@pytest.mark.parametrize("name", NON_IDENTITY)
def test_learnable_parts_live_under_mask(name):
    att = build_attention(name, 32, 6, 6)
    names = [n for n, _ in att.named_parameters()] + [n for n, _ in att.named_buffers()]
    assert names
    assert all(n.startswith("_mask.") for n in names), names


@pytest.mark.parametrize("name", SPEC_ATTN_PRIMITIVES)
def test_tiny_channel_count_builds(name):
    # C // 16 == 0: the hidden width must be clamped to at least 1.
    att = build_attention(name, 4, 3, 3)
    for m in att.modules():
        if isinstance(m, nn.Linear):
            assert m.in_features >= 1 and m.out_features >= 1
        if isinstance(m, nn.Conv2d):
            assert m.in_channels >= 1 and m.out_channels >= 1
    att.eval()
    x = torch.randn(2, 4, 3, 3)
    y = att(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def _hidden(C):
    return max(1, C // R)


def _expected_param_count(name, C, H, W):
    h = _hidden(C)
    if name == "Identity":
        return 0
    if name == "SE":
        return 2 * C * h
    if name == "BAM":
        channel = (C * h + h) + 2 * h + (h * C + C)
        spatial = (C * h + h) + 2 * h + 2 * (9 * h * h + h + 2 * h) + (h + 1)
        return channel + spatial
    if name == "CBAM":
        return (C * h + h) + (h * C + C) + 2 * 49 + 2
    if name == "GE_theta-plus":
        return C * H * W + 2 * C + 2 * C * h
    if name == "DoubleAttention":
        c = C // 4
        return 3 * (C * c + c) + (c * C + C)
    raise AssertionError(name)


@pytest.mark.parametrize("C,H,W", [(64, 8, 8), (36, 16, 12)])
@pytest.mark.parametrize("name", SPEC_ATTN_PRIMITIVES)
def test_parameter_count_follows_spec(name, C, H, W):
    att = build_attention(name, C, H, W)
    assert sum(p.numel() for p in att.parameters()) == _expected_param_count(name, C, H, W)


def test_cbam_spatial_batchnorm_settings():
    att = build_attention("CBAM", 32, 4, 4)
    bns = [m for m in att.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1
    assert bns[0].num_features == 1 and bns[0].eps == 1e-5 and bns[0].momentum == 0.01


# -- re-computation in float64 ------------------------------------------------------

def _randomize(module):
    """Random BN statistics and affine parameters, random biases: nothing trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.3)


def _bn(x, bn):
    """Eval-mode BatchNorm along dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


def _conv(x, conv):
    """A plain convolution by explicit loops over the kernel offsets (groups=1)."""
    assert conv.groups == 1
    B, Cin, H, W = x.shape
    w = conv.weight
    kh, kw = w.shape[2:]
    (ph, pw), (dh, dw), (sh, sw) = conv.padding, conv.dilation, conv.stride
    xp = torch.zeros(B, Cin, H + 2 * ph, W + 2 * pw, dtype=x.dtype)
    xp[:, :, ph:ph + H, pw:pw + W] = x
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(B, w.shape[0], Ho, Wo, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw]
            out = out + torch.einsum("oc,bchw->bohw", w[:, :, i, j], patch)
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1, 1)
    return out


def _linear(v, lin):
    out = v @ lin.weight.t()
    return out + lin.bias if lin.bias is not None else out


def _ref_se(att, x):
    first, second = [m for m in att.modules() if isinstance(m, nn.Linear)]
    assert first.bias is None and second.bias is None
    pooled = x.mean(dim=(2, 3))
    mask = torch.sigmoid(_linear(torch.relu(_linear(pooled, first)), second))
    return x * mask[:, :, None, None]


def _ref_bam(att, x):
    gc = att._mask.channel_att.gate_c
    gs = att._mask.spatial_att.gate_s
    pooled = x.mean(dim=(2, 3))
    channel = _linear(torch.relu(_bn(_linear(pooled, gc.gate_c_fc_0), gc.gate_c_bn_1)),
                      gc.gate_c_fc_final)                                   # (B, C)
    s = torch.relu(_bn(_conv(x, gs.gate_s_conv_reduce0), gs.gate_s_bn_reduce0))
    for i in range(2):
        conv = getattr(gs, f"gate_s_conv_di_{i}")
        assert conv.dilation == (4, 4) and conv.padding == (4, 4) and conv.kernel_size == (3, 3)
        s = torch.relu(_bn(_conv(s, conv), getattr(gs, f"gate_s_bn_di_{i}")))
    spatial = _conv(s, gs.gate_s_conv_final)                                # (B, 1, H, W)
    mask = 1 + torch.sigmoid(channel[:, :, None, None] * spatial)
    return x * mask


def _ref_cbam(att, x):
    mlp = att._mask.ChannelAttention.mlp
    fc1, fc2 = [m for m in mlp.modules() if isinstance(m, nn.Linear)]

    def shared(v):
        return _linear(torch.relu(_linear(v, fc1)), fc2)

    a = torch.sigmoid(shared(x.mean(dim=(2, 3))) + shared(x.amax(dim=(2, 3))))[:, :, None, None]
    y = a * x
    maps = torch.stack([y.amax(dim=1), y.mean(dim=1)], dim=1)               # max first, then mean
    spatial = att._mask.SpatialAttention.spatial
    assert spatial.conv.bias is None
    s = torch.sigmoid(_bn(_conv(maps, spatial.conv), spatial.bn))
    return x * (s * a)


def _ref_ge(att, x):
    B, C, H, W = x.shape
    convs = [m for m in att.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in att.modules() if isinstance(m, nn.BatchNorm2d)]
    depthwise, reduce_, expand = convs
    assert depthwise.groups == C and depthwise.kernel_size == (H, W) and depthwise.bias is None
    assert reduce_.bias is None and expand.bias is None
    # Gather: each channel's whole map weighted by its own kernel, summed.
    gathered = torch.zeros(B, C, dtype=x.dtype)
    for c in range(C):
        for i in range(H):
            for j in range(W):
                gathered[:, c] += x[:, c, i, j] * depthwise.weight[c, 0, i, j]
    gathered = _bn(gathered, bns[0])
    hidden = torch.relu(gathered @ reduce_.weight[:, :, 0, 0].t())
    mask = torch.sigmoid(hidden @ expand.weight[:, :, 0, 0].t())
    return x * mask[:, :, None, None]


def _ref_double_attention(att, x):
    blk = att._mask
    B, C, H, W = x.shape
    P = H * W
    flat = x.reshape(B, C, P)

    def conv1x1(conv, b, p):
        w = conv.weight[:, :, 0, 0]
        return [sum(w[o, c] * flat[b, c, p] for c in range(C)) + conv.bias[o] for o in range(w.shape[0])]

    out = torch.zeros_like(flat)
    for b in range(B):
        A = [conv1x1(blk.convA, b, p) for p in range(P)]    # A[p][m]
        Bm = [conv1x1(blk.convB, b, p) for p in range(P)]   # Bm[p][n]
        V = [conv1x1(blk.convV, b, p) for p in range(P)]    # V[p][n]
        c_m, c_n = len(A[0]), len(Bm[0])
        # softmax of B over positions, for every n
        soft_b = [[0.0] * c_n for _ in range(P)]
        for n in range(c_n):
            denom = sum(math.exp(Bm[q][n]) for q in range(P))
            for p in range(P):
                soft_b[p][n] = math.exp(Bm[p][n]) / denom
        # softmax of V over channels, for every position
        soft_v = [[0.0] * c_n for _ in range(P)]
        for p in range(P):
            denom = sum(math.exp(V[p][k]) for k in range(c_n))
            for n in range(c_n):
                soft_v[p][n] = math.exp(V[p][n]) / denom
        # gather: G[m][n] = sum_p A[p][m] * softmax(B)[p][n]
        G = [[sum(A[p][m] * soft_b[p][n] for p in range(P)) for n in range(c_n)] for m in range(c_m)]
        # distribute: Z[m][p] = sum_n G[m][n] * softmax(V)[p][n]
        Z = [[sum(G[m][n] * soft_v[p][n] for n in range(c_n)) for p in range(P)] for m in range(c_m)]
        wz = blk.convZ.weight[:, :, 0, 0]
        for c in range(C):
            for p in range(P):
                out[b, c, p] = sum(wz[c, m] * Z[m][p] for m in range(c_m)) + blk.convZ.bias[c] + flat[b, c, p]
    return out.view(B, C, H, W)


REFERENCES = {
    "SE": _ref_se,
    "BAM": _ref_bam,
    "CBAM": _ref_cbam,
    "GE_theta-plus": _ref_ge,
    "DoubleAttention": _ref_double_attention,
}


@pytest.mark.parametrize("name", NON_IDENTITY)
def test_matches_reference_computation(name):
    torch.manual_seed(0)
    if name == "DoubleAttention":
        B, C, H, W = 2, 8, 3, 4          # explicit Python loops: keep it tiny
    else:
        B, C, H, W = 3, 48, 5, 6         # hidden width 3
    att = build_attention(name, C, H, W).double()
    _randomize(att)
    att.eval()
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        got = att(x)
        expected = REFERENCES[name](att, x)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10), (got - expected).abs().max()
    # The attention does something: it is not the identity.
    assert not torch.allclose(got, x)


def test_double_attention_widths():
    att = build_attention("DoubleAttention", 32, 4, 4)
    blk = att._mask
    assert (blk.convA.out_channels, blk.convB.out_channels, blk.convV.out_channels) == (8, 8, 8)
    assert (blk.convZ.in_channels, blk.convZ.out_channels) == (8, 32)


def test_ge_theta_plus_uses_the_given_spatial_size():
    att = build_attention("GE_theta-plus", 8, 7, 5)
    depthwise = [m for m in att.modules() if isinstance(m, nn.Conv2d)][0]
    assert depthwise.kernel_size == (7, 5)
    assert att(torch.randn(2, 8, 7, 5)).shape == (2, 8, 7, 5)


# -- checkpoint names ----------------------------------------------------------------

# The original release's names inside _mask, in registration order.
ORIGINAL_NAMES = {
    "SE": ["_mask.excitation.0.weight", "_mask.excitation.2.weight"],
    "GE_theta-plus": ["_mask.downop.dwconv.weight", "_mask.downop.bn.weight",
                      "_mask.downop.bn.bias", "_mask.downop.bn.running_mean",
                      "_mask.downop.bn.running_var", "_mask.downop.bn.num_batches_tracked",
                      "_mask.mlp.0.weight", "_mask.mlp.2.weight"],
}

# This project's earlier names of the same entries.
LEGACY_NAMES = {
    "SE": ["_mask.2.weight", "_mask.4.weight"],
    "GE_theta-plus": ["_mask.gather.0.weight", "_mask.gather.1.weight", "_mask.gather.1.bias",
                      "_mask.gather.1.running_mean", "_mask.gather.1.running_var",
                      "_mask.gather.1.num_batches_tracked",
                      "_mask.excite.0.weight", "_mask.excite.2.weight"],
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_NAMES))
def test_state_dict_names_follow_the_original(name):
    att = build_attention(name, 32, 6, 6)
    assert list(att.state_dict()) == ORIGINAL_NAMES[name]


@pytest.mark.parametrize("prefix", ["", "cells.3._second_layers.5.", "cells.0._ops.2.1."])
@pytest.mark.parametrize("name", sorted(ORIGINAL_NAMES))
def test_upgrade_legacy_keys_renames_to_the_original(name, prefix):
    state = build_attention(name, 32, 6, 6).state_dict()
    legacy = {prefix + old: state[new]
              for old, new in zip(LEGACY_NAMES[name], ORIGINAL_NAMES[name])}
    legacy["classifier.weight"] = torch.zeros(3)
    upgraded = upgrade_legacy_keys(legacy)
    assert list(upgraded) == [prefix + k for k in ORIGINAL_NAMES[name]] + ["classifier.weight"]
    for new in ORIGINAL_NAMES[name]:
        assert upgraded[prefix + new] is state[new]
    # Already-current keys are left alone.
    assert list(upgrade_legacy_keys(upgraded)) == list(upgraded)


def test_upgrade_legacy_keys_leaves_other_attentions_alone():
    state = {}
    for name in ["BAM", "CBAM", "DoubleAttention"]:
        entries = build_attention(name, 32, 6, 6).state_dict()
        state.update({f"{name}.{k}": v for k, v in entries.items()})
    upgraded = upgrade_legacy_keys(state)
    assert list(upgraded) == list(state)
    assert all(upgraded[k] is v for k, v in state.items())


@pytest.mark.parametrize("channels_last", [False, True])
def test_global_max_pool_under_deterministic_algorithms_is_adaptive_max_pooling(channels_last):
    """CBAM's max-pooled descriptor: adaptive_max_pool2d has no deterministic CUDA
    backward, so --deterministic takes a max over the flattened map instead.  The same
    values and gradients, ties included (the first maximum takes the gradient)."""
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 1.0  # a map of ties
    x[1, 2, 3, 1] = x[1, 2, 0, 4] = 9.0  # two equal maxima
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = F.adaptive_max_pool2d(reference, 1)
    with kernel_choice(True, torch.device("cpu")), OpCounter() as ops:
        pooled = global_max_pool(ours)
    assert "aten.adaptive_max_pool2d" not in ops.counts and "aten.max" in ops.counts
    assert torch.equal(pooled, expected)
    grad = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    pooled.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, reference.grad)
    with OpCounter() as ops:  # without --deterministic: PyTorch's own kernel
        global_max_pool(x)
    assert "aten.adaptive_max_pool2d" in ops.counts
