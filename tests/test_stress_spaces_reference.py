"""The supernet in RobustDARTS's stress spaces (Zela et al., ICLR 2020; ``--space s1..s4``,
``--location no_attention``) computes what their release computes: forward, weight and
architecture gradients and the genotype, in float64, against their computation written
out below as their release writes it (automl/RobustDARTS @ 3dec3fe, src/search/
model_search.py: their ``MixedOp`` over the edge's own list of primitives, a
non-affine BN after a pooling; their ``Cell``, which hands edge ``edge_index`` the list
``self.primitives[edge_index]`` of its cell kind and sums each node's edges; the
network's softmax per cell kind; their genotype ``_parse`` with its local-index lookup
of 'none'; src/operations.py's ``NoiseOp``), one module per edge, with our per-edge
operations holding our supernet's weights.

Their search cell's drop path (``--drop_path_prob``, a regulariser of the paper's
experiments, not part of the spaces) is left at 0.  The noise op draws from the global
random stream in both releases, in another order (theirs edge by edge, ours one draw for
the edges leaving a state): here every noise op of both networks draws edge e of cell
c's samples from a generator seeded by (c, e), the same noise on both sides.  Forward
and gradients differ only by the order of float64 operations: 1e-10 relative."""
import re
from typing import Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_values import fill_seeded_supernet

from genotypes import space_operations
from model_search import Network
from operations import OPS, FactorizedReduce, Noise, ReLUConvBN

C, LAYERS, SIZE, BATCH, STEPS = 8, 3, 8, 4, 4
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


# -- RobustDARTS, as their src/operations.py and src/search/model_search.py compute it -------

class ReferenceNoiseOp(nn.Module):
    """Their NoiseOp; ``seed`` (set by the test) stands for the global random stream."""

    def __init__(self, stride, mean, std):
        super().__init__()
        self.stride, self.mean, self.std, self.seed = stride, mean, std, None

    def forward(self, x):
        if self.stride != 1:
            x_new = x[:, :, ::self.stride, ::self.stride]
        else:
            x_new = x
        generator = torch.Generator().manual_seed(self.seed)
        return x_new.new(x_new.size()).normal_(self.mean, self.std, generator=generator)


def reference_op(primitive, C, stride, affine):
    if primitive == "noise":
        return ReferenceNoiseOp(stride, 0., 1.)
    return OPS[primitive](C, stride, affine)


class ReferenceMixedOp(nn.Module):
    def __init__(self, C, stride, PRIMITIVES):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in PRIMITIVES:
            op = reference_op(primitive, C, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class ReferenceCell(nn.Module):
    def __init__(self, primitives, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.primitives = primitives["primitives_reduct" if reduction else "primitives_normal"]
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._ops = nn.ModuleList()
        edge_index = 0
        for i in range(STEPS):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(ReferenceMixedOp(C, stride, self.primitives[edge_index]))
                edge_index += 1

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for i in range(STEPS):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-4:], dim=1)


class ReferenceNetwork(nn.Module):
    def __init__(self, primitives):
        super().__init__()
        self.PRIMITIVES = primitives
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
            self.cells.append(ReferenceCell(primitives, C_prev_prev, C_prev, C_curr, reduction,
                                            reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, 4 * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, 10)
        k = sum(1 for i in range(STEPS) for n in range(2 + i))
        num_ops = len(primitives["primitives_normal"][0])
        self.alphas_normal = nn.Parameter(torch.zeros(k, num_ops))
        self.alphas_reduce = nn.Parameter(torch.zeros(k, num_ops))

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            alphas = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(alphas, dim=-1))
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def genotype(self):
        def _parse(weights, normal=True):
            PRIMITIVES = self.PRIMITIVES["primitives_normal" if normal else "primitives_reduct"]
            gene = []
            n = 2
            start = 0
            for i in range(STEPS):
                end = start + n
                W = weights[start:end].copy()
                try:
                    edges = sorted(range(i + 2), key=lambda x: -max(
                        W[x][k] for k in range(len(W[x])) if k != PRIMITIVES[x].index("none")))[:2]
                except ValueError:  # This error happens when the 'none' op is not present in the ops
                    edges = sorted(range(i + 2), key=lambda x: -max(W[x][k] for k in range(len(W[x]))))[:2]
                for j in edges:
                    k_best = None
                    for k in range(len(W[j])):
                        if "none" in PRIMITIVES[j]:
                            if k != PRIMITIVES[j].index("none"):
                                if k_best is None or W[j][k] > W[j][k_best]:
                                    k_best = k
                        else:
                            if k_best is None or W[j][k] > W[j][k_best]:
                                k_best = k
                    gene.append((PRIMITIVES[start + j][k_best], j))
                start = end
                n += 1
            return gene

        with torch.no_grad():
            return {"normal": _parse(F.softmax(self.alphas_normal, dim=-1).numpy(), True),
                    "reduce": _parse(F.softmax(self.alphas_reduce, dim=-1).numpy(), False)}


# -- our supernet's weights (and noise) in the reference ------------------------------------------

def their_space(space: str) -> Dict[str, list]:
    """Their src/spaces.py entry: our table of the space in their form."""
    return {key: [list(row) for row in space_operations(space, kind, 14)]
            for key, kind in (("primitives_normal", "normal"), ("primitives_reduct", "reduce"))}


_EDGE_OP = re.compile(r"cells\.(\d+)\._ops\.(\d+)\._ops\.(\d+)(\..*)")


def as_reference(network: Network, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our tensors under the reference's names: an edge's candidates there count the
    'none' we never build."""
    out = {}
    for name, tensor in network.per_edge_layout(tensors).items():
        match = _EDGE_OP.fullmatch(name)
        if match:
            cell, edge, k, tail = match.groups()
            kind = "reduce" if network.cells[int(cell)].reduction else "normal"
            row = space_operations(network.operation_space, kind, 14)[int(edge)]
            index = row.index([n for n in row if n != "none"][int(k)])
            name = f"cells.{cell}._ops.{edge}._ops.{index}{tail}"
        out[name] = tensor
    return out


def _seeded_noise(shape, cell: int, edge: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * cell + edge)
    return torch.empty(shape, dtype=torch.float64).normal_(0.0, 1.0, generator=generator)


def share_noise(network: Network, reference: ReferenceNetwork) -> int:
    """Edge e of cell c draws the same samples in both networks, at every forward;
    returns how many of our noise modules (edges leaving a state) were set."""
    def ours(op: Noise, cell: int, edges):
        original = op.forward

        def forward(x):
            shape = original(x).shape  # our strided shape, for all the edges side by side
            per_edge = (shape[0], shape[1] // len(edges)) + tuple(shape[2:])
            return torch.cat([_seeded_noise(per_edge, cell, e) for e in edges], dim=1)
        return forward

    count = 0
    for c, cell in enumerate(network.cells):
        for state, mixed in enumerate(cell._ops_from):
            for op, blocks in zip(mixed._ops, mixed.placements):
                if isinstance(op, Noise):
                    op.forward = ours(op, c, [cell.layout.edges_leaving[state][p] for p, _ in blocks])
                    count += 1
    for c, cell in enumerate(reference.cells):
        for e, mixed in enumerate(cell._ops):
            for op in mixed._ops:
                if isinstance(op, ReferenceNoiseOp):
                    op.seed = 100 * c + e
    return count


SPACES = ["s1", "s3", "s4"]  # s2 is s3 without 'none'


@pytest.fixture(scope="module", params=SPACES)
def pair(request):
    space = request.param
    torch.manual_seed(0)
    network = Network(C, 10, LAYERS, nn.CrossEntropyLoss(), "no_attention", image_size=SIZE,
                      recompute=False, operation_space=space).double().train()
    fill_seeded_supernet(network)
    reference = ReferenceNetwork(their_space(space)).double().train()
    reference.load_state_dict(as_reference(network, network.state_dict()))
    noise_modules = share_noise(network, reference)
    assert (noise_modules > 0) == (space == "s4")
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    return space, network, reference, (x, y)


def test_forward_and_gradients_match_robustdarts(pair):
    space, network, reference, (x, y) = pair
    names, weights = zip(*network.named_weights())
    logits = network(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), list(weights) + network.arch_parameters())
    expected_logits = reference(x)
    ref_params = dict(reference.named_parameters())
    expected = dict(zip(ref_params, torch.autograd.grad(F.cross_entropy(expected_logits, y),
                                                        list(ref_params.values()))))
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    ours = as_reference(network, {**dict(zip(names, grads)),
                                  **dict(zip(network.named_arch_parameters(), grads[len(weights):]))})
    # Every parametrised (edge, candidate) of theirs is one of ours, and no more.
    assert set(ours) == set(expected)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)
    columns = {"s1": 2, "s3": 3, "s4": 2}[space]
    assert network.alphas_normal.shape == network.alphas_reduce.shape == (14, columns)
    arch_grad = ours["alphas_normal"]
    if space == "s3":  # 'none' adds nothing, yet its weight takes part in the softmax
        assert arch_grad[:, 1:].abs().min() > 0
    else:
        assert arch_grad.abs().min() > 0


def _genotypes(network: Network, reference: ReferenceNetwork):
    genotype = network.genotype()
    assert all(attention == "" for _, _, attention in genotype.normal + genotype.reduce)
    return genotype, {"normal": [(op, j) for op, j, _ in genotype.normal],
                      "reduce": [(op, j) for op, j, _ in genotype.reduce]}, reference.genotype()


def test_genotype_is_robustdarts_parse(pair):
    space, network, reference, _ = pair
    genotype, ours, expected = _genotypes(network, reference)
    assert genotype.space == space
    assert ours == expected
    if space == "s1":  # each edge's own pair: an edge's operation is one of its two
        rows = space_operations("s1", "normal", 14)
        offsets = [0, 2, 5, 9]
        assert all(op in rows[offsets[position // 2] + j]
                   for position, (op, j, _) in enumerate(genotype.normal))
    if space == "s3":
        # 'none' the strongest on every edge: ranking and choice skip it, as theirs.
        saved = {name: p.detach().clone() for name, p in network.named_arch_parameters().items()}
        with torch.no_grad():
            for name, p in network.named_arch_parameters().items():
                p[:, 0] = 3.0
                getattr(reference, name).copy_(p)
        try:
            _, ours, expected = _genotypes(network, reference)
        finally:
            with torch.no_grad():
                for name, p in network.named_arch_parameters().items():
                    p.copy_(saved[name])
                    getattr(reference, name).copy_(saved[name])
        assert ours == expected
        assert all(op != "none" for op, _ in ours["normal"] + ours["reduce"])
