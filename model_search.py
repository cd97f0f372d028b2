"""The Att-DARTS supernet: every edge mixes all candidate ops (and attentions).

Where attention is searched is an ``AttLocation``; what each location puts in a
cell is declared once, in ``SEARCH_SPACES``, and the cell is built from that data.
Architecture parameters (alpha: first stage, beta: second stage, gamma: cell-end
attention; with edge normalisation, one edge weight per edge) are registered as parameters so that DataParallel replicates them, but
they are *not* network weights: use ``weights()`` for the weight optimizer and
``arch_parameters()`` for the architecture optimizer.
"""
import contextlib
import enum
import functools
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from attentions import ATTENTIONS, build_attention
from genotypes import ATTN_PRIMITIVES, PRIMITIVES, Genotype, space_operations
from operations import OPS, FactorizedReduce, ReLUConvBN, ReLUFirst, halve, imagenet_stems
from runtime.recompute import BATCH_NORMS, RecomputedPart

# Prefix of PC-DARTS's per-edge architecture parameters (edge normalisation), apart
# from the attention parameters betas_*.
EDGE_WEIGHTS = "edge_weights"
# How the architecture parameters weigh an edge's candidates: DARTS's softmax over the
# row, or FairDARTS's independent sigmoids.
RELAXATIONS = ("softmax", "sigmoid")


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
CELL_KINDS = ("normal", "reduce")


def stage_on_edges(stage: Optional[Tuple[str, ...]], operations: Sequence[Tuple[str, ...]]
                   ) -> Optional[List[Tuple[str, ...]]]:
    """Each edge's candidates in ``stage`` of a ``SearchSpace`` when the edges' candidate
    operations are ``operations`` (one tuple per edge: an operation space's, see
    genotypes.space_operations): the edge's operations in place of DARTS's
    (PRIMITIVES), the stage's attentions after them as they are.  None: no stage."""
    if stage is None:
        return None
    if not set(stage) & set(PRIMITIVES):  # attentions only
        return [stage] * len(operations)
    attentions = tuple(name for name in stage if name not in PRIMITIVES)
    return [tuple(edge) + attentions for edge in operations]


def build_candidate(name: str, C: int, stride: int, height: int, width: int,
                    edges: int = 1) -> nn.Module:
    """One supernet candidate: a non-affine op, or an attention built for (height, width),
    for ``edges`` edges side by side (see operations.py).

    ``height``/``width`` are the size of the candidate's *output*; an attention on a
    stride-2 edge is preceded by a FactorizedReduce so its output matches the ops.
    """
    if name in ATTENTIONS:
        attention = build_attention(name, C, height, width, edges)
        if stride == 1:
            return attention
        return nn.Sequential(FactorizedReduce(C, C, affine=False, edges=edges), attention)
    op = OPS[name](C, stride, False, edges)
    if "pool" in name:
        # A non-affine BN puts pooling outputs on the same scale as the conv ops.
        op = nn.Sequential(op, nn.BatchNorm2d(edges * C, affine=False))
    return op


class MixedOp(nn.Module):
    """For each of ``edges`` edges, sum_k w_k * candidate_k(x_edge).  `none` is never
    built nor run: it adds exactly zero.

    The edges run side by side: the input is (B, edges*C, H, W), edge e's channels at
    block e, and every candidate is built for all the edges at once (grouped by edge,
    see operations.py): a few large kernels instead of one small one per edge and
    candidate, the point on launch-bound GPUs.  Non-affine BatchNorms over the
    edges' channels keep each edge's own statistics.

    ``candidates`` names the columns of the weights, shared by every edge, or holds one
    tuple of names per edge where the edges differ (RobustDARTS's s1: each edge its own
    pair).  Then each distinct candidate is built once, for the edges that have it: it
    runs on their input blocks only, its weight is gathered from each edge's own column,
    and it adds into their outputs (``index_add``).  That is the per-edge computation
    exactly, with one set of kernels per distinct candidate (at most 5 per state in s1,
    fewer than DARTS's 7) and no work or parameters for a candidate an edge lacks.  (The
    union of the candidates on every edge, the absent ones weighted zero, is simpler but
    runs up to 2.5 times s1's (edge, candidate) pairs, and holds weights that never
    train.)  ``same_input``: every block of the input is the same tensor (a first stage:
    all the edges leave one state), so a candidate of m edges reads the first m blocks,
    a view.

    With ``aux_skip`` (DARTS-) every edge adds ``rate * skip_connect(x_edge)``, a
    skip_connect of its own weighted by one more column after the candidates' (the
    decaying rate, see Network._cell_weights)."""

    def __init__(self, candidates: "Sequence[str] | Sequence[Sequence[str]]", C: int,
                 stride: int, height: int, width: int, edges: int = 1, same_input: bool = False,
                 aux_skip: bool = False):
        super().__init__()
        self.edges = edges
        self.same_input = same_input
        rows = ([tuple(candidates)] * edges if isinstance(candidates[0], str)
                else [tuple(row) for row in candidates])
        assert len(rows) == edges and len({len(row) for row in rows}) == 1, \
            "one row of candidates per edge, all of one length"
        names = list(dict.fromkeys(name for row in rows for name in row if name != "none"))
        # Candidates on every edge first: they start the sum without a zero tensor.
        names.sort(key=lambda name: not all(name in row for row in rows))
        members = [[e for e, row in enumerate(rows) if name in row] for name in names]
        # Per built candidate, each of its blocks' (edge, index in that edge's own
        # per-edge MixedOp): the per-edge layout of its tensors (EdgeLayout).
        self.placements = [[(e, [n for n in rows[e] if n != "none"].index(name)) for e in edges_of]
                           for name, edges_of in zip(names, members)]
        # Per built candidate: its column when it sits in one column of every edge
        # (then weights.t()[column] weighs it), else None (weights gathered, index_add).
        self._weight_index = []
        columns_per_edge = len(rows[0]) + aux_skip
        gather, scatter, self._sizes = [], [], []
        for name, edges_of in zip(names, members):
            columns = {rows[e].index(name) for e in edges_of}
            if len(edges_of) == edges and len(columns) == 1:
                self._weight_index.append(columns.pop())
                continue
            self._weight_index.append(None)
            gather += [e * columns_per_edge + rows[e].index(name) for e in edges_of]
            scatter += edges_of
            self._sizes.append(len(edges_of))
        if aux_skip:
            self.placements.append([(e, len([n for n in rows[e] if n != "none"]))
                                    for e in range(edges)])
            self._weight_index.append(len(rows[0]))
            names.append("skip_connect")
            members.append(list(range(edges)))
        self.register_buffer("_gather", torch.tensor(gather, dtype=torch.long) if gather else None,
                             persistent=False)
        self.register_buffer("_scatter", torch.tensor(scatter, dtype=torch.long) if gather else None,
                             persistent=False)
        self._ops = nn.ModuleList(build_candidate(name, C, stride, height, width, len(edges_of))
                                  for name, edges_of in zip(names, members))
        # The conv candidates all begin with ReLU(x): rectify once, which saves their
        # copies of it (time, and memory kept for backward).
        self._starts_with_relu = [isinstance(op, ReLUFirst) for op in self._ops]
        self.shares_relu = sum(self._starts_with_relu) > 1

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x``: (B, edges*C, H, W); ``weights``: (edges, candidates).  Returns the edges'
        outputs as (B, edges, C, H', W')."""
        rectified = F.relu(x) if self.shares_relu else None
        # Candidate k's weights as (1, edges, 1, 1, 1), against (B, edges, C, H, W).
        columns = weights.t()[:, None, :, None, None, None].unbind()
        if self._gather is not None:  # the others': (1, their edges, 1, 1, 1) each
            gathered = iter(weights.flatten().index_select(0, self._gather)[
                None, :, None, None, None].split(self._sizes, dim=1))
            scattered = iter(self._scatter.split(self._sizes))
        out = None
        for k, op, from_relu in zip(self._weight_index, self._ops, self._starts_with_relu):
            source = rectified if from_relu and self.shares_relu else x
            if k is None:
                where, weight = next(scattered), next(gathered)
                source = self._blocks(source, where)
            y = op.forward_from_relu(source) if from_relu and self.shares_relu else op(source)
            if k is not None:
                y = y.unflatten(1, (self.edges, -1))
                # out + w * y in one pass over memory
                out = columns[k] * y if out is None else torch.addcmul(out, columns[k], y)
                continue
            contribution = weight * y.unflatten(1, (len(where), -1))
            if out is None:
                out = contribution.new_zeros((y.shape[0], self.edges) + contribution.shape[2:])
            out = out.index_add(1, where, contribution)
        return out

    def _blocks(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """The input blocks of ``edges``, side by side."""
        if self.same_input:
            return x.narrow(1, 0, len(edges) * (x.shape[1] // self.edges))
        return x.unflatten(1, (self.edges, -1)).index_select(1, edges).flatten(1, 2)


def channel_shuffle(x: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    """ShuffleNet's channel shuffle along ``dim``: the channels as (groups, C/groups),
    transposed, flattened again."""
    return x.unflatten(dim, (groups, -1)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def node_softmax(logits: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-edge logits (edges numbered node by node) softmaxed over each node's
    incoming edges: PC-DARTS's edge normalisation."""
    return torch.cat([F.softmax(chunk, dim=-1) for chunk in logits.split(node_sizes(steps))])


def node_sizes(steps: int) -> List[int]:
    """How many edges lead into each intermediate node."""
    return [2 + i for i in range(steps)]


def check_partial_channels(C: int, layers: int, partial_channels: int) -> None:
    """ValueError unless ``partial_channels`` (K) is at least 1 and divides the channels
    of every cell of a supernet of width ``C`` (C, 2C, 4C)."""
    if partial_channels < 1:
        raise ValueError(f"partial channels K must be at least 1 (1: every channel), "
                         f"got {partial_channels}")
    reductions = {layers // 3, 2 * layers // 3}
    widths = sorted({C << sum(i >= r for r in reductions) for i in range(layers)})
    bad = [w for w in widths if w % partial_channels]
    if bad:
        raise ValueError(f"partial channels K={partial_channels} does not divide the {bad[0]} "
                         f"channels of a cell (cells have {', '.join(map(str, widths))}): choose "
                         f"a K that divides the initial channels {C}")


class EdgeLayout:
    """Where a cell's edges sit, in the two orders the code needs.

    Edges are numbered node by node (node i's edge from state j is ``offset(i) + j``):
    the order of the architecture rows, the genotype and per-edge checkpoints.  The
    cell runs state by state: ``edges_leaving[j]`` are the edges leaving state j, in
    the order of the nodes they lead to (``targets[j]``), and ``order`` lists every
    edge in that run order (``rows[j]`` is state j's slice of it).

    It also converts checkpoints between the per-edge layout of earlier versions
    (``_ops.{edge}``, one MixedOp per edge) and the per-state one (``_ops_from.{j}``)."""

    def __init__(self, steps: int):
        offsets = [sum(2 + k for k in range(i)) for i in range(steps)]
        self.num_edges = sum(2 + i for i in range(steps))
        self.targets = [list(range(max(0, j - 1), steps)) for j in range(steps + 1)]
        self.edges_leaving = [[offsets[i] + j for i in targets]
                              for j, targets in enumerate(self.targets)]
        self.order = [e for edges in self.edges_leaving for e in edges]
        bounds = [0]
        for edges in self.edges_leaving:
            bounds.append(bounds[-1] + len(edges))
        self.rows = [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def group_per_edge(self, state_dict: Dict[str, torch.Tensor], prefix: str,
                       mixed_ops: Dict[str, Sequence["MixedOp"]]) -> None:
        """Rewrite a per-edge checkpoint's ``_ops.{edge}``/``_attns.{edge}`` entries under
        ``prefix`` into the per-state ``_ops_from.{state}``/``_attns_from.{state}`` ones,
        in place.  ``mixed_ops["_ops"][state]`` (and ``"_attns"``) is the cell's MixedOp of
        that state, whose ``placements`` say which edge each block belongs to."""
        pattern = re.compile(re.escape(prefix) + r"(_ops|_attns)\.(\d+)\._ops\.(\d+)\.(.*)")
        owners = {(kind, self.edges_leaving[state][position], k): (state, u, blocks)
                  for kind, ops in mixed_ops.items() for state, mixed in enumerate(ops)
                  for u, blocks in enumerate(mixed.placements) for position, k in blocks}
        per_edge = {}
        for key in [k for k in state_dict if pattern.fullmatch(k)]:
            kind, edge, k, rest = pattern.fullmatch(key).groups()
            per_edge[kind, int(edge), int(k), rest] = state_dict.pop(key)
        for kind, edge, k, rest in list(per_edge):
            state, u, blocks = owners[kind, edge, k]
            edges = self.edges_leaving[state]
            if (edge, k) != (edges[blocks[0][0]], blocks[0][1]):
                continue  # gathered with the candidate's first block
            tensors = [per_edge[kind, edges[position], index, rest] for position, index in blocks]
            # num_batches_tracked: one counter for the state's edges (they count alike).
            state_dict[f"{prefix}{kind}_from.{state}._ops.{u}.{rest}"] = (
                tensors[0] if tensors[0].dim() == 0 else torch.cat(tensors))

    def per_edge_entries(self, kind: str, by_state: Dict[int, Dict[str, torch.Tensor]],
                         prefix: str, mixed_ops: Sequence["MixedOp"]) -> Dict[str, torch.Tensor]:
        """The entries ``{state: {name inside _ops_from.{state}: tensor}}`` of ``kind``
        (``_ops`` or ``_attns``) under the per-edge names, edge by edge: each edge's
        block (views), counters repeated.  ``mixed_ops[state]``: the state's MixedOp."""
        pattern = re.compile(r"_ops\.(\d+)\.(.*)")
        found = []
        for state, tensors in by_state.items():
            for order, (name, tensor) in enumerate(tensors.items()):
                u, rest = pattern.fullmatch(name).groups()
                blocks = mixed_ops[state].placements[int(u)]
                for block, (position, k) in enumerate(blocks):
                    edge = self.edges_leaving[state][position]
                    found.append(((edge, k, order), f"{prefix}{kind}.{edge}._ops.{k}.{rest}",
                                  tensor if tensor.dim() == 0
                                  else tensor.unflatten(0, (len(blocks), -1))[block]))
        return {key: tensor for _, key, tensor in sorted(found, key=lambda entry: entry[0])}


class SearchCell(nn.Module):
    """A cell whose edges are MixedOps; its output concatenates the last
    ``multiplier`` intermediate nodes.

    The forward runs state by state: each part takes one state (a cell input, which
    it preprocesses, or a finished node) and computes every edge leaving it as one
    MixedOp over those edges side by side (``_ops_from[j]``, then ``_attns_from[j]``
    for a second stage).  Node i sums the edges from states 0..i+1 in that order, and
    is finished once state i+1 has run.  With ``recompute=True`` each part is
    recomputed in backward on its own (``RecomputedPart``), and a training forward
    keeps only the states.

    ``operations``: each edge's candidate operations, edges numbered node by node (an
    operation space's, genotypes.space_operations), in place of DARTS's PRIMITIVES in
    the stages of ``space``; None: PRIMITIVES on every edge.

    State-dict layout: ``_ops_from.{j}`` holds the tensors of the edges leaving state
    j, stacked in the order of the nodes they lead to.  Checkpoints of the per-edge
    layout (``_ops.{edge}``, ``_attns.{edge}``, one MixedOp per edge, edges numbered
    node by node) still load; ``EdgeLayout`` converts them."""

    def __init__(self, space: SearchSpace, steps: int, multiplier: int, C_prev_prev: int,
                 C_prev: int, C: int, reduction: bool, reduction_prev: bool,
                 height: int, width: int, partial_channels: int = 1,
                 operations: Optional[Sequence[Tuple[str, ...]]] = None, aux_skip: bool = False):
        super().__init__()
        self.reduction = reduction
        self.partial_channels = partial_channels
        self._steps = steps
        self._multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)

        self.layout = EdgeLayout(steps)
        # The edges' architecture weights in the order of the parts: state j's rows
        # are layout.rows[j] of the reordered matrix.
        self.register_buffer("_order", torch.tensor(self.layout.order), persistent=False)

        operations = operations or [tuple(PRIMITIVES)] * self.layout.num_edges
        first = stage_on_edges(space.first_stage, operations)
        second = stage_on_edges(space.second_stage, operations)
        self._ops_from = nn.ModuleList()
        self._attns_from = nn.ModuleList()
        for j, edges in enumerate(self.layout.edges_leaving):
            stride = 2 if reduction and j < 2 else 1
            # The first stage sees C/K channels of its state (PC-DARTS), the rest bypass it.
            self._ops_from.append(MixedOp([first[e] for e in edges], C // partial_channels,
                                          stride, height, width, len(edges), same_input=True,
                                          aux_skip=aux_skip))
            if second is not None:
                self._attns_from.append(MixedOp([second[e] for e in edges], C, 1, height, width,
                                                len(edges)))
        self._bottleneck = (MixedOp(space.cell_end, multiplier * C, 1, height, width)
                            if space.cell_end is not None else None)

        self._part_modules = [
            ([f"preprocess{j}"] if j < 2 else []) + [f"_ops_from.{j}"]
            + ([f"_attns_from.{j}"] if space.second_stage is not None else [])
            for j in range(steps + 1)]
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
                edge_weights: Optional[torch.Tensor] = None, recompute: bool = False) -> torch.Tensor:
        run = self._run
        if recompute:  # the cell's modules by name, looked up once per forward (see _part_params)
            run = functools.partial(self._run_recomputed, dict(self.named_modules()))
        first = first.index_select(0, self._order)
        second = second.index_select(0, self._order) if second is not None else None
        if edge_weights is not None:
            edge_weights = edge_weights.index_select(0, self._order)
        states = [s0, s1]
        nodes: List[Optional[torch.Tensor]] = [None] * self._steps
        for j in range(self._steps + 1):  # the last node leads nowhere
            part = functools.partial(SearchCell._edges_from, index=j)
            rows = self.layout.rows[j]
            contributions = run(part, self._part_modules[j], states[j], first[rows],
                                None if second is None else second[rows],
                                None if edge_weights is None else edge_weights[rows])
            for i, out in zip(self.layout.targets[j], contributions.unbind(1)):
                nodes[i] = out if nodes[i] is None else nodes[i] + out
            if j >= 1:
                states.append(nodes[j - 1])  # its last edge comes from state j
        out = torch.cat(states[-self._multiplier:], dim=1)
        if self._bottleneck is not None:
            out = run(SearchCell._cell_end, self._part_modules[-1], out, cell_end[None])
        return out

    # -- the parts --------------------------------------------------------------------
    def _edges_from(self, h: torch.Tensor, first: torch.Tensor, second: Optional[torch.Tensor],
                    edge_weights: Optional[torch.Tensor], index: int) -> torch.Tensor:
        """Every edge leaving state ``index`` (preprocessed here for a cell input), in
        the order of the nodes they lead to: (B, edges, C, H, W), each edge scaled by its
        normalised edge weight when there are edge weights."""
        if index < 2:
            h = (self.preprocess0 if index == 0 else self.preprocess1)(h)
        edges = len(self.layout.edges_leaving[index])
        k = self.partial_channels
        sampled = h[:, :h.shape[1] // k] if k > 1 else h
        # Every edge's input side by side (cat keeps the memory format; repeat does not).
        out = self._ops_from[index](torch.cat([sampled] * edges, dim=1) if edges > 1 else sampled,
                                    first)
        if k > 1:
            out = self._with_bypass(out, h[:, h.shape[1] // k:])
        if second is not None:
            out = self._attns_from[index](out.flatten(1, 2), second)
        if edge_weights is not None:
            out = out * edge_weights[:, None, None, None]
        return out

    def _with_bypass(self, mixed: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
        """PC-DARTS's partial channel connection, for every edge at once: each edge's
        mixed C/K channels (``mixed``: (B, edges, C/K, H', W')) followed by the channels
        that bypassed the mixture (2x2 max-pooled where the edge halves the resolution),
        then shuffled in K groups."""
        if bypass.shape[-1] != mixed.shape[-1]:
            bypass = F.max_pool2d(bypass, 2, 2)
        # The bypass is the same for every edge leaving the state: a broadcast view.
        bypass = bypass[:, None].expand(-1, mixed.shape[1], -1, -1, -1)
        return channel_shuffle(torch.cat([mixed, bypass], dim=2), self.partial_channels, dim=2)

    def _cell_end(self, out: torch.Tensor, cell_end: torch.Tensor) -> torch.Tensor:
        return self._bottleneck(out, cell_end).flatten(1, 2)

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load a per-edge checkpoint as well as a per-state one (see EdgeLayout)."""
        self.layout.group_per_edge(state_dict, prefix,
                                   {"_ops": self._ops_from, "_attns": self._attns_from})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Network(nn.Module):
    """The search supernet.  ``forward(x)`` returns logits.

    ``recompute=True`` keeps only the inputs of each part of a cell (preprocessings,
    the edges leaving each state, cell end) during a training forward and recomputes
    the part in backward (``RecomputedPart``, runtime/recompute.py): the same gradients for far
    less memory (1.4 GB instead of about 4 GB for a second-order step at batch 16,
    after_every), at the price of one more forward pass.

    ``partial_channels=K`` > 1 searches with PC-DARTS's partial channel connections:
    each edge's first stage runs on the first C/K channels of its input, the others
    bypass it, and the edge's output is channel-shuffled in K groups; a second stage
    and a cell-end attention see all channels.  ``edge_norm=True`` adds PC-DARTS's
    edge weights ``edge_weights_normal``/``edge_weights_reduce`` (one per edge; a node
    sums its incoming edges weighted by their softmax over that node's edges).

    ``operation_space`` (genotypes.OPERATION_SPACES, ``--space``) gives each edge's
    candidate operations in place of DARTS's; attentions stay where ``location`` puts
    them.  ``edge_candidates[name]`` holds, per edge, the candidates behind the columns
    of architecture parameter ``name`` (``alphas_*``, ``betas_*``).

    The published fixes of collapse (runtime/collapse_fixes.py drives them):
    ``relaxation="sigmoid"`` weighs every candidate by its own sigmoid instead of the
    row's softmax and derives the cell by FairDARTS's threshold (``op_threshold``);
    ``aux_skip=True`` adds DARTS-'s auxiliary skip connection to every edge's
    operations, weighted by the buffer ``aux_skip_rate``; ``holding_relaxed`` lets
    SDARTS's weight step run on perturbed relaxed weights."""

    def __init__(self, C: int, num_classes: int, layers: int, criterion: nn.Module,
                 location: "AttLocation | str" = AttLocation.AFTER_EVERY, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, image_size: int = 32,
                 recompute: bool = False, partial_channels: int = 1, edge_norm: bool = False,
                 operation_space: str = "darts", relaxation: str = "softmax",
                 op_threshold: float = 0.85, aux_skip: bool = False):
        super().__init__()
        check_partial_channels(C, layers, partial_channels)
        if relaxation not in RELAXATIONS:
            raise ValueError(f"unknown relaxation {relaxation!r}; valid: {', '.join(RELAXATIONS)}")
        self.recompute = recompute
        self.partial_channels = partial_channels
        self.edge_norm = edge_norm
        self.relaxation = relaxation
        self.op_threshold = op_threshold
        self.aux_skip = aux_skip
        # True while the architecture tensors hold relaxed weights (SDARTS's weight step).
        self._holds_relaxed = False
        # DARTS-'s rate of the auxiliary skip, set every epoch (a buffer: a CUDA graph
        # reads its current value, a checkpoint does not hold it).
        self.register_buffer("aux_skip_rate", torch.ones(()), persistent=False)
        self.criterion = criterion
        self.steps = steps
        self._multiplier = multiplier
        self.location = AttLocation.parse(location)
        self.space = SEARCH_SPACES[self.location]
        self.operation_space = operation_space
        num_edges = sum(node_sizes(steps))
        operations = {kind: space_operations(operation_space, kind, num_edges) for kind in CELL_KINDS}
        self.edge_candidates = {
            f"{prefix}_{kind}": stage_on_edges(stage, operations[kind]) for kind in CELL_KINDS
            for prefix, stage in (("alphas", self.space.first_stage), ("betas", self.space.second_stage))
            if stage is not None}

        C_curr = stem_multiplier * C
        size, reduction_prev = self._build_stem(C_curr, image_size)
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
                size = halve(size)
            cell = SearchCell(self.space, steps, multiplier, C_prev_prev, C_prev, C_curr,
                              reduction, reduction_prev, size, size, partial_channels,
                              operations["reduce" if reduction else "normal"], aux_skip)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_arch_parameters()

    def _build_stem(self, C_stem: int, image_size: int) -> Tuple[int, bool]:
        """The stem (3 -> ``C_stem`` channels); returns the spatial size the first cell
        sees and whether its earlier input (``s0``) has twice that size."""
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_stem),
        )
        return image_size, False

    def stem_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first cell's two inputs (s0, s1)."""
        s = self.stem(x)
        return s, s

    def _initialize_arch_parameters(self) -> None:
        num_edges = sum(2 + i for i in range(self.steps))
        # Every edge of a space has as many candidates (RobustDARTS's s1: two each).
        shapes = {"alphas": (num_edges, len(self.edge_candidates["alphas_normal"][0]))}
        if self.space.second_stage is not None:
            shapes["betas"] = (num_edges, len(self.edge_candidates["betas_normal"][0]))
        if self.space.cell_end is not None:
            shapes["gammas"] = (len(self.space.cell_end),)
        if self.edge_norm:
            shapes[EDGE_WEIGHTS] = (num_edges,)
        self._arch_names: List[str] = []
        for prefix, shape in shapes.items():
            for kind in ("normal", "reduce"):
                name = f"{prefix}_{kind}"
                self.register_parameter(name, nn.Parameter(1e-3 * torch.randn(*shape)))
                self._arch_names.append(name)

    # -- parameters -----------------------------------------------------------
    def arch_parameters(self) -> List[nn.Parameter]:
        """alpha (and beta, gamma, edge weights) for normal and reduction cells."""
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

    @contextlib.contextmanager
    def holding_relaxed(self, weights: Optional[Dict[str, torch.Tensor]] = None) -> Iterator[None]:
        """Within this block the forward takes the architecture tensors as relaxed
        weights, as they are (SDARTS's ``updateType='weight'``): the tensors a
        ``functional_call`` passes, or ``weights`` (name -> relaxed weight), copied into
        the parameters here and the parameters restored afterwards (in place: a CUDA
        graph and DataParallel's replicas see them)."""
        saved = {}
        with torch.no_grad():
            for name, value in (weights or {}).items():
                param = getattr(self, name)
                saved[name] = param.detach().clone()
                param.copy_(value)
        self._holds_relaxed = True
        try:
            yield
        finally:
            self._holds_relaxed = False
            with torch.no_grad():
                for name, value in saved.items():
                    getattr(self, name).copy_(value)

    # -- forward --------------------------------------------------------------
    def relaxed(self, name: str) -> torch.Tensor:
        """Architecture parameter ``name`` as the forward weighs with it: softmaxed (or,
        ``relaxation="sigmoid"``, sigmoided) over each row's candidates, or (edge weights)
        softmaxed over each node's incoming edges."""
        param = getattr(self, name)
        if self._holds_relaxed:
            return param
        if name.startswith(EDGE_WEIGHTS):
            return node_softmax(param, self.steps)
        return torch.sigmoid(param) if self.relaxation == "sigmoid" else F.softmax(param, dim=-1)

    def _cell_weights(self, kind: str, aux_skip: bool = True) -> Tuple[Optional[torch.Tensor], ...]:
        """The relaxed (first, second, cell_end, edge) weights of ``kind`` cells; with the
        auxiliary skip, ``first`` carries its rate as one more column."""
        first = self.relaxed(f"alphas_{kind}")
        if self.aux_skip and aux_skip:
            rate = self.aux_skip_rate.to(first.dtype).expand(first.shape[0], 1)
            first = torch.cat([first, rate], dim=1)
        second = self.relaxed(f"betas_{kind}") if self.space.second_stage else None
        cell_end = self.relaxed(f"gammas_{kind}") if self.space.cell_end else None
        edges = self.relaxed(f"{EDGE_WEIGHTS}_{kind}") if self.edge_norm else None
        return first, second, cell_end, edges

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {"normal": self._cell_weights("normal"), "reduce": self._cell_weights("reduce")}
        recompute = self.recompute and self.training and torch.is_grad_enabled()
        s0, s1 = self.stem_outputs(x)
        for cell in self.cells:
            cell_weights = weights["reduce" if cell.reduction else "normal"]
            s0, s1 = s1, cell(s0, s1, *cell_weights, recompute=recompute)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def per_edge_layout(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``tensors`` keyed as this network's state_dict (all of it, or a part: the
        weights, their gradients) under the per-edge layout of earlier versions, in its
        order: each cell's ``_ops.{edge}``/``_attns.{edge}`` in place of its
        ``_ops_from.{state}``/``_attns_from.{state}`` (edge blocks as views).  The
        network loads that layout as its own (EdgeLayout)."""
        pattern = re.compile(r"(cells\.(\d+)\.)(_ops|_attns)_from\.(\d+)\.(.*)")
        out: Dict = {}
        for key, tensor in tensors.items():
            match = pattern.fullmatch(key)
            if match is None:
                out[key] = tensor
                continue
            prefix, cell, kind, state, rest = match.groups()
            # The block of the cell's kind stands where its first entry stood.
            out.setdefault((prefix, int(cell), kind), {}).setdefault(int(state), {})[rest] = tensor
        result = {}
        for key, value in out.items():
            if isinstance(key, tuple):
                prefix, cell, kind = key
                cell = self.cells[cell]
                result.update(cell.layout.per_edge_entries(kind, value, prefix,
                                                           getattr(cell, f"{kind}_from")))
            else:
                result[key] = value
        return result

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
        """The relaxed architecture weights (softmaxed, or sigmoided), as nested lists
        (for logs and plots)."""
        with torch.no_grad():
            return {name: self.relaxed(name).float().cpu().tolist() for name in self._arch_names}

    def genotype(self) -> Genotype:
        """The discrete cell these architecture weights stand for (``derive_genotype``;
        with sigmoids, FairDARTS's threshold rule)."""
        with torch.no_grad():
            weights = {kind: [w.detach().cpu() if w is not None else None
                              for w in self._cell_weights(kind, aux_skip=False)]
                       for kind in ("normal", "reduce")}
        threshold = self.op_threshold if self.relaxation == "sigmoid" else None
        return derive_genotype(weights, self.edge_candidates, self.space.cell_end, self.steps,
                               self._multiplier, self.operation_space, threshold)


class NetworkImageNet(Network):
    """PC-DARTS's ImageNet supernet (their model_search_imagenet.py): ``Network``'s
    cells, attention mixtures, partial channels and edge weights behind a stride-8 stem
    in two parts, as DARTS's ImageNet networks have: ``stem0`` (3x3/2 conv to half the
    stem width, BN, ReLU, 3x3/2 conv, BN) gives the first cell's earlier input ``s0``
    at 1/4 of the image, ``stem1`` (ReLU, 3x3/2 conv, BN) its input ``s1`` at 1/8, so
    the first cell reduces ``s0`` (FactorizedReduce).  At 224 pixels the cells see
    28, 14 and 7 (reductions at a third and two thirds of the cells); the head is
    ``Network``'s global average pool and classifier."""

    def __init__(self, C: int, num_classes: int, layers: int, criterion: nn.Module,
                 location: "AttLocation | str" = AttLocation.AFTER_EVERY, image_size: int = 224,
                 **kwargs):
        super().__init__(C, num_classes, layers, criterion, location, image_size=image_size,
                         **kwargs)

    def _build_stem(self, C_stem: int, image_size: int) -> Tuple[int, bool]:
        self.stem0, self.stem1 = imagenet_stems(C_stem)
        return halve(halve(halve(image_size))), True

    def stem_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


def derive_genotype(weights: Dict[str, Sequence[Optional[torch.Tensor]]],
                    candidates: Dict[str, List[Tuple[str, ...]]],
                    cell_end: Optional[Tuple[str, ...]], steps: int, multiplier: int,
                    operation_space: str = "darts", threshold: Optional[float] = None) -> Genotype:
    """The DARTS rule: per node the two strongest incoming edges (ignoring `none`), each
    with its best non-`none` first- and second-stage candidate; the cell-end attention
    is the best one.  ``weights[kind]`` holds the relaxed (first, second, cell_end)
    weights of ``kind`` ("normal" or "reduce"), edges numbered node by node, and
    optionally fourth the normalised edge weights (PC-DARTS: an edge's strength is then
    its strongest operation weight times its edge weight).  ``candidates``: per edge the
    names behind the columns (``Network.edge_candidates``).

    With ``threshold`` (FairDARTS's ``threshold_sparse``, on sigmoid weights) a kept
    edge stays only if its operation's weight reaches the threshold, and an attention
    only if its own does (else ''): a node may keep fewer than two edges.  Edges then
    name their node (``(op, input, attention, node)``), the edges leaving a node that
    kept none are dropped (FairDARTS's final cell skips them), and the concat lists
    the nodes that kept an edge."""
    cells = {kind: derive_edges(w[0], w[1], candidates[f"alphas_{kind}"],
                                candidates.get(f"betas_{kind}"), steps,
                                w[3] if len(w) > 3 else None, threshold)
             for kind, w in weights.items()}
    ends = {kind: best_candidate(w[2], cell_end, threshold)[0] if w[2] is not None else ""
            for kind, w in weights.items()}
    concat = {kind: list(range(2 + steps - multiplier, steps + 2)) if threshold is None
              else sorted({edge[3] for edge in cells[kind]}) for kind in cells}
    return Genotype(normal=cells["normal"], normal_concat=concat["normal"],
                    reduce=cells["reduce"], reduce_concat=concat["reduce"],
                    normal_bottleneck=ends["normal"], reduce_bottleneck=ends["reduce"],
                    space=operation_space)


def derive_edges(first: torch.Tensor, second: Optional[torch.Tensor],
                 first_names: Sequence[Sequence[str]], second_names: Optional[Sequence[Sequence[str]]],
                 steps: int, edge_weights: Optional[torch.Tensor] = None,
                 threshold: Optional[float] = None) -> List[Tuple]:
    """One cell's (operation, input, attention) per kept edge, node by node; with
    ``edge_weights``, edges rank by (strongest operation weight) x (edge weight); with
    ``threshold``, (operation, input, attention, node) for the edges that reach it
    from a node that kept an edge (see ``derive_genotype``).
    ``first_names[e]``/``second_names[e]``: edge e's candidates.  RobustDARTS's parse
    looks 'none' up in the list of edge ``j`` of the node rather than of edge
    ``start + j``; their spaces never tell the two apart, and this uses the edge's own."""
    gene = []
    live = {0, 1}  # the states an edge may leave: the cell's inputs, nodes with an edge
    start = 0
    for i in range(steps):
        end = start + i + 2
        strength = {e: best_candidate(first[e], first_names[e])[1]
                    * (float(edge_weights[e]) if edge_weights is not None else 1.0)
                    for e in range(start, end)}
        for e in sorted(strength, key=lambda e: -strength[e])[:2]:
            op, weight = best_candidate(first[e], first_names[e])
            attention = (best_candidate(second[e], second_names[e], threshold)[0]
                         if second is not None else "")
            if threshold is None:
                gene.append((op, e - start, attention))
            elif weight >= threshold and e - start in live:
                gene.append((op, e - start, attention, i + 2))
        if gene and len(gene[-1]) > 3 and gene[-1][3] == i + 2:
            live.add(i + 2)
        start = end
    return gene


def best_candidate(weights: torch.Tensor, names: Sequence[str],
                   threshold: Optional[float] = None) -> Tuple[str, float]:
    """The strongest candidate other than `none`, and its weight ('' when it falls
    short of ``threshold``)."""
    best = max((k for k, name in enumerate(names) if name != "none"), key=lambda k: float(weights[k]))
    weight = float(weights[best])
    return (names[best] if threshold is None or weight >= threshold else ""), weight
