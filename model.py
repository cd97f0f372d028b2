"""Final networks built from a genotype: CIFAR and ImageNet, with auxiliary heads.

Module names (``_first_layers``, ``_second_layers``, ``auxiliary_head`` ...) and
nesting follow the original release so its published checkpoints load unchanged;
``upgrade_state_dict`` (also a method of both networks) renames the keys of this
project's earlier checkpoints.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from attentions import ATTENTIONS, build_attention, upgrade_legacy_keys
from genotypes import Genotype, edge_nodes
from operations import OPS, FactorizedReduce, ReLUConvBN, halve, imagenet_stems, is_identity_op
from runtime.errors import UserError


def build_first_layer(name: str, C: int, stride: int, reduction: bool,
                      height: int, width: int) -> nn.Module:
    """An edge's first element: an op, or (mixed locations) an attention.

    In a reduction cell the original wraps such an attention as
    ``Sequential(skip_connect(C, stride, affine=False), attention)`` on every edge:
    a FactorizedReduce at stride 2, a parameter-free identity at stride 1.  Normal
    cells keep the bare attention."""
    if name in ATTENTIONS:
        attention = build_attention(name, C, height, width)
        if not reduction:
            return attention
        return nn.Sequential(OPS["skip_connect"](C, stride, False), attention)
    return OPS[name](C, stride, True)


def build_second_layer(name: str, C: int, height: int, width: int) -> nn.Module:
    """An edge's second element: an attention, an op at stride 1 (double_mixed), or
    nothing ('' builds a parameter-free identity)."""
    if name in OPS:
        return OPS[name](C, 1, True)
    return build_attention(name or "Identity", C, height, width)


def passes_through(name: str, stride: int) -> bool:
    """True when an edge element returns its input unchanged (never drop-pathed)."""
    return is_identity_op(name, stride) or (name == "Identity" and stride == 1)


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Drop whole samples of an edge's output with probability ``drop_prob``."""
    keep_prob = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
    return x * mask / keep_prob


class Cell(nn.Module):
    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, height: int, width: int):
        """``height``/``width``: the spatial size of this cell's output."""
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)

        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        bottleneck = genotype.reduce_bottleneck if reduction else genotype.normal_bottleneck
        if not edges:
            raise UserError(f"the genotype's {'reduction' if reduction else 'normal'} cell has no "
                            f"edge (its threshold derivation kept none: search longer, or with a "
                            f"lower --op_threshold)")
        self._concat = list(concat)
        self.multiplier = len(concat)
        self._indices = [edge[1] for edge in edges]
        # A threshold cell (FairDARTS) may give a node fewer than two edges, or none: as
        # their final cell, a node sums the edges it has and the concat lists the nodes.
        self._nodes = edge_nodes(edges)

        self._first_layers = nn.ModuleList()
        self._second_layers = nn.ModuleList()
        # Drop-path only where neither element is an identity: that is what the
        # published models were trained with.
        self._droppable: List[bool] = []
        for edge in edges:
            op_name, index, attention_name = edge[:3]
            stride = 2 if reduction and index < 2 else 1
            self._first_layers.append(
                build_first_layer(op_name, C, stride, reduction, height, width))
            self._second_layers.append(build_second_layer(attention_name, C, height, width))
            self._droppable.append(not passes_through(op_name, stride)
                                   and not passes_through(attention_name, 1))
        self._bottleneck = (build_attention(bottleneck, C * self.multiplier, height, width)
                            if bottleneck else None)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = {0: self.preprocess0(s0), 1: self.preprocess1(s1)}
        for e, (index, node) in enumerate(zip(self._indices, self._nodes)):
            h = self._second_layers[e](self._first_layers[e](states[index]))
            if self.training and drop_prob > 0 and self._droppable[e]:
                h = drop_path(h, drop_prob)
            states[node] = h if node not in states else states[node] + h
        out = torch.cat([states[i] for i in self._concat], dim=1)
        if self._bottleneck is not None:
            out = self._bottleneck(out)
        return out


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on the 8x8 output of the second reduction."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8x8 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier on the 14x14 output of the second reduction (no second BN,
    as in DARTS)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _Network(nn.Module):
    """Shared forward of the final networks: stems, cells, auxiliary head, classifier."""

    drop_path_prob: float = 0.0

    def upgrade_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state_dict`` with this project's earlier key layouts moved to this network's
        (see ``upgrade_state_dict``): checkpoint loaders call it without knowing the class."""
        return upgrade_state_dict(self, state_dict)

    def _build_cells(self, genotype: Genotype, layers: int, C_prev_prev: int, C_prev: int,
                     C_curr: int, reduction_prev: bool, size: int, auxiliary: bool,
                     num_classes: int) -> Tuple[int, Optional[int]]:
        self.cells = nn.ModuleList()
        self._auxiliary_index = 2 * layers // 3
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
                size = halve(size)
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, size, size)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self._auxiliary_index:
                C_aux = C_prev
        self._auxiliary = auxiliary
        return C_prev, C_aux

    def _forward_cells(self, s0: torch.Tensor, s1: torch.Tensor
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self._auxiliary_index and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, logits_aux


class NetworkCIFAR(_Network):
    """CIFAR network; ``forward`` returns (logits, auxiliary logits or None)."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool,
                 genotype: Genotype, image_size: int = 32):
        super().__init__()
        stem_multiplier = 3
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev, C_aux = self._build_cells(genotype, layers, C_curr, C_curr, C, False,
                                          image_size, auxiliary, num_classes)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        s = self.stem(x)
        return self._forward_cells(s, s)


class NetworkImageNet(_Network):
    """ImageNet network (224x224 inputs); ``forward`` returns (logits, aux or None)."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool,
                 genotype: Genotype, image_size: int = 224):
        super().__init__()
        self.stem0, self.stem1 = imagenet_stems(C)
        size = halve(halve(halve(image_size)))  # the three stride-2 stem convs
        C_prev, C_aux = self._build_cells(genotype, layers, C, C, C, True, size,
                                          auxiliary, num_classes)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes)
        self.global_pooling = nn.AvgPool2d(7)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        return self._forward_cells(s0, s1)


# A bare attention as an edge's first element; this project's earlier layout had
# it bare at stride 1 in reduction cells too.
BARE_FIRST_ATTENTION = re.compile(r"(_first_layers\.\d+)\._mask\.")


def upgrade_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]
                       ) -> Dict[str, torch.Tensor]:
    """``state_dict`` (keys named as in ``model``, no ``module.`` prefix) with this
    project's earlier layouts moved to the current one.

    Renames the SE / Gather-Excite layers (``attentions.upgrade_legacy_keys``) and
    moves a bare attention-first edge ``..._first_layers.E._mask...`` to
    ``..._first_layers.E.1._mask...`` where ``model`` expects the latter (reduction
    cells).  Keys that fit neither stay as they are, so a mismatch check on the
    result still reports them."""
    expected = model.state_dict().keys()
    upgraded = {}
    for key, value in upgrade_legacy_keys(state_dict).items():
        if key not in expected:
            moved = BARE_FIRST_ATTENTION.sub(r"\1.1._mask.", key, count=1)
            if moved in expected:
                key = moved
        upgraded[key] = value
    return upgraded
