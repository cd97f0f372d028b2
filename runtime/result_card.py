"""The result card of a pipeline (runtime/pipeline.py): ``results.json`` and
``RESULTS.md`` in its directory, rewritten (atomically) as the stages finish.

It holds each search's seed, genotype and selection score (the accuracy of its cell,
trained briefly, on the held-out part of the training split); the selected cell, drawn
by visualize.py, with its parameters and multiply-accumulates (counted as cost.py
counts them); each final training's test error and their mean ± std; the device
hours per stage; the paper's row; the environment; and the command of every job.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

from runtime.atomic import atomic_write_text
from runtime.launchers import REPO

CARD_MD = "RESULTS.md"
CARD_JSON = "results.json"
STAGES = ("search", "select", "final", "test")
# README.md, "Results reported in the paper": test error (%) mean ± std, params (M).
# ImageNet: top-1 error of a single training (no std reported).
PAPER = {"cifar10": {"Att-DARTS": (2.54, 0.10, 3.2), "DARTS": (2.76, 0.09, 3.3)},
         "cifar100": {"Att-DARTS": (16.54, 0.40, 3.2), "DARTS": (16.69, 0.28, 3.3)},
         "imagenet": {"Att-DARTS": (26.0, None, 4.6), "DARTS": (26.7, None, 4.7)}}


def mean_std(values: List[float]) -> Dict[str, Any]:
    """Mean and sample standard deviation (0 for a single value), as the paper reports them."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values), "text": f"{mean:.2f} ± {std:.2f}"}


def stage_hours(jobs: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per stage, the device time its jobs took: GPU-hours (wall time × GPUs per job)
    when they ran on GPUs, else CPU-hours (wall time of the CPU jobs)."""
    hours: Dict[str, Dict[str, Any]] = {}
    for entry in jobs.values():
        if "stage" not in entry:
            continue
        devices = entry.get("devices") or []
        gpus = [name for name in devices if not name.startswith("CPU")]
        stage = hours.setdefault(entry["stage"], {"hours": 0.0, "unit": "CPU-hours"})
        stage["hours"] += entry["seconds"] * max(1, len(gpus)) / 3600
        if gpus:
            stage["unit"] = "GPU-hours"
    return hours


def class_count(data: str, dataset: str) -> int:
    """Classes of the data the networks are built for: an image folder's, else CIFAR's."""
    folder = os.path.join(data, "train")
    if os.path.isdir(folder):
        return len([name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))])
    return 100 if dataset == "cifar100" else 10


def network_cost(genotype_path: str, settings: Mapping[str, Any], classes: int) -> Dict[str, Any]:
    """Parameters (auxiliary head left out) and multiply-accumulates per image of the final
    network, and the image size they are counted at."""
    from genotypes import load_genotype
    from runtime.complexity import count_macs, count_parameters
    from runtime.training import build_network, input_size_of
    final = argparse.Namespace(init_ch=settings["final_init_ch"], layers=settings["final_layers"],
                               auxiliary=True)
    network = build_network(final, settings["dataset"], classes, load_genotype(genotype_path))
    size = input_size_of(settings["dataset"])
    return {"params_M": count_parameters(network) / 1e6,
            "macs_M": count_macs(network, size) / 1e6, "input": f"{size[1]}x{size[2]}"}


def draw(genotype_path: str, directory: str) -> List[str]:
    """visualize.py's drawings of the selected cell (PDFs, or DOT sources without Graphviz)."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "visualize.py"), genotype_path,
                             "--save_dir", directory, "--file_name", "selected_cell",
                             "--without_view"], cwd=REPO, capture_output=True, text=True)
    return [os.path.relpath(line, directory) for line in result.stdout.splitlines()
            if os.path.isfile(line)]


def search_variant(settings: Mapping[str, Any]) -> str:
    """The collapse fixes the searches ran with (``--search_args``), in words."""
    from runtime.collapse_fixes import describe_command_line
    return describe_command_line(shlex.split(settings.get("search_args", "")))


def jobs_by_seed(jobs: Mapping[str, Any], stage: str) -> List[Tuple[str, int]]:
    """The (name, seed) of ``stage``'s jobs (named ``<stage>-seed<seed>``), by seed."""
    prefix = f"{stage}-seed"
    return sorted(((name, int(name[len(prefix):])) for name in jobs if name.startswith(prefix)),
                  key=lambda job: job[1])


class Card:
    """Builds the card from the pipeline's state; ``write`` after every stage."""

    def __init__(self, directory: str, settings: Mapping[str, Any], state: Mapping[str, Any],
                 options: argparse.Namespace):
        self.directory, self.settings, self.state, self.options = directory, settings, state, options
        self.cell: Dict[str, Any] = {}

    def selected_cell(self, name: str) -> Dict[str, Any]:
        genotype_path = self.state["jobs"][name]["result"]["genotype_path"]
        if self.cell.get("genotype_path") != genotype_path:
            self.cell = {"job": name, "genotype_path": genotype_path,
                         "drawings": draw(genotype_path, self.directory),
                         **network_cost(genotype_path, self.settings,
                                        class_count(self.options.data, self.settings["dataset"]))}
        return self.cell

    def summary(self) -> Dict[str, Any]:
        jobs = self.state["jobs"]

        def result(name: str) -> Optional[Dict[str, Any]]:
            entry = jobs.get(name, {})
            return entry.get("result") if entry.get("status") == "done" else None

        searches = []
        for name, seed in jobs_by_seed(jobs, "search"):
            found, score = result(name), result(f"select-seed{seed}")
            searches.append({"job": name, "seed": seed, "genotype": found and found["genotype"],
                             "held_out_accuracy": score and score["accuracy"],
                             "held_out_images": score and score["images"]})
        finals = []
        for name, seed in jobs_by_seed(jobs, "final"):
            trained, tested = result(name), result(f"test-seed{seed}")
            finals.append({"job": name, "seed": seed, "test_error": tested and tested["error"],
                           "last_epoch_test_error": trained and trained["error"]})
        errors = [final["test_error"] for final in finals if final["test_error"] is not None]
        devices = sorted({d for entry in jobs.values() for d in entry.get("devices") or []})
        return {
            "command": self.state.get("command", ""), "settings": dict(self.settings),
            "search_variant": search_variant(self.settings), "searches": searches,
            "selected": self.selected_cell(self.state["selected"]) if self.state.get("selected") else None,
            "finals": finals, "test_error": mean_std(errors) if errors else None,
            "hours": stage_hours(jobs),
            "paper": PAPER.get(self.settings["dataset"], {}),
            "environment": {"torch": _torch_version(), "python": platform.python_version(),
                            "host": platform.node(), "devices": devices},
            # The jobs run so far (at least once).
            "jobs": {name: {key: entry.get(key) for key in
                            ("status", "attempts", "log", "command", "fresh_command")}
                     for name, entry in jobs.items() if "fresh_command" in entry},
        }

    def write(self) -> Dict[str, Any]:
        summary = self.summary()
        atomic_write_text(os.path.join(self.directory, CARD_JSON),
                          json.dumps(summary, indent=1) + "\n")
        atomic_write_text(os.path.join(self.directory, CARD_MD), markdown(summary))
        return summary


def _torch_version() -> str:
    import torch
    return torch.__version__


def _number(value: Optional[float], digits: int = 2) -> str:
    return "…" if value is None else f"{value:.{digits}f}"


def selection_rule(settings: Mapping[str, Any]) -> str:
    """What the selection score is: never a test-split accuracy."""
    held_out = settings["holdout_portion"]
    return (f"Selection score: the top-1 accuracy of each search's cell, trained "
            f"{settings['select_epochs']} epoch(s) from scratch on {1 - held_out:.0%} of the "
            f"training split, on the other {held_out:.0%} (held-out training images; the test "
            f"split is never used to select).")


def markdown(summary: Mapping[str, Any]) -> str:
    """RESULTS.md: the tables of ``summary``, stages not yet run shown as '…'."""
    settings = summary["settings"]
    lines = [f"# Reproduction: {settings['dataset'].upper()}", "",
             f"Command: `{summary['command']}`", "",
             f"Searched in operation space {settings.get('space') or 'darts'}, attention at "
             f"location {settings.get('location') or 'after_every'} (train_search.py --space, "
             f"--location).", "", f"Search: {summary['search_variant']}", "", "## Result", "",
             "| | test error (%) | params (M) |", "|:--|:--:|:--:|"]
    selected, error = summary["selected"], summary["test_error"]
    lines.append(f"| this pipeline ({error['n'] if error else 0} runs) | "
                 f"{error['text'] if error else '…'} | "
                 f"{_number(selected and selected['params_M'])} |")
    for name, (mean, std, params) in summary["paper"].items():
        spread = f" ± {std:.2f}" if std is not None else ""
        lines.append(f"| {name}, paper | {mean:.2f}{spread} | {params} |")
    lines += ["", "## Searches and selection", "", selection_rule(settings), "",
              "| search | seed | held-out accuracy (%) | genotype |", "|:--|:--:|:--:|:--|"]
    for search in summary["searches"]:
        mark = " (selected)" if selected and selected["job"] == search["job"] else ""
        lines.append(f"| {search['job']}{mark} | {search['seed']} | "
                     f"{_number(search['held_out_accuracy'])} | "
                     f"`{json.dumps(search['genotype']) if search['genotype'] else '…'}` |")
    if selected:
        lines += ["", f"Selected cell: {selected['job']} ({selected['genotype_path']}), "
                      f"{selected['params_M']:.3f} M parameters (auxiliary head left out), "
                      f"{selected['macs_M']:.1f} M multiply-accumulates per "
                      f"{selected['input']} image; "
                      f"drawings: {', '.join(selected['drawings']) or 'none (visualize.py failed)'}"]
    lines += ["", "## Final trainings", "", "| training | seed | test error (%) |", "|:--|:--:|:--:|"]
    lines += [f"| {final['job']} | {final['seed']} | {_number(final['test_error'])} |"
              for final in summary["finals"]]
    lines += ["", "## Time", "", "| stage | device time |", "|:--|:--:|"]
    lines += [f"| {stage} | {hours['hours']:.3f} {hours['unit']} |"
              for stage, hours in summary["hours"].items()]
    environment = summary["environment"]
    lines += ["", "## Environment", "", f"torch {environment['torch']}, Python "
              f"{environment['python']}, host {environment['host']}; devices: "
              f"{'; '.join(environment['devices']) or '…'}", "", "## Jobs", "",
              "Each job's command from scratch (add `--checkpoint_path` with its run "
              "directory to resume one), status and log:", ""]
    for name, job in summary["jobs"].items():
        lines.append(f"- {name} ({job['status']}, {job['attempts']} run(s), log {job['log']}): "
                     f"`{job['fresh_command']}`")
    return "\n".join(lines) + "\n"
