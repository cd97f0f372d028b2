"""Candidate operations of a cell edge (DARTS' search space plus the NASNet ops).

Every op maps C channels to C channels.  ``affine`` is the BatchNorm affine flag:
False inside the search supernet (so the architecture weights, not BN scales,
decide the op's strength), True in final networks.  The ``op``/``conv_1``/... names
and Sequential indices fix the checkpoint layout of the published models.

The search supernet runs all the edges leaving one state as one computation: the
parametrised ops take ``edges`` (default 1, the per-edge op of the final networks),
read a (B, edges*C, H, W) input holding every edge's input side by side, and keep
every edge's parameters in one tensor whose rows are the edges' in order (edge e's
block of a weight is the per-edge op's weight).  Their 1x1 convolutions are grouped
by edge; depthwise convolutions and non-affine BatchNorms are per channel anyway.
"""
import itertools
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.recompute import standard_normal


class DepthwiseConvolution(torch.autograd.Function):
    """A depthwise convolution whose input gradient is a forward convolution.

    oneDNN's backward of depthwise convolutions other than 3x3 (5x5, dilated) is
    5-50x slower than its forward on CPUs (measured at the supernet's sizes), and
    those are most of a search's convolutions.  For a 'same'-padded convolution the
    input gradient is the forward convolution of the output gradient with the
    flipped kernel (after inserting zeros between its pixels for stride 2), which
    runs at forward speed.  The weight gradient stays PyTorch's own.  Under autocast
    it runs in the autocast dtype, as ``F.conv2d`` would, and backward in that dtype
    whatever the caller's autocast state.  Every op in ``backward`` is
    differentiable, so double backward works as for ``F.conv2d``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                dilation: int) -> torch.Tensor:
        device = x.device.type
        ctx.dtypes = (x.dtype, weight.dtype)
        if torch.is_autocast_enabled(device):
            # What autocast does to conv2d, done here so that backward sees the same
            # operands: both in the autocast dtype (bfloat16 under --amp).
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        with torch.autocast(device, enabled=False):
            return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        # In the forward's dtype whatever the caller's autocast state (the architect
        # differentiates float32 passes inside an --amp region).
        with torch.autocast(x.device.type, enabled=False):
            grad_x, grad_weight = DepthwiseConvolution.gradients(ctx, grad.to(x.dtype))
        x_dtype, weight_dtype = ctx.dtypes
        return (None if grad_x is None else grad_x.to(x_dtype),
                None if grad_weight is None else grad_weight.to(weight_dtype), None, None, None)

    @staticmethod
    def gradients(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        channels = x.shape[1]
        geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], channels)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            if stride == 1 or dilation > 1:
                spread = grad
                if stride == 2:
                    # The stride-1 convolution's output gradient: zero off the stride-2 grid.
                    spread = torch.zeros_like(x, dtype=grad.dtype)
                    spread[:, :, ::2, ::2] = grad
                grad_x = F.conv2d(spread, weight.flip(2, 3), None, 1, padding, dilation, channels)
            else:  # stride 2 without dilation: PyTorch's own kernel is as fast
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, *geometry, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            if dilation > 1 and x.dtype in (torch.bfloat16, torch.float16):
                # oneDNN's (torch 2.14.1, AVX-512) bfloat16 weight gradient of a dilated
                # depthwise convolution is wrong (130% off, or inf) when any operand is
                # channels-last, the weight included (a (C, 1, k, k) weight of a model
                # moved to channels-last passes is_contiguous(), so clone it): --amp
                # searches went NaN.  Its kernel for contiguous operands is right.
                grad, x, weight = (t.clone(memory_format=torch.contiguous_format)
                                   for t in (grad, x, weight))
            grad_weight = torch.ops.aten.convolution_backward(
                grad, x, weight, None, *geometry, [False, True, False])[1]
        return grad_x, grad_weight


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, k, groups=C, bias=False)`` with 'same' padding, differentiated
    by ``DepthwiseConvolution`` (same parameters, same results, faster backward)."""

    def __init__(self, channels: int, kernel_size: int, stride: int, padding: int,
                 dilation: int = 1):
        assert padding == dilation * (kernel_size - 1) // 2, "'same' padding only"
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DepthwiseConvolution.apply(x, self.weight, self.stride[0], self.padding[0],
                                          self.dilation[0])


def pointwise(C_in: int, C_out: int, edges: int = 1, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias, one per edge on its own block of channels."""
    return nn.Conv2d(edges * C_in, edges * C_out, 1, stride=stride, padding=0, bias=False,
                     groups=edges)


class ReLUFirst(nn.Module):
    """An op whose ``self.op`` Sequential starts with a ReLU.  ``forward_from_relu``
    takes the already rectified input, so a supernet edge can rectify its input
    once for all its conv candidates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def forward_from_relu(self, rectified: torch.Tensor) -> torch.Tensor:
        for layer in itertools.islice(self.op, 1, None):
            rectified = layer(rectified)
        return rectified


class ReLUConvBN(ReLUFirst):
    """ReLU -> conv (no bias) -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(ReLUFirst):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, affine: bool = True, edges: int = 1):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(edges * C_in, kernel_size, stride, padding, dilation),
            pointwise(C_in, C_out, edges),
            nn.BatchNorm2d(edges * C_out, affine=affine),
        )


class SepConv(ReLUFirst):
    """Two (ReLU -> depthwise conv -> pointwise conv -> BN) blocks; stride on the first."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True, edges: int = 1):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(edges * C_in, kernel_size, stride, padding),
            pointwise(C_in, C_in, edges),
            nn.BatchNorm2d(edges * C_in, affine=affine),
            nn.ReLU(inplace=False),
            DepthwiseConv2d(edges * C_in, kernel_size, 1, padding),
            pointwise(C_in, C_out, edges),
            nn.BatchNorm2d(edges * C_out, affine=affine),
        )


class Conv7x1x1x7(ReLUFirst):
    """ReLU -> 1x7 conv (stride on width) -> 7x1 conv (stride on height) -> BN."""

    def __init__(self, C: int, stride: int, affine: bool = True, edges: int = 1):
        super().__init__()
        E = edges
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(E * C, E * C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False, groups=E),
            nn.Conv2d(E * C, E * C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False, groups=E),
            nn.BatchNorm2d(E * C, affine=affine),
        )


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The `none` op: a zero tensor, subsampled by the stride.

    The supernet never calls it (its weight multiplies an exact zero); final
    networks never contain it.  It exists so that every name in PRIMITIVES builds.
    """

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class Noise(nn.Module):
    """RobustDARTS's `noise` op (their operations.py ``NoiseOp(stride, 0., 1.)``): fresh
    N(0, 1) samples of the input's shape, spatially strided (``x[:, :, ::2, ::2]``) on a
    stride-2 edge; the input itself is discarded.  No parameters, and the same in
    training and evaluation (their release has no ``self.training`` check), in the
    search and in final networks alike.  Channelwise, so it serves any number of edges."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        shape = (batch, channels, -(-height // self.stride), -(-width // self.stride))
        return standard_normal(shape, x)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two 1x1 stride-2 convs, the
    second on the input shifted by one pixel, concatenated along channels (per edge:
    each edge's output is its two halves)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True, edges: int = 1):
        super().__init__()
        assert C_out % 2 == 0, "FactorizedReduce needs an even number of output channels"
        self.edges = edges
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = pointwise(C_in, C_out // 2, edges, stride=2)
        self.conv_2 = pointwise(C_in, C_out // 2, edges, stride=2)
        self.bn = nn.BatchNorm2d(edges * C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        halves = [self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])]
        if self.edges > 1:  # edge by edge: (B, edges, C_out, H, W)
            return self.bn(torch.cat([h.unflatten(1, (self.edges, -1)) for h in halves], 2).flatten(1, 2))
        return self.bn(torch.cat(halves, dim=1))


# name -> (C, stride, affine, edges=1) -> op.  The parameter-free ops are channelwise,
# so they serve any number of edges as built.
OPS: Dict[str, Callable[..., nn.Module]] = {
    "none": lambda C, stride, affine, edges=1: Zero(stride),
    "noise": lambda C, stride, affine, edges=1: Noise(stride),
    "avg_pool_3x3": lambda C, stride, affine, edges=1: nn.AvgPool2d(3, stride=stride, padding=1,
                                                                    count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine, edges=1: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine, edges=1: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine, edges)),
    "sep_conv_3x3": lambda C, stride, affine, edges=1: SepConv(C, C, 3, stride, 1, affine, edges),
    "sep_conv_5x5": lambda C, stride, affine, edges=1: SepConv(C, C, 5, stride, 2, affine, edges),
    "sep_conv_7x7": lambda C, stride, affine, edges=1: SepConv(C, C, 7, stride, 3, affine, edges),
    "dil_conv_3x3": lambda C, stride, affine, edges=1: DilConv(C, C, 3, stride, 2, 2, affine, edges),
    "dil_conv_5x5": lambda C, stride, affine, edges=1: DilConv(C, C, 5, stride, 4, 2, affine, edges),
    "conv_7x1_1x7": lambda C, stride, affine, edges=1: Conv7x1x1x7(C, stride, affine, edges),
}


def imagenet_stems(C: int) -> Tuple[nn.Sequential, nn.Sequential]:
    """DARTS's ImageNet stem in two parts, 3 -> C channels at 1/8 of the image: stem0
    (3x3 stride-2 conv to C/2, BN, ReLU, 3x3 stride-2 conv to C, BN), then stem1 (ReLU,
    3x3 stride-2 conv, BN); the first cell takes both outputs."""
    stem0 = nn.Sequential(
        nn.Conv2d(3, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(
        nn.ReLU(inplace=True),
        nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    return stem0, stem1


def halve(size: int) -> int:
    """Spatial size after a stride-2 op with 'same' padding."""
    return (size + 1) // 2


def is_identity_op(name: str, stride: int) -> bool:
    """True when the op passes its input through unchanged (no drop-path on it)."""
    return name == "skip_connect" and stride == 1
