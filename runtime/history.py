"""``arch_history.jsonl``: one JSON object per finished search epoch (its metrics, the
softmaxed architecture parameters, their candidate names, the genotype, the collapse
diagnostics, and when there is one the Hessian eigenvalue and the early stop), written
by the search (searching.py) and read by plot_search.py."""
import json
import os
from typing import Any, Dict

from runtime.atomic import atomic_write_text

HISTORY = "arch_history.jsonl"


def record_epoch(run_dir: str, epoch: int, record: Dict[str, Any]) -> None:
    """Make ``record`` line ``epoch`` (1-based) of the run's history, after the first
    ``epoch - 1`` lines already there: a resumed run may have recorded epochs past its
    checkpoint, which it redoes."""
    path = os.path.join(run_dir, HISTORY)
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()[:epoch - 1]
    atomic_write_text(path, "".join(line + "\n" for line in lines + [json.dumps(record)]))
