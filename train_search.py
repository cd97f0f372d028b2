"""Architecture search (SPEC §7): learn which operation and attention every cell
edge uses, by alternating an architecture step (first or second order) on one
half of the training images with a weight step on the other half.

    python train_search.py --unrolled            # second order, attention after every op
    python train_search.py --location end        # first order, one attention per cell

Writes, in a new directory under --exp_path: log.txt, genotype.json (every epoch),
arch_history.jsonl (softmaxed alpha/beta/gamma and metrics per epoch, for
plot_search.py) and checkpoint.pt (resume with --checkpoint_path).
"""
import argparse
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn as nn

import data
import parallel
import utils
from architect import Architect
from model_search import AttLocation, Network
from parallel import Runtime
from precision import Precision, add_precision_flags, memory_format, resolve_channels_last
from experiment import (CHECKPOINT, EpochMetrics, RunLog, checkpoint_file, new_run_directory,
                        progress, restore_rng, to_device)

parser = argparse.ArgumentParser(
    description="Att-DARTS architecture search on CIFAR (or an image folder).",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--data", default="data",
                    help="dataset root: torchvision's CIFAR files (downloaded there if missing), or a "
                         "folder holding train/<class>/ images (any classes, resized to 32x32)")
parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10",
                    help="which CIFAR to download/normalise for (ignored for class counts of a folder)")
parser.add_argument("--batchsz", type=int, default=64, help="batch size per process, for both halves")
parser.add_argument("--lr", type=float, default=0.025, help="initial learning rate of the weights")
parser.add_argument("--lr_min", type=float, default=0.001, help="final weight learning rate (cosine)")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the weights")
parser.add_argument("--wd", type=float, default=3e-4, help="weight decay of the weights")
parser.add_argument("--report_freq", type=int, default=50, help="log running metrics every N steps")
parser.add_argument("--epochs", type=int, default=50, help="search epochs")
parser.add_argument("--init_ch", type=int, default=16, help="channels of the first cells (C)")
parser.add_argument("--layers", type=int, default=8, help="cells in the supernet")
parser.add_argument("--checkpoint_path", default=None,
                    help="resume the search of this checkpoint.pt (or run directory) where it stopped")
parser.add_argument("--cutout", action="store_true", help="cutout augmentation on the training images")
parser.add_argument("--cutout_length", type=int, default=16, help="side of the cutout square")
parser.add_argument("--exp_path", default="exp", help="each run writes into a new directory under this one")
parser.add_argument("--seed", type=int, default=2, help="random seed")
parser.add_argument("--grad_clip", type=float, default=5.0, help="gradient norm clipping of the weights")
parser.add_argument("--train_portion", type=float, default=0.5,
                    help="fraction of the training images for the weights; the rest train the architecture")
parser.add_argument("--unrolled", action="store_true",
                    help="second-order architecture gradient (one virtual SGD step); default: first order")
parser.add_argument("--arch_lr", type=float, default=3e-4, help="Adam learning rate of the architecture")
parser.add_argument("--arch_wd", type=float, default=1e-3, help="Adam weight decay of the architecture")
parser.add_argument("--location", default=AttLocation.AFTER_EVERY.value,
                    help="where attention is searched: " + ", ".join(loc.value for loc in AttLocation))
parser.add_argument("--workers", type=int, default=2, help="data loader worker processes")
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                    help="keep only the inputs of each part of a cell (preprocessings, nodes, cell "
                         "end) in the training forward passes and recompute the part during backward: "
                         "same gradients, far less memory, one more forward per pass")
add_precision_flags(parser, channels_last_default="auto")

HISTORY = "arch_history.jsonl"
# Flags that define the search itself: a resumed run must use the same ones.
# --epochs may grow: a finished search can be extended (the cosine follows the new length).
SEARCH_DEFINING_FLAGS = ("dataset", "batchsz", "lr", "lr_min", "momentum", "wd", "init_ch",
                         "layers", "cutout", "cutout_length", "seed", "grad_clip", "train_portion",
                         "unrolled", "arch_lr", "arch_wd", "location")


def search_epoch(model: nn.Module, network: Network, architect: Architect, train_loader,
                 arch_batches: data.CyclingLoader, optimizer: torch.optim.SGD, lr: float,
                 precision: Precision, args: argparse.Namespace, runtime: Runtime,
                 log: RunLog) -> Tuple[float, float]:
    """One pass over the weight half: per batch an architecture step, then a weight step."""
    model.train()
    metrics = EpochMetrics(runtime.device)
    bar = progress(train_loader, runtime, desc="search", leave=False)
    for step, (images, targets) in enumerate(bar, 1):
        images, targets = to_device(images, targets, runtime, args.channels_last)
        valid_images, valid_targets = to_device(*next(arch_batches), runtime, args.channels_last)

        architect.step(images, targets, valid_images, valid_targets, lr)

        with network.frozen_architecture(), precision.autocast():
            logits = model(images)
            loss = network.logits_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(network.weights(), args.grad_clip)
        precision.scaler.step(optimizer)
        precision.scaler.update()

        metrics.update(loss, logits, targets)
        if step % args.report_freq == 0:
            bar.set_postfix_str(metrics.running())
            log(f"search step {step:04d}/{len(train_loader)} {metrics.running()}")
    return metrics.total(runtime.device)


@torch.no_grad()
def evaluate(model: nn.Module, network: Network, loader, precision: Precision,
             runtime: Runtime, channels_last: bool) -> Tuple[float, float]:
    """Loss and accuracy of the supernet on the architecture half."""
    model.eval()
    metrics = EpochMetrics(runtime.device)
    for images, targets in progress(loader, runtime, desc="valid", leave=False):
        images, targets = to_device(images, targets, runtime, channels_last)
        with precision.autocast():
            logits = model(images)
        metrics.update(network.logits_loss(logits, targets), logits, targets)
    return metrics.total(runtime.device)


def candidates_of(network: Network) -> Dict[str, list]:
    """The candidate names behind each architecture parameter's columns."""
    stages = {"alphas": network.space.first_stage, "betas": network.space.second_stage,
              "gammas": network.space.cell_end}
    return {name: list(stages[name.split("_")[0]]) for name in network.named_arch_parameters()}


def load_search_checkpoint(path: str, args: argparse.Namespace) -> Dict[str, Any]:
    state = utils.load_torch_file(path)
    required = ("state_dict", "weight_optimizer", "arch_optimizer", "scheduler", "scaler",
                "epoch", "arch_batches", "rng", "args")
    missing = [k for k in required if k not in state] if isinstance(state, Mapping) else ["state_dict"]
    if missing:
        raise utils.UserError(f"{path} is not a search checkpoint (no {missing[0]!r}); pass the "
                              f"{CHECKPOINT} of a train_search.py run directory")
    for flag in SEARCH_DEFINING_FLAGS:
        saved = state["args"].get(flag)
        if saved is not None and saved != getattr(args, flag):
            raise utils.UserError(f"{path} comes from a search with --{flag} {saved}, not "
                                  f"{getattr(args, flag)}; resume with the run's own flags")
    return state


def arch_digest(network: Network) -> str:
    """A hash of the exact architecture parameters (ranks must agree bit for bit)."""
    digest = hashlib.sha256()
    for p in network.arch_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    args = parser.parse_args()
    try:
        location = AttLocation.parse(args.location)
    except ValueError as error:
        raise utils.UserError(f"--location: {error}") from None
    if args.epochs < 1:
        raise utils.UserError(f"--epochs must be at least 1, got {args.epochs}")
    runtime = parallel.setup()
    try:
        args.channels_last = resolve_channels_last(args.channels_last, runtime.device)
        search(args, location, runtime)
    finally:
        parallel.teardown()


def search(args: argparse.Namespace, location: AttLocation, runtime: Runtime) -> None:
    state = None
    if args.checkpoint_path:
        path = checkpoint_file(args.checkpoint_path)
        state = load_search_checkpoint(path, args)

    # Same seed on every process: identical initial weights and architecture.
    utils.set_seed(args.seed)
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dataset = data.cifar_split(args.data, args.dataset, train=True,
                               cutout_length=args.cutout_length if args.cutout else 0)
    weight_half, arch_half = data.split_for_search(dataset, args.train_portion)
    num_classes = data.num_classes_of(dataset)
    # drop_last: a final batch of one image would break the BatchNorm1d inside BAM.
    train_loader = data.make_loader(weight_half, args.batchsz, runtime, shuffle=True,
                                    workers=args.workers, seed=args.seed, drop_last=True)
    arch_batches = data.CyclingLoader(data.make_loader(
        arch_half, args.batchsz, runtime, shuffle=True, workers=args.workers,
        seed=args.seed + 1, drop_last=True))
    valid_loader = data.make_eval_loader(arch_half, args.batchsz, runtime, args.workers)
    if len(train_loader) == 0 or len(arch_batches.loader) == 0:
        raise utils.UserError(f"{len(dataset)} training images split by --train_portion "
                              f"{args.train_portion} leave less than one batch of --batchsz "
                              f"{args.batchsz} per process in a half")
    # Created only once the data is there: a failed start leaves no empty directory.
    if state is not None:
        run_dir = os.path.dirname(os.path.abspath(path))
    else:
        run_dir = new_run_directory(args.exp_path) if runtime.is_main else None
    log = RunLog(run_dir if runtime.is_main else None)

    precision = Precision(args.amp, args.amp_dtype, runtime.device)
    network = Network(args.init_ch, num_classes, args.layers, nn.CrossEntropyLoss(), location,
                      recompute=args.recompute)
    network.to(runtime.device, memory_format=memory_format(args.channels_last))
    model = parallel.wrap(network, runtime, ignore=list(network.named_arch_parameters()))
    optimizer = torch.optim.SGD(network.weights(), args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(args.epochs),
                                                           eta_min=args.lr_min)
    architect = Architect(model, optimizer, args.arch_lr, args.arch_wd, args.unrolled)

    start_epoch = 0
    if state is not None:
        utils.check_state_dict_fits(network, state["state_dict"], path)
        network.load_state_dict(state["state_dict"])
        try:
            optimizer.load_state_dict(state["weight_optimizer"])
            architect.optimizer.load_state_dict(state["arch_optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            precision.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise utils.UserError(f"{path}: the optimizer state does not fit this search "
                                  f"({str(error).splitlines()[0][:160]})") from None
        if state["args"].get("epochs") != args.epochs:
            # An extended search continues on the cosine of its new length.
            scheduler.T_max = float(args.epochs)
            lr = args.lr_min + (args.lr - args.lr_min) * (
                1 + math.cos(math.pi * state["epoch"] / args.epochs)) / 2
            for group in optimizer.param_groups:
                group["lr"] = lr
            scheduler._last_lr = [lr]
        arch_batches.load_state_dict(state["arch_batches"])
        restore_rng(state["rng"], runtime, args.seed)
        start_epoch = state["epoch"]
        log(f"resuming {run_dir} after epoch {start_epoch}/{args.epochs}")
    else:
        log(f"run directory {run_dir}")
        log(f"args {vars(args)}")
        log(f"supernet: location {location}, {utils.count_parameters_in_MB(network):.6f} M "
            f"parameters (architecture included); {len(weight_half)} images train the weights, "
            f"{len(arch_half)} the architecture, {num_classes} classes; {runtime.world_size} "
            f"process(es) on {runtime.device}, {precision!r}, "
            f"{'channels-last' if args.channels_last else 'contiguous'} layout, cells "
            f"{'recomputed in backward' if args.recompute else 'kept for backward'}, "
            f"{'second' if args.unrolled else 'first'} order")

    epochs = progress(range(start_epoch, args.epochs), runtime, desc="epochs",
                      initial=start_epoch, total=args.epochs)
    for epoch in epochs:
        started = time.time()
        lr = scheduler.get_last_lr()[0]
        train_loader.sampler.set_epoch(epoch)
        train_loss, train_acc = search_epoch(model, network, architect, train_loader, arch_batches,
                                             optimizer, lr, precision, args, runtime, log)
        scheduler.step()
        valid_loss, valid_acc = evaluate(network if runtime.distributed else model, network,
                                         valid_loader, precision, runtime, args.channels_last)
        genotype = network.genotype()
        arch = network.softmaxed_arch()
        epochs.set_postfix_str(f"train {train_acc:.2f}% valid {valid_acc:.2f}%")
        log(f"epoch {epoch + 1}/{args.epochs} lr {lr:.6e} train_loss {train_loss:.4f} "
            f"train_acc {train_acc:.4f}% valid_loss {valid_loss:.4f} valid_acc {valid_acc:.4f}% "
            f"time {time.time() - started:.1f}s")
        log(f"genotype {genotype}")
        for name, weights in arch.items():
            log(f"{name} (softmax) {json.dumps([[round(w, 4) for w in row] if isinstance(row, list) else round(row, 4) for row in weights])}")

        rng = parallel.gather_objects(utils.rng_state())
        if runtime.is_main:
            utils.save_genotype(genotype, os.path.join(run_dir, "genotype.json"))
            record = {"epoch": epoch + 1, "lr": lr, "train_acc": train_acc, "train_loss": train_loss,
                      "valid_acc": valid_acc, "valid_loss": valid_loss,
                      "genotype": utils.genotype_to_dict(genotype), "arch": arch,
                      "candidates": candidates_of(network)}
            history = os.path.join(run_dir, HISTORY)
            # Keep exactly the epochs done so far (a resumed run may have logged more).
            lines = open(history).read().splitlines()[:epoch] if os.path.exists(history) else []
            utils.atomic_write_text(history, "".join(line + "\n" for line in lines + [json.dumps(record)]))
            utils.atomic_save({
                "state_dict": network.state_dict(), "weight_optimizer": optimizer.state_dict(),
                "arch_optimizer": architect.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
                "epoch": epoch + 1, "arch_batches": arch_batches.state_dict(), "rng": rng,
                "args": vars(args), "genotype": utils.genotype_to_dict(genotype),
            }, os.path.join(run_dir, CHECKPOINT))
    epochs.close()
    if runtime.distributed:
        print(f"rank {runtime.rank}: architecture sha256 {arch_digest(network)}", flush=True)
    log(f"final genotype {network.genotype()} written to {os.path.join(str(run_dir), 'genotype.json')}")


if __name__ == "__main__":
    utils.run_cli(main)
