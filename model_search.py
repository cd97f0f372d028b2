"""The Att-DARTS supernet: every edge mixes all candidate ops (and attentions).

Where attention is searched is an ``AttLocation``; what each location puts in a
cell is declared once, in ``SEARCH_SPACES``, and the cell is built from that data.
Architecture parameters (alpha: first stage, beta: second stage, gamma: cell-end
attention) are registered as parameters so that DataParallel replicates them, but
they are *not* network weights: use ``weights()`` for the weight optimizer and
``arch_parameters()`` for the architecture optimizer.
"""
import contextlib
import enum
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from attentions import ATTENTIONS, build_attention
from genotypes import ATTN_PRIMITIVES, PRIMITIVES, Genotype
from operations import OPS, FactorizedReduce, ReLUConvBN, ReLUFirst, halve


class AttLocation(enum.Enum):
    """Where the attention candidates sit in a searched cell (``--location``)."""

    AFTER_EVERY = "after_every"
    END = "end"
    AFTER_EVERY_AND_END = "after_every_and_end"
    MIXED_WITH_OPERATION = "mixed_with_operation"
    DOUBLE_MIXED = "double_mixed"
    NO_ATTENTION = "no_attention"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: "str | AttLocation") -> "AttLocation":
        """Parse a location from its string, with an error listing the valid ones."""
        if isinstance(text, cls):
            return text
        try:
            return cls(text)
        except ValueError:
            valid = ", ".join(loc.value for loc in cls)
            raise ValueError(f"unknown attention location {text!r}; valid: {valid}") from None


@dataclass(frozen=True)
class SearchSpace:
    """The candidates of one location: first stage on every edge, an optional second
    stage after every edge, an optional attention after the cell's concat."""

    first_stage: Tuple[str, ...]
    second_stage: Optional[Tuple[str, ...]] = None
    cell_end: Optional[Tuple[str, ...]] = None


_OPS = tuple(PRIMITIVES)
_ATTNS = tuple(ATTN_PRIMITIVES)
_OPS_AND_ATTNS = _OPS + tuple(a for a in ATTN_PRIMITIVES if a != "Identity")

SEARCH_SPACES: Dict[AttLocation, SearchSpace] = {
    AttLocation.AFTER_EVERY: SearchSpace(_OPS, second_stage=_ATTNS),
    AttLocation.END: SearchSpace(_OPS, cell_end=_ATTNS),
    AttLocation.AFTER_EVERY_AND_END: SearchSpace(_OPS, second_stage=_ATTNS, cell_end=_ATTNS),
    AttLocation.MIXED_WITH_OPERATION: SearchSpace(_OPS_AND_ATTNS),
    AttLocation.DOUBLE_MIXED: SearchSpace(_OPS_AND_ATTNS, second_stage=_OPS_AND_ATTNS),
    AttLocation.NO_ATTENTION: SearchSpace(_OPS),
}


def build_candidate(name: str, C: int, stride: int, height: int, width: int) -> nn.Module:
    """One supernet candidate: a non-affine op, or an attention built for (height, width).

    ``height``/``width`` are the size of the candidate's *output*; an attention on a
    stride-2 edge is preceded by a FactorizedReduce so its output matches the ops.
    """
    if name in ATTENTIONS:
        attention = build_attention(name, C, height, width)
        if stride == 1:
            return attention
        return nn.Sequential(FactorizedReduce(C, C, affine=False), attention)
    op = OPS[name](C, stride, False)
    if "pool" in name:
        # A non-affine BN puts pooling outputs on the same scale as the conv ops.
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
    return op


class MixedOp(nn.Module):
    """sum_k w_k * candidate_k(x).  `none` is never built nor run: it adds exactly zero."""

    def __init__(self, candidates: Sequence[str], C: int, stride: int, height: int, width: int):
        super().__init__()
        self._weight_index = [k for k, name in enumerate(candidates) if name != "none"]
        self._ops = nn.ModuleList(
            build_candidate(candidates[k], C, stride, height, width) for k in self._weight_index)
        # The conv candidates all begin with ReLU(x): rectify once per edge, which
        # saves their copies of it (time, and memory kept for backward).
        self._starts_with_relu = [isinstance(op, ReLUFirst) for op in self._ops]
        self._share_relu = sum(self._starts_with_relu) > 1

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rectified = F.relu(x) if self._share_relu else None
        out = None
        for k, op, starts_with_relu in zip(self._weight_index, self._ops, self._starts_with_relu):
            y = op.forward_from_relu(rectified) if self._share_relu and starts_with_relu else op(x)
            term = weights[k] * y
            out = term if out is None else out + term
        return out


class SearchCell(nn.Module):
    """A cell whose edges are MixedOps; its output concatenates the last
    ``multiplier`` intermediate nodes."""

    def __init__(self, space: SearchSpace, steps: int, multiplier: int, C_prev_prev: int,
                 C_prev: int, C: int, reduction: bool, reduction_prev: bool,
                 height: int, width: int):
        super().__init__()
        self.reduction = reduction
        self._steps = steps
        self._multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)

        self._ops = nn.ModuleList()
        self._attns = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(space.first_stage, C, stride, height, width))
                if space.second_stage is not None:
                    self._attns.append(MixedOp(space.second_stage, C, 1, height, width))
        self._bottleneck = (MixedOp(space.cell_end, multiplier * C, 1, height, width)
                            if space.cell_end is not None else None)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, first: torch.Tensor,
                second: Optional[torch.Tensor], cell_end: Optional[torch.Tensor]) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            node = None
            for j, h in enumerate(states):
                edge = offset + j
                out = self._ops[edge](h, first[edge])
                if second is not None:
                    out = self._attns[edge](out, second[edge])
                node = out if node is None else node + out
            offset += len(states)
            states.append(node)
        out = torch.cat(states[-self._multiplier:], dim=1)
        if self._bottleneck is not None:
            out = self._bottleneck(out, cell_end)
        return out


class RecomputedCell(torch.autograd.Function):
    """Run a SearchCell without keeping its activations; rebuild them in backward.

    Every edge of the supernet evaluates all candidates, so the activations kept for
    backward dominate a search's memory (1.6-2.0 GB per pass at batch 16; one cell at
    most 0.42 GB).  Forward runs without a graph and keeps only the cell's inputs;
    backward runs the cell again and differentiates that.  The cell's parameters
    are explicit inputs, so the recomputation uses the tensors of the forward even
    when that forward ran inside the architect's ``functional_call`` (virtual or
    perturbed weights), and gradients reach them through ``autograd.grad`` too.

    Why not ``torch.utils.checkpoint``: its reentrant form refuses ``autograd.grad``
    (which the architect uses), and its non-reentrant form runs a Python hook for
    each of the ~2700 tensors a cell saves, which cost twice the recomputation
    itself here (measured: +1.2 s against +0.6 s per pass).  Search cells draw no
    random numbers, so no RNG state needs replaying.
    """

    @staticmethod
    def forward(ctx, cell: "SearchCell", names: List[str], s0: torch.Tensor, s1: torch.Tensor,
                first: torch.Tensor, second: Optional[torch.Tensor],
                cell_end: Optional[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.cell, ctx.names = cell, names
        device = s1.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(s0, s1, first, second, cell_end, *params)
        return cell(s0, s1, first, second, cell_end)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if torch.is_grad_enabled():
            # (once_differentiable would silently treat this backward as a constant.)
            raise RuntimeError("double backward (create_graph=True) through recomputed cells is "
                               "not supported: build the supernet with recompute=False")
        needs_grad = ctx.needs_input_grad[2:]
        inputs = [t if t is None else t.detach().requires_grad_(needed)
                  for t, needed in zip(ctx.saved_tensors, needs_grad)]
        tensors = dict(zip(ctx.names, inputs[5:]))
        # Training-mode BatchNorm normalises with batch statistics; the running
        # statistics were updated by the forward and must not be updated twice.
        tensors.update((name, b.clone()) for name, b in ctx.cell.named_buffers())
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            out = functional_call(ctx.cell, tensors, tuple(inputs[:5]))
        wanted = [t for t, needed in zip(inputs, needs_grad) if needed]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (None, None, *(next(grads) if needed else None for needed in needs_grad))


class Network(nn.Module):
    """The search supernet.  ``forward(x)`` returns logits.

    ``recompute=True`` keeps only each cell's inputs during a training forward and
    recomputes the cell in backward (``RecomputedCell``): the same gradients for
    about half the memory, at the price of one more forward pass."""

    def __init__(self, C: int, num_classes: int, layers: int, criterion: nn.Module,
                 location: "AttLocation | str" = AttLocation.AFTER_EVERY, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, image_size: int = 32,
                 recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion
        self._steps = steps
        self._multiplier = multiplier
        self.location = AttLocation.parse(location)
        self.space = SEARCH_SPACES[self.location]

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        size = image_size
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
                size = halve(size)
            cell = SearchCell(self.space, steps, multiplier, C_prev_prev, C_prev, C_curr,
                              reduction, reduction_prev, size, size)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_arch_parameters()

    def _initialize_arch_parameters(self) -> None:
        num_edges = sum(2 + i for i in range(self._steps))
        shapes = {"alphas": (num_edges, len(self.space.first_stage))}
        if self.space.second_stage is not None:
            shapes["betas"] = (num_edges, len(self.space.second_stage))
        if self.space.cell_end is not None:
            shapes["gammas"] = (len(self.space.cell_end),)
        self._arch_names: List[str] = []
        for prefix, shape in shapes.items():
            for kind in ("normal", "reduce"):
                name = f"{prefix}_{kind}"
                self.register_parameter(name, nn.Parameter(1e-3 * torch.randn(*shape)))
                self._arch_names.append(name)

    # -- parameters -----------------------------------------------------------
    def arch_parameters(self) -> List[nn.Parameter]:
        """alpha (and beta, gamma) for normal and reduction cells."""
        return [getattr(self, name) for name in self._arch_names]

    def named_arch_parameters(self) -> Dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self._arch_names}

    def named_weights(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """The network weights: every parameter except the architecture parameters."""
        arch = set(self._arch_names)
        return ((n, p) for n, p in self.named_parameters() if n not in arch)

    def weights(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_weights())

    @contextlib.contextmanager
    def frozen_architecture(self) -> Iterator[None]:
        """Within this block the architecture parameters get no gradient (weight step)."""
        params = self.arch_parameters()
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- forward --------------------------------------------------------------
    def _cell_weights(self, kind: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        first = F.softmax(getattr(self, f"alphas_{kind}"), dim=-1)
        second = F.softmax(getattr(self, f"betas_{kind}"), dim=-1) if self.space.second_stage else None
        cell_end = F.softmax(getattr(self, f"gammas_{kind}"), dim=-1) if self.space.cell_end else None
        return first, second, cell_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {"normal": self._cell_weights("normal"), "reduce": self._cell_weights("reduce")}
        recompute = self.recompute and self.training and torch.is_grad_enabled()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            cell_weights = weights["reduce" if cell.reduction else "normal"]
            if recompute:
                params = dict(cell.named_parameters())
                out = RecomputedCell.apply(cell, list(params), s0, s1, *cell_weights, *params.values())
            else:
                out = cell(s0, s1, *cell_weights)
            s0, s1 = s1, out
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._criterion(self(x), target)

    # -- derivation -----------------------------------------------------------
    def softmaxed_arch(self) -> Dict[str, List]:
        """The softmaxed architecture weights, as nested lists (for logs and plots)."""
        with torch.no_grad():
            return {name: F.softmax(p.float(), dim=-1).cpu().tolist()
                    for name, p in self.named_arch_parameters().items()}

    def genotype(self) -> Genotype:
        """Derive the discrete cell: per node the two strongest edges (ignoring `none`),
        each with its best non-`none` first- and second-stage candidate."""
        space = self.space

        def parse(kind: str) -> List[Tuple[str, int, str]]:
            first, second, _ = self._cell_weights(kind)
            first = first.detach().cpu()
            second = second.detach().cpu() if second is not None else None
            gene = []
            start = 0
            for i in range(self._steps):
                end = start + i + 2
                rows = range(start, end)
                edges = sorted(rows, key=lambda e: -best_candidate(first[e], space.first_stage)[1])[:2]
                for e in edges:
                    op = best_candidate(first[e], space.first_stage)[0]
                    attention = best_candidate(second[e], space.second_stage)[0] if second is not None else ""
                    gene.append((op, e - start, attention))
                start = end
            return gene

        def bottleneck(kind: str) -> str:
            _, _, cell_end = self._cell_weights(kind)
            return best_candidate(cell_end.detach().cpu(), space.cell_end)[0] if cell_end is not None else ""

        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(
            normal=parse("normal"), normal_concat=concat,
            reduce=parse("reduce"), reduce_concat=concat,
            normal_bottleneck=bottleneck("normal"), reduce_bottleneck=bottleneck("reduce"),
        )


def best_candidate(weights: torch.Tensor, names: Sequence[str]) -> Tuple[str, float]:
    """The strongest candidate other than `none`, and its weight."""
    best = max((k for k, name in enumerate(names) if name != "none"), key=lambda k: float(weights[k]))
    return names[best], float(weights[best])
