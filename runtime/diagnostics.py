"""Signs of a search collapsing, computed every epoch from the architecture parameters
and the derived genotype (cheap: no forward pass).

DARTS-family searches tend to drift towards parameter-free operations (skip_connect,
poolings), and their genotypes can keep changing late in the search.  Per epoch:

- ``parameter_free``: edges of the derived normal / reduction cell whose operation
  (first stage) is skip_connect or a pooling; ``skip_connect``: those that are
  skip_connect (the count DARTS+ stops on);
- ``entropy``: for every architecture parameter set, the entropy of each softmaxed
  row (an edge's candidates; the one row of a cell-end gamma; a node's incoming
  edges for PC-DARTS's edge weights) divided by log(number
  of candidates), so 1 is uniform and 0 is one-hot; its mean and minimum over rows;
- ``edges_changed``: edges of the genotype (normal and reduction cell, per node, so
  that the order of a node's two edges does not count; a bottleneck counts as one)
  that differ from the previous epoch's; ``genotype_changed``: whether any did;
- ``attention``: per cell type, how many edges chose each attention module.
"""
import math
from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from genotypes import ATTN_PRIMITIVES, Genotype, edge_nodes
from model_search import EDGE_WEIGHTS, Network, node_sizes

PARAMETER_FREE = ("skip_connect", "max_pool_3x3", "avg_pool_3x3")
CELLS = ("normal", "reduce")

Edge = Tuple[str, int, str]


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of softmaxed ``weights`` (last dimension: candidates) over
    log(candidates): 1 for a uniform row, 0 for a one-hot row."""
    return -torch.special.xlogy(weights, weights).sum(-1) / math.log(weights.shape[-1])


def entropy_summary(network: Network) -> Dict[str, Dict[str, float]]:
    """Mean and minimum normalised row entropy of every architecture parameter set."""
    summary = {}
    with torch.no_grad():
        for name, param in network.named_arch_parameters().items():
            if name.startswith(EDGE_WEIGHTS):  # one distribution per node, over its edges
                entropy = torch.stack([row_entropy(F.softmax(node.double(), dim=-1))
                                       for node in param.split(node_sizes(network.steps))])
            else:
                entropy = row_entropy(F.softmax(param.double(), dim=-1)).flatten()
            summary[name] = {"mean": float(entropy.mean()), "min": float(entropy.min())}
    return summary


def count_operations(edges: Sequence[Edge], names: Sequence[str]) -> int:
    """Edges whose operation (first element) is one of ``names``."""
    return sum(edge[0] in names for edge in edges)


def attention_counts(edges: Sequence[Edge], attentions: Sequence[str]) -> Dict[str, int]:
    """How many edges chose each of ``attentions`` (as operation or as attention)."""
    chosen = Counter(name for edge in edges for name in (edge[0], edge[2]) if name in attentions)
    return {name: chosen[name] for name in attentions}


def edge_attentions(network: Network) -> List[str]:
    """The attention modules an edge of this search space can choose (none for
    ``end`` and ``no_attention``, whose edges hold operations only)."""
    space = network.space
    candidates = set(space.first_stage) | set(space.second_stage or ())
    return [name for name in ATTN_PRIMITIVES if name in candidates]


def edges_by_node(edges: Sequence[Sequence]) -> Dict[int, Counter]:
    """A cell's edges as a multiset of (op, input, attention) per node."""
    nodes: Dict[int, Counter] = {}
    for edge, node in zip(edges, edge_nodes(edges)):
        nodes.setdefault(node, Counter())[tuple(edge[:3])] += 1
    return nodes


def changed_edges(genotype: Genotype, previous: Genotype) -> int:
    """Edges that differ between two genotypes, compared node by node (a node's
    edges as a multiset; a node that kept more edges than before counts the extra
    ones), plus one per bottleneck that differs."""
    changed = 0
    for cell in CELLS:
        now, before = edges_by_node(getattr(genotype, cell)), edges_by_node(getattr(previous, cell))
        for node in now.keys() | before.keys():
            a, b = now.get(node, Counter()), before.get(node, Counter())
            changed += max(sum(a.values()), sum(b.values())) - sum((a & b).values())
        changed += getattr(genotype, f"{cell}_bottleneck") != getattr(previous, f"{cell}_bottleneck")
    return changed


def epoch_diagnostics(network: Network, genotype: Genotype, previous: Genotype) -> Dict[str, Any]:
    """Everything in the module docstring for this epoch's ``genotype`` (derived from
    ``network``), against the ``previous`` epoch's (before the first epoch: the
    genotype of the initial architecture parameters)."""
    edges = {cell: getattr(genotype, cell) for cell in CELLS}
    changed = changed_edges(genotype, previous)
    attentions = edge_attentions(network)
    return {
        "parameter_free": {cell: count_operations(edges[cell], PARAMETER_FREE) for cell in CELLS},
        "skip_connect": {cell: count_operations(edges[cell], ("skip_connect",)) for cell in CELLS},
        "edges": {cell: len(edges[cell]) for cell in CELLS},
        "genotype_changed": changed > 0,
        "edges_changed": changed,
        "entropy": entropy_summary(network),
        "attention": {cell: attention_counts(edges[cell], attentions) for cell in CELLS}
        if attentions else {},
    }


def describe(stats: Dict[str, Any], since: str) -> List[str]:
    """``epoch_diagnostics`` as log lines; ``since``: what the genotype is compared with."""
    cells = ", ".join(f"{cell} {stats['parameter_free'][cell]}/{stats['edges'][cell]} "
                      f"({stats['skip_connect'][cell]} skip_connect)" for cell in CELLS)
    change = (f"changed since {since}: {stats['edges_changed']} edges" if stats["genotype_changed"]
              else f"unchanged since {since}")
    entropy = ", ".join(f"{name} mean {value['mean']:.4f} min {value['min']:.4f}"
                        for name, value in stats["entropy"].items())
    lines = [f"diagnostics: parameter-free operations (skip_connect, pooling) {cells}; "
             f"genotype {change}",
             f"diagnostics: row entropy (1 uniform, 0 one-hot) {entropy}"]
    if stats["attention"]:
        attention = "; ".join(
            f"{cell} " + ", ".join(f"{name} {count}" for name, count in counts.items())
            for cell, counts in stats["attention"].items())
        lines.append(f"diagnostics: edges per attention module {attention}")
    return lines


def scalars(stats: Dict[str, Any]) -> Dict[str, float]:
    """``epoch_diagnostics`` as flat named numbers (metrics.csv columns, TensorBoard tags)."""
    row: Dict[str, float] = {}
    for key in ("parameter_free", "skip_connect"):
        row.update((f"{key}_{cell}", stats[key][cell]) for cell in CELLS)
    row["genotype_changed"] = int(stats["genotype_changed"])
    row["edges_changed"] = stats["edges_changed"]
    for name, value in stats["entropy"].items():
        row[f"entropy_{name}_mean"] = value["mean"]
        row[f"entropy_{name}_min"] = value["min"]
    for cell, counts in stats["attention"].items():
        row.update((f"attention_{cell}_{name}", count) for name, count in counts.items())
    return row
