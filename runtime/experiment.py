"""What every run shares, search and training alike: its directory and log, the
epoch loop and its metrics, checkpoints (files, contents, the resume rule, restoring
them), the learning-rate schedule of a resumed run, and the random state.

A run lives in its own directory (``--exp_path/<script>-<date>-<time>``), where only
rank 0 writes.  ``checkpoint.pt`` holds everything a run needs to continue; a run
resumed from it (``--checkpoint_path``) writes on into the same directory and ends
bit-identical to an uninterrupted run.
"""
import argparse
import functools
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler
from tqdm import tqdm

from genotypes import Genotype, genotype_to_dict
from runtime import parallel
from runtime.atomic import atomic_write
from runtime.cuda_graphs import StepGraph, place_step_counters
from runtime.errors import UserError
from runtime.parallel import Runtime
from runtime.precision import Precision, memory_format

CHECKPOINT = "checkpoint.pt"
GENOTYPE = "genotype.json"
# What every checkpoint holds, besides each optimizer's state under its own key and
# what a kind of run adds (see ``save_checkpoint``).
CHECKPOINT_KEYS = ("state_dict", "scaler", "epoch", "rng", "args", "genotype")
# Flags a resumed run may change: where things are, how often it reports, how fast and
# in which precision it computes, and its length (a finished run can be extended: its
# schedule follows the new --epochs, see ``resumed_schedule``).  Every other flag must
# be the checkpoint's.  A training run compares its genotype itself, not --arch/--arch_path.
# What an optimizer's param_groups say about how this run computes, not about the
# optimisation itself: a resumed run keeps its own (see ``load_optimizer_state``).
RUN_SETTINGS = ("capturable", "foreach", "fused", "differentiable")
RESUME_FREE_FLAGS = frozenset({"checkpoint_path", "data", "exp_path", "workers", "report_freq",
                               "amp", "amp_dtype", "channels_last", "recompute", "epochs",
                               "arch", "arch_path", "cuda_graphs", "device_loader",
                               "deterministic"})


# -- the run directory -------------------------------------------------------------------

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


class RunClock:
    """Throughput and the expected time to the end of the run, for each epoch's log line."""

    def __init__(self, start_epoch: int, epochs: int):
        self.epochs_left = epochs - start_epoch
        self.seconds = 0.0
        self.epochs_timed = 0

    def epoch_done(self, images: int, iterations: int, step_seconds: float,
                   epoch_seconds: float) -> str:
        """``images`` (all processes) went through ``iterations`` steps in
        ``step_seconds`` of an epoch that took ``epoch_seconds`` in all: the speed, the
        seconds per iteration, and the time the remaining epochs take at this run's
        mean epoch time."""
        self.epochs_left -= 1
        self.seconds += epoch_seconds
        self.epochs_timed += 1
        remaining = int(round(self.seconds / self.epochs_timed * self.epochs_left))
        hours, rest = divmod(remaining, 3600)
        return (f"{images / max(step_seconds, 1e-9):.0f} img/s, "
                f"{step_seconds / max(iterations, 1):.4f} s/it, "
                f"eta {hours}:{rest // 60:02d}:{rest % 60:02d}")


def progress(iterable: Iterable, runtime: Runtime, **kwargs: Any) -> tqdm:
    """A progress bar on rank 0 only, and only on a terminal (no log spam)."""
    return tqdm(iterable, disable=None if runtime.is_main else True, dynamic_ncols=True, **kwargs)


def new_run_directory(exp_path: str) -> str:
    """Create ``exp_path/<script>-<date>-<time>`` (with a suffix if that exists)."""
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
            raise UserError(f"cannot create the run directory {path}: {error.strerror}") from None
    raise UserError(f"cannot find a free run directory name under {exp_path}")


def run_directory(checkpoint: Optional[str], exp_path: str, runtime: Runtime) -> Optional[str]:
    """Rank 0's output directory: the resumed ``checkpoint``'s, else a new one under
    ``exp_path``.  None on the other processes, which write nothing."""
    if not runtime.is_main:
        return None
    return os.path.dirname(os.path.abspath(checkpoint)) if checkpoint else new_run_directory(exp_path)


def checkpoint_file(path: str) -> str:
    """``--checkpoint_path`` names the checkpoint or the run directory holding it."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


# -- epochs and their metrics ---------------------------------------------------------------

def to_device(images: torch.Tensor, targets: torch.Tensor, runtime: Runtime,
              channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return (images.to(runtime.device, non_blocking=True, memory_format=memory_format(channels_last)),
            targets.to(runtime.device, non_blocking=True))


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1,)) -> torch.Tensor:
    """How many samples have their target among the top-k predictions, per k: exact
    integer counts (sums over batches and processes stay exact), left on the device."""
    maxk = min(max(topk), logits.size(1))
    _, predicted = logits.topk(maxk, 1, True, True)
    correct = predicted.eq(targets.view(-1, 1))
    return torch.stack([correct[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


@dataclass
class Accuracy:
    """Top-k correct counts over a whole split."""
    topk: Tuple[int, ...]
    correct: List[int]
    total: int

    def percent(self, k: int = 1) -> float:
        return 100.0 * self.correct[self.topk.index(k)] / self.total

    def __str__(self) -> str:
        return "; ".join(f"top-{k} acc {self.percent(k):.4f}% ({c}/{self.total}), "
                         f"error {100.0 - self.percent(k):.4f}%"
                         for k, c in zip(self.topk, self.correct))


class EpochMetrics:
    """Loss and top-k sums over an epoch, kept on the device: reading them back every
    step would stall a GPU."""

    def __init__(self, device: torch.device, topk: Sequence[int] = (1,)):
        self.topk = tuple(topk)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.has_loss = False
        self.correct = torch.zeros(len(self.topk), dtype=torch.long, device=device)
        self.seen = 0

    def update(self, loss: Optional[torch.Tensor], logits: torch.Tensor,
               targets: torch.Tensor) -> None:
        if loss is not None:
            self.loss += loss.detach().double() * targets.size(0)
            self.has_loss = True
        self.correct += topk_correct(logits.detach(), targets, self.topk)
        self.seen += targets.size(0)

    def running(self) -> str:
        """This process's running figures, for progress bars and step logs."""
        return (f"loss {self.loss.item() / self.seen:.4f} "
                f"acc {100.0 * self.correct[0].item() / self.seen:.2f}%")

    def total(self, device: torch.device) -> Tuple[float, Accuracy]:
        """(mean loss, or NaN without one; top-k accuracy) over all processes."""
        loss, *correct, seen = parallel.sum_over_processes(
            [self.loss.item(), *[float(c) for c in self.correct.tolist()], float(self.seen)], device)
        return (loss / seen if self.has_loss else math.nan,
                Accuracy(self.topk, [int(c) for c in correct], int(seen)))


# ``step(images, targets) -> (loss or None, logits)``: one batch of an epoch.
Step = Callable[[torch.Tensor, torch.Tensor], Tuple[Optional[torch.Tensor], torch.Tensor]]


def run_epoch(loader: Iterable, step: Step, runtime: Runtime, channels_last: bool, desc: str,
              topk: Sequence[int] = (1,), report_freq: int = 0, log: Optional[RunLog] = None,
              graph: Optional[StepGraph] = None) -> Tuple[float, Accuracy]:
    """Run ``step`` on every batch of this process's ``loader`` (moved to the device, or
    with ``graph``, the ``StepGraph`` the step runs, copied straight into its static
    inputs); returns the mean loss and the top-k accuracy over all processes.  Every
    ``report_freq`` steps the running figures go to the progress bar and ``log``."""
    metrics = EpochMetrics(runtime.device, topk)
    place = functools.partial(to_device, runtime=runtime, channels_last=channels_last)
    bar = progress(loader, runtime, desc=desc, leave=False)
    for number, batch in enumerate(bar, 1):
        images, targets = graph.feed(place, *batch) if graph is not None else place(*batch)
        loss, logits = step(images, targets)
        metrics.update(loss, logits, targets)
        if report_freq and number % report_freq == 0:
            bar.set_postfix_str(metrics.running())
            log(f"{desc} step {number:04d}/{len(loader)} {metrics.running()}")
    return metrics.total(runtime.device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, forward: StepGraph, runtime: Runtime,
             channels_last: bool, desc: str, topk: Sequence[int] = (1,)) -> Tuple[float, Accuracy]:
    """``run_epoch`` of the ``forward`` graph in evaluation mode, without gradients.
    Deterministic: the same weights, batch size and precision give the same counts."""
    model.eval()
    return run_epoch(loader, forward, runtime, channels_last, desc, topk, graph=forward)


def weight_step(loss: torch.Tensor, optimizer: Optimizer, parameters: Iterable[nn.Parameter],
                precision: Precision, grad_clip: float) -> None:
    """Backward ``loss`` and step ``optimizer``, the gradient norm of ``parameters``
    clipped to ``grad_clip`` (on the true gradients: the scaler's are unscaled first)."""
    optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    precision.scaler.unscale_(optimizer)
    # foreach: one norm and one scaling kernel for all tensors, not two per tensor.
    nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    # No gradient outlives the step: under a CUDA graph they live in its private pool,
    # which could not be freed before the next capture or the Hessian otherwise.
    optimizer.zero_grad(set_to_none=True)


# -- learning-rate schedules ----------------------------------------------------------------

def cosine_schedule(epochs: int, lr_min: float = 0.0) -> Callable[[Optimizer], LRScheduler]:
    """The learning rate follows a cosine from its initial value to ``lr_min`` over the epochs."""
    return lambda optimizer: CosineAnnealingLR(optimizer, float(epochs), eta_min=lr_min)


def warmed_up_cosine_schedule(epochs: int, lr_min: float,
                              warmup_epochs: int) -> Callable[[Optimizer], LRScheduler]:
    """PC-DARTS's ImageNet search schedule: epoch e < ``warmup_epochs`` runs at
    lr (e + 1) / warmup_epochs (a linear warm-up), every later epoch where the cosine
    from lr to ``lr_min`` over all the epochs stands (in closed form)."""
    def make(optimizer: Optimizer) -> LRScheduler:
        base = optimizer.param_groups[0]["lr"]

        def factor(epoch: int) -> float:
            if epoch < warmup_epochs:
                return (epoch + 1) / warmup_epochs
            cosine = lr_min + (base - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
            return cosine / base if base else 0.0
        return LambdaLR(optimizer, factor)
    return make


def resumed_schedule(make_scheduler: Callable[[Optimizer], LRScheduler], optimizer: Optimizer,
                     epochs_done: int) -> LRScheduler:
    """The schedule after ``epochs_done`` epochs, as an uninterrupted run of this length
    has it, bit for bit: built from the initial learning rate (which a loaded optimizer
    state keeps as ``initial_lr``) and stepped once per epoch done.  So a run resumed
    with a larger --epochs continues on the schedule of its new length."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = make_scheduler(optimizer)
    with warnings.catch_warnings():
        # Stepping the schedule without optimizer steps is the point here.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        for _ in range(epochs_done):
            scheduler.step()
    return scheduler


# -- checkpoint files -------------------------------------------------------------------------

def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a killed run never leaves half a file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch_file(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        if "Weights only load failed" in str(error):
            reason = "it holds Python objects besides tensors, which are not loaded for safety"
        else:
            reason = "not a file written by torch.save"
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {reason}") from None


def extract_state_dict(checkpoint: Any, path: str) -> Dict[str, torch.Tensor]:
    """A network ``state_dict`` from a bare one, one inside ``{"state_dict": ...}``, or
    one whose keys carry DataParallel's ``module.`` prefix."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if (not isinstance(checkpoint, Mapping) or not checkpoint
            or not all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
        raise UserError(f"{path} holds no model state_dict")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def check_state_dict_fits(network: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """One line naming the first key that is missing, unexpected or of another shape."""
    expected = network.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UserError(f"{path} does not fit the architecture: missing key {key!r} "
                            f"(check --arch/--arch_path, --init_ch, --layers, --auxiliary)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{path} does not fit the architecture: {key!r} has shape "
                            f"{tuple(state[key].shape)}, the model expects {tuple(tensor.shape)} "
                            f"(check --arch/--arch_path, --init_ch, --layers)")
    for key in state:
        if key not in expected:
            raise UserError(f"{path} does not fit the architecture: unexpected key {key!r} "
                            f"(check --arch/--arch_path, --auxiliary, --layers)")


def load_state_dict_checked(network: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into ``network``; a mismatch names the first key that differs.  A
    network that renamed its keys since earlier checkpoints were written owns the
    renaming: its ``upgrade_state_dict(state)`` method, when it has one, runs first."""
    upgrade = getattr(network, "upgrade_state_dict", None)
    state = upgrade(dict(state)) if callable(upgrade) else dict(state)
    check_state_dict_fits(network, state, path)
    network.load_state_dict(state)


def load_weights(network: nn.Module, path: str) -> None:
    """Load a published-layout checkpoint (bare, ``module.``-prefixed or under
    ``"state_dict"``) into ``network``."""
    load_state_dict_checked(network, extract_state_dict(load_torch_file(path), path), path)


# -- resumable state -------------------------------------------------------------------------

def save_checkpoint(run_dir: Optional[str], runtime: Runtime, network: nn.Module,
                    optimizers: Mapping[str, Optimizer], scheduler: LRScheduler,
                    precision: Precision, epoch: int, args: argparse.Namespace,
                    genotype: Genotype, **extra: Any) -> None:
    """Write ``checkpoint.pt``: the bare network, each optimizer under its key, the
    scaler, the epochs done, every process's random state, the flags, the genotype and
    ``extra``.  Every process calls it (the random states are gathered); rank 0 writes."""
    rng = parallel.gather_objects(rng_state(parallel.cuda_devices(runtime)))
    if runtime.is_main:
        atomic_save({
            "state_dict": network.state_dict(),
            **{key: optimizer.state_dict() for key, optimizer in optimizers.items()},
            # Not read back (``resumed_schedule`` rebuilds the schedule); kept so that
            # earlier versions of this code still resume these checkpoints.
            "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict(), "epoch": epoch, "rng": rng,
            "args": vars(args), "genotype": genotype_to_dict(genotype), **extra,
        }, os.path.join(run_dir, CHECKPOINT))


def load_checkpoint(path: str, args: argparse.Namespace, kind: str, keys: Sequence[str],
                    earlier: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint of a ``kind`` run ('search' or 'training') at ``path``, which must
    hold ``keys`` besides ``CHECKPOINT_KEYS`` and come from a run with this run's flags
    (``RESUME_FREE_FLAGS`` excepted).  ``earlier``: flags added since checkpoints were
    first written, with the value a run had before the flag existed."""
    state = load_torch_file(path)
    required = CHECKPOINT_KEYS + tuple(keys)
    missing = [key for key in required if key not in state] if isinstance(state, Mapping) else ["state_dict"]
    if missing:
        raise UserError(f"{path} is not a resumable {kind} checkpoint (no {missing[0]!r}); pass "
                        f"the {CHECKPOINT} of a {kind} run directory")
    for flag, value in {**(earlier or {}), **state["args"]}.items():
        if flag not in RESUME_FREE_FLAGS and getattr(args, flag, value) != value:
            raise UserError(f"{path} comes from a {kind} run with --{flag} {value}, not "
                            f"{getattr(args, flag)}; resume with the run's own flags")
    return state


def restore(state: Mapping[str, Any], path: str, network: nn.Module,
            optimizers: Mapping[str, Optimizer], precision: Precision, runtime: Runtime,
            seed: int) -> None:
    """Load a checkpoint into the bare ``network``, the ``optimizers`` (by their keys) and
    the scaler, and continue this process's random streams.

    Call it once everything is built, just before the first epoch: whatever draws
    random numbers after it would shift the streams of an uninterrupted run."""
    load_state_dict_checked(network, state["state_dict"], path)
    try:
        for key, optimizer in optimizers.items():
            load_optimizer_state(optimizer, state[key])
        precision.load_scaler_state(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{path}: the optimizer state does not fit this run "
                        f"({str(error).splitlines()[0][:160]})") from None
    restore_rng(state["rng"], runtime, seed)


def load_optimizer_state(optimizer: Optimizer, state: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict``, keeping what depends on this run rather than on the
    one that wrote the checkpoint: ``RUN_SETTINGS`` (a run with CUDA graphs needs
    ``capturable``, one on the CPU must not have it) and where the step counters live
    (on the parameter's device for a capturable or fused step, on the CPU otherwise)."""
    own = [{key: group[key] for key in RUN_SETTINGS if key in group}
           for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)
    place_step_counters(optimizer)


# -- random state ------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(devices: Sequence[torch.device] = ()) -> Dict[str, Any]:
    """Every RNG the run uses, for resumable checkpoints: Python's, NumPy's, the CPU's
    and those of ``devices`` (``parallel.cuda_devices``: the CUDA devices the run uses,
    in that order)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    # Plain Python values and tensors only, so checkpoints load with weights_only=True.
    return {"python": random.getstate(),
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
            "torch": torch.get_rng_state(),
            "cuda_devices": [torch.cuda.get_rng_state(device) for device in devices]}


def set_rng_state(state: Dict[str, Any], devices: Sequence[torch.device] = ()) -> None:
    """Continue the streams of ``state`` (``rng_state``'s) on this process's ``devices``.

    The i-th CUDA device the run uses takes the i-th saved state: a run resumed on fewer
    devices drops the others' states, one on more devices (or from a CPU run) keeps the
    seeded state on the devices the checkpoint has none for.  A checkpoint written
    before ``cuda_devices`` holds one state per GPU that was visible (``cuda``): each
    device takes the state of its own index there, or the first."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda_devices")
    if saved is None:
        visible = state.get("cuda", [])
        saved = [visible[device.index] if device.index < len(visible) else visible[0]
                 for device in devices] if visible else []
    for device, device_state in zip(devices, saved):
        torch.cuda.set_rng_state(device_state, device)


def restore_rng(states: List[Dict[str, Any]], runtime: Runtime, seed: int) -> None:
    """Each process continues its own random streams (a process the checkpoint did
    not have, after a change of process count, starts from its seed)."""
    if runtime.rank < len(states):
        set_rng_state(states[runtime.rank], parallel.cuda_devices(runtime))
    else:
        set_seed(seed + runtime.rank)
