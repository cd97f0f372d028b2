"""The ``no_attention`` supernet with partial channels and edge normalisation computes
what PC-DARTS (Xu et al., ICLR 2020) computes: forward, weight gradients, first- and
second-order architecture gradients and the genotype, in float64, against PC-DARTS's
own computation written out below as its release writes it (their ``MixedOp``: slice,
mixture on C/K channels, concatenation with the bypass, max-pooled on a reduction
edge, channel shuffle; their ``Cell``: each node sums ``weights2[edge] * MixedOp``;
their network's per-node softmax of the edge parameters; their genotype ``_parse``),
one module per edge, with our per-edge operations holding our supernet's weights.

Forward and first-order gradients differ only by the order of float64 operations:
1e-10 relative.  The second-order reference evaluates the same finite-difference
formula (DARTS's, which PC-DARTS's architect keeps) on the reference network; the
difference of the two perturbed gradients divided by 2 eps amplifies rounding by
about |grad| / (eps |Hv|) ~ 1e2..1e4, so 1e-8 relative still leaves six orders of
magnitude between rounding and any change of the math."""
import re
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_values import fill_seeded_supernet
from torch.func import functional_call

from architect import Architect
from genotypes import PRIMITIVES
from model_search import Network
from operations import OPS, FactorizedReduce, ReLUConvBN

K, C, LAYERS, SIZE, BATCH, STEPS = 4, 8, 3, 8, 4, 4
LR, WEIGHT_DECAY = 0.1, 3e-4
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


# -- PC-DARTS, as their model_search.py computes it ------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    x = x.view(batchsize, groups, num_channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ReferenceMixedOp(nn.Module):
    def __init__(self, C: int, stride: int, k: int):
        super().__init__()
        self.mp = nn.MaxPool2d(2, 2)
        self.k = k
        self._ops = nn.ModuleList()
        for primitive in PRIMITIVES:
            op = OPS[primitive](C // k, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
            self._ops.append(op)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops))
        if temp1.shape[2] == x.shape[2]:
            ans = torch.cat([temp1, xtemp2], dim=1)
        else:
            ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
        return channel_shuffle(ans, self.k)


class ReferenceCell(nn.Module):
    def __init__(self, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, k: int = K):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._ops = nn.ModuleList(ReferenceMixedOp(C, 2 if reduction and j < 2 else 1, k)
                                  for i in range(STEPS) for j in range(2 + i))

    def forward(self, s0, s1, weights, weights2):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(STEPS):
            s = sum(weights2[offset + j] * self._ops[offset + j](h, weights[offset + j])
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-4:], dim=1)


class ReferenceNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        C_curr = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(LAYERS):
            reduction = i in [LAYERS // 3, 2 * LAYERS // 3]
            if reduction:
                C_curr *= 2
            self.cells.append(ReferenceCell(C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, 4 * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, 10)
        edges = sum(2 + i for i in range(STEPS))
        for name in ("alphas_normal", "alphas_reduce"):
            self.register_parameter(name, nn.Parameter(torch.zeros(edges, len(PRIMITIVES))))
        for name in ("betas_normal", "betas_reduce"):
            self.register_parameter(name, nn.Parameter(torch.zeros(edges)))

    def edge_weights(self, betas: torch.Tensor) -> torch.Tensor:
        n, start = 3, 2
        weights2 = F.softmax(betas[0:2], dim=-1)
        for _ in range(STEPS - 1):
            end = start + n
            weights2 = torch.cat([weights2, F.softmax(betas[start:end], dim=-1)], dim=0)
            start, n = end, n + 1
        return weights2

    def stems(self, x):
        """The first cell's inputs (s0 = s1 = stem(x)); their ImageNet network differs here."""
        s = self.stem(x)
        return s, s

    def forward(self, x):
        s0, s1 = self.stems(x)
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            weights = F.softmax(getattr(self, f"alphas_{kind}"), dim=-1)
            weights2 = self.edge_weights(getattr(self, f"betas_{kind}"))
            s0, s1 = s1, cell(s0, s1, weights, weights2)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def genotype(self):
        def _parse(weights, weights2):
            gene, n, start = [], 2, 0
            none = PRIMITIVES.index("none")
            for i in range(STEPS):
                end = start + n
                W = weights[start:end].copy()
                W2 = weights2[start:end].copy()
                for j in range(n):
                    W[j, :] = W[j, :] * W2[j]
                edges = sorted(range(i + 2),
                               key=lambda x: -max(W[x][k] for k in range(len(W[x])) if k != none))[:2]
                for j in edges:
                    k_best = None
                    for k in range(len(W[j])):
                        if k != none and (k_best is None or W[j][k] > W[j][k_best]):
                            k_best = k
                    gene.append((PRIMITIVES[k_best], j))
                start, n = end, n + 1
            return gene

        with torch.no_grad():
            return {kind: _parse(F.softmax(getattr(self, f"alphas_{kind}"), dim=-1).numpy(),
                                 self.edge_weights(getattr(self, f"betas_{kind}")).numpy())
                    for kind in ("normal", "reduce")}


# -- our supernet's weights in the reference ------------------------------------------------

_EDGE_OP = re.compile(r"(cells\.\d+\._ops\.\d+\._ops\.)(\d+)(\..*)")


def reference_name(name: str) -> str:
    """Our per-edge name of a tensor as the reference calls it: candidates count
    `none` (which we never build), edge weights are their ``betas``."""
    match = _EDGE_OP.fullmatch(name)
    if match:
        head, index, tail = match.groups()
        return f"{head}{int(index) + 1}{tail}"
    return name.replace("edge_weights_", "betas_")


def as_reference(network: Network, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {reference_name(k): v for k, v in network.per_edge_layout(tensors).items()}


def share_seeded_weights(network: Network, reference: nn.Module, seed: int) -> None:
    """Seeded weights in ``network``, with edge weights drawn from ``seed`` (far enough
    apart to decide the genotype), loaded into ``reference``."""
    fill_seeded_supernet(network)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name in ("edge_weights_normal", "edge_weights_reduce"):
            getattr(network, name).copy_(torch.randn(14, generator=generator, dtype=torch.float64))
    reference.load_state_dict(as_reference(network, network.state_dict()))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    network = Network(C, 10, LAYERS, nn.CrossEntropyLoss(), "no_attention", image_size=SIZE,
                      partial_channels=K, edge_norm=True, recompute=False).double().train()
    reference = ReferenceNetwork().double().train()
    share_seeded_weights(network, reference, 7)
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=torch.float64),
                torch.randint(0, 10, (BATCH,), generator=generator)) for _ in range(2)]
    return network, reference, batches


def _arch(reference: ReferenceNetwork) -> List[nn.Parameter]:
    return [reference.alphas_normal, reference.alphas_reduce,
            reference.betas_normal, reference.betas_reduce]


def test_forward_and_gradients_match_pc_darts(pair):
    network, reference, [(x, y), _] = pair
    names, weights = zip(*network.named_weights())
    logits = network(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), list(weights) + network.arch_parameters())
    expected_logits = reference(x)
    ref_params = dict(reference.named_parameters())
    expected = torch.autograd.grad(F.cross_entropy(expected_logits, y), list(ref_params.values()))
    expected = dict(zip(ref_params, expected))
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    ours = as_reference(network, {**dict(zip(names, grads)),
                                  **dict(zip(network.named_arch_parameters(), grads[len(weights):]))})
    assert set(ours) == set(expected)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)
    assert ours["betas_normal"].abs().min() > 0  # every edge weight takes part


def _reference_loss(reference: ReferenceNetwork, tensors: Dict[str, torch.Tensor], x, y):
    return F.cross_entropy(functional_call(reference, tensors, (x,)), y)


def _reference_second_order(reference: ReferenceNetwork, train, valid) -> List[torch.Tensor]:
    """DARTS's unrolled hypergradient (PC-DARTS's architect), on the reference network,
    with a fresh optimizer (no momentum yet)."""
    arch = dict(zip(["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"],
                    _arch(reference)))
    weights = {n: p for n, p in reference.named_parameters() if n not in arch}
    g = torch.autograd.grad(_reference_loss(reference, {}, *train), list(weights.values()))
    unrolled = {n: (w - LR * (d + WEIGHT_DECAY * w)).detach().requires_grad_(True)
                for (n, w), d in zip(weights.items(), g)}
    grads = torch.autograd.grad(_reference_loss(reference, unrolled, *valid),
                                list(arch.values()) + list(unrolled.values()))
    dalpha, vector = grads[:len(arch)], grads[len(arch):]
    R = 0.01 / torch.cat([v.flatten() for v in vector]).norm()
    plus = {n: (w + R * v).detach() for (n, w), v in zip(weights.items(), vector)}
    minus = {n: (w - R * v).detach() for (n, w), v in zip(weights.items(), vector)}
    grads_p = torch.autograd.grad(_reference_loss(reference, plus, *train), list(arch.values()))
    grads_n = torch.autograd.grad(_reference_loss(reference, minus, *train), list(arch.values()))
    implicit = [(p - n) / (2 * R) for p, n in zip(grads_p, grads_n)]
    return [d - LR * i for d, i in zip(dalpha, implicit)]


def _architect(network: Network) -> Architect:
    optimizer = torch.optim.SGD(network.weights(), LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    return Architect(network, optimizer, 6e-4, 1e-3, unrolled=True)


def test_first_order_architecture_gradient_matches_pc_darts(pair):
    network, reference, (_, valid) = pair
    first = _architect(network).first_order_gradient(*valid)
    expected = torch.autograd.grad(_reference_loss(reference, {}, *valid), _arch(reference))
    for got, want in zip(first, expected):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.slow
def test_second_order_architecture_gradient_matches_pc_darts(pair):
    network, reference, (train, valid) = pair
    architect = _architect(network)
    first = architect.first_order_gradient(*valid)
    second = architect.second_order_gradient(*train, *valid, LR)
    expected = _reference_second_order(reference, train, valid)
    for got, want, first_order in zip(second, expected, first):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
        assert not torch.allclose(got, first_order, rtol=1e-6)  # the second order term counts


def test_genotype_is_pc_darts_parse(pair):
    network, reference, _ = pair
    genotype = network.genotype()
    expected = reference.genotype()
    assert [(op, j) for op, j, _ in genotype.normal] == expected["normal"]
    assert [(op, j) for op, j, _ in genotype.reduce] == expected["reduce"]
    # The edge weights decide: without them some node keeps other edges.
    plain = ReferenceNetwork().double()
    plain.load_state_dict(reference.state_dict())
    with torch.no_grad():
        plain.betas_normal.zero_()
        plain.betas_reduce.zero_()
    assert plain.genotype() != expected
    assert all(attention == "" for _, _, attention in genotype.normal + genotype.reduce)
    assert np.isfinite(network.softmaxed_arch()["edge_weights_normal"]).all()
