"""Per-epoch numbers where researchers look for them: ``metrics.csv`` in every run
directory and, when the optional ``tensorboard`` package is installed, TensorBoard
event files in ``RUN_DIR/tensorboard`` (scalars, plus images such as the search's
architecture-weight heatmaps).

``metrics.csv`` has one row per finished epoch and a column per number ever logged
(empty where an epoch lacks it, e.g. the Hessian eigenvalue between measurements).
It is rewritten atomically each epoch; a resumed run drops the rows of the epochs it
redoes, as arch_history.jsonl does.
"""
import csv
import io
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from runtime.atomic import atomic_write_text

METRICS = "metrics.csv"
TENSORBOARD = "tensorboard"


def summary_writer_class() -> Optional[type]:
    """TensorBoard's ``SummaryWriter``, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def spread_rows(weights: Any, names: Sequence[Sequence[str]]) -> Tuple[np.ndarray, List[str]]:
    """Rows whose columns mean different candidates (``names[row]``) as one matrix over
    the union of the names, in order of first appearance; NaN where a row lacks one."""
    union = list(dict.fromkeys(name for row in names for name in row))
    matrix = np.full((len(names), len(union)), np.nan)
    for r, (values, row) in enumerate(zip(weights, names)):
        matrix[r, [union.index(name) for name in row]] = values
    return matrix, union


def heatmap_image(weights: Any, names: Optional[Sequence] = None, scale: int = 8) -> np.ndarray:
    """Softmaxed weights (rows x candidates, or one row) as an RGB image (H, W, 3,
    uint8) on the viridis scale 0..1, each entry a ``scale`` x ``scale`` square.
    ``names``: the candidates of the columns, or one list per row where rows differ
    (RobustDARTS's s1); then the columns are the union of the rows' candidates
    (``spread_rows``), grey where a row lacks one."""
    import matplotlib  # only needed with TensorBoard

    matrix = np.atleast_2d(np.asarray(weights, dtype=float))
    if names and not isinstance(names[0], str):
        matrix = spread_rows(matrix, names)[0]
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    rgb = colours(np.ma.masked_invalid(np.clip(matrix, 0.0, 1.0)))[..., :3]
    return (np.kron(rgb, np.ones((scale, scale, 1))) * 255).round().astype(np.uint8)


class Metrics:
    """Writes one epoch's numbers per call; a no-op when ``run_dir`` is None (processes
    other than rank 0).  ``resumed_after``: the epochs already done by a resumed run
    (TensorBoard drops what the interrupted run logged after them)."""

    def __init__(self, run_dir: Optional[str], resumed_after: int = 0):
        self.path = os.path.join(run_dir, METRICS) if run_dir else None
        self.writer = None
        writer_class = summary_writer_class() if run_dir else None
        if writer_class is not None:
            self.writer = writer_class(log_dir=os.path.join(run_dir, TENSORBOARD),
                                       purge_step=resumed_after + 1 if resumed_after else None)

    def describe(self) -> str:
        """Where the numbers go, for the run's log."""
        if self.writer is None:
            return f"per-epoch metrics in {METRICS} (TensorBoard: the tensorboard package is not installed)"
        return f"per-epoch metrics in {METRICS} and TensorBoard logs in {TENSORBOARD}/"

    def write(self, epoch: int, values: Mapping[str, float],
              images: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Make ``values`` row ``epoch`` of metrics.csv (1-based, after the rows of the
        earlier epochs) and log them, and ``images`` (H, W, 3 uint8), to TensorBoard."""
        if self.path is None:
            return
        rows = [row for row in self._read() if int(row["epoch"]) < epoch]
        rows.append({"epoch": epoch, **values})
        columns: List[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, epoch)
            for key, image in (images or {}).items():
                self.writer.add_image(key, image, epoch, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _read(self) -> List[Dict[str, str]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))
