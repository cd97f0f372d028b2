"""Draw the normal and the reduction cell of a genotype as PDF diagrams.

    python visualize.py Att_DARTS
    python visualize.py path/genotype.json --save_dir figures --without_view
"""
import argparse
import os
import sys
from typing import List, Sequence, Tuple

import graphviz

from genotypes import NAMED_GENOTYPES, Genotype, edge_nodes, load_genotype
from runtime.errors import UserError, run_cli

parser = argparse.ArgumentParser(
    description="Draw the normal and the reduction cell of a genotype, left to right, as "
                "SAVE_DIR/FILE_NAME_normal.pdf and SAVE_DIR/FILE_NAME_reduction.pdf. Needs "
                "Graphviz's 'dot' program; without it the DOT sources (.gv) are written instead.")
parser.add_argument("genotype",
                    help="a genotype name from genotypes.py (%s), or a genotype.json file "
                         "(an argument ending in .json, or any other existing file that is "
                         "not a genotype name)" % ", ".join(NAMED_GENOTYPES))
parser.add_argument("--save_dir", default=".",
                    help="directory for the drawings, created if missing (default: the current "
                         "directory)")
parser.add_argument("--file_name", default=None,
                    help="file name prefix (default: the genotype name, or the stem of the "
                         "json file, e.g. 'genotype' for genotype.json)")
parser.add_argument("--without_view", action="store_true",
                    help="do not open the drawings in a viewer (a viewer is only ever opened "
                         "when a display is available)")

INPUT_NODES = ("c_{k-2}", "c_{k-1}")
OUTPUT_NODE = "c_{k}"
# Holds the concatenated states when a bottleneck attention follows the concatenation.
CONCAT_NODE = "concat"
RENDER_HINT = ("Graphviz's 'dot' program was not found, so DOT sources (.gv) were written "
               "instead; install Graphviz (e.g. apt-get install graphviz) and render each with "
               "`dot -Tpdf FILE.gv -o FILE.pdf`")


def _state_node(index: int) -> str:
    """Graph node of cell state ``index``: 0 and 1 are the cell inputs, k >= 2 is node k-2."""
    return INPUT_NODES[index] if index < 2 else str(index - 2)


def _display_available() -> bool:
    """Whether opening a viewer can work: macOS and Windows always have a desktop, other
    systems need an X11 or Wayland display (a headless server has neither)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_viewer(path: str) -> None:
    """Open ``path`` in the system viewer, if possible; never fails the drawing."""
    if not _display_available():
        return
    try:
        graphviz.view(path, quiet=True)
    except (RuntimeError, OSError) as error:
        # A missing xdg-open or an unsupported platform should not lose the written files.
        print(f"warning: could not open a viewer for {path}: {error}", file=sys.stderr)


def cell_graph(edges: Sequence[Sequence], concat: Sequence[int], bottleneck: str) -> graphviz.Digraph:
    """The Graphviz graph of one cell: inputs, intermediate nodes 0..n-1 and output c_{k}.

    ``edges`` holds two ``(op, input_index[, attention])`` entries per node; pairs (the cells
    published without attention) are drawn like triples with no attention.  A threshold
    cell's edges name their node (``(op, input, attention, node)``): only the nodes that
    kept an edge are drawn."""
    graph = graphviz.Digraph(
        format="pdf",
        engine="dot",
        graph_attr={"rankdir": "LR"},
        node_attr={"style": "filled", "shape": "rect", "align": "center", "fontsize": "20",
                   "height": "0.5", "width": "0.5", "penwidth": "2", "fontname": "times"},
        edge_attr={"fontsize": "20", "fontname": "times"},
    )
    for name in INPUT_NODES:
        graph.node(name, fillcolor="darkseagreen2")
    nodes = edge_nodes(edges)
    for node in sorted(set(nodes)):
        graph.node(_state_node(node), fillcolor="lightblue")

    for edge, node in zip(edges, nodes):
        op, index = edge[0], int(edge[1])
        attention = edge[2] if len(edge) > 2 else ""
        label = f"{op} {attention}" if attention else op
        graph.edge(_state_node(index), _state_node(node), label=label)

    graph.node(OUTPUT_NODE, fillcolor="palegoldenrod")
    if bottleneck:
        graph.node(CONCAT_NODE, fillcolor="lightgray")
        concat_target = CONCAT_NODE
        graph.edge(CONCAT_NODE, OUTPUT_NODE, label=bottleneck)
    else:
        concat_target = OUTPUT_NODE
    for index in concat:
        graph.edge(_state_node(int(index)), concat_target)
    return graph


def plot_cell(edges: Sequence[Sequence], concat: Sequence[int], bottleneck: str,
              path: str, view: bool = False) -> str:
    """Draw one cell to ``path`` + '.pdf' and return the file written.

    Without Graphviz's ``dot`` program the DOT source ``path`` + '.gv' is written and
    returned instead. ``view`` opens the PDF when a display is available."""
    graph = cell_graph(edges, concat, bottleneck)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    source_path = path + ".gv"
    try:
        # cleanup: the intermediate .gv is only wanted when it is the result.
        written = graph.render(filename=source_path, outfile=path + ".pdf", cleanup=True)
    except graphviz.ExecutableNotFound:
        return graph.save(source_path)
    if view:
        _open_viewer(written)
    return written


def plot_genotype(genotype: Genotype, save_dir: str, file_name: str, view: bool = False) -> List[str]:
    """Draw the normal and the reduction cell as ``save_dir/file_name_{normal,reduction}``."""
    base = os.path.join(save_dir, file_name)
    return [
        plot_cell(genotype.normal, genotype.normal_concat, genotype.normal_bottleneck,
                  base + "_normal", view),
        plot_cell(genotype.reduce, genotype.reduce_concat, genotype.reduce_bottleneck,
                  base + "_reduction", view),
    ]


def _resolve(argument: str) -> Tuple[Genotype, str]:
    """The genotype an argument names, and its default file name."""
    # A name wins over a same-named extensionless file, so `visualize.py DARTS` stays stable.
    if argument.endswith(".json") or (argument not in NAMED_GENOTYPES and os.path.isfile(argument)):
        stem = os.path.splitext(os.path.basename(argument))[0]
        return load_genotype(argument), stem
    if argument not in NAMED_GENOTYPES:
        raise UserError(f"unknown genotype {argument!r}; valid names: "
                              f"{', '.join(NAMED_GENOTYPES)} (or give a genotype.json file)")
    return NAMED_GENOTYPES[argument], argument


def main() -> None:
    args = parser.parse_args()
    genotype, default_name = _resolve(args.genotype)
    paths = plot_genotype(genotype, args.save_dir, args.file_name or default_name,
                          view=not args.without_view)
    for path in paths:
        print(path)
    if any(path.endswith(".gv") for path in paths):
        print(RENDER_HINT)


if __name__ == "__main__":
    run_cli(main)
