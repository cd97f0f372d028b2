"""The architecture search: learn which operation and attention every cell edge uses,
by alternating an architecture step on one half of the training images with a weight
step on the other half.  train_search.py is its command line.

Each iteration (``search_step``): one Adam step on the architecture parameters A
(first order: grad_A L_val(w, A); second order: through one virtual SGD step of the
weights, see architect.py) on a batch of the architecture half, then one SGD step on
the weights w (momentum, weight decay, gradient-norm clipping, cosine learning rate)
on a batch of the weight half.

A search writes, in its run directory: log.txt, genotype.json (every epoch),
arch_history.jsonl (softmaxed A and metrics per epoch, for plot_search.py) and
checkpoint.pt (resume with --checkpoint_path).
"""
import argparse
import hashlib
import json
import os
import time
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

import data
import parallel
from architect import Architect
from complexity import count_parameters
from errors import UserError
from experiment import (GENOTYPE, Accuracy, RunLog, checkpoint_file, cosine_schedule,
                        evaluate, load_checkpoint, progress, restore,
                        resumed_schedule, run_directory, run_epoch, save_checkpoint, set_seed,
                        to_device, weight_step)
from genotypes import genotype_to_dict, save_genotype
from history import record_epoch
from model_search import AttLocation, Network
from parallel import Runtime
from precision import Precision, memory_format, resolve_channels_last

Batch = Tuple[torch.Tensor, torch.Tensor]


def search_step(model: nn.Module, architect: Architect, optimizer: torch.optim.Optimizer,
                precision: Precision, train: Batch, valid: Batch, lr: float,
                grad_clip: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One search iteration: the architecture step on ``valid`` (``lr``: the weights'
    current learning rate, for the second order's virtual step), then the weight step
    on ``train``.  Returns the weight step's (loss, logits), still on the device."""
    images, targets = train
    architect.step(images, targets, *valid, lr)
    network = architect.network
    with network.frozen_architecture(), precision.autocast():
        logits = model(images)
        loss = network.logits_loss(logits, targets)
    weight_step(loss, optimizer, network.weights(), precision, grad_clip)
    return loss.detach(), logits.detach()


def search_epoch(model: nn.Module, architect: Architect, optimizer: torch.optim.Optimizer,
                 train_loader: torch.utils.data.DataLoader, arch_batches: Iterator[Batch],
                 lr: float, precision: Precision, runtime: Runtime, args: argparse.Namespace,
                 log: RunLog) -> Tuple[float, Accuracy]:
    """One pass over the weight half, each batch paired with the next batch of the
    architecture half; returns the mean loss and accuracy of the weight steps."""
    model.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        valid = to_device(*next(arch_batches), runtime, args.channels_last)
        return search_step(model, architect, optimizer, precision, (images, targets), valid, lr,
                           args.grad_clip)

    return run_epoch(train_loader, step, runtime, args.channels_last, "search",
                     report_freq=args.report_freq, log=log)


def evaluate_supernet(model: nn.Module, loader: torch.utils.data.DataLoader, precision: Precision,
                      runtime: Runtime, channels_last: bool) -> Tuple[float, Accuracy]:
    """Loss and accuracy of the supernet on the architecture half."""
    network = parallel.unwrap(model)

    def forward(images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast():
            logits = model(images)
        return network.logits_loss(logits, targets), logits

    return evaluate(model, loader, forward, runtime, channels_last, "valid")


def candidate_names(network: Network) -> Dict[str, List[str]]:
    """The candidate names behind each architecture parameter's columns."""
    stages = {"alphas": network.space.first_stage, "betas": network.space.second_stage,
              "gammas": network.space.cell_end}
    return {name: list(stages[name.split("_")[0]]) for name in network.named_arch_parameters()}


def arch_digest(network: Network) -> str:
    """A hash of the exact architecture parameters (ranks must agree bit for bit)."""
    digest = hashlib.sha256()
    for p in network.arch_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def search(args: argparse.Namespace) -> None:
    """train_search.py's whole run on every process of this launch."""
    try:
        location = AttLocation.parse(args.location)
    except ValueError as error:
        raise UserError(f"--location: {error}") from None
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    runtime = parallel.setup()
    try:
        args.channels_last = resolve_channels_last(args.channels_last, runtime.device)
        run_search(args, location, runtime)
    finally:
        parallel.teardown()


def run_search(args: argparse.Namespace, location: AttLocation, runtime: Runtime) -> None:
    """This process's part of the search: data, supernet, resume, then the epochs."""
    path = checkpoint_file(args.checkpoint_path) if args.checkpoint_path else None
    state = load_checkpoint(path, args, "search", ("weight_optimizer", "arch_optimizer",
                                                   "arch_batches")) if path else None

    # Same seed on every process: identical initial weights and architecture.
    set_seed(args.seed)
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
        raise UserError(f"{len(dataset)} training images split by --train_portion "
                        f"{args.train_portion} leave less than one batch of --batchsz "
                        f"{args.batchsz} per process in a half")
    # Created only once the data is there: a failed start leaves no empty directory.
    run_dir = run_directory(path, args.exp_path, runtime)
    log = RunLog(run_dir)

    precision = Precision(args.amp, args.amp_dtype, runtime.device)
    network = Network(args.init_ch, num_classes, args.layers, nn.CrossEntropyLoss(), location,
                      recompute=args.recompute)
    network.to(runtime.device, memory_format=memory_format(args.channels_last))
    model = parallel.wrap(network, runtime, ignore=list(network.named_arch_parameters()))
    optimizer = torch.optim.SGD(network.weights(), args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    architect = Architect(model, optimizer, args.arch_lr, args.arch_wd, args.unrolled)
    optimizers = {"weight_optimizer": optimizer, "arch_optimizer": architect.optimizer}

    start_epoch = 0
    if state is not None:
        arch_batches.load_state_dict(state["arch_batches"])
        restore(state, path, network, optimizers, precision, runtime, args.seed)
        start_epoch = state["epoch"]
        log(f"resuming {run_dir} after epoch {start_epoch}/{args.epochs}")
    else:
        log(f"run directory {run_dir}")
        log(f"args {vars(args)}")
        log(f"supernet: location {location}, {count_parameters(network) / 1e6:.6f} M "
            f"parameters (architecture included); {len(weight_half)} images train the weights, "
            f"{len(arch_half)} the architecture, {num_classes} classes; {runtime.world_size} "
            f"process(es) on {runtime.device}, {precision!r}, "
            f"{'channels-last' if args.channels_last else 'contiguous'} layout, cells "
            f"{'recomputed in backward' if args.recompute else 'kept for backward'}, "
            f"{'second' if args.unrolled else 'first'} order")
    scheduler = resumed_schedule(cosine_schedule(args.epochs, args.lr_min), optimizer, start_epoch)

    epochs = progress(range(start_epoch, args.epochs), runtime, desc="epochs",
                      initial=start_epoch, total=args.epochs)
    for epoch in epochs:
        started = time.time()
        lr = scheduler.get_last_lr()[0]
        train_loader.sampler.set_epoch(epoch)
        train_loss, train_acc = search_epoch(model, architect, optimizer, train_loader,
                                             arch_batches, lr, precision, runtime, args, log)
        scheduler.step()
        # DDP's forward synchronises; each process evaluates its share with the bare network.
        valid_loss, valid_acc = evaluate_supernet(network if runtime.distributed else model,
                                                  valid_loader, precision, runtime,
                                                  args.channels_last)
        genotype = network.genotype()
        arch = network.softmaxed_arch()
        epochs.set_postfix_str(f"train {train_acc.percent():.2f}% valid {valid_acc.percent():.2f}%")
        log(f"epoch {epoch + 1}/{args.epochs} lr {lr:.6e} train_loss {train_loss:.4f} "
            f"train_acc {train_acc.percent():.4f}% valid_loss {valid_loss:.4f} "
            f"valid_acc {valid_acc.percent():.4f}% time {time.time() - started:.1f}s")
        log(f"genotype {genotype}")
        for name, weights in arch.items():
            rounded = [[round(w, 4) for w in row] if isinstance(row, list) else round(row, 4)
                       for row in weights]
            log(f"{name} (softmax) {json.dumps(rounded)}")
        if runtime.is_main:
            save_genotype(genotype, os.path.join(run_dir, GENOTYPE))
            record_epoch(run_dir, epoch + 1, {
                "epoch": epoch + 1, "lr": lr, "train_acc": train_acc.percent(),
                "train_loss": train_loss, "valid_acc": valid_acc.percent(),
                "valid_loss": valid_loss, "genotype": genotype_to_dict(genotype), "arch": arch,
                "candidates": candidate_names(network)})
        save_checkpoint(run_dir, runtime, network, optimizers, scheduler, precision, epoch + 1,
                        args, genotype, arch_batches=arch_batches.state_dict())
    epochs.close()
    if runtime.distributed:
        print(f"rank {runtime.rank}: architecture sha256 {arch_digest(network)}", flush=True)
    log(f"final genotype {network.genotype()} written to {os.path.join(str(run_dir), GENOTYPE)}")
