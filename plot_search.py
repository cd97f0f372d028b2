"""Plot how the architecture parameters and the metrics of a search run evolved.

Reads ``RUN_DIR/arch_history.jsonl`` (one JSON object per finished epoch, written by
the search script) and writes, into ``--out_dir`` (default ``RUN_DIR/plots``):

- ``<param>.png`` for every architecture parameter set found under ``"arch"``
  (``alphas_normal``, ``betas_reduce``, ``gammas_normal``, ...): for a per-edge
  parameter, one small heatmap per edge (rows: candidates, each edge's own where
  they differ as in RobustDARTS's s1; columns: epochs; colour: softmaxed weight
  on a shared 0..1 scale); for a per-cell parameter
  (the cell-end ``gammas``), one heatmap candidates x epochs;
- ``curves.png``: train/valid accuracy, train/valid loss and, if logged, the
  learning rate over the epochs;
- ``diagnostics.png`` (runs that logged diagnostics): the signs of a collapse per
  epoch: parameter-free operations (and skip_connect) in the derived cells, the
  normalised entropy of the softmaxed rows, the genotype edges that changed, and the
  dominant Hessian eigenvalue when it was measured; an early stop is marked;
- ``attention.png`` (searches with attention on the edges): how many edges of each
  cell type chose each attention module.

Usage: ``python plot_search.py RUN_DIR [--out_dir DIR]``.
"""
import argparse
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator

from runtime.errors import UserError, run_cli
from runtime.figures import (attention_names, epoch_labels, new_figure, plot_attention, plot_curves,
                             plot_diagnostics, save_figure)
from runtime.history import HISTORY

CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # NaN: epoch without it
_PARAM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Plot the architecture-parameter history of a search run.")
    parser.add_argument("run_dir", help="search run directory holding " + HISTORY)
    parser.add_argument("--out_dir", default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    return parser.parse_args()


# -- reading -----------------------------------------------------------------------

def read_history(path: str) -> List[Dict[str, Any]]:
    """The epoch records of an ``arch_history.jsonl`` file, in file order.

    Blank lines are skipped; a missing or empty file, a line that is not a JSON
    object, a record without an ``"arch"`` object, or architecture parameters whose
    shapes or candidate lists do not fit raise ``UserError``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (has the search finished an epoch?)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None
    history: List[Dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("arch"), dict):
            raise UserError(f"{path}:{number}: no \"arch\" object")
        history.append(record)
    if not history:
        raise UserError(f"{path}: empty, no epoch recorded")
    try:
        collect_params(history)  # shapes and candidate names, reported against this file
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return history


def _as_matrix(value: Any, param: str, epoch: Any) -> np.ndarray:
    """One epoch's value of a parameter as a float array of 1 or 2 dimensions."""
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim not in (1, 2) or array.size == 0:
        raise UserError(f"epoch {epoch}: arch.{param} is not a non-empty list (of lists) of numbers")
    return array


def collect_params(history: Sequence[Dict[str, Any]]) -> Dict[str, Tuple[np.ndarray, List[str]]]:
    """Every architecture parameter found in the history, in first-seen order.

    Returns ``{param: (values, candidate_names)}`` where ``values`` has shape
    ``(epochs, edges, candidates)`` for per-edge parameters and ``(epochs, candidates)``
    for per-cell ones; epochs where the parameter is absent are NaN.  The names are
    one list, or one list per edge where the edges' candidates differ."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    names: Dict[str, List[str]] = {}
    per_epoch: List[Dict[str, np.ndarray]] = []
    for record, epoch in zip(history, epoch_labels(history)):
        arrays = {}
        for param, value in record["arch"].items():
            if not _PARAM_NAME.match(str(param)):
                raise UserError(f"epoch {epoch}: unusable parameter name {param!r}")
            array = _as_matrix(value, param, epoch)
            if param not in shapes:
                shapes[param] = array.shape
            elif shapes[param] != array.shape:
                raise UserError(f"epoch {epoch}: arch.{param} has shape {list(array.shape)}, "
                                      f"earlier epochs {list(shapes[param])}")
            arrays[param] = array
            candidates = (record.get("candidates") or {}).get(param)
            if candidates is not None and param not in names:
                names[param] = _candidate_names(candidates, array.shape, f"epoch {epoch}: "
                                                f"candidates.{param}")
        per_epoch.append(arrays)
    params: Dict[str, Tuple[np.ndarray, List[str]]] = {}
    for param, shape in shapes.items():
        values = np.full((len(history),) + shape, np.nan)
        for index, arrays in enumerate(per_epoch):
            if param in arrays:
                values[index] = arrays[param]
        params[param] = (values, names.get(param, [str(k) for k in range(shape[-1])]))
    return params


def _candidate_names(candidates: Any, shape: Tuple[int, ...], where: str) -> List:
    """A record's names of a parameter's columns (one list, or one per row), checked
    against the parameter's shape."""
    per_row = isinstance(candidates, list) and bool(candidates) and isinstance(candidates[0], list)
    rows = candidates if per_row else [candidates]
    if (not isinstance(candidates, list) or (per_row and len(candidates) != shape[0])
            or any(not isinstance(row, list) or len(row) != shape[-1] for row in rows)):
        raise UserError(f"{where} does not list {shape[-1]} names (once, or per edge)")
    names = [[str(name) for name in row] for row in rows]
    return names if per_row else names[0]


# -- plotting ------------------------------------------------------------------------

def _edge_layout(num_edges: int) -> Optional[List[Tuple[int, int]]]:
    """``(node, input)`` of each edge when ``num_edges`` fits a DARTS cell, else None."""
    pairs: List[Tuple[int, int]] = []
    node = 0
    while len(pairs) < num_edges:
        pairs.extend((node, source) for source in range(node + 2))
        node += 1
    return pairs if len(pairs) == num_edges else None


def _source_name(source: int) -> str:
    return f"input {source}" if source < 2 else f"input {source} (node {source - 2})"


def _consecutive(epochs: Sequence[Any]) -> bool:
    """Whether the epoch labels are consecutive integers (the usual case)."""
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in epochs):
        return False
    return list(epochs) == list(range(epochs[0], epochs[0] + len(epochs)))


def _heatmap(ax: Any, matrix: np.ndarray, epochs: Sequence[Any], names: Sequence[str],
             show_names: bool) -> Any:
    """Draw ``matrix`` (candidates x epochs) on ``ax`` with the shared 0..1 colour scale.

    Columns sit at their epoch numbers when these are consecutive integers; otherwise
    at their positions, with at most ~6 ticks labelled by the epoch values."""
    rows = len(names)
    if _consecutive(epochs):
        extent = (epochs[0] - 0.5, epochs[-1] + 0.5, rows - 0.5, -0.5)
    else:
        extent = (-0.5, len(epochs) - 0.5, rows - 0.5, -0.5)
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest",
                      cmap=CMAP, vmin=0.0, vmax=1.0, extent=extent)
    ax.set_yticks(range(rows))
    if show_names:
        ax.set_yticklabels(names, fontsize=7)
    else:
        ax.set_yticklabels([])
    if _consecutive(epochs):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True, min_n_ticks=1))
    else:
        count = len(epochs)
        positions = sorted(set(np.linspace(0, count - 1, num=min(count, 6)).round().astype(int).tolist()))
        ax.set_xticks(positions)
        ax.set_xticklabels([str(epochs[p]) for p in positions])
    ax.tick_params(length=2, labelsize=7)
    return image


def plot_edges(values: np.ndarray, names: Sequence, epochs: Sequence[Any], param: str,
               path: str) -> None:
    """One heatmap per edge of a per-edge parameter (values: epochs x edges x candidates;
    ``names``: the candidates, or one list per edge, each panel then labelled with its own)."""
    num_edges = values.shape[1]
    per_edge = not isinstance(names[0], str)
    edge_names = names if per_edge else [names] * num_edges
    layout = _edge_layout(num_edges)
    if layout is not None:
        rows, cols = layout[-1][0] + 1, layout[-1][0] + 2
        cells = layout
    else:
        cols = min(num_edges, 5)
        rows = math.ceil(num_edges / cols)
        cells = [(k // cols, k % cols) for k in range(num_edges)]
    # Fixed layout in inches (much cheaper than constrained layout with 14 axes):
    # candidate names on the left, a colorbar on the right, titles and ticks between rows.
    panel_w, panel_h = 2.1, max(1.0, 0.17 * len(edge_names[0]) + 0.2)
    left = 0.35 + 0.062 * max(len(name) for row in edge_names for name in row)
    # Every panel names its own rows where the edges' candidates differ.
    right, top, bottom, wgap, hgap = 1.2, 0.55, 0.5, left if per_edge else 0.15, 0.55
    width = left + cols * panel_w + (cols - 1) * wgap + right
    height = bottom + rows * panel_h + (rows - 1) * hgap + top
    fig = new_figure(width, height, layout=None)
    grid = fig.add_gridspec(rows, cols, left=left / width, right=1 - right / width,
                            bottom=bottom / height, top=1 - top / height,
                            wspace=wgap / panel_w, hspace=hgap / panel_h)
    image = None
    for edge, (row, col) in enumerate(cells):
        ax = fig.add_subplot(grid[row, col])
        image = _heatmap(ax, values[:, edge, :].T, epochs, edge_names[edge],
                         show_names=per_edge or col == 0)
        title = f"node {row} \u2190 {_source_name(col)}" if layout is not None else f"edge {edge}"
        ax.set_title(title, fontsize=8)
        if row == rows - 1:
            ax.set_xlabel("epoch", fontsize=7)
    bar_h = min(4.0, 0.6 * (height - top - bottom))
    cax = fig.add_axes([(width - right + 0.3) / width, (height - bar_h) / 2 / height,
                        0.18 / width, bar_h / height])
    fig.colorbar(image, cax=cax, label="softmax weight")
    fig.suptitle(f"{param}: softmaxed weight per edge (rows: candidates, columns: epochs)", fontsize=10, y=1 - 0.15 / height)
    save_figure(fig, path)


def plot_cell(values: np.ndarray, names: Sequence[str], epochs: Sequence[Any], param: str,
              path: str) -> None:
    """One heatmap candidates x epochs of a per-cell parameter (values: epochs x candidates)."""
    fig = new_figure(7.0, max(2.8, 0.3 * len(names) + 1.6))
    ax = fig.subplots()
    image = _heatmap(ax, values.T, epochs, names, show_names=True)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("candidate", fontsize=8)
    fig.colorbar(image, ax=ax, label="softmax weight")
    fig.suptitle(f"{param}: softmaxed weight (rows: candidates, columns: epochs)", fontsize=10)
    save_figure(fig, path)


def plot_history(history: Sequence[Dict[str, Any]], out_dir: str) -> List[str]:
    """Write ``<param>.png`` for every architecture parameter, ``curves.png`` and, when
    the history holds diagnostics, ``diagnostics.png`` and ``attention.png``.

    Returns the paths written: parameters first (in first-seen order), then curves,
    then the diagnostics."""
    if not history:
        raise UserError("empty history: nothing to plot")
    params = collect_params(history)
    epochs = epoch_labels(history)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"{out_dir}: cannot create the output folder: {error}") from None
    written: List[str] = []
    try:
        for param, (values, names) in params.items():
            path = os.path.join(out_dir, f"{param}.png")
            if values.ndim == 3:
                plot_edges(values, names, epochs, param, path)
            else:
                plot_cell(values, names, epochs, param, path)
            written.append(path)
        path = os.path.join(out_dir, "curves.png")
        plot_curves(history, path)
        written.append(path)
        if any(isinstance(record.get("diagnostics"), dict) for record in history):
            path = os.path.join(out_dir, "diagnostics.png")
            plot_diagnostics(history, path)
            written.append(path)
            names = attention_names(history)
            if names:
                path = os.path.join(out_dir, "attention.png")
                plot_attention(history, names, path)
                written.append(path)
    except OSError as error:
        raise UserError(f"{out_dir}: cannot write a plot: {error}") from None
    return written


def main() -> None:
    args = parse_args()
    if not os.path.isdir(args.run_dir):
        raise UserError(f"{args.run_dir}: not a directory")
    history = read_history(os.path.join(args.run_dir, HISTORY))
    out_dir = args.out_dir if args.out_dir is not None else os.path.join(args.run_dir, "plots")
    for path in plot_history(history, out_dir):
        print(path)


if __name__ == "__main__":
    run_cli(main)
