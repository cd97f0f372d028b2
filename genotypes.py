"""Genotypes: the plain-data description of a cell, and the published cells.

A genotype lists, for each intermediate node of a cell, its two incoming edges as
triples ``(op, input_index, attention)``.  ``op`` is a name from ``PRIMITIVES``
(or, for the mixed search locations, an attention name); ``attention`` is a name
from ``ATTN_PRIMITIVES`` or ``''`` when the edge has none.  Input 0 and 1 are the
cell's two inputs, input ``k >= 2`` is intermediate node ``k - 2``.  The
bottlenecks are cell-end attentions applied after the concatenation (``''``: none).
``space`` names the operation space it was searched in (``OPERATION_SPACES``,
train_search.py's ``--space``): a record, the final network does not depend on it.

A cell derived by FairDARTS's threshold (``--relaxation sigmoid``) may keep fewer
edges: each of its edges names the node it leads to as a fourth element,
``(op, input_index, attention, node)`` (node k: state k, >= 2), and its concat lists
the nodes that kept an edge (``edge_nodes`` reads either form).

A genotype's file form is ``genotype.json`` (written by the search, read by
``--arch_path`` and visualize.py): ``genotype_to_dict`` and ``save_genotype`` write it,
``load_genotype`` reads and validates it.
"""
import json
from collections import namedtuple
from typing import Any, Dict, List, Optional, Sequence, Tuple

from runtime.atomic import atomic_write_text
from runtime.errors import UserError

Genotype = namedtuple(
    "Genotype",
    "normal normal_concat reduce reduce_concat normal_bottleneck reduce_bottleneck space",
)
# The cells published with DARTS have no attention: pairs get '' as third element
# and the bottlenecks default to ''; they come from DARTS's operations.
Genotype.__new__.__defaults__ = ("", "", "darts")

# Order matters: it fixes the columns of the architecture parameters.
PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

ATTN_PRIMITIVES = [
    "Identity",
    "SE",
    "BAM",
    "CBAM",
    "GE_theta-plus",
    "DoubleAttention",
]

# Every operation a final cell may use (operations.OPS builds each one): the search
# primitives, the two that only NASNet and AmoebaNet use, and RobustDARTS's noise.
OPERATIONS = PRIMITIVES + ["sep_conv_7x7", "conv_7x1_1x7", "noise"]

# The operation spaces of the search (train_search.py --space): the candidate operations
# of every edge, edges numbered node by node (node i's edge from state j is edge
# 2i + i(i-1)/2 + j).  A space whose edges all share one list gives that list; one
# whose edges differ gives, per cell kind, one list per edge of a 4-node cell.
# darts: DARTS's PRIMITIVES.  s1-s4: the stress spaces of RobustDARTS (Zela et al.,
# "Understanding and Robustifying DARTS", ICLR 2020) exactly as their release defines
# them (automl/RobustDARTS @ 3dec3fe, src/spaces.py): s1 a pair per edge, its own in
# normal and reduction cells; s2 skip_connect and sep_conv_3x3; s3 with none; s4 noise
# (operations.Noise) and sep_conv_3x3.
_S1_NORMAL = [
    ["skip_connect", "dil_conv_3x3"], ["skip_connect", "dil_conv_5x5"],
    ["skip_connect", "dil_conv_5x5"], ["skip_connect", "sep_conv_3x3"],
    ["skip_connect", "dil_conv_3x3"], ["max_pool_3x3", "skip_connect"],
    ["skip_connect", "sep_conv_3x3"], ["skip_connect", "sep_conv_3x3"],
    ["skip_connect", "dil_conv_3x3"], ["skip_connect", "sep_conv_3x3"],
    ["max_pool_3x3", "skip_connect"], ["skip_connect", "dil_conv_3x3"],
    ["dil_conv_3x3", "dil_conv_5x5"], ["dil_conv_3x3", "dil_conv_5x5"],
]
_S1_REDUCE = [
    ["max_pool_3x3", "avg_pool_3x3"], ["max_pool_3x3", "dil_conv_3x3"],
    ["max_pool_3x3", "avg_pool_3x3"], ["max_pool_3x3", "avg_pool_3x3"],
    ["skip_connect", "dil_conv_5x5"], ["max_pool_3x3", "avg_pool_3x3"],
    ["max_pool_3x3", "sep_conv_3x3"], ["skip_connect", "dil_conv_3x3"],
    ["skip_connect", "dil_conv_5x5"], ["max_pool_3x3", "avg_pool_3x3"],
    ["max_pool_3x3", "avg_pool_3x3"], ["skip_connect", "dil_conv_5x5"],
    ["skip_connect", "dil_conv_5x5"], ["skip_connect", "dil_conv_5x5"],
]
OPERATION_SPACES: Dict[str, Any] = {
    "darts": PRIMITIVES,
    "s1": {"normal": _S1_NORMAL, "reduce": _S1_REDUCE},
    "s2": ["skip_connect", "sep_conv_3x3"],
    "s3": ["none", "skip_connect", "sep_conv_3x3"],
    "s4": ["noise", "sep_conv_3x3"],
}


def check_space(space: Any, what: str = "--space") -> str:
    """``space`` if it names an operation space, else a one-line UserError."""
    return _check_choice(space, list(OPERATION_SPACES), what, "operation space")


def space_operations(space: str, kind: str, num_edges: int) -> List[Tuple[str, ...]]:
    """Each edge's candidate operations in the ``kind`` ("normal" or "reduce") cells of
    operation space ``space``, edges numbered node by node.  ValueError when the space
    lists its edges one by one and the cell has another number of them."""
    operations = OPERATION_SPACES[space]
    if isinstance(operations, list):
        return [tuple(operations)] * num_edges
    rows = operations[kind]
    if len(rows) != num_edges:
        raise ValueError(f"operation space {space} defines {len(rows)} edges per cell (4 "
                         f"nodes), not {num_edges}")
    return [tuple(row) for row in rows]


def _without_attention(pairs):
    return [(op, index, "") for op, index in pairs]


NASNet = Genotype(
    normal=_without_attention([
        ("sep_conv_5x5", 1), ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
        ("avg_pool_3x3", 1), ("skip_connect", 0),
        ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
        ("sep_conv_3x3", 1), ("skip_connect", 1),
    ]),
    normal_concat=[2, 3, 4, 5, 6],
    reduce=_without_attention([
        ("sep_conv_5x5", 1), ("sep_conv_7x7", 0),
        ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
        ("avg_pool_3x3", 1), ("sep_conv_5x5", 0),
        ("skip_connect", 3), ("avg_pool_3x3", 2),
        ("sep_conv_3x3", 2), ("max_pool_3x3", 1),
    ]),
    reduce_concat=[4, 5, 6],
)

AmoebaNet = Genotype(
    normal=_without_attention([
        ("avg_pool_3x3", 0), ("max_pool_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
        ("sep_conv_3x3", 0), ("avg_pool_3x3", 3),
        ("sep_conv_3x3", 1), ("skip_connect", 1),
        ("skip_connect", 0), ("avg_pool_3x3", 1),
    ]),
    normal_concat=[4, 5, 6],
    reduce=_without_attention([
        ("avg_pool_3x3", 0), ("sep_conv_3x3", 1),
        ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
        ("sep_conv_7x7", 0), ("avg_pool_3x3", 1),
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5),
    ]),
    reduce_concat=[3, 4, 6],
)

DARTS_V1 = Genotype(
    normal=_without_attention([
        ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("skip_connect", 2),
    ]),
    normal_concat=[2, 3, 4, 5],
    reduce=_without_attention([
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 0),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("avg_pool_3x3", 0),
    ]),
    reduce_concat=[2, 3, 4, 5],
)

DARTS_V2 = Genotype(
    normal=_without_attention([
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("skip_connect", 0),
        ("skip_connect", 0), ("dil_conv_3x3", 2),
    ]),
    normal_concat=[2, 3, 4, 5],
    reduce=_without_attention([
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 1),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("max_pool_3x3", 1),
    ]),
    reduce_concat=[2, 3, 4, 5],
)

DARTS = DARTS_V2

# The cell found by Att-DARTS (second order, attention after every operation).
Att_DARTS = Genotype(
    normal=[
        ("sep_conv_3x3", 0, "DoubleAttention"), ("sep_conv_3x3", 1, "CBAM"),
        ("sep_conv_3x3", 0, "CBAM"), ("skip_connect", 2, "CBAM"),
        ("skip_connect", 0, "CBAM"), ("sep_conv_3x3", 1, "CBAM"),
        ("skip_connect", 0, "CBAM"), ("skip_connect", 2, "CBAM"),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0, "BAM"), ("dil_conv_3x3", 1, "DoubleAttention"),
        ("avg_pool_3x3", 0, "BAM"), ("skip_connect", 2, "CBAM"),
        ("skip_connect", 2, "CBAM"), ("avg_pool_3x3", 0, "BAM"),
        ("skip_connect", 2, "CBAM"), ("avg_pool_3x3", 0, "BAM"),
    ],
    reduce_concat=[2, 3, 4, 5],
)

# Every named genotype, for `--arch NAME` and `visualize.py NAME`.
NAMED_GENOTYPES = {
    "NASNet": NASNet,
    "AmoebaNet": AmoebaNet,
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
    "DARTS": DARTS,
    "Att_DARTS": Att_DARTS,
}


# -- the JSON form ---------------------------------------------------------------------

GENOTYPE_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat",
                   "normal_bottleneck", "reduce_bottleneck", "space")
# What an edge may hold: an operation (or, from the mixed locations, an attention)
# first; then an attention (or, from double_mixed, an operation) or nothing.
FIRST_ELEMENTS = [name for name in OPERATIONS if name != "none"] + ATTN_PRIMITIVES
SECOND_ELEMENTS = [""] + ATTN_PRIMITIVES + [name for name in OPERATIONS if name != "none"]
BOTTLENECKS = [""] + ATTN_PRIMITIVES


def edge_nodes(edges: Sequence[Sequence]) -> List[int]:
    """The state each edge of a cell leads to: its fourth element, or (two edges per
    node) 2 + its position // 2."""
    return [int(edge[3]) if len(edge) > 3 else 2 + position // 2
            for position, edge in enumerate(edges)]


def genotype_to_dict(genotype: Genotype) -> Dict[str, Any]:
    """The JSON form of a genotype; pairs (cells written in DARTS' own form, as
    ``(op, input)``) gain '' as their attention.  ``space`` is written only when it is
    not darts, so that a darts genotype's file is what it was before spaces existed
    (and what earlier versions read)."""
    def triples(edges):
        return [[edge[0], int(edge[1]), edge[2] if len(edge) > 2 else ""]
                + ([int(edge[3])] if len(edge) > 3 else []) for edge in edges]
    data = {
        "normal": triples(genotype.normal),
        "normal_concat": list(genotype.normal_concat),
        "reduce": triples(genotype.reduce),
        "reduce_concat": list(genotype.reduce_concat),
        "normal_bottleneck": genotype.normal_bottleneck or "",
        "reduce_bottleneck": genotype.reduce_bottleneck or "",
    }
    if genotype.space != "darts":
        data["space"] = genotype.space
    return data


def save_genotype(genotype: Genotype, path: str) -> None:
    atomic_write_text(path, json.dumps(genotype_to_dict(genotype), indent=2) + "\n")


def _check_choice(value: Any, valid: Sequence[str], where: str, what: str) -> str:
    if not isinstance(value, str) or value not in valid:
        shown = ", ".join(repr(v) for v in valid)
        raise UserError(f"{where}: unknown {what} {value!r}; valid: {shown}")
    return value


def _parse_edges(value: Any, where: str) -> List[Tuple]:
    """A cell's edges: two per node, or (a threshold cell) each naming its node; an
    empty list is a threshold cell that kept no edge."""
    named = isinstance(value, list) and all(isinstance(e, (list, tuple)) and len(e) == 4 for e in value)
    if not isinstance(value, list) or (not named and (len(value) < 2 or len(value) % 2)):
        raise UserError(f"{where}: expected a list of an even number of [op, input, attention] "
                        f"entries (two per node), or of [op, input, attention, node] entries, "
                        f"got {value!r}")
    edges: List[Tuple] = []
    for position, edge in enumerate(value):
        here = f"{where}[{position}]"
        if not isinstance(edge, (list, tuple)) or len(edge) not in (2, 3, 4) or (len(edge) == 4) != named:
            raise UserError(f"{here}: expected [op, input index] or [op, input index, attention] "
                            f"(or [op, input index, attention, node] for every edge), got {edge!r}")
        op = _check_choice(edge[0], FIRST_ELEMENTS, here, "operation")
        before = edge_nodes(edges)
        node = edge[3] if named else 2 + position // 2
        if isinstance(node, bool) or not isinstance(node, int) or node < max(before, default=2):
            raise UserError(f"{here}: node {node!r} is invalid: edges go node by node, the nodes "
                            f"numbered from 2 (0, 1: the cell inputs)")
        # An edge leaves a cell input or an earlier node that has an edge.
        live = sorted({0, 1, *(n for n in before if n < node)})
        index = edge[1]
        if isinstance(index, bool) or not isinstance(index, int) or index not in live:
            raise UserError(f"{here}: input index {index!r} is invalid for node {node - 2}; "
                            f"valid: {', '.join(map(str, live))} (0, 1: cell inputs, "
                            f"k >= 2: node k-2{', if it has an edge' if named else ''})")
        attention = _check_choice(edge[2] if len(edge) > 2 else "", SECOND_ELEMENTS, here, "attention")
        edges.append((op, index, attention, node) if named else (op, index, attention))
    return edges


def _check_edges_in_space(edges: Sequence[Tuple], space: str, kind: str, where: str) -> None:
    """Every operation of ``edges`` (a ``kind`` cell) is one its edge offers in ``space``.
    A threshold cell (edges naming their node) may have lost its last nodes: it is
    checked against the space's own edges."""
    nodes = edge_nodes(edges)
    table = OPERATION_SPACES[space]
    named = any(len(edge) > 3 for edge in edges)
    num_edges = (len(table[kind]) if named and isinstance(table, dict)
                 else sum(2 + i for i in range(max(nodes, default=1) - 1)))
    try:
        offered = space_operations(space, kind, num_edges)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None
    for position, (edge, node) in enumerate(zip(edges, nodes)):
        row = sum(2 + i for i in range(node - 2)) + edge[1]
        if row >= len(offered):
            raise UserError(f"{where}[{position}]: node {node - 2} is beyond the cells of space "
                            f"{space}")
        for name in (edge[0], edge[2]):
            if name in OPERATIONS and name not in offered[row]:
                raise UserError(f"{where}[{position}]: operation {name!r} is not a candidate of "
                                f"its edge (node {node - 2} <- {edge[1]}) in space {space}: "
                                f"{', '.join(offered[row])}")


def _parse_concat(value: Any, edges: Sequence[Tuple], where: str) -> List[int]:
    valid = sorted({0, 1, *edge_nodes(edges)})
    if (not isinstance(value, list) or bool(edges) != bool(value)
            or any(isinstance(i, bool) or not isinstance(i, int) or i not in valid for i in value)):
        raise UserError(f"{where}: expected a non-empty list of states among "
                        f"{', '.join(map(str, valid))} (an empty one only for a cell without "
                        f"edges), got {value!r}")
    return list(value)


def genotype_from_dict(data: Any, source: str = "genotype") -> Genotype:
    """Validate and build a genotype from its JSON form; errors name the source and field.

    Edges may be pairs (the cells published with DARTS): they get '' as attention.
    Missing bottleneck fields mean '', a missing space darts.  In a space other than
    darts every operation must be a candidate of its edge."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with fields {', '.join(GENOTYPE_FIELDS)}")
    unknown = sorted(set(data) - set(GENOTYPE_FIELDS))
    if unknown:
        raise UserError(f"{source}: unknown field {unknown[0]!r}; valid: {', '.join(GENOTYPE_FIELDS)}")
    fields: Dict[str, Any] = {"space": check_space(data.get("space", "darts"),
                                                   f"{source}: field 'space'")}
    for kind in ("normal", "reduce"):
        for key in (kind, f"{kind}_concat"):
            if key not in data:
                raise UserError(f"{source}: missing field {key!r}")
        edges = _parse_edges(data[kind], f"{source}: field {kind!r}")
        fields[kind] = edges
        fields[f"{kind}_concat"] = _parse_concat(data[f"{kind}_concat"], edges,
                                                 f"{source}: field '{kind}_concat'")
        fields[f"{kind}_bottleneck"] = _check_choice(
            data.get(f"{kind}_bottleneck", ""), BOTTLENECKS,
            f"{source}: field '{kind}_bottleneck'", "attention")
        if fields["space"] != "darts":
            _check_edges_in_space(edges, fields["space"], kind, f"{source}: field {kind!r}")
    return Genotype(**fields)


def load_genotype(path: str) -> Genotype:
    """Read a ``genotype.json``, with one-line errors naming the file and the field."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise UserError(f"cannot read genotype file {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    return genotype_from_dict(data, path)


def resolve_genotype(arch: Optional[str], arch_path: Optional[str]) -> Genotype:
    """``--arch_path`` (a JSON file) wins over ``--arch`` (a name in ``NAMED_GENOTYPES``)."""
    if arch_path:
        return load_genotype(arch_path)
    if arch not in NAMED_GENOTYPES:
        raise UserError(f"unknown --arch {arch!r}; valid: {', '.join(NAMED_GENOTYPES)} "
                        f"(or give a genotype.json with --arch_path)")
    return NAMED_GENOTYPES[arch]
