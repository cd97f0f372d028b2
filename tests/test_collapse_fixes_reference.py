"""The collapse fixes (runtime/collapse_fixes.py) compute what their authors' releases compute, in
float64 on the same inputs and weights: forward, losses, weight and architecture
gradients and the derived cell, against each release's computation written out below
as it writes it (one module per edge, DARTS's supernet with their changes):

- beta-DARTS (Sunshine-Ye/Beta-DARTS, optimizers/darts/architect.py): ``mlc_loss``,
  ``loss = L_val + (50 * epoch / 100) * mlc_loss(arch)`` in ``_backward_step``.  Their
  DARTS-space script hands ``mlc_loss`` a Python list (it fails); the reference takes
  the rows of both cells together, as their NAS-Bench-201 tensor holds one cell's.
- DARTS- (Meituan-AutoML/DARTS-, src/search/model_search.py, src/utils.py): the
  auxiliary op in ``MixedOp.forward`` and ``DecayScheduler``.
- FairDARTS (xiaomi-automl/FairDARTS, fairdarts/): sigmoid weights over their seven
  operations (no `none`), ``ConvSeparateLoss``, ``parse(..., 'threshold_sparse')`` and
  the final ``DCOCell``.
- SDARTS (xiangning-chen/SmoothDARTS, sota/cnn/model_search.py, attacker/): ``clip``,
  ``Random_alpha``, ``Linf_PGD_alpha`` with ``Linf_SGD`` and ``updateType='weight'``.

Tolerance 1e-10 relative: the two sides differ only in the order of float64 sums."""
import argparse
import math
import re
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_values import fill_seeded, fill_seeded_supernet

from architect import Architect
from genotypes import PRIMITIVES, genotype_from_dict, genotype_to_dict
from model import NetworkCIFAR
from model_search import Network
from operations import OPS, FactorizedReduce, Identity, ReLUConvBN
from runtime import collapse_fixes
from runtime.collapse_fixes import Variant

C, LAYERS, SIZE, BATCH, STEPS = 4, 3, 8, 4, 4
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
# One intra-op thread: two threads on a loaded two-core machine run these float64
# passes tens of times slower.
pytestmark = pytest.mark.usefixtures("one_thread")
FAIR_PRIMITIVES = [name for name in PRIMITIVES if name != "none"]  # FairDARTS's seven


# -- DARTS's supernet with the releases' changes, one module per edge ----------------------

class ReferenceMixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives: List[str], auxiliary_skip: bool):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in primitives:
            op = OPS[primitive](C, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)
        if auxiliary_skip:  # DARTS-
            self.auxiliary_op = FactorizedReduce(C, C, affine=False) if stride == 2 else Identity()

    def forward(self, x, weights, decay_rate):
        res = sum(w * op(x) for w, op in zip(weights, self._ops))
        if hasattr(self, "auxiliary_op"):
            res += self.auxiliary_op(x) * decay_rate
        return res


class ReferenceCell(nn.Module):
    def __init__(self, C_prev_prev, C_prev, C, reduction, reduction_prev, primitives, aux):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._ops = nn.ModuleList(ReferenceMixedOp(C, 2 if reduction and j < 2 else 1, primitives, aux)
                                  for i in range(STEPS) for j in range(2 + i))

    def forward(self, s0, s1, weights, decay_rate):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(STEPS):
            s = sum(self._ops[offset + j](h, weights[offset + j], decay_rate)
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-4:], dim=1)


class ReferenceNetwork(nn.Module):
    """``relaxation``: softmax (DARTS, beta-DARTS, DARTS-), sigmoid (FairDARTS) or
    weight (SDARTS's ``updateType='weight'``: the tensors are the weights)."""

    def __init__(self, primitives: List[str], aux: bool = False, relaxation: str = "softmax"):
        super().__init__()
        self.relaxation, self.decay_rate = relaxation, 1.0
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
            self.cells.append(ReferenceCell(C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                            primitives, aux))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, 4 * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, 10)
        for name in ("alphas_normal", "alphas_reduce"):
            self.register_parameter(name, nn.Parameter(torch.zeros(14, len(primitives))))

    def weights(self, alphas):
        if self.relaxation == "softmax":
            return F.softmax(alphas, dim=-1)
        return torch.sigmoid(alphas) if self.relaxation == "sigmoid" else alphas

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            alphas = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, self.weights(alphas), self.decay_rate)
        return self.classifier(self.global_pooling(s1).view(x.shape[0], -1))

    def arch(self) -> List[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("alphas_")}


_CANDIDATE = re.compile(r"(cells\.\d+\._ops\.\d+\.)_ops\.(\d+)(\..*)")


def reference_state(network: Network, tensors: Dict[str, torch.Tensor],
                    with_none: bool) -> Dict[str, torch.Tensor]:
    """Our tensors under the reference's names: per edge, the candidates counting `none`
    (which we never build) if the reference has it, our last one (the auxiliary skip)
    as ``auxiliary_op``; our architecture columns without `none` if it has not."""
    built = len(FAIR_PRIMITIVES)
    out = {}
    for name, tensor in network.per_edge_layout(tensors).items():
        match = _CANDIDATE.fullmatch(name)
        if match:
            head, index, tail = match.groups()
            index = int(index)
            name = (f"{head}auxiliary_op{tail}" if index == built
                    else f"{head}_ops.{index + with_none}{tail}")
        elif name.startswith("alphas_") and not with_none:
            tensor = tensor[:, 1:]
        out[name] = tensor
    return out


def make_pair(primitives: List[str], aux: bool = False, relaxation: str = "softmax",
              location: str = "no_attention", arch_scale: Optional[float] = None):
    torch.manual_seed(0)
    network = Network(C, 10, LAYERS, nn.CrossEntropyLoss(), location, image_size=SIZE,
                      aux_skip=aux, relaxation="sigmoid" if relaxation == "sigmoid" else "softmax"
                      ).double().train()
    fill_seeded_supernet(network)
    if arch_scale is not None:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in network.arch_parameters():
                p.copy_(arch_scale * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    reference = ReferenceNetwork(primitives, aux, relaxation).double().train()
    reference.load_state_dict(reference_state(network, network.state_dict(), "none" in primitives))
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=torch.float64),
                torch.randint(0, 10, (BATCH,), generator=generator)) for _ in range(2)]
    return network, reference, batches


def flags(**overrides) -> argparse.Namespace:
    values = dict(collapse_fixes.EARLIER_FLAGS, epochs=50)
    values.update(overrides)
    return argparse.Namespace(**values)


def architect(network: Network, variant: Variant, unrolled: bool = False) -> Architect:
    optimizer = torch.optim.SGD(network.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    return Architect(network, optimizer, 3e-4, 1e-3, unrolled, variant=variant)


def assert_weight_gradients_match(network, reference, loss, reference_loss, with_none=True):
    names, weights = zip(*network.named_weights())
    ours = dict(zip(names, torch.autograd.grad(loss, weights)))
    ref = reference.weight_parameters()
    expected = dict(zip(ref, torch.autograd.grad(reference_loss, list(ref.values()))))
    ours = reference_state(network, ours, with_none)
    assert set(ours) == set(expected)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)


# -- beta-DARTS -----------------------------------------------------------------------------

def mlc_loss(arch_param):
    y_pred_neg = arch_param
    neg_loss = torch.logsumexp(y_pred_neg, dim=-1)
    aux_loss = torch.mean(neg_loss)
    return aux_loss


def test_beta_decay_gradient_is_beta_darts_backward_step():
    network, reference, (_, (x, y)) = make_pair(PRIMITIVES, arch_scale=1.0)
    epoch = 37
    variant = Variant(flags(beta_decay=50.0, epochs=100), network)
    variant.start_epoch(epoch)
    grads = architect(network, variant).architecture_gradient(x, y, x, y, 0.1)
    weights = 0 + 50 * epoch / 100
    loss = (F.cross_entropy(reference(x), y)
            + weights * mlc_loss(torch.cat([reference.alphas_normal, reference.alphas_reduce])))
    expected = torch.autograd.grad(loss, reference.arch())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOLERANCE)
    decay = torch.autograd.grad(weights * mlc_loss(torch.cat(reference.arch())), reference.arch())
    assert decay[0].norm() > 0.1 * grads[0].norm()  # the regulariser counts


def test_beta_decay_takes_each_attention_family_as_the_alphas():
    network = Network(C, 10, LAYERS, nn.CrossEntropyLoss(), "after_every_and_end",
                      image_size=SIZE).double()
    fill_seeded_supernet(network)
    arch = network.named_arch_parameters()
    rows = {name: value.reshape(-1, value.shape[-1]) for name, value in arch.items()}  # gammas: 1 row
    expected = sum(mlc_loss(torch.cat([rows[f"{family}_normal"], rows[f"{family}_reduce"]]))
                   for family in ("alphas", "betas", "gammas"))
    torch.testing.assert_close(collapse_fixes.beta_decay_loss(network, arch), expected, **TOLERANCE)


@pytest.mark.slow
def test_beta_decay_is_added_to_the_second_order_gradient_too():
    network, _, (train, valid) = make_pair(PRIMITIVES, arch_scale=1.0)
    variant = Variant(flags(beta_decay=10.0), network)
    variant.start_epoch(20)
    ours = architect(network, variant, unrolled=True)
    grads = ours.architecture_gradient(*train, *valid, 0.1)
    arch = network.named_arch_parameters()
    penalty = torch.autograd.grad(4.0 * collapse_fixes.beta_decay_loss(network, arch), list(arch.values()))
    second = ours.second_order_gradient(*train, *valid, 0.1)
    for got, hyper, extra in zip(grads, second, penalty):
        torch.testing.assert_close(got, hyper + extra, **TOLERANCE)


# -- DARTS- ---------------------------------------------------------------------------------

def decay_rate(decay_type: str, epoch: int, T_max: int = 50, T_start: int = 0, T_stop: int = 50,
               base_lr: float = 1.0) -> float:
    """DARTS-'s ``DecayScheduler.step(epoch)`` from its initial rate 1.0."""
    if decay_type == "cosine":
        return base_lr * (1 + math.cos(math.pi * epoch / (T_max - T_start))) / 2.0
    if decay_type == "linear":
        return base_lr * (T_max - epoch) / (T_max - T_start)
    return base_lr


@pytest.mark.parametrize("decay", collapse_fixes.AUX_SKIP_DECAYS)
def test_aux_skip_schedule_is_darts_minus_decay_scheduler(decay):
    for epoch in range(50):
        assert collapse_fixes.aux_skip_rate(decay, epoch, 50) == decay_rate(decay, epoch)


def test_aux_skip_forward_and_gradients_are_darts_minus():
    network, reference, ((x, y), _) = make_pair(PRIMITIVES, aux=True)
    variant = Variant(flags(aux_skip=True), network)
    variant.start_epoch(49)
    reference.decay_rate = decay_rate("linear", 49)
    assert reference.decay_rate == pytest.approx(0.02)
    logits, expected_logits = network(x), reference(x)
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    loss, reference_loss = F.cross_entropy(logits, y), F.cross_entropy(expected_logits, y)
    arch_grads = torch.autograd.grad(loss, network.arch_parameters(), retain_graph=True)
    expected = torch.autograd.grad(reference_loss, reference.arch(), retain_graph=True)
    for got, want in zip(arch_grads, expected):
        torch.testing.assert_close(got, want, **TOLERANCE)
    assert_weight_gradients_match(network, reference, loss, reference_loss)
    # The stride-2 edges' auxiliary op is a learnable FactorizedReduce of its own.
    assert any("auxiliary_op.conv_1" in name for name in reference.weight_parameters())


def test_aux_skip_never_enters_the_genotype():
    network, _, _ = make_pair(PRIMITIVES, aux=True, arch_scale=1.0)
    plain = Network(C, 10, LAYERS, nn.CrossEntropyLoss(), "no_attention", image_size=SIZE).double()
    with torch.no_grad():
        for mine, theirs in zip(plain.arch_parameters(), network.arch_parameters()):
            mine.copy_(theirs)
    assert network.genotype() == plain.genotype()
    assert all(len(edge) == 3 for edge in network.genotype().normal)


# -- FairDARTS ------------------------------------------------------------------------------

def conv_separate_loss(input1, target1, input2, weight=10.0):
    loss1 = F.cross_entropy(input1, target1)
    loss2 = -F.mse_loss(input2, torch.tensor(0.5, requires_grad=False, dtype=input2.dtype).expand_as(input2))
    return loss1 + weight * loss2


def test_sigmoid_zero_one_gradient_is_fairdarts_architect_step():
    network, reference, (_, (x, y)) = make_pair(FAIR_PRIMITIVES, relaxation="sigmoid", arch_scale=1.0)
    variant = Variant(flags(relaxation="sigmoid", zero_one_weight=10.0), network)
    grads = architect(network, variant).architecture_gradient(x, y, x, y, 0.1)
    logits = reference(x)
    torch.testing.assert_close(network(x), logits, **TOLERANCE)
    aux_input = torch.cat([torch.sigmoid(reference.alphas_normal),
                           torch.sigmoid(reference.alphas_reduce)], dim=0)
    expected = torch.autograd.grad(conv_separate_loss(logits, y, aux_input), reference.arch())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got[:, 1:], want, **TOLERANCE)
        assert torch.equal(got[:, 0], torch.zeros_like(got[:, 0]))  # `none`: not a candidate of theirs


@pytest.mark.slow
def test_sigmoid_weight_gradients_are_fairdarts():
    network, reference, ((x, y), _) = make_pair(FAIR_PRIMITIVES, relaxation="sigmoid", arch_scale=1.0)
    assert_weight_gradients_match(network, reference, F.cross_entropy(network(x), y),
                                  F.cross_entropy(reference(x), y), with_none=False)


def fair_parse(weights, operation_set, op_threshold, steps=STEPS):
    """FairDARTS's ``utils.parse`` with ``parse_method='threshold_sparse'``."""
    gene = []
    n = 2
    start = 0
    for i in range(steps):
        end = start + n
        W = weights[start:end].copy()
        edges = sorted(range(i + 2), key=lambda x: -max(W[x][k] for k in range(len(W[x]))))[:2]
        for j in edges:
            k_best = None
            for k in range(len(W[j])):
                if k_best is None or W[j][k] > W[j][k_best]:
                    k_best = k
            if W[j][k_best] >= op_threshold:
                gene.append((operation_set[k_best], i + 2, j))
        start = end
        n += 1
    return gene


def live_genes(gene):
    """The genes FairDARTS's ``DCOCell.forward`` computes: those from a state it has."""
    states = {0, 1}
    kept = []
    for name, to, frm in gene:
        if frm in states:
            kept.append((name, to, frm))
            states.add(to)
    return kept


@pytest.mark.parametrize("threshold", [0.85, 0.9])
def test_threshold_cell_is_fairdarts_parse(threshold):
    network, reference, _ = make_pair(FAIR_PRIMITIVES, relaxation="sigmoid", arch_scale=1.0)
    network.op_threshold = threshold
    genotype = network.genotype()
    for kind in ("normal", "reduce"):
        expected = fair_parse(torch.sigmoid(getattr(reference, f"alphas_{kind}")).detach().numpy(),
                              FAIR_PRIMITIVES, threshold)
        ours = getattr(genotype, kind)
        assert [(op, node, j) for op, j, _, node in ours] == live_genes(expected)
        assert getattr(genotype, f"{kind}_concat") == sorted({to for _, to, _ in live_genes(expected)})
    counts = [sum(edge[3] == node for edge in edges) for edges in (genotype.normal, genotype.reduce)
              for node in range(2, 6)]
    assert min(counts) < 2  # some node kept fewer than two edges
    assert genotype_from_dict(genotype_to_dict(genotype)) == genotype


def test_edges_from_a_node_without_edges_are_dropped_as_dcocell_skips_them():
    """Node 0 keeps no edge; node 1's two strongest edges come from input 0 and from
    node 0: FairDARTS's parse keeps both, its DCOCell computes only the first."""
    network, _, _ = make_pair(FAIR_PRIMITIVES, relaxation="sigmoid")
    with torch.no_grad():
        for p in network.arch_parameters():
            p.fill_(-3.0)
        network.alphas_normal[2, 4].fill_(3.0)  # node 1 <- input 0
        network.alphas_normal[4, 5].fill_(3.0)  # node 1 <- node 0
        network.alphas_normal[9, 1].fill_(3.0)  # node 3 <- input 0
    genotype = network.genotype()
    expected = fair_parse(torch.sigmoid(network.alphas_normal[:, 1:]).detach().numpy(),
                          FAIR_PRIMITIVES, 0.85)
    assert len(expected) == 3 and len(live_genes(expected)) == 2
    assert [(op, node, j) for op, j, _, node in genotype.normal] == live_genes(expected)
    assert genotype.normal_concat == [3, 5]
    assert genotype.reduce == [] and genotype.reduce_concat == []


# -- FairDARTS's final cell --------------------------------------------------------------

class ReferenceDCOCell(nn.Module):
    """FairDARTS's ``DCOCell`` (fairdarts/model.py), without drop-path."""

    def __init__(self, gene, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        self._ops = nn.ModuleDict()
        for name_i, to_i, from_i in gene:
            stride = 2 if reduction and from_i < 2 else 1
            op = OPS[name_i](C, stride, True)
            if str(to_i) in self._ops.keys():
                if str(from_i) in self._ops[str(to_i)]:
                    self._ops[str(to_i)][str(from_i)] += [op]
                else:
                    self._ops[str(to_i)][str(from_i)] = nn.ModuleList()
                    self._ops[str(to_i)][str(from_i)] += [op]
            else:
                self._ops[str(to_i)] = nn.ModuleDict()
                self._ops[str(to_i)][str(from_i)] = nn.ModuleList()
                self._ops[str(to_i)][str(from_i)] += [op]
        self.multiplier = len(self._ops)

    def forward(self, s0, s1):
        states = {"0": self.preprocess0(s0), "1": self.preprocess1(s1)}
        for to_i, ops in self._ops.items():
            h = []
            for from_i, op_i in ops.items():
                if from_i not in states:
                    continue
                h += [sum([op(states[from_i]) for op in op_i if from_i in states])]
            states[to_i] = sum(h)
        return torch.cat([v for v in states.values()][2:], dim=1)


@pytest.mark.slow
def test_final_network_of_a_threshold_cell_is_fairdarts_dco_network():
    network, reference, _ = make_pair(FAIR_PRIMITIVES, relaxation="sigmoid", arch_scale=2.0)
    network.op_threshold = 0.7
    genotype = network.genotype()
    genes = {kind: [(op, node, j) for op, j, _, node in getattr(genotype, kind)]
             for kind in ("normal", "reduce")}
    ours = NetworkCIFAR(C, 10, 5, False, genotype).double().eval()
    fill_seeded(ours)
    cells, C_prev_prev, C_prev, C_curr, reduction_prev = nn.ModuleList(), 3 * C, 3 * C, C, False
    for i in range(5):
        reduction = i in (5 // 3, 2 * 5 // 3)
        C_curr *= 2 if reduction else 1
        cell = ReferenceDCOCell(genes["reduce" if reduction else "normal"], C_prev_prev, C_prev,
                                C_curr, reduction, reduction_prev)
        cells.append(cell)
        reduction_prev = reduction
        C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
    theirs = nn.ModuleDict({"stem": nn.Sequential(nn.Conv2d(3, 3 * C, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(3 * C)),
                            "cells": cells, "classifier": nn.Linear(C_prev, 10)}).double().eval()
    ours_state = {k: v for k, v in ours.state_dict().items() if "_second_layers" not in k}
    theirs_state = theirs.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in theirs_state.values()]
    theirs.load_state_dict(dict(zip(theirs_state, ours_state.values())))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s0 = s1 = theirs["stem"](x)
    for cell in theirs["cells"]:
        s0, s1 = s1, cell(s0, s1)
    expected = theirs["classifier"](F.adaptive_avg_pool2d(s1, 1).flatten(1))
    logits, _ = ours(x)
    torch.testing.assert_close(logits, expected, **TOLERANCE)


# -- SDARTS ---------------------------------------------------------------------------------

def sdarts_clip(weights: torch.Tensor) -> torch.Tensor:
    """SDARTS's ``Network.clip()`` on one parameter (in place, row by row)."""
    for line in weights:
        max_index = line.argmax()
        line.data.clamp_(0, 1)
        if line.sum() == 0.0:
            line.data[max_index] = 1.0
        line.data.div_(line.sum())
    return weights


def test_clip_rows_is_sdarts_clip():
    rows = torch.randn(20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows[3] = -rows[3].abs()  # all negative: one-hot at its argmax
    rows[4] = rows[4].abs() + 1  # all above one
    torch.testing.assert_close(collapse_fixes.clip_rows(rows), sdarts_clip(rows.clone()), **TOLERANCE)
    assert collapse_fixes.clip_rows(rows)[3].max() == 1


def reference_random(reference, epsilon):
    """SDARTS's ``softmax_arch_parameters`` then ``Random_alpha``."""
    for p in reference.arch():
        p.data.copy_(F.softmax(p, dim=-1))
    for p in reference.arch():
        p.data.add_(torch.zeros_like(p).uniform_(-epsilon, epsilon))
    for p in reference.arch():
        sdarts_clip(p.data)


def reference_pgd(reference, X, y, epsilon, steps=7, random_start=True):
    """SDARTS's ``softmax_arch_parameters`` then ``Linf_PGD_alpha``, its ``Linf_SGD``
    step written out (``p -= lr * sign(grad)`` of the negated loss)."""
    for p in reference.arch():
        p.data.copy_(F.softmax(p, dim=-1))
    training = reference.training
    if training:
        reference.eval()
    saved_params = [p.clone() for p in reference.arch()]
    lr = 2 * epsilon / steps if steps else None  # (their Linf_SGD needs steps > 0)
    with torch.no_grad():
        loss_before = F.cross_entropy(reference(X), y)
    if random_start:
        for p in reference.arch():
            p.data.add_(torch.zeros_like(p).uniform_(-epsilon, epsilon))
        for p in reference.arch():
            sdarts_clip(p.data)
    for _ in range(steps):
        reference.zero_grad()
        loss = -F.cross_entropy(reference(X), y)
        loss.backward()
        for p in reference.arch():
            p.data.add_(torch.sign(p.grad.data), alpha=-lr)
        diff = [(reference.arch()[i] - saved_params[i]).clamp_(-epsilon, epsilon)
                for i in range(len(saved_params))]
        for i, p in enumerate(reference.arch()):
            p.data.copy_(diff[i] + saved_params[i])
        for p in reference.arch():
            sdarts_clip(p.data)
    reference.zero_grad()
    with torch.no_grad():
        loss_after = F.cross_entropy(reference(X), y)
    if loss_before > loss_after:
        for i, p in enumerate(reference.arch()):
            p.data.copy_(saved_params[i])
    if training:
        reference.train()
    return bool(loss_before > loss_after)


def _perturbed_weight_step(network, reference, perturbation, reference_perturbation, batch,
                           epoch=10, **kwargs):
    x, y = batch
    variant = Variant(flags(perturb_alpha=perturbation, **kwargs), network)
    variant.start_epoch(epoch)
    epsilon = collapse_fixes.perturb_epsilon(0.3, epoch, 50)
    assert variant.epsilon == 0.03 + (0.3 - 0.03) * epoch / 50
    clean = [p.detach().clone() for p in network.arch_parameters()]
    torch.manual_seed(11)
    with variant.perturbed(x, y):
        held = [p.detach().clone() for p in network.arch_parameters()]
        logits = network(x)
    assert all(torch.equal(a, b) for a, b in zip(clean, network.arch_parameters()))  # restored
    reference.relaxation = "weight"
    torch.manual_seed(11)
    reverted = reference_perturbation(reference, x, y, epsilon)
    for got, want in zip(held, reference.arch()):
        torch.testing.assert_close(got, want, **TOLERANCE)
    expected_logits = reference(x)
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    assert_weight_gradients_match(network, reference, F.cross_entropy(logits, y),
                                  F.cross_entropy(expected_logits, y))
    return reverted, held, clean


def test_random_smoothing_is_sdarts_rs():
    network, reference, (batch, _) = make_pair(PRIMITIVES, aux=True)
    reference.decay_rate = 1.0
    _, held, clean = _perturbed_weight_step(network, reference, "random",
                                            lambda ref, x, y, eps: reference_random(ref, eps), batch,
                                            aux_skip=True, aux_skip_decay="constant")
    assert not torch.allclose(held[0], F.softmax(clean[0], dim=-1))


@pytest.mark.slow
def test_adversarial_perturbation_is_sdarts_pgd():
    network, reference, (batch, _) = make_pair(PRIMITIVES)
    reverted, held, clean = _perturbed_weight_step(network, reference, "adversarial", reference_pgd,
                                                   batch)
    assert not reverted and not torch.allclose(held[0], F.softmax(clean[0], dim=-1))
    assert network.training and reference.training


@pytest.mark.slow
def test_adversarial_perturbation_reverts_as_sdarts_when_the_loss_fell(monkeypatch):
    """With no PGD step (their optimizer's lr would divide by zero: the reference
    builds none) the random start alone decides: for some draws it lowers the loss,
    and SDARTS (and we) fall back to the clean weights."""
    monkeypatch.setattr(collapse_fixes, "PGD_STEPS", 0)
    outcomes = set()
    for seed in range(6):
        network, reference, (batch, _) = make_pair(PRIMITIVES)
        torch.manual_seed(seed)
        batch = (torch.randn_like(batch[0]), batch[1])
        reverted, held, clean = _perturbed_weight_step(
            network, reference, "adversarial",
            lambda ref, x, y, eps: reference_pgd(ref, x, y, eps, steps=0), batch)
        outcomes.add(reverted)
        if reverted:
            torch.testing.assert_close(held[0], F.softmax(clean[0], dim=-1), **TOLERANCE)
        if outcomes == {True, False}:
            break
    assert outcomes == {True, False}


@pytest.mark.slow
def test_the_architecture_step_sees_the_clean_architecture():
    """A search iteration with SDARTS-RS moves the architecture as one without it (the
    perturbation comes after the architecture step) but not the weights."""
    from runtime.precision import Precision
    from runtime.searching import search_step
    steps = {}
    for perturbation in ("none", "random"):
        network, _, (train, valid) = make_pair(PRIMITIVES)
        net_architect = architect(network, Variant(flags(perturb_alpha=perturbation), network))
        torch.manual_seed(0)
        search_step(network, net_architect, net_architect.weight_optimizer,
                    Precision(False, "bfloat16", torch.device("cpu")), train, valid, 0.1, 5.0)
        steps[perturbation] = ([p.detach().clone() for p in network.arch_parameters()],
                               [w.detach().clone() for w in network.weights()])
    for a, b in zip(steps["none"][0], steps["random"][0]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(steps["none"][1], steps["random"][1]))


def test_epsilon_schedule_is_sdarts():
    for epoch in range(50):
        assert collapse_fixes.perturb_epsilon(0.3, epoch, 50) == 0.03 + (0.3 - 0.03) * epoch / 50
