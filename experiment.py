"""What every run shares, search and training alike: its directory, its log, its
progress bars, moving batches to the device, epoch metrics and resumable state."""
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from tqdm import tqdm

import parallel
import utils
from parallel import Runtime
from precision import memory_format

CHECKPOINT = "checkpoint.pt"


class RunLog:
    """Prints messages and appends them to ``log.txt``; a no-op when ``directory`` is
    None (processes other than rank 0)."""

    def __init__(self, directory: Optional[str]):
        self.path = os.path.join(directory, "log.txt") if directory else None

    def __call__(self, message: str) -> None:
        if self.path is None:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        tqdm.write(line)
        # One append per line: a killed run loses at most the line being written,
        # and long runs do not rewrite the whole log each time.
        with open(self.path, "a") as f:
            f.write(line + "\n")


def progress(iterable: Iterable, runtime: Runtime, **kwargs: Any) -> tqdm:
    """A progress bar on rank 0 only, and only on a terminal (no log spam)."""
    return tqdm(iterable, disable=None if runtime.is_main else True, dynamic_ncols=True, **kwargs)


def new_run_directory(exp_path: str) -> str:
    """``exp_path/<script>-<timestamp>``, made unique if two runs start the same second."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "run"
    base = os.path.join(exp_path, f"{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    for attempt in range(1, 1000):
        path = base if attempt == 1 else f"{base}-{attempt}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise utils.UserError(f"cannot create the run directory {path}: {error.strerror}") from None
    raise utils.UserError(f"cannot find a free run directory name under {exp_path}")


def to_device(images: torch.Tensor, targets: torch.Tensor, runtime: Runtime,
              channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return (images.to(runtime.device, non_blocking=True, memory_format=memory_format(channels_last)),
            targets.to(runtime.device, non_blocking=True))


class EpochMetrics:
    """Loss and top-1 sums over an epoch, kept on the device: reading them back every
    step would stall a GPU."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss += loss.detach().double() * targets.size(0)
        self.correct += utils.topk_correct(logits.detach(), targets)[0]
        self.seen += targets.size(0)

    def running(self) -> str:
        """This process's running figures, for progress bars and step logs."""
        return f"loss {self.loss.item() / self.seen:.4f} acc {100.0 * self.correct.item() / self.seen:.2f}%"

    def total(self, device: torch.device) -> Tuple[float, float]:
        """(mean loss, top-1 accuracy in %) over all processes."""
        loss, correct, seen = parallel.sum_over_processes(
            [self.loss.item(), float(self.correct.item()), float(self.seen)], device)
        return loss / seen, 100.0 * correct / seen


def checkpoint_file(path: str) -> str:
    """``--checkpoint_path`` names the checkpoint or the run directory holding it."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


def restore_rng(states: List[Dict[str, Any]], runtime: Runtime, seed: int) -> None:
    """Each process continues its own random streams (a process the checkpoint did
    not have, after a change of process count, starts from its seed)."""
    if runtime.rank < len(states):
        utils.set_rng_state(states[runtime.rank])
    else:
        utils.set_seed(seed + runtime.rank)
