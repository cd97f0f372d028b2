"""Attention modules searched by Att-DARTS, and a name -> class registry.

Every module maps a (B, C, H, W) tensor to the same shape and is built from
``(channels, height, width)`` so all of them share one constructor signature.
Learnable parts live in a sub-module named ``_mask``, and the layers inside it
carry the original release's names (SE's ``excitation``, Gather-Excite's
``downop``/``mlp`` ...): together they are the checkpoint layout of the published
models.  The reduction ratio is 16; the hidden width is at least 1 so very narrow
(test) networks still build.

The search supernet applies the attentions of several edges at once: built with
``edges`` > 1 a module reads (B, edges*C, H, W), every edge's input side by side,
and holds the parameters of ``edges`` per-edge modules, each tensor stacked edge
by edge along its first dimension (edge e's block is the per-edge module's tensor,
under the same name).  Its Linear and convolution layers are grouped by edge, its
BatchNorms cover every edge's channels, and whatever mixes channels (CBAM's
channel max and mean, BAM's and CBAM's spatial masks, A2-Net's descriptors) does
so within each edge.  ``edges=1`` builds exactly the per-edge module.
"""
import math
import re
from collections import OrderedDict
from typing import Dict, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

REDUCTION = 16


def hidden_width(channels: int, reduction: int = REDUCTION) -> int:
    return max(1, channels // reduction)


class EdgeLinear(nn.Module):
    """``edges`` independent ``nn.Linear(in_features, out_features)`` on consecutive
    blocks of a (B, edges * in_features) input, as one grouped 1x1 convolution.
    ``weight`` is (edges * out_features, in_features): edge e's rows are its Linear's
    weight (initialised as nn.Linear initialises it)."""

    def __init__(self, in_features: int, out_features: int, edges: int, bias: bool = True):
        super().__init__()
        self.edges = edges
        self.weight = nn.Parameter(torch.empty(edges * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(edges * out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x[:, :, None, None], self.weight[:, :, None, None], self.bias,
                        groups=self.edges).flatten(1)


def linear(in_features: int, out_features: int, edges: int = 1,
           bias: bool = True) -> Union[nn.Linear, EdgeLinear]:
    """``nn.Linear`` for one edge, ``EdgeLinear`` for several."""
    if edges == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return EdgeLinear(in_features, out_features, edges, bias=bias)


def conv(in_channels: int, out_channels: int, kernel_size: int, edges: int = 1,
         **kwargs) -> nn.Conv2d:
    """``nn.Conv2d(in_channels, out_channels, ...)`` once per edge, grouped by edge."""
    return nn.Conv2d(edges * in_channels, edges * out_channels, kernel_size, groups=edges, **kwargs)


def mask_per_edge(x: torch.Tensor, mask: torch.Tensor, edges: int) -> torch.Tensor:
    """``x`` (B, edges*C, H, W) times a spatial mask (B, edges, H, W): edge e's
    channels by the mask's channel e."""
    if edges == 1:
        return x * mask
    return (x.unflatten(1, (edges, -1)) * mask.unsqueeze(2)).flatten(1, 2)


class Attention(nn.Module):
    """Base class: ``forward`` returns ``x * self._mask(x)`` (the mask broadcasts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._mask(x)


class IdentityAttention(nn.Module):
    """No attention: returns its input."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SEMask(nn.Module):
    """Squeeze (global average) then excitation (bottleneck MLP -> sigmoid)."""

    def __init__(self, channels: int, edges: int = 1):
        super().__init__()
        hidden = hidden_width(channels)
        self.excitation = nn.Sequential(
            linear(channels, hidden, edges, bias=False),
            # In place on a plain tensor only: EdgeLinear returns a view, and an in-place
            # op on a view costs autograd a copy of its base.
            nn.ReLU(inplace=edges == 1),
            linear(hidden, channels, edges, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean, not adaptive_avg_pool2d: the same average without its restriding copy
        # (three kernels more per call, forward and backward).
        squeezed = x.mean((2, 3))
        return self.excitation(squeezed)[:, :, None, None]


class SE(Attention):
    """Squeeze-and-Excitation (Hu et al.): channel mask from the global average."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()
        self._mask = SEMask(channels, edges)


class BAMChannelGate(nn.Module):
    def __init__(self, channels: int, edges: int = 1):
        super().__init__()
        hidden = hidden_width(channels)
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", nn.Flatten())
        self.gate_c.add_module("gate_c_fc_0", linear(channels, hidden, edges))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(edges * hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", linear(hidden, channels, edges))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3), keepdim=True)  # (see SEMask)
        return self.gate_c(pooled)[:, :, None, None]


class BAMSpatialGate(nn.Module):
    def __init__(self, channels: int, dilation: int = 4, num_dilated_convs: int = 2,
                 edges: int = 1):
        super().__init__()
        hidden = hidden_width(channels)
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", conv(channels, hidden, 1, edges))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(edges * hidden))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num_dilated_convs):
            self.gate_s.add_module(f"gate_s_conv_di_{i}", conv(
                hidden, hidden, 3, edges, padding=dilation, dilation=dilation))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(edges * hidden))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", conv(hidden, 1, 1, edges))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_s(x)


class BAMMask(nn.Module):
    """sigmoid(channel gate * spatial gate), a (B, C, H, W) attention map."""

    def __init__(self, channels: int, edges: int = 1):
        super().__init__()
        self.edges = edges
        self.channel_att = BAMChannelGate(channels, edges)
        self.spatial_att = BAMSpatialGate(channels, edges=edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(mask_per_edge(self.channel_att(x), self.spatial_att(x), self.edges))


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al.): x * (1 + attention map)."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()
        self._mask = BAMMask(channels, edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + x * m equals x * (1 + m) but keeps one full-size tensor fewer for backward.
        return x + x * self._mask(x)


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """The maximum of each (B, C, H, W) map, (B, C, 1, 1): ``F.adaptive_max_pool2d(x, 1)``,
    whose CUDA backward has no deterministic implementation.  Under
    ``torch.use_deterministic_algorithms`` (``--deterministic``) a max over the flattened
    map instead, which picks the same maximum (the first, in row-major order) and sends
    its gradient there: the same values, with a backward that scatters rather than adds
    atomically."""
    if torch.are_deterministic_algorithms_enabled():
        return x.flatten(2).max(dim=2).values[:, :, None, None]
    return F.adaptive_max_pool2d(x, 1)


class CBAMChannelAttention(nn.Module):
    """Shared MLP over the average- and max-pooled descriptors -> sigmoid."""

    def __init__(self, channels: int, edges: int = 1):
        super().__init__()
        hidden = hidden_width(channels)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            linear(channels, hidden, edges),
            nn.ReLU(),
            linear(hidden, channels, edges),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both descriptors through the MLP as one batch (the MLP is per sample).
        pooled = torch.cat([x.mean((2, 3), keepdim=True), global_max_pool(x)])
        average, maximum = self.mlp(pooled).chunk(2)
        return torch.sigmoid(average + maximum)[:, :, None, None]


class CBAMSpatialConv(nn.Module):
    def __init__(self, edges: int = 1):
        super().__init__()
        self.conv = conv(2, 1, 7, edges, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(edges, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class CBAMSpatialAttention(nn.Module):
    """7x7 conv over the per-pixel channel max and mean -> sigmoid."""

    def __init__(self, edges: int = 1):
        super().__init__()
        self.edges = edges
        self.spatial = CBAMSpatialConv(edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max (not amax): its backward scatters into the arg-max instead of comparing
        # every channel with the maximum, and it matches the original's torch.max.
        # Per edge: (B, edges, C, H, W) -> the maps of edge e at channels 2e, 2e + 1.
        x = x.unflatten(1, (self.edges, -1))
        pooled = torch.stack([x.max(dim=2).values, x.mean(dim=2)], dim=2).flatten(1, 2)
        return torch.sigmoid(self.spatial(pooled))


class CBAMMask(nn.Module):
    """The two masks of CBAM: channel mask a, spatial mask s computed on a * x."""

    def __init__(self, channels: int, edges: int = 1):
        super().__init__()
        self.ChannelAttention = CBAMChannelAttention(channels, edges)
        self.SpatialAttention = CBAMSpatialAttention(edges)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al.): x * (s * a)."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()
        self.edges = edges
        self._mask = CBAMMask(channels, edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed as (x * a) * s: a * x is needed for s anyway, and no full-size
        # s * a mask is materialised.
        refined = x * self._mask.ChannelAttention(x)
        return mask_per_edge(refined, self._mask.SpatialAttention(refined), self.edges)


class GEThetaPlusMask(nn.Module):
    """Gather with a learned depthwise conv over the whole map, then excite."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()
        hidden = hidden_width(channels)
        width_all = edges * channels
        self.downop = nn.Sequential(OrderedDict(
            dwconv=nn.Conv2d(width_all, width_all, kernel_size=(height, width), groups=width_all,
                             bias=False),
            bn=nn.BatchNorm2d(width_all),
        ))
        self.mlp = nn.Sequential(
            conv(channels, hidden, 1, edges, bias=False),
            nn.ReLU(),
            conv(hidden, channels, 1, edges, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gather is a depthwise convolution whose kernel covers the whole map: a
        # weighted sum over positions, computed as such (its backward through
        # PyTorch's convolution kernels costs 10-20x its forward on CPUs).
        gathered = torch.einsum("bchw,chw->bc", x, self.downop.dwconv.weight[:, 0])
        # The gathered map is 1x1 (global extent); resizing it back to HxW is a
        # broadcast, so the (B, C, 1, 1) mask is returned as is.
        return torch.sigmoid(self.mlp(self.downop.bn(gathered[:, :, None, None])))


class GEThetaPlus(Attention):
    """Gather-Excite theta-plus (Hu et al.), global extent.  Needs the real input size."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()
        self._mask = GEThetaPlusMask(channels, height, width, edges)


class DoubleAttentionBlock(nn.Module):
    """A^2 block: gather global descriptors, distribute them to every position."""

    def __init__(self, channels: int, c_m: int, c_n: int, edges: int = 1):
        super().__init__()
        self.edges, self.widths = edges, [c_m, c_n, c_n]
        self.convA = conv(channels, c_m, 1, edges)
        self.convB = conv(channels, c_n, 1, edges)
        self.convV = conv(channels, c_n, 1, edges)
        self.convZ = conv(c_m, channels, 1, edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        edges = self.edges
        # The three 1x1 convolutions of x as one (a single pass over x), edge by edge:
        # edge e's output channels are its A, B and V rows.
        convs = (self.convA, self.convB, self.convV)
        weight = torch.cat([c.weight.unflatten(0, (edges, -1)) for c in convs], 1).flatten(0, 1)
        bias = torch.cat([c.bias.unflatten(0, (edges, -1)) for c in convs], 1).flatten()
        projected = F.conv2d(x, weight, bias, groups=edges)
        # Each edge a sample of its own from here: (B * edges, m|n|n, HW).
        features, maps, vectors = projected.reshape(batch * edges, -1, height * width).split(
            self.widths, dim=1)
        attention_maps = F.softmax(maps, dim=-1)                            # over positions
        attention_vectors = F.softmax(vectors, dim=1)                       # over channels
        global_descriptors = torch.bmm(features, attention_maps.transpose(1, 2))  # (B, m, n)
        distributed = torch.bmm(global_descriptors, attention_vectors)    # (B, m, HW)
        return self.convZ(distributed.view(batch, -1, height, width))


class DoubleAttention(nn.Module):
    """A^2-Net double attention (Chen et al.), c_m = c_n = C/4, with a residual."""

    def __init__(self, channels: int, height: int, width: int, edges: int = 1):
        super().__init__()
        reduced = max(1, channels // 4)
        self._mask = DoubleAttentionBlock(channels, reduced, reduced, edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mask(x) + x


ATTENTIONS: Dict[str, Type[nn.Module]] = {
    "Identity": IdentityAttention,
    "SE": SE,
    "BAM": BAM,
    "CBAM": CBAM,
    "GE_theta-plus": GEThetaPlus,
    "DoubleAttention": DoubleAttention,
}


def build_attention(name: str, channels: int, height: int, width: int, edges: int = 1) -> nn.Module:
    """Build the attention module ``name`` for inputs of shape (*, channels, height, width)
    (``edges`` side by side: (*, edges * channels, height, width))."""
    if name not in ATTENTIONS:
        raise KeyError(f"unknown attention {name!r}; valid: {', '.join(ATTENTIONS)}")
    return ATTENTIONS[name](channels, height, width, edges)


# This project's earlier names inside ``_mask`` -> the original's (SE, then GE).
LEGACY_RENAMES = [
    (re.compile(r"(^|\.)_mask\.2\.weight$"), r"\1_mask.excitation.0.weight"),
    (re.compile(r"(^|\.)_mask\.4\.weight$"), r"\1_mask.excitation.2.weight"),
    (re.compile(r"(^|\.)_mask\.gather\.0\."), r"\1_mask.downop.dwconv."),
    (re.compile(r"(^|\.)_mask\.gather\.1\."), r"\1_mask.downop.bn."),
    (re.compile(r"(^|\.)_mask\.excite\."), r"\1_mask.mlp."),
]


def upgrade_legacy_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with this project's earlier SE / Gather-Excite key
    names (``_mask.2``/``_mask.4``, ``_mask.gather``/``_mask.excite``) renamed to the
    original's; every other key, already-new ones included, is kept as is."""
    upgraded = {}
    for key, value in state_dict.items():
        for pattern, replacement in LEGACY_RENAMES:
            key = pattern.sub(replacement, key)
        upgraded[key] = value
    return upgraded
