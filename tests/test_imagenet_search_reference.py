"""The ImageNet supernet (``NetworkImageNet``: ``train_search.py --dataset imagenet``)
computes what PC-DARTS's ImageNet supernet computes (their model_search_imagenet.py),
in float64 on the same weights: logits, weight gradients, the architecture gradients
(alphas and edge weights; their ImageNet search is first order) and the genotype, to
1e-10 relative.

What their file adds to their CIFAR supernet is written out below as they write it:
the stem in two parts (stem0: two 3x3 stride-2 convolutions, 3 -> 3C/2 -> 3C, stem1: a
third, so the cells see 1/8 of the image), the first cell taking stem0's output as a
reduced input (FactorizedReduce), the per-node softmax of the edge parameters and the
head.  Their ImageNet ``MixedOp`` is their CIFAR one with K fixed at 2 (the slice
``x[:, :C//2]``, the mixture on C/2 channels, the other half bypassing it, 2x2
max-pooled on a stride-2 edge, the channel shuffle in 2 groups) and their ``Cell`` and
genotype ``_parse`` are the CIFAR ones: those come from
test_partial_channels_reference.py, with K=2."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_partial_channels_reference import (STEPS, ReferenceCell, ReferenceNetwork, as_reference,
                                             share_seeded_weights)

from architect import Architect
from genotypes import PRIMITIVES
from model_search import NetworkImageNet

K, C, LAYERS, SIZE, BATCH, CLASSES = 2, 4, 3, 64, 4, 10
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


class ReferenceImageNetNetwork(ReferenceNetwork):
    """Their model_search_imagenet.Network (stem_multiplier 3, multiplier 4); its forward
    is their CIFAR network's but for the two stems."""

    def __init__(self):
        nn.Module.__init__(self)
        C_curr = 3 * C
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C_curr // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C_curr // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C_curr // 2, C_curr, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C_curr, C_curr, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = True
        for i in range(LAYERS):
            if i in [LAYERS // 3, 2 * LAYERS // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            self.cells.append(ReferenceCell(C_prev_prev, C_prev, C_curr, reduction,
                                            reduction_prev, k=K))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, 4 * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, CLASSES)
        edges = sum(1 for i in range(STEPS) for _ in range(2 + i))
        for kind in ("normal", "reduce"):
            self.register_parameter(f"alphas_{kind}",
                                    nn.Parameter(torch.zeros(edges, len(PRIMITIVES))))
            self.register_parameter(f"betas_{kind}", nn.Parameter(torch.zeros(edges)))

    def stems(self, input):
        s0 = self.stem0(input)
        s1 = self.stem1(s0)
        return s0, s1


@pytest.fixture(scope="module")
def pair():
    """Our supernet, theirs on the same weights, a batch, and their logits and
    gradients on it (by parameter name)."""
    torch.manual_seed(0)
    network = NetworkImageNet(C, CLASSES, LAYERS, nn.CrossEntropyLoss(), "no_attention",
                              image_size=SIZE, partial_channels=K, edge_norm=True,
                              recompute=False).double().train()
    reference = ReferenceImageNetNetwork().double().train()
    share_seeded_weights(network, reference, 11)
    generator = torch.Generator().manual_seed(5)
    batch = (torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=torch.float64),
             torch.randint(0, CLASSES, (BATCH,), generator=generator))
    logits = reference(batch[0])
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(logits, batch[1]), list(params.values()))
    return network, reference, batch, (logits.detach(), dict(zip(params, grads)))


def test_the_cells_see_an_eighth_of_the_image_and_k_halves_the_operations(pair):
    network, _, (images, _), _ = pair
    s0, s1 = network.stem_outputs(images)
    assert s0.shape[-1] == SIZE // 4 and s1.shape[-1] == SIZE // 8
    first_cell = network.cells[0]
    assert type(first_cell.preprocess0).__name__ == "FactorizedReduce"
    # sep_conv_3x3 on the edges leaving s0: depthwise over C/K channels per edge.
    depthwise = [m for m in first_cell._ops_from[0].modules() if isinstance(m, nn.Conv2d)][0]
    assert depthwise.in_channels == len(first_cell.layout.edges_leaving[0]) * C // K


def test_forward_and_gradients_match_pc_darts_imagenet(pair):
    network, _, (x, y), (expected_logits, expected) = pair
    names, weights = zip(*network.named_weights())
    logits = network(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, y),
                                list(weights) + network.arch_parameters())
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    ours = as_reference(network, {**dict(zip(names, grads)),
                                  **dict(zip(network.named_arch_parameters(), grads[len(weights):]))})
    assert set(ours) == set(expected)
    assert {"stem0.0.weight", "stem1.1.weight", "betas_reduce"} <= set(ours)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)
    assert ours["betas_normal"].abs().min() > 0 and ours["stem0.0.weight"].abs().max() > 0


def test_architecture_step_gradient_is_theirs(pair):
    """Their ImageNet search's architecture step: the gradient of the loss on a batch of
    the architecture sample, first order (our Architect's own forward)."""
    network, _, batch, (_, expected) = pair
    optimizer = torch.optim.SGD(network.weights(), 0.5, momentum=0.9, weight_decay=3e-4)
    got = Architect(network, optimizer, 6e-3, 1e-3, unrolled=False).first_order_gradient(*batch)
    names = ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    for ours, name in zip(got, names):
        torch.testing.assert_close(ours, expected[name], **TOLERANCE, msg=name)


def test_genotype_is_their_parse(pair):
    network, reference, *_ = pair

    def pairs(genotype) -> dict:
        return {kind: [(op, j) for op, j, _ in getattr(genotype, kind)] for kind in ("normal", "reduce")}
    assert pairs(network.genotype()) == reference.genotype()
    # The edge weights decide some node: equal ones give another cell.
    even = NetworkImageNet(C, CLASSES, LAYERS, nn.CrossEntropyLoss(), "no_attention",
                           image_size=SIZE, partial_channels=K, edge_norm=True).double()
    even.load_state_dict({name: torch.zeros_like(value) if name.startswith("edge_weights") else value
                          for name, value in network.state_dict().items()})
    assert pairs(even.genotype()) != reference.genotype()
