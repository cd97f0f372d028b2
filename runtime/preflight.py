"""What reproduce.py checks before its first job (runtime/pipeline.py): that every stage
will find what it needs, so that a mistake only a late stage would meet is one line at
start-up, not a failure after days of searches.

- the search space: ``--location`` and ``--partial_channels`` against the supernet;
- the flags: ``--search_args`` and ``--train_args`` parsed by train_search.py's and the
  train script's own parsers (in a child process: the package imports no script), and
  refused where they set a flag the pipeline sets itself (``--seed``, ``--epochs``...);
- the data: the training split (every stage) and the test split (the final trainings
  and the tests), with the same classes; torchvision's CIFAR files are downloaded here,
  once, where they are missing, rather than by every job at once;
- the sizes: every part a stage splits the training images into holds a batch.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from runtime.errors import UserError
from runtime.launchers import REPO

# train_search.py's --dataset: the searches run on CIFAR-10's files (as DARTS, whose
# CIFAR-10 cell the CIFAR-100 trainings use) unless --search_args gives another.
SEARCH_DATASET = "cifar10"
NOTHING_RUN = "nothing was run"
# A check of --search_args or --train_args: (that flag, the script, the flags the
# pipeline gives the script itself, the user's string).
FlagCheck = Tuple[str, str, List[str], str]


def check(settings: Mapping[str, Any], options: argparse.Namespace,
          flag_checks: Sequence[FlagCheck], processes: int) -> None:
    """Every check, cheapest first; ``processes``: the processes of one job."""
    check_search_space(settings)
    search_flags = check_flags(flag_checks).get("--search_args", {})
    images = check_data(options.data, settings["dataset"],
                        search_flags.get("dataset", SEARCH_DATASET))
    check_sizes(settings, images, processes)


def check_search_space(settings: Mapping[str, Any]) -> None:
    """--location and --partial_channels, as train_search.py checks them."""
    if settings["location"] is None and settings["partial_channels"] is None:
        return
    from model_search import AttLocation, check_partial_channels
    try:
        if settings["location"] is not None:
            AttLocation.parse(settings["location"])
    except ValueError as error:
        raise UserError(f"--location: {error} ({NOTHING_RUN})") from None
    try:
        if settings["partial_channels"] is not None:
            check_partial_channels(settings["search_init_ch"], settings["search_layers"],
                                   settings["partial_channels"])
    except ValueError as error:
        raise UserError(f"--partial_channels: {error} (--search_init_ch "
                        f"{settings['search_init_ch']}; {NOTHING_RUN})") from None


# -- --search_args and --train_args ------------------------------------------------------------

def check_flags(checks: Sequence[FlagCheck]) -> Dict[str, Dict[str, Any]]:
    """Each non-empty string parsed by its script's parser; returns, per flag, the
    values the user's flags set.  One line for every problem found."""
    todo = []
    for flag, script, own, text in checks:
        try:
            extra = shlex.split(text)
        except ValueError as error:
            raise UserError(f"{flag} {text!r}: {error} ({NOTHING_RUN})") from None
        if extra:
            todo.append((flag, script, own, extra))
    if not todo:
        return {}
    child = subprocess.run(
        [sys.executable, "-c", "from runtime.preflight import parse_flags; parse_flags()",
         json.dumps([(script, own, extra) for _, script, own, extra in todo])],
        cwd=REPO, capture_output=True, text=True)
    try:
        answers = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        why = (child.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(f"could not check {' and '.join(flag for flag, *_ in todo)} with the "
                        f"scripts' parsers: {why}") from None
    problems = []
    for (flag, script, _, extra), answer in zip(todo, answers):
        if "error" in answer:
            problems.append(f"{flag} {shlex.join(extra)!r}: {script} says: {answer['error']}")
        elif answer["owned"]:
            problems.append(f"{flag} sets {', '.join('--' + dest for dest in answer['owned'])}, "
                            f"which reproduce.py sets itself: use its own flags (reproduce.py "
                            f"--help)")
    if problems:
        raise UserError("; ".join(problems) + f" ({NOTHING_RUN})")
    return {flag: answer["set"] for (flag, *_), answer in zip(todo, answers)}


def parse_flags() -> None:
    """In the child process: for each (script, own flags, user flags) of ``sys.argv[1]``
    (JSON), print argparse's complaint about the user's flags, or the destinations they
    set and which of them the own flags set too (one JSON line)."""
    import runpy
    answers = []
    for script, own, extra in json.loads(sys.argv[1]):
        # The script's module body builds its parser; main() runs only as __main__.
        parser = runpy.run_path(os.path.join(REPO, script), run_name="__flags__")["parser"]
        answers.append(flags_set(parser, own, extra))
    print(json.dumps(answers, default=str))


def flags_set(parser: argparse.ArgumentParser, own: List[str], extra: List[str]) -> Dict[str, Any]:
    """What ``extra`` sets (every default replaced by a marker first, so that a flag
    given its default value counts) and which of it ``own`` sets too; or the error."""
    def fail(message: str) -> None:
        raise ValueError(message)

    parser.error = fail  # argparse reports here instead of exiting
    unset = object()
    parser.set_defaults(**{dest: unset for dest in vars(parser.parse_args([]))})
    try:
        extra_set = {k: v for k, v in vars(parser.parse_args(extra)).items() if v is not unset}
        own_set = {k for k, v in vars(parser.parse_args(own)).items() if v is not unset}
    except ValueError as error:
        return {"error": str(error)}
    return {"set": extra_set, "owned": sorted(own_set & set(extra_set))}


# -- data and sizes ----------------------------------------------------------------------------

def check_data(data_dir: str, dataset: str, search_dataset: str) -> int:
    """The training split of the searches and of the trainings, and the test split of
    the final trainings and the tests, their classes alike; returns the number of
    training images.  Where ``data_dir`` is a folder, every stage reads the same one."""
    from runtime import data
    folder = os.path.isdir(os.path.join(data_dir, "train"))
    needs = [(search_dataset, True, "the searches"), (dataset, True, "the trainings"),
             (dataset, False, "the final trainings and the tests")]
    splits = {}
    for name, train, who in needs:
        key = ("" if folder else name, train)
        if key in splits:
            continue
        try:
            splits[key] = data.cifar_split(data_dir, name, train=train)
        except UserError as error:
            split = "training" if train else "test"
            raise UserError(f"{who} need the {split} split of --data: {error} "
                            f"({NOTHING_RUN})") from None
    kept = "" if folder else dataset
    train_set, test_set = splits[(kept, True)], splits[(kept, False)]
    if train_set.classes != test_set.classes:
        raise UserError(f"the training and test splits under {data_dir} have different classes "
                        f"({len(train_set.classes)} and {len(test_set.classes)}), which the final "
                        f"trainings refuse ({NOTHING_RUN})")
    return len(train_set)


def check_sizes(settings: Mapping[str, Any], images: int, processes: int) -> None:
    """Each part a stage splits the ``images`` training images into holds at least one
    batch per process (``processes`` per job); the held-out part at least an image."""
    for flag in ("search_train_portion", "holdout_portion"):
        if not 0 < settings[flag] < 1:
            raise UserError(f"--{flag} must be between 0 and 1, got {settings[flag]}")
    weights = int(images * settings["search_train_portion"])
    trained = int(images * (1.0 - settings["holdout_portion"]))
    if trained == images:
        raise UserError(f"--holdout_portion {settings['holdout_portion']} holds out none of the "
                        f"{images} training images ({NOTHING_RUN})")
    parts = [("select", trained, f"the part a selection trains on (--holdout_portion "
                                 f"{settings['holdout_portion']} held out)"),
             ("final", images, "the training split")]
    # An ImageNet search draws its own per-class sample (--imagenet_sample), and is the
    # first job: it checks its sample itself before any other job has run.
    if settings["dataset"] != "imagenet":
        parts.insert(0, ("search", min(weights, images - weights), "the smaller half of a search"))
    for stage, part, what in parts:
        batch = settings[f"{stage}_batchsz"]
        if part // processes < batch:
            raise UserError(f"--{stage}_batchsz {batch} is more than {what} holds per process: "
                            f"{part} of the {images} training images under --data, over "
                            f"{processes} process(es); lower it or give more images "
                            f"({NOTHING_RUN})")
