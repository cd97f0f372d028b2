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
from recompute import BATCH_NORMS, RecomputedPart


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
        # The conv candidates all begin with ReLU(x): rectify once, which saves their
        # copies of it (time, and memory kept for backward).
        self._starts_with_relu = [isinstance(op, ReLUFirst) for op in self._ops]
        self.shares_relu = sum(self._starts_with_relu) > 1
        # Candidates whose output depends on x alone: the poolings (their BN has no
        # parameters and normalises with batch statistics) and the identity skip.
        # Edges leaving the same state compute them once (``input_only_outputs``).
        self._input_only = [candidates[k] in ("max_pool_3x3", "avg_pool_3x3")
                            or (candidates[k] == "skip_connect" and stride == 1)
                            for k in self._weight_index]

    def input_only_outputs(self, x: torch.Tensor
                           ) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        """The outputs of the candidates that depend on ``x`` alone, by position, and
        each pooling's output before its BN (for ``track_statistics``)."""
        outputs, pooled = {}, {}
        for i, (op, only_x) in enumerate(zip(self._ops, self._input_only)):
            if not only_x:
                continue
            if isinstance(op, nn.Sequential):  # pooling, then its BN
                pooled[i] = op[0](x)
                outputs[i] = op[1](pooled[i])
            else:
                outputs[i] = op(x)
        return outputs, pooled

    @torch.no_grad()
    def track_statistics(self, pooled: Dict[int, torch.Tensor]) -> None:
        """Update the poolings' BN running statistics with the batch another edge
        normalised (in training mode their outputs would be that edge's)."""
        for i, tensor in pooled.items():
            if self._ops[i][1].track_running_stats:
                self._ops[i][1](tensor)

    def forward(self, x: torch.Tensor, weights: torch.Tensor,
                rectified: Optional[torch.Tensor] = None,
                shared: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
        """``rectified`` (relu(x)) and ``shared`` (``input_only_outputs(x)``) may come
        from another edge leaving the same state."""
        if rectified is None and self.shares_relu:
            rectified = F.relu(x)
        if shared is None:
            shared, _ = self.input_only_outputs(x)
        weights = weights.unbind()
        out = None
        for i, (k, op) in enumerate(zip(self._weight_index, self._ops)):
            if i in shared:
                y = shared[i]
            elif self.shares_relu and self._starts_with_relu[i]:
                y = op.forward_from_relu(rectified)
            else:
                y = op(x)
            # out + w * y in one pass over memory
            out = weights[k] * y if out is None else torch.addcmul(out, weights[k], y)
        return out


class SearchCell(nn.Module):
    """A cell whose edges are MixedOps; its output concatenates the last
    ``multiplier`` intermediate nodes.

    The forward runs state by state: each part takes one state (a cell input, which
    it preprocesses, or a finished node) and computes every edge leaving it, so what
    depends on the state alone (its ReLU, its poolings) is computed once for all of
    them.  Node i sums the edges from states 0..i+1 in that order, and is finished once
    state i+1 has run.  With ``recompute=True`` each part is recomputed in backward on
    its own (``RecomputedPart``), and a training forward keeps only the states."""

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

        # Edges are numbered node by node; node i's edge from state j is offset(i) + j.
        offsets = [sum(2 + k for k in range(i)) for i in range(steps)]
        self._targets = [list(range(max(0, j - 1), steps)) for j in range(steps + 1)]
        self._edges_leaving = [[offsets[i] + j for i in targets]
                               for j, targets in enumerate(self._targets)]
        self._part_modules = [
            ([f"preprocess{j}"] if j < 2 else []) + [f"_ops.{e}" for e in edges]
            + ([f"_attns.{e}" for e in edges] if space.second_stage is not None else [])
            for j, edges in enumerate(self._edges_leaving)]
        if self._bottleneck is not None:
            self._part_modules.append(["_bottleneck"])
        # By name, looked up in the cell that runs: a DataParallel replica runs its own
        # copies of these modules and holds its parameters as plain attributes, which
        # named_parameters() does not list.
        self._part_params = {tuple(modules): [name for module in modules for name, _ in
                                              self.get_submodule(module).named_parameters(prefix=module)]
                             for modules in self._part_modules}
        self._part_norms = {tuple(modules): [name for module in modules for name, m in
                                             self.get_submodule(module).named_modules(prefix=module)
                                             if isinstance(m, BATCH_NORMS)]
                            for modules in self._part_modules}

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, first: torch.Tensor,
                second: Optional[torch.Tensor], cell_end: Optional[torch.Tensor],
                recompute: bool = False) -> torch.Tensor:
        run = self._run
        if recompute:  # the cell's modules by name, looked up once per forward (see _part_params)
            run = functools.partial(self._run_recomputed, dict(self.named_modules()))
        states = [s0, s1]
        nodes: List[Optional[torch.Tensor]] = [None] * self._steps
        for j in range(self._steps + 1):  # the last node leads nowhere
            part = functools.partial(SearchCell._edges_from, index=j)
            contributions = run(part, self._part_modules[j], states[j], first, second)
            for i, out in zip(self._targets[j], contributions):
                nodes[i] = out if nodes[i] is None else nodes[i] + out
            if j >= 1:
                states.append(nodes[j - 1])  # its last edge comes from state j
        out = torch.cat(states[-self._multiplier:], dim=1)
        if self._bottleneck is not None:
            out = run(SearchCell._cell_end, self._part_modules[-1], out, cell_end)
        return out

    # -- the parts --------------------------------------------------------------------
    def _edges_from(self, h: torch.Tensor, first: torch.Tensor, second: Optional[torch.Tensor],
                    index: int) -> Tuple[torch.Tensor, ...]:
        """Every edge leaving state ``index`` (preprocessed here for a cell input), in
        the order of the nodes they lead to."""
        if index < 2:
            h = (self.preprocess0 if index == 0 else self.preprocess1)(h)
        edges = self._edges_leaving[index]
        lead = self._ops[edges[0]]
        rectified = F.relu(h) if lead.shares_relu else None
        # In training mode a pooling's BN output is the same on every edge (batch
        # statistics): the first edge computes it, the others only update their running
        # statistics.  In eval mode each edge normalises with its own statistics.
        shared, pooled = lead.input_only_outputs(h) if self.training else (None, {})
        outputs = []
        for e in edges:
            if e != edges[0]:
                self._ops[e].track_statistics(pooled)
            out = self._ops[e](h, first[e], rectified, shared)
            if second is not None:
                out = self._attns[e](out, second[e])
            outputs.append(out)
        return tuple(outputs)

    def _cell_end(self, out: torch.Tensor, cell_end: torch.Tensor) -> torch.Tensor:
        return self._bottleneck(out, cell_end)

    def _run(self, part: Callable, modules: List[str], *inputs):
        return part(self, *inputs)

    def _run_recomputed(self, members: Dict[str, nn.Module], part: Callable, modules: List[str],
                        *inputs):
        names = self._part_params[tuple(modules)]
        # The current tensors: under the architect's functional_call these are the
        # virtual or perturbed weights, not the module's own parameters.
        params = [getattr(members[owner], attr)
                  for owner, _, attr in (name.rpartition(".") for name in names)]
        norms = [members[name] for name in self._part_norms[tuple(modules)]]
        return RecomputedPart.apply(part, self, norms, names, len(inputs), *inputs, *params)


class Network(nn.Module):
    """The search supernet.  ``forward(x)`` returns logits.

    ``recompute=True`` keeps only the inputs of each part of a cell (preprocessings,
    the edges leaving each state, cell end) during a training forward and recomputes
    the part in backward (``RecomputedPart``, recompute.py): the same gradients for far
    less memory (1.4 GB instead of about 4 GB for a second-order step at batch 16,
    after_every), at the price of one more forward pass."""

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
        logits = self(x) if tensors is None else functional_call(self, tensors, (x,), tie_weights=False)
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
