"""Genotypes: the plain-data description of a cell, and the published cells.

A genotype lists, for each intermediate node of a cell, its two incoming edges as
triples ``(op, input_index, attention)``.  ``op`` is a name from ``PRIMITIVES``
(or, for the mixed search locations, an attention name); ``attention`` is a name
from ``ATTN_PRIMITIVES`` or ``''`` when the edge has none.  Input 0 and 1 are the
cell's two inputs, input ``k >= 2`` is intermediate node ``k - 2``.  The
bottlenecks are cell-end attentions applied after the concatenation (``''``: none).
"""
from collections import namedtuple

Genotype = namedtuple(
    "Genotype",
    "normal normal_concat reduce reduce_concat normal_bottleneck reduce_bottleneck",
)
# The cells published with DARTS have no attention: pairs get '' as third element
# and the bottlenecks default to ''.
Genotype.__new__.__defaults__ = ("", "")

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
