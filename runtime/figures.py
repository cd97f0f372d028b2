"""The figures of a search's history other than the architecture heatmaps (those are
plot_search.py's): learning curves, the collapse diagnostics and the attention
chosen per edge, plus the figure helpers plot_search.py shares.  Each ``plot_*``
takes the records of ``arch_history.jsonl`` and writes one PNG atomically."""
import math
from typing import Any, Dict, List, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from runtime.atomic import atomic_write

_METRICS = ("train_acc", "valid_acc", "train_loss", "valid_loss", "lr")


def epoch_labels(history: Sequence[Dict[str, Any]]) -> List[Any]:
    """The epoch label of each record (its ``"epoch"`` field, else its 1-based position)."""
    return [record.get("epoch", index + 1) for index, record in enumerate(history)]


def epoch_numbers(history: Sequence[Dict[str, Any]]) -> np.ndarray:
    """The epoch of each record as a number for an x axis (its position where the
    label is not a number)."""
    return np.asarray([e if isinstance(e, (int, float)) else i + 1
                       for i, e in enumerate(epoch_labels(history))], dtype=float)


def save_figure(fig: Figure, path: str) -> None:
    """Write a figure as PNG atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def new_figure(width: float, height: float, layout: Optional[str] = "constrained") -> Figure:
    """A figure on the Agg canvas (no display, no pyplot global state)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def series(history: Sequence[Dict[str, Any]], key: str) -> np.ndarray:
    """A metric per epoch as floats, NaN where it is missing or not a number."""
    out = []
    for record in history:
        value = record.get(key)
        out.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                   else math.nan)
    return np.asarray(out, dtype=float)


def plot_curves(history: Sequence[Dict[str, Any]], path: str) -> None:
    """Accuracy, loss and (if logged) learning rate over the epochs."""
    epochs = epoch_numbers(history)
    per_metric = {key: series(history, key) for key in _METRICS}
    panels = [("accuracy (%)", ("train_acc", "valid_acc")), ("loss", ("train_loss", "valid_loss"))]
    if not np.all(np.isnan(per_metric["lr"])):
        panels.append(("learning rate", ("lr",)))
    fig = new_figure(4.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, keys) in zip(axes, panels):
        drawn = False
        for key in keys:
            if np.all(np.isnan(per_metric[key])):
                continue
            ax.plot(epochs, per_metric[key], marker="o", markersize=3, label=key.split("_")[0])
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    fig.suptitle("search metrics", fontsize=11)
    save_figure(fig, path)


def value_at(record: Dict[str, Any], *keys: str) -> float:
    """The number at ``record[keys[0]][keys[1]]...``, NaN where it is missing."""
    value: Any = record
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _mark_early_stop(axes: Sequence[Any], history: Sequence[Dict[str, Any]]) -> None:
    """Vertical lines at the epoch a search stopped and at the epoch whose genotype it kept."""
    stops = [record["early_stop"] for record in history if isinstance(record.get("early_stop"), dict)]
    if not stops:
        return
    stop = stops[-1]
    for number, ax in enumerate(axes):
        ax.axvline(value_at(stop, "epoch"), color="tab:red", linestyle="--", linewidth=1,
                   label="early stop" if number == 0 else None)
        ax.axvline(value_at(stop, "kept_epoch"), color="tab:red", linestyle=":", linewidth=1,
                   label="genotype kept" if number == 0 else None)


def plot_diagnostics(history: Sequence[Dict[str, Any]], path: str) -> None:
    """Parameter-free operations, row entropy, genotype changes and (if measured) the
    dominant Hessian eigenvalue over the epochs."""
    epochs = epoch_numbers(history)
    eigenvalues = np.asarray([value_at(record, "hessian", "eigenvalue") for record in history])
    fig = new_figure(10.0, 7.6)
    axes = fig.subplots(2, 2).flatten()

    ax = axes[0]
    for number, cell in enumerate(("normal", "reduce")):
        colour = f"C{number}"
        ax.plot(epochs, [value_at(r, "diagnostics", "parameter_free", cell) for r in history],
                marker="o", markersize=3, color=colour, label=f"{cell}: skip + pooling")
        ax.plot(epochs, [value_at(r, "diagnostics", "skip_connect", cell) for r in history],
                linestyle="--", color=colour, label=f"{cell}: skip_connect")
    edges = max([value_at(r, "diagnostics", "edges", "normal") for r in history] + [1.0])
    ax.set_ylim(-0.3, (edges if not math.isnan(edges) else 8) + 0.3)
    ax.set_title("parameter-free operations in the derived cells", fontsize=9)
    ax.set_ylabel("edges")

    ax = axes[1]
    names: List[str] = []
    for record in history:
        entropy = (record.get("diagnostics") or {}).get("entropy") or {}
        names.extend(name for name in entropy if name not in names)
    for number, name in enumerate(names):
        colour = f"C{number}"
        ax.plot(epochs, [value_at(r, "diagnostics", "entropy", name, "mean") for r in history],
                color=colour, label=f"{name} mean")
        ax.plot(epochs, [value_at(r, "diagnostics", "entropy", name, "min") for r in history],
                color=colour, linestyle="--", label=f"{name} min")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("row entropy (1 uniform, 0 one-hot)", fontsize=9)

    ax = axes[2]
    ax.bar(epochs, np.nan_to_num([value_at(r, "diagnostics", "edges_changed") for r in history]),
           color="C2", width=0.8)
    ax.set_title("genotype edges changed since the previous epoch", fontsize=9)
    ax.set_ylabel("edges")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    ax = axes[3]
    measured = ~np.isnan(eigenvalues)
    ax.plot(epochs[measured], eigenvalues[measured], marker="o", markersize=3, color="C3")
    if not measured.any():
        ax.text(0.5, 0.5, "not measured (--hessian_every)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("dominant eigenvalue of the validation loss's Hessian (architecture)", fontsize=9)
    _mark_early_stop(axes, history)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("search diagnostics: in a collapse, parameter-free operations pile up while "
                 "the entropy falls\nand the eigenvalue grows", fontsize=10)
    save_figure(fig, path)


def attention_names(history: Sequence[Dict[str, Any]]) -> List[str]:
    """The attention modules counted in the history's diagnostics, in first-seen order."""
    names: List[str] = []
    for record in history:
        for counts in ((record.get("diagnostics") or {}).get("attention") or {}).values():
            if isinstance(counts, dict):
                names.extend(name for name in counts if name not in names)
    return names


def plot_attention(history: Sequence[Dict[str, Any]], names: Sequence[str], path: str) -> None:
    """Stacked bars per epoch: the edges of each cell type that chose each attention."""
    epochs = epoch_numbers(history)
    fig = new_figure(9.0, 3.9)
    axes = fig.subplots(1, 2, sharey=True)
    colours = matplotlib.colormaps["tab10"]
    for ax, cell in zip(axes, ("normal", "reduce")):
        bottom = np.zeros(len(history))
        for number, name in enumerate(names):
            counts = np.nan_to_num([value_at(r, "diagnostics", "attention", cell, name) for r in history])
            ax.bar(epochs, counts, bottom=bottom, width=0.8, color=colours(number % 10), label=name)
            bottom += counts
        ax.set_title(f"{cell} cell", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes[0].set_ylabel("edges")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("attention module chosen per edge of the derived cells", fontsize=10)
    save_figure(fig, path)
