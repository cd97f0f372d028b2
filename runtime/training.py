"""Training from scratch and testing of final networks, shared by train_CIFAR10.py,
train_CIFAR100.py, train_ImageNet.py and the test_*.py scripts.

A run lives in its own directory (``--exp_path/<script>-<timestamp>``):

- ``log.txt``: flags, parameter count and multiply-accumulates per image, one line per
  epoch (lr, train loss/accuracy, test accuracy) and the final test result (with
  ``--holdout_portion``, "held-out" accuracy: that of the held-out training images);
- ``metrics.csv``: one row per epoch (and TensorBoard logs in ``tensorboard/`` when
  the tensorboard package is installed);
- ``checkpoint.pt``: everything needed to resume, rewritten after each epoch
  (``--checkpoint_path`` continues the run in the same directory);
- ``best.pt``: the weights with the best test accuracy so far;
- ``trained.pt``: the final weights, a bare ``state_dict`` in the published layout;
- ``genotype.json``: the trained architecture.

Under torchrun every process trains on its shard, only rank 0 logs and writes, and
metrics are summed over processes so they cover the whole split.  Evaluation is
deterministic: a test script on ``trained.pt`` reproduces the accuracy of the run (but for
a cell with RobustDARTS's noise op, which draws fresh noise in evaluation too).
"""
import argparse
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from genotypes import NAMED_GENOTYPES, Genotype, genotype_to_dict, resolve_genotype, save_genotype
from model import NetworkCIFAR, NetworkImageNet
from runtime import data, parallel
from runtime.complexity import count_macs, count_parameters
from runtime.cuda_graphs import (GraphGroup, StepGraph, add_cuda_graph_flag, resolve_cuda_graphs,
                                 run_graphs)
from runtime.errors import UserError
from runtime.experiment import (CHECKPOINT, GENOTYPE, Accuracy, RunClock, RunLog, atomic_save,
                                checkpoint_file, evaluate, load_checkpoint, load_weights, progress,
                                restore, resumed_schedule, run_directory, run_epoch,
                                save_checkpoint, set_seed, weight_step)
from runtime.metrics import Metrics
from runtime.parallel import Runtime
from runtime.precision import (Precision, add_deterministic_flag, add_precision_flags,
                               deterministic_mode, kernel_choice, memory_format)

CIFAR_DEFAULTS = dict(
    batchsz=96, lr=0.025, wd=3e-4, epochs=600, init_ch=36, layers=20, drop_path_prob=0.2, seed=2,
    workers=4, data_help="dataset root: torchvision's CIFAR files (downloaded there if missing) or "
                         "a folder with train/<class>/ and test/ or val/<class>/ images")
IMAGENET_DEFAULTS = dict(
    batchsz=128, lr=0.1, wd=3e-5, epochs=250, init_ch=48, layers=14, drop_path_prob=0.0, seed=0,
    workers=8, data_help="a folder with train/<class>/ and val/<class>/ images (ILSVRC2012)")


# -- flags -----------------------------------------------------------------------

def add_model_args(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """The flags that define the network: architecture, width, depth, auxiliary head."""
    parser.add_argument("--arch", default="Att_DARTS",
                        help=f"a genotype in genotypes.py: {', '.join(NAMED_GENOTYPES)} "
                             f"(default: %(default)s)")
    parser.add_argument("--arch_path", default=None,
                        help="a genotype.json written by train_search.py; wins over --arch")
    parser.add_argument("--init_ch", type=int, default=defaults["init_ch"],
                        help="channels of the first cells (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=defaults["layers"],
                        help="number of cells (default: %(default)s)")
    parser.add_argument("--auxiliary", action="store_true",
                        help="with the auxiliary classifier after the second reduction cell")


def add_runtime_args(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Data location, batch size, seed, loader workers and numeric precision."""
    parser.add_argument("--data", default="data", help=defaults["data_help"] + " (default: %(default)s)")
    parser.add_argument("--batchsz", type=int, default=defaults["batchsz"],
                        help="batch size per process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="random seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults["workers"],
                        help="data loader worker processes (default: %(default)s)")
    add_precision_flags(parser)
    add_cuda_graph_flag(parser)
    add_deterministic_flag(parser)


def add_train_args(parser: argparse.ArgumentParser, defaults: Mapping[str, Any],
                   cutout: bool) -> None:
    """Every flag of a train script (``cutout``: offer CIFAR's cutout augmentation)."""
    add_model_args(parser, defaults)
    add_runtime_args(parser, defaults)
    parser.add_argument("--lr", type=float, default=defaults["lr"],
                        help="initial learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9,
                        help="SGD momentum (default: %(default)s)")
    parser.add_argument("--wd", type=float, default=defaults["wd"],
                        help="weight decay (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults["epochs"],
                        help="training epochs (default: %(default)s)")
    parser.add_argument("--report_freq", type=int, default=50,
                        help="log the running training loss and accuracy every this many steps "
                             "(default: %(default)s)")
    parser.add_argument("--auxiliary_weight", type=float, default=0.4,
                        help="weight of the auxiliary loss (default: %(default)s)")
    if cutout:
        parser.add_argument("--cutout", action="store_true", help="cutout augmentation")
        parser.add_argument("--cutout_length", type=int, default=16,
                            help="side of the cutout square (default: %(default)s)")
        data.add_device_loader_flag(parser)
    parser.add_argument("--drop_path_prob", type=float, default=defaults["drop_path_prob"],
                        help="drop-path probability, ramped linearly from 0 over the epochs "
                             "(default: %(default)s)")
    parser.add_argument("--grad_clip", type=float, default=5.0,
                        help="gradient norm clipping (default: %(default)s)")
    parser.add_argument("--exp_path", default="exp",
                        help="each run writes into a new directory under this one "
                             "(default: %(default)s)")
    parser.add_argument("--checkpoint_path", default=None,
                        help=f"resume the run of this {CHECKPOINT} (or run directory), writing "
                             f"into its directory; give the run's own flags again")
    parser.add_argument("--holdout_portion", type=float, default=0.0,
                        help="hold out this last part of the training split and evaluate on it "
                             "instead of the test split, training on the rest (choosing between "
                             "cells never looks at the test split; 0: off; default: %(default)s)")


def add_test_args(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Every flag of a test script."""
    parser.add_argument("--model_path", required=True,
                        help="weights to test: a state_dict (bare or with DataParallel's 'module.' "
                             "prefix), {'state_dict': ...}, or a run's trained.pt/best.pt/checkpoint.pt")
    add_model_args(parser, defaults)
    add_runtime_args(parser, defaults)


def precision_of(args: argparse.Namespace, runtime: Runtime) -> Precision:
    return Precision(args.amp, args.amp_dtype, runtime.device)


# -- datasets and networks -----------------------------------------------------------

def load_split(args: argparse.Namespace, dataset: str, train: bool,
               augment: bool = True) -> Dataset:
    """The training split (augmented unless ``augment`` is False) or the
    test/validation split of ``dataset``."""
    if dataset == "imagenet":
        return data.imagenet_split(args.data, train, augment)
    cutout_length = args.cutout_length if train and args.cutout else 0
    return data.cifar_split(args.data, dataset, train, cutout_length, augment)


def load_train_and_eval(args: argparse.Namespace, dataset: str) -> Tuple[Dataset, Dataset]:
    """The images a run trains on and those it evaluates on: the training and test
    splits, or with ``--holdout_portion`` the two parts of the training split (the
    held-out part without augmentation)."""
    train_set = load_split(args, dataset, train=True)
    portion = getattr(args, "holdout_portion", 0.0)
    if portion:
        return data.split_for_search(train_set, 1.0 - portion,
                                     rest=load_split(args, dataset, train=True, augment=False),
                                     flag="--holdout_portion")
    test_set = load_split(args, dataset, train=False)
    if train_set.classes != test_set.classes:
        raise UserError(f"the training and test splits under {args.data} have different "
                        f"classes: {train_set.classes} vs {test_set.classes}")
    return train_set, test_set


def evaluated_on(args: argparse.Namespace) -> str:
    """What a run's log and metrics call its evaluation: the test split, or with
    ``--holdout_portion`` the held-out part of the training split."""
    return "held-out" if getattr(args, "holdout_portion", 0.0) else "test"


def input_size_of(dataset: str) -> Tuple[int, int, int]:
    """(channels, height, width) of the images a network of ``dataset`` sees."""
    return (3, 224, 224) if dataset == "imagenet" else (3, 32, 32)


def build_network(args: argparse.Namespace, dataset: str, num_classes: int,
                  genotype: Genotype) -> nn.Module:
    network = NetworkImageNet if dataset == "imagenet" else NetworkCIFAR
    return network(args.init_ch, num_classes, args.layers, args.auxiliary, genotype)


# -- the loop --------------------------------------------------------------------

def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               criterion: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               auxiliary_weight: float, grad_clip: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on the loss plus the weighted auxiliary loss (when the network
    returns auxiliary logits); returns (loss, logits), still on the device."""
    with precision.autocast():
        logits, logits_aux = model(images)
        loss = criterion(logits, targets)
        if logits_aux is not None:
            loss = loss + auxiliary_weight * criterion(logits_aux, targets)
    weight_step(loss, optimizer, model.parameters(), precision, grad_clip)
    return loss.detach(), logits.detach()


def train_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module,
                optimizer: torch.optim.Optimizer, precision: Precision, runtime: Runtime,
                args: argparse.Namespace, log: RunLog,
                graph: Optional[StepGraph] = None) -> Tuple[float, Accuracy]:
    """One pass over this process's shard; returns the mean loss and the accuracy
    over all processes.  ``graph``: the run's ``StepGraph`` (CUDA graphs), captured anew
    for this epoch's learning rate and drop-path probability."""
    model.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return train_step(model, images, targets, criterion, optimizer, precision,
                          args.auxiliary_weight, args.grad_clip)

    graph = graph if graph is not None else StepGraph(step, enabled=False)
    graph.reset(step)
    return run_epoch(loader, graph, runtime, args.channels_last, "train",
                     report_freq=args.report_freq, log=log, graph=graph)


def test_accuracy(model: nn.Module, loader: DataLoader, runtime: Runtime, precision: Precision,
                  channels_last: bool, topk: Sequence[int] = (1,),
                  graph: Optional[StepGraph] = None) -> Accuracy:
    """Top-k accuracy over the whole split (this process's share summed over processes);
    ``graph``: an evaluation ``StepGraph`` (the short last batch runs eagerly)."""
    def forward(images: torch.Tensor, targets: torch.Tensor) -> Tuple[None, torch.Tensor]:
        with precision.autocast():
            logits, _ = model(images)
        return None, logits

    graph = graph if graph is not None else StepGraph(forward, enabled=False)
    graph.reset(forward)
    return evaluate(model, loader, graph, runtime, channels_last, "test", topk)[1]


# -- whole runs --------------------------------------------------------------------

@dataclass
class TrainingRun:
    """A training run's parts: network (bare and wrapped), optimizer, loaders, CUDA
    graphs, output directory, and where it stands (next epoch, best and last test)."""
    network: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    train_loader: Iterable
    test_loader: DataLoader
    graph: StepGraph
    eval_graph: StepGraph
    run_dir: Optional[str]
    log: RunLog
    start_epoch: int = 0
    best_acc: float = -1.0
    last_test: Optional[Accuracy] = None

    @property
    def eval_model(self) -> nn.Module:
        """DDP's forward synchronises; each process evaluates its share with the bare network."""
        distributed = isinstance(self.model, nn.parallel.DistributedDataParallel)
        return self.network if distributed else self.model


def make_train_loader(args: argparse.Namespace, runtime: Runtime, train_set: Dataset,
                      dataset: str) -> Iterable:
    """This process's shuffled training batches, made on the device with
    ``--device_loader``.  drop_last: a last batch of one image would break BAM's
    BatchNorm1d, and a CUDA graph replays one batch shape."""
    if args.device_loader:
        images, labels, _ = data.cifar_train_pixels(args.data, dataset, workers=args.workers)
        loader = data.device_cifar_loader((images, labels), train_set, args.batchsz, runtime,
                                          dataset, args.cutout_length if args.cutout else 0,
                                          args.seed, args.channels_last)
    else:
        loader = data.make_loader(train_set, args.batchsz, runtime, shuffle=True,
                                  workers=args.workers, seed=args.seed, drop_last=True)
    if len(loader) == 0:
        raise UserError(f"the training split has {len(train_set)} images: fewer than one batch "
                        f"of --batchsz {args.batchsz} per process")
    return loader


def prepare_training(args: argparse.Namespace, runtime: Runtime, network: nn.Module,
                     genotype: Genotype, train_set: Dataset, test_set: Dataset,
                     dataset: str, strict_graphs: bool) -> TrainingRun:
    """Loaders, the network on its device with its optimizer, the run directory, and
    the checkpoint to resume (checked against the architecture).  ``strict_graphs``:
    a failed CUDA-graph capture stops the run."""
    train_loader = make_train_loader(args, runtime, train_set, dataset)
    test_loader = data.make_eval_loader(test_set, args.batchsz, runtime, args.workers)
    precision = precision_of(args, runtime)
    network.to(runtime.device, memory_format=memory_format(args.channels_last))
    # foreach: a handful of launches per step instead of several per parameter tensor.
    optimizer = torch.optim.SGD(network.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.wd, foreach=True)
    path = checkpoint_file(args.checkpoint_path) if args.checkpoint_path else None
    state = None
    if path:
        # A checkpoint from before --holdout_portion existed trained on the whole split.
        state = load_checkpoint(path, args, "training", ("optimizer", "best_acc", "last_test"),
                                earlier={"holdout_portion": 0.0})
        if state["genotype"] != genotype_to_dict(genotype):
            raise UserError(f"{path} was trained with another architecture; resume with the "
                            f"run's --arch/--arch_path")
    run_dir = run_directory(path, args.exp_path, runtime)
    log = RunLog(run_dir)
    run = TrainingRun(network, parallel.wrap(network, runtime), optimizer, precision, train_loader,
                      test_loader, *run_graphs(args.cuda_graphs, strict_graphs, log), run_dir, log)
    if state is not None:
        restore(state, path, network, {"optimizer": optimizer}, precision, runtime, args.seed)
        run.start_epoch, run.best_acc = state["epoch"], state["best_acc"]
        run.last_test = Accuracy(**state["last_test"])
        run.log(f"resuming {run_dir} after epoch {run.start_epoch}/{args.epochs}")
    return run


def modes_line(args: argparse.Namespace, reasons: Dict[str, str]) -> str:
    """How this process computes, and why: a resumed run may do it otherwise than the
    run that wrote its checkpoint."""
    return (f"CUDA graphs {'on' if args.cuda_graphs else 'off'} ({reasons['cuda_graphs']}); "
            f"device loader {'on' if args.device_loader else 'off'} ({reasons['device_loader']}); "
            f"{deterministic_mode(args)}")


def log_start(run: TrainingRun, args: argparse.Namespace, runtime: Runtime, genotype: Genotype,
              train_set: Dataset, test_set: Dataset, input_size: Tuple[int, int, int],
              reasons: Dict[str, str]) -> None:
    """A new run's first lines, and its genotype.json."""
    log, network = run.log, run.network
    log(f"run directory {run.run_dir}")
    log(f"args {vars(args)}")
    log(f"genotype {genotype}")
    log(f"param size {count_parameters(network) / 1e6:.6f} M (auxiliary head excluded), "
        f"{count_macs(network, input_size) / 1e6:.1f} M multiply-accumulates per "
        f"{input_size[1]}x{input_size[2]} image")
    held_out = "held-out training" if evaluated_on(args) == "held-out" else "test"
    log(f"{len(train_set)} training and {len(test_set)} {held_out} images, "
        f"{data.num_classes_of(train_set)} classes; {runtime.world_size} process(es) on "
        f"{runtime.device}, {run.precision!r}")
    log(modes_line(args, reasons))
    if runtime.is_main:
        save_genotype(genotype, os.path.join(run.run_dir, GENOTYPE))


def train_and_test(run: TrainingRun, criterion: nn.Module, scheduler: LRScheduler, epoch: int,
                   runtime: Runtime, args: argparse.Namespace,
                   topk: Sequence[int]) -> Dict[str, Any]:
    """One training epoch at this epoch's drop-path probability, then the test split."""
    started = time.time()
    run.train_loader.sampler.set_epoch(epoch)
    run.network.drop_path_prob = args.drop_path_prob * epoch / args.epochs
    lr = scheduler.get_last_lr()[0]
    train_loss, train_acc = train_epoch(run.model, run.train_loader, criterion, run.optimizer,
                                        run.precision, runtime, args, run.log, run.graph)
    step_seconds = time.time() - started
    scheduler.step()
    # Every process evaluates the weights rank 0 saves: its BN statistics too.
    parallel.broadcast_(run.network.buffers())
    run.last_test = test_accuracy(run.eval_model, run.test_loader, runtime, run.precision,
                                  args.channels_last, topk, run.eval_graph)
    return {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "step_seconds": step_seconds, "seconds": time.time() - started}


def end_of_training_epoch(run: TrainingRun, result: Dict[str, Any], speed: str,
                          scheduler: LRScheduler, metrics: Metrics, runtime: Runtime,
                          args: argparse.Namespace, genotype: Genotype,
                          topk: Sequence[int]) -> None:
    """Log the epoch, write its metrics, the best weights so far and the checkpoint."""
    last_test, epoch = run.last_test, result["epoch"]
    is_best = last_test.percent(topk[0]) > run.best_acc
    run.best_acc = max(run.best_acc, last_test.percent(topk[0]))
    # Logged before the checkpoint is saved: a run killed in between repeats a line
    # rather than losing one.
    drop_path, evaluation = run.network.drop_path_prob, evaluated_on(args)
    run.log(f"epoch {epoch + 1}/{args.epochs} lr {result['lr']:.6e} drop_path {drop_path:.4f} "
            f"train_loss {result['train_loss']:.4f} train_acc {result['train_acc'].percent():.4f}% "
            f"{evaluation} {last_test} best {run.best_acc:.4f}% time {result['seconds']:.1f}s "
            f"{speed}")
    metrics.write(epoch + 1, {
        "lr": result["lr"], "drop_path": drop_path, "train_loss": result["train_loss"],
        "train_acc": result["train_acc"].percent(),
        **{f"{evaluation.replace('-', '_')}_top{k}_acc": last_test.percent(k) for k in topk},
        "best_acc": run.best_acc, "seconds": result["seconds"]})
    if runtime.is_main and is_best:
        atomic_save(run.network.state_dict(), os.path.join(run.run_dir, "best.pt"))
    save_checkpoint(run.run_dir, runtime, run.network, {"optimizer": run.optimizer}, scheduler,
                    run.precision, epoch + 1, args, genotype, best_acc=run.best_acc,
                    last_test=vars(last_test))


def fit(args: argparse.Namespace, runtime: Runtime, network: nn.Module, genotype: Genotype,
        train_set: Dataset, test_set: Dataset, criterion: nn.Module,
        make_scheduler: Callable[[torch.optim.Optimizer], LRScheduler],
        input_size: Tuple[int, int, int], topk: Sequence[int] = (1,),
        dataset: str = "cifar10") -> Accuracy:
    """Train the bare ``network`` for ``args.epochs`` (or the rest of them, with
    ``--checkpoint_path``), testing after each epoch, with checkpoints and logs in the
    run directory; returns the final test accuracy.  ``input_size``: (channels, height,
    width) of an image, for the multiply-accumulates logged; ``dataset``: which split
    ``--device_loader`` reads."""
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    reasons = {}
    args.cuda_graphs, strict_graphs, reasons["cuda_graphs"] = resolve_cuda_graphs(args, runtime)
    args.device_loader, reasons["device_loader"] = data.use_device_loader(
        getattr(args, "device_loader", False), runtime.device, dataset)
    run = prepare_training(args, runtime, network, genotype, train_set, test_set, dataset,
                           strict_graphs)
    resumed = run.last_test is not None
    if resumed:
        run.log(f"{run.precision!r}; {modes_line(args, reasons)}")
    else:
        log_start(run, args, runtime, genotype, train_set, test_set, input_size, reasons)
    metrics = Metrics(run.run_dir, resumed_after=run.start_epoch)
    if not resumed:
        run.log(metrics.describe())
    scheduler = resumed_schedule(make_scheduler, run.optimizer, run.start_epoch)
    clock = RunClock(run.start_epoch, args.epochs)
    epochs = progress(range(run.start_epoch, args.epochs), runtime, desc="epochs",
                      initial=run.start_epoch, total=args.epochs)
    for epoch in epochs:
        result = train_and_test(run, criterion, scheduler, epoch, runtime, args, topk)
        epochs.set_postfix_str(f"train {result['train_acc'].percent():.2f}% "
                               f"{evaluated_on(args)} {run.last_test.percent(topk[0]):.2f}%")
        iterations = len(run.train_loader)
        speed = clock.epoch_done(iterations * args.batchsz * runtime.world_size, iterations,
                                 result["step_seconds"], result["seconds"])
        end_of_training_epoch(run, result, speed, scheduler, metrics, runtime, args, genotype, topk)
    epochs.close()
    metrics.close()
    if runtime.is_main:
        atomic_save(network.state_dict(), os.path.join(run.run_dir, "trained.pt"))
    run.log(f"final {evaluated_on(args)} {run.last_test}")
    return run.last_test


def train(args: argparse.Namespace, dataset: str, criterion: nn.Module,
          make_scheduler: Callable[[torch.optim.Optimizer], LRScheduler],
          topk: Sequence[int] = (1,)) -> None:
    """A train script's whole run on ``dataset`` ('cifar10', 'cifar100' or 'imagenet')."""
    with parallel.process_group() as runtime:
        genotype = resolve_genotype(args.arch, args.arch_path)
        train_set, test_set = load_train_and_eval(args, dataset)
        # The same weights on every process (DDP would broadcast rank 0's anyway),
        # different augmentation and drop-path draws.
        set_seed(args.seed + runtime.rank)
        network = build_network(args, dataset, data.num_classes_of(train_set), genotype)
        with kernel_choice(args.deterministic, runtime.device):
            fit(args, runtime, network, genotype, train_set, test_set,
                criterion.to(runtime.device), make_scheduler, input_size_of(dataset), topk, dataset)


def test(args: argparse.Namespace, dataset: str, topk: Sequence[int] = (1,)) -> Accuracy:
    """A test script: the accuracy of ``args.model_path`` on the test/validation split."""
    with parallel.process_group() as runtime:
        set_seed(args.seed)
        genotype = resolve_genotype(args.arch, args.arch_path)
        test_set = load_split(args, dataset, train=False)
        network = build_network(args, dataset, data.num_classes_of(test_set), genotype)
        load_weights(network, args.model_path)
        network.to(runtime.device, memory_format=memory_format(args.channels_last))
        model = network if runtime.distributed else parallel.wrap(network, runtime)
        loader = data.make_eval_loader(test_set, args.batchsz, runtime, args.workers)
        graphs, strict, _ = resolve_cuda_graphs(args, runtime)
        graph = StepGraph(None, graphs, warmup=1, group=GraphGroup(strict))
        with kernel_choice(args.deterministic, runtime.device):
            result = test_accuracy(model, loader, runtime, precision_of(args, runtime),
                                   args.channels_last, topk, graph)
        if runtime.is_main:
            print(f"param size {count_parameters(network) / 1e6:.6f} M (auxiliary head excluded)")
            print(f"test {result}")
        return result
