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
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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
    ``multiplier`` intermediate nodes.

    The forward runs in parts (the two preprocessings, each node, the cell-end
    attention) so that with ``recompute=True`` each part can be recomputed in
    backward on its own (``RecomputedPart``)."""

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
                second: Optional[torch.Tensor], cell_end: Optional[torch.Tensor],
                recompute: bool = False) -> torch.Tensor:
        run = self._run_recomputed if recompute else self._run
        states = list(run(SearchCell._preprocess, ["preprocess0", "preprocess1"], s0, s1))
        offset = 0
        for _ in range(self._steps):
            edges = range(offset, offset + len(states))
            modules = [f"_ops.{e}" for e in edges]
            if second is not None:
                modules += [f"_attns.{e}" for e in edges]
            states.append(run(functools.partial(SearchCell._node, offset=offset), modules,
                              first, second, *states))
            offset += len(states) - 1
        out = torch.cat(states[-self._multiplier:], dim=1)
        if self._bottleneck is not None:
            out = run(SearchCell._cell_end, ["_bottleneck"], out, cell_end)
        return out

    # -- the parts --------------------------------------------------------------------
    def _preprocess(self, s0: torch.Tensor, s1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.preprocess0(s0), self.preprocess1(s1)

    def _node(self, first: torch.Tensor, second: Optional[torch.Tensor], *states: torch.Tensor,
              offset: int) -> torch.Tensor:
        """One intermediate node: the sum of its edges from all previous states."""
        node = None
        for j, h in enumerate(states):
            edge = offset + j
            out = self._ops[edge](h, first[edge])
            if second is not None:
                out = self._attns[edge](out, second[edge])
            node = out if node is None else node + out
        return node

    def _cell_end(self, out: torch.Tensor, cell_end: torch.Tensor) -> torch.Tensor:
        return self._bottleneck(out, cell_end)

    def _run(self, part: Callable, modules: List[str], *inputs):
        return part(self, *inputs)

    def _run_recomputed(self, part: Callable, modules: List[str], *inputs):
        # The current tensors: under the architect's functional_call these are the
        # virtual or perturbed weights, not the module's own parameters.
        params = {name: p for module in modules
                  for name, p in self.get_submodule(module).named_parameters(prefix=module)}
        return RecomputedPart.apply(part, self, modules, list(params), len(inputs), *inputs,
                                    *params.values())


class _Part(nn.Module):
    """``part(cell, *inputs)`` as a module, for ``functional_call``."""

    def __init__(self, cell: SearchCell, part: Callable):
        super().__init__()
        self.cell, self.part = cell, part

    def forward(self, *inputs):
        return self.part(self.cell, *inputs)


class RecomputedPart(torch.autograd.Function):
    """Run ``part(cell, *inputs)`` without keeping its activations; rebuild them in backward.

    Every edge of the supernet evaluates all candidates, so the activations kept for
    backward dominate a search's memory (1.6-2.0 GB per pass at batch 16, up to
    0.42 GB in one cell).  Forward runs without a graph and keeps only the part's
    inputs; backward runs the part again and differentiates that, so at most one
    node's activations (the largest has 5 of a cell's 14 edges) exist at a time.
    The parameters of the part are explicit inputs: the recomputation uses the
    tensors of the forward even when that forward ran inside the architect's
    ``functional_call``, and gradients reach them through ``autograd.grad`` too.

    Why not ``torch.utils.checkpoint``: its reentrant form refuses ``autograd.grad``
    (which the architect uses), and its non-reentrant form runs a Python hook for
    each of the ~2700 tensors a cell saves, which cost twice the recomputation
    itself here (measured: +1.2 s against +0.6 s per pass).  Search cells draw no
    random numbers, so no RNG state needs replaying.
    """

    @staticmethod
    def forward(ctx, part: Callable, cell: SearchCell, modules: List[str], names: List[str],
                num_inputs: int, *inputs_and_params: Optional[torch.Tensor]):
        ctx.part, ctx.cell, ctx.modules, ctx.names, ctx.num_inputs = part, cell, modules, names, num_inputs
        device = next(t for t in inputs_and_params if t is not None).device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*inputs_and_params)
        return part(cell, *inputs_and_params[:num_inputs])

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        if torch.is_grad_enabled():
            # Refused rather than silently wrong: a gradient graph built here would
            # miss the second derivatives of this part.
            raise RuntimeError("double backward (create_graph=True) through recomputed cells is "
                               "not supported: build the supernet with recompute=False")
        needs_grad = ctx.needs_input_grad[5:]
        saved = [t if t is None else t.detach().requires_grad_(needed)
                 for t, needed in zip(ctx.saved_tensors, needs_grad)]
        inputs, params = saved[:ctx.num_inputs], saved[ctx.num_inputs:]
        tensors = {"cell." + name: p for name, p in zip(ctx.names, params)}
        # Training-mode BatchNorm normalises with batch statistics; the running
        # statistics were updated by the forward and must not be updated twice.
        tensors.update(("cell." + name, b.clone()) for module in ctx.modules
                       for name, b in ctx.cell.get_submodule(module).named_buffers(prefix=module))
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            outputs = functional_call(_Part(ctx.cell, ctx.part), tensors, tuple(inputs))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # (An output may not depend on anything that needs a gradient, e.g. the
        # preprocessing of a cell input computed from detached weights.)
        differentiable = [(out, grad) for out, grad in zip(outputs, grad_outputs) if out.requires_grad]
        wanted = [t for t, needed in zip(saved, needs_grad) if needed]
        grads = iter(torch.autograd.grad([out for out, _ in differentiable],
                                         wanted, [grad for _, grad in differentiable],
                                         allow_unused=True))
        return (None,) * 5 + tuple(next(grads) if needed else None for needed in needs_grad)


class Network(nn.Module):
    """The search supernet.  ``forward(x)`` returns logits.

    ``recompute=True`` keeps only the inputs of each part of a cell (preprocessings,
    nodes, cell end) during a training forward and recomputes the part in backward
    (``RecomputedPart``): the same gradients for far less memory (4.1 -> 1.5 GB at
    batch 16), at the price of one more forward pass."""

    def __init__(self, C: int, num_classes: int, layers: int, criterion: nn.Module,
                 location: "AttLocation | str" = AttLocation.AFTER_EVERY, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, image_size: int = 32,
                 recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.criterion = criterion
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
            s0, s1 = s1, cell(s0, s1, *cell_weights, recompute=recompute)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def loss(self, x: torch.Tensor, target: torch.Tensor,
             tensors: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The criterion on the logits of ``x``; ``tensors`` (name -> tensor) stand in
        for parameters and buffers (``torch.func.functional_call``), as the
        architect's virtual and perturbed weights do."""
        logits = self(x) if tensors is None else functional_call(self, tensors, (x,))
        return self.logits_loss(logits, target)

    def logits_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The criterion, computed in at least float32 (autocast gives bfloat16 logits)."""
        return self.criterion(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)

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
