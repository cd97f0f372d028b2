"""Attention modules searched by Att-DARTS, and a name -> class registry.

Every module maps a (B, C, H, W) tensor to the same shape and is built from
``(channels, height, width)`` so all of them share one constructor signature.
Learnable parts live in a sub-module named ``_mask``, and the layers inside it
carry the original release's names (SE's ``excitation``, Gather-Excite's
``downop``/``mlp`` ...): together they are the checkpoint layout of the published
models.  The reduction ratio is 16; the hidden width is at least 1 so very narrow
(test) networks still build.
"""
import re
from collections import OrderedDict
from typing import Dict, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

REDUCTION = 16


def hidden_width(channels: int, reduction: int = REDUCTION) -> int:
    return max(1, channels // reduction)


class Attention(nn.Module):
    """Base class: ``forward`` returns ``x * self._mask(x)`` (the mask broadcasts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._mask(x)


class IdentityAttention(nn.Module):
    """No attention: returns its input."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SEMask(nn.Module):
    """Squeeze (global average) then excitation (bottleneck MLP -> sigmoid)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = hidden_width(channels)
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.excitation(squeezed)[:, :, None, None]


class SE(Attention):
    """Squeeze-and-Excitation (Hu et al.): channel mask from the global average."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self._mask = SEMask(channels)


class BAMChannelGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = hidden_width(channels)
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", nn.Flatten())
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(channels, hidden))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1)
        return self.gate_c(pooled)[:, :, None, None]


class BAMSpatialGate(nn.Module):
    def __init__(self, channels: int, dilation: int = 4, num_dilated_convs: int = 2):
        super().__init__()
        hidden = hidden_width(channels)
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num_dilated_convs):
            self.gate_s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(
                hidden, hidden, kernel_size=3, padding=dilation, dilation=dilation))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_s(x)


class BAMMask(nn.Module):
    """sigmoid(channel gate * spatial gate), a (B, C, H, W) attention map."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel_att = BAMChannelGate(channels)
        self.spatial_att = BAMSpatialGate(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.channel_att(x) * self.spatial_att(x))


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al.): x * (1 + attention map)."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self._mask = BAMMask(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + x * m equals x * (1 + m) but keeps one full-size tensor fewer for backward.
        return x + x * self._mask(x)


class CBAMChannelAttention(nn.Module):
    """Shared MLP over the average- and max-pooled descriptors -> sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = hidden_width(channels)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(logits)[:, :, None, None]


class CBAMSpatialConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class CBAMSpatialAttention(nn.Module):
    """7x7 conv over the per-pixel channel max and mean -> sigmoid."""

    def __init__(self):
        super().__init__()
        self.spatial = CBAMSpatialConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max (not amax): its backward scatters into the arg-max instead of comparing
        # every channel with the maximum, and it matches the original's torch.max.
        pooled = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))


class CBAMMask(nn.Module):
    """The two masks of CBAM: channel mask a, spatial mask s computed on a * x."""

    def __init__(self, channels: int):
        super().__init__()
        self.ChannelAttention = CBAMChannelAttention(channels)
        self.SpatialAttention = CBAMSpatialAttention()


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al.): x * (s * a)."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self._mask = CBAMMask(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed as (x * a) * s: a * x is needed for s anyway, and no full-size
        # s * a mask is materialised.
        refined = x * self._mask.ChannelAttention(x)
        return refined * self._mask.SpatialAttention(refined)


class GEThetaPlusMask(nn.Module):
    """Gather with a learned depthwise conv over the whole map, then excite."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        hidden = hidden_width(channels)
        self.downop = nn.Sequential(OrderedDict(
            dwconv=nn.Conv2d(channels, channels, kernel_size=(height, width), groups=channels,
                             bias=False),
            bn=nn.BatchNorm2d(channels),
        ))
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
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

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self._mask = GEThetaPlusMask(channels, height, width)


class DoubleAttentionBlock(nn.Module):
    """A^2 block: gather global descriptors, distribute them to every position."""

    def __init__(self, channels: int, c_m: int, c_n: int):
        super().__init__()
        self.convA = nn.Conv2d(channels, c_m, kernel_size=1)
        self.convB = nn.Conv2d(channels, c_n, kernel_size=1)
        self.convV = nn.Conv2d(channels, c_n, kernel_size=1)
        self.convZ = nn.Conv2d(c_m, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        # The three 1x1 convolutions of x as one (a single pass over x).
        convs = (self.convA, self.convB, self.convV)
        projected = F.conv2d(x, torch.cat([conv.weight for conv in convs]),
                             torch.cat([conv.bias for conv in convs]))
        features, maps, vectors = projected.flatten(2).split(
            [conv.out_channels for conv in convs], dim=1)                  # (B, m|n|n, HW)
        attention_maps = F.softmax(maps, dim=-1)                            # over positions
        attention_vectors = F.softmax(vectors, dim=1)                       # over channels
        global_descriptors = torch.bmm(features, attention_maps.transpose(1, 2))  # (B, m, n)
        distributed = torch.bmm(global_descriptors, attention_vectors)    # (B, m, HW)
        return self.convZ(distributed.view(batch, -1, height, width))


class DoubleAttention(nn.Module):
    """A^2-Net double attention (Chen et al.), c_m = c_n = C/4, with a residual."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        reduced = max(1, channels // 4)
        self._mask = DoubleAttentionBlock(channels, reduced, reduced)

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


def build_attention(name: str, channels: int, height: int, width: int) -> nn.Module:
    """Build the attention module ``name`` for inputs of shape (*, channels, height, width)."""
    if name not in ATTENTIONS:
        raise KeyError(f"unknown attention {name!r}; valid: {', '.join(ATTENTIONS)}")
    return ATTENTIONS[name](channels, height, width)


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
