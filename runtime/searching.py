"""The architecture search: learn which operation and attention every cell edge uses,
by alternating an architecture step on one half of the training images with a weight
step on the other half.  train_search.py is its command line.

Each iteration (``search_step``): one Adam step on the architecture parameters A
(first order: grad_A L_val(w, A); second order: through one virtual SGD step of the
weights, see architect.py) on a batch of the architecture half, then one SGD step on
the weights w (momentum, weight decay, gradient-norm clipping, cosine learning rate)
on a batch of the weight half.  The collapse fixes (runtime/collapse_fixes.py, ``--beta_decay``,
``--aux_skip``, ``--relaxation``, ``--perturb_alpha``) hook in through the architect:
a penalty on the architecture loss, SDARTS's perturbed architecture for the weight
step, and their per-epoch schedules (``Variant.start_epoch``).

A search writes, in its run directory: log.txt, genotype.json (every epoch),
arch_history.jsonl (softmaxed A, metrics and diagnostics per epoch, for plot_search.py),
metrics.csv (and TensorBoard logs when the package is installed) and checkpoint.pt
(resume with --checkpoint_path).  Every epoch it also logs signs of a collapse
(diagnostics.py), every --hessian_every epochs the dominant eigenvalue of the
validation loss's Hessian in architecture space (curvature.py), and it may stop
early on either (--early_stop, early_stop.py).
"""
import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from architect import Architect
from genotypes import (OPERATION_SPACES, Genotype, check_space, genotype_from_dict,
                       genotype_to_dict, save_genotype)
from model_search import (EDGE_WEIGHTS, AttLocation, Network, NetworkImageNet,
                          check_partial_channels, node_sizes)
from runtime import curvature, data, imagenet_sample, parallel
from runtime.collapse_fixes import EARLIER_FLAGS as VARIANT_FLAGS
from runtime.collapse_fixes import Variant, check_variant_flags
from runtime.collapse_fixes import describe as describe_variant
from runtime.complexity import count_parameters
from runtime.cuda_graphs import StepGraph, resolve_cuda_graphs, run_graphs
from runtime.diagnostics import describe, epoch_diagnostics, scalars
from runtime.early_stop import EarlyStop
from runtime.errors import UserError
from runtime.experiment import (GENOTYPE, Accuracy, RunClock, RunLog, checkpoint_file,
                                cosine_schedule, evaluate, load_checkpoint, progress, restore,
                                resumed_schedule, run_directory, run_epoch, save_checkpoint,
                                set_seed, to_device, warmed_up_cosine_schedule, weight_step)
from runtime.history import record_epoch
from runtime.metrics import Metrics, heatmap_image
from runtime.parallel import Runtime
from runtime.precision import (Precision, deterministic_mode, kernel_choice, memory_format,
                               resolve_channels_last)

Batch = Tuple[torch.Tensor, torch.Tensor]
# Set to 1: each process prints a hash of the architecture after every search step.
TRACE_ARCH = "ATT_DARTS_TRACE_ARCH"


def search_step(model: nn.Module, architect: Architect, optimizer: torch.optim.Optimizer,
                precision: Precision, train: Batch, valid: Batch, lr: float,
                grad_clip: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One search iteration: the architecture step on ``valid`` (``lr``: the weights'
    current learning rate, for the second order's virtual step), then the weight step
    on ``train`` (on SDARTS's perturbed architecture with ``--perturb_alpha``).  Returns
    the weight step's (loss, logits), still on the device."""
    architect.step(*train, *valid, lr)
    variant = architect.variant
    with variant.perturbed(*train) if variant is not None else contextlib.nullcontext():
        return supernet_weight_step(model, architect.network, optimizer, precision, train,
                                    grad_clip)


def supernet_weight_step(model: nn.Module, network: Network, optimizer: torch.optim.Optimizer,
                         precision: Precision, train: Batch,
                         grad_clip: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight step of a search iteration on ``train``, the architecture held fixed
    (alone, it is a whole iteration while the architecture is frozen:
    ``--arch_warmup_epochs``).  Returns (loss, logits), still on the device."""
    images, targets = train
    with network.frozen_architecture(), precision.autocast():
        logits = model(images)
        loss = network.logits_loss(logits, targets)
    weight_step(loss, optimizer, network.weights(), precision, grad_clip)
    return loss.detach(), logits.detach()


def search_epoch(model: nn.Module, architect: Architect, optimizer: torch.optim.Optimizer,
                 train_loader: torch.utils.data.DataLoader, arch_batches: Iterator[Batch],
                 lr: float, precision: Precision, runtime: Runtime, args: argparse.Namespace,
                 log: RunLog, graph: Optional[StepGraph] = None,
                 frozen: bool = False) -> Tuple[float, Accuracy]:
    """One pass over the weight half, each batch paired with the next batch of the
    architecture half; returns the mean loss and accuracy of the weight steps.
    ``graph``: the run's ``StepGraph`` (CUDA graphs) for this kind of iteration,
    captured anew for this epoch's learning rate; without it every iteration runs
    eagerly.  ``frozen``: the architecture is frozen this epoch (``--arch_warmup_epochs``):
    weight steps only, and no batch of the architecture half is fetched.

    With ``ATT_DARTS_TRACE_ARCH=1`` in the environment every process prints
    ``rank R epoch E step S architecture sha256 H`` after each iteration (epoch and
    step counted from 1; the weight step leaves the architecture alone, so H is that
    of the architecture step): the ranks of a torchrun search must agree at every step.
    The trace reads the architecture back every step: a debugging aid, not for speed."""
    model.train()
    trace = os.environ.get(TRACE_ARCH) == "1"
    epoch = getattr(train_loader.sampler, "epoch", 0) + 1
    steps = 0

    def iteration(images: torch.Tensor, targets: torch.Tensor, *valid: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        if frozen:
            return supernet_weight_step(model, architect.network, optimizer, precision,
                                        (images, targets), args.grad_clip)
        return search_step(model, architect, optimizer, precision, (images, targets), valid,
                           lr, args.grad_clip)

    graph = graph if graph is not None else StepGraph(iteration, enabled=False)
    graph.reset(iteration)

    place = functools.partial(to_device, runtime=runtime, channels_last=args.channels_last)

    def step(images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        nonlocal steps
        valid = () if frozen else graph.feed(place, *next(arch_batches), first=2)
        result = graph(images, targets, *valid)
        steps += 1
        if trace:
            # One write of the whole line, after any pending output: under torchrun the
            # processes share one output, and an unbuffered print() (PYTHONUNBUFFERED)
            # writes its newline apart.
            sys.stdout.flush()
            sys.stdout.write(f"rank {runtime.rank} epoch {epoch} step {steps} architecture "
                             f"sha256 {arch_digest(architect.network)}\n")
            sys.stdout.flush()
        return result

    return run_epoch(train_loader, step, runtime, args.channels_last, "search",
                     report_freq=args.report_freq, log=log, graph=graph)


def evaluate_supernet(model: nn.Module, loader: torch.utils.data.DataLoader, precision: Precision,
                      runtime: Runtime, channels_last: bool,
                      graph: Optional[StepGraph] = None) -> Tuple[float, Accuracy]:
    """Loss and accuracy of the supernet on the architecture half (``graph``: the run's
    evaluation ``StepGraph``, captured anew: the network changed since the last one)."""
    network = parallel.unwrap(model)

    def forward(images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast():
            logits = model(images)
        return network.logits_loss(logits, targets), logits

    graph = graph if graph is not None else StepGraph(forward, enabled=False)
    graph.reset(forward)
    return evaluate(model, loader, graph, runtime, channels_last, "valid")


def candidate_names(network: Network) -> Dict[str, List]:
    """The candidate names behind each architecture parameter's columns: one list, or
    one list per edge where the edges' candidates differ (RobustDARTS's s1)."""
    # Edge weights: one column per edge, named by the node it leads to and its input.
    edges = [f"node {i} <- {j}" for i, size in enumerate(node_sizes(network.steps))
             for j in range(size)]
    names: Dict[str, List] = {}
    for name in network.named_arch_parameters():
        rows = network.edge_candidates.get(name)
        if name.startswith(EDGE_WEIGHTS):
            names[name] = edges
        elif rows is None:  # gammas: the cell-end attentions
            names[name] = list(network.space.cell_end)
        else:
            names[name] = (list(rows[0]) if all(row == rows[0] for row in rows)
                           else [list(row) for row in rows])
    return names


def describe_space(network: Network) -> str:
    """The operation space (--space) and what each edge chooses from, for the run's log."""
    space = network.operation_space
    rows = {kind: network.edge_candidates[f"alphas_{kind}"] for kind in ("normal", "reduce")}
    if all(row == rows["normal"][0] for kind_rows in rows.values() for row in kind_rows):
        return f"operation space {space}: every edge chooses from {', '.join(rows['normal'][0])}"
    edges = [f"{i}<-{j}" for i, size in enumerate(node_sizes(network.steps)) for j in range(size)]
    per_edge = "; ".join(f"{kind} cells " + ", ".join(f"{edge} {'/'.join(row)}"
                                                       for edge, row in zip(edges, kind_rows))
                         for kind, kind_rows in rows.items())
    return f"operation space {space}: each edge its own candidates (node<-input): {per_edge}"


def arch_digest(network: Network) -> str:
    """A hash of the exact architecture parameters (ranks must agree bit for bit)."""
    digest = hashlib.sha256()
    for p in network.arch_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def add_collapse_flags(parser: argparse.ArgumentParser) -> None:
    """train_search.py's flags of curvature tracking and early stopping."""
    parser.add_argument("--hessian_every", type=int, default=0, metavar="K",
                        help="every K epochs, compute the dominant eigenvalue of the Hessian of the "
                             "validation loss with respect to the architecture parameters (power "
                             "iteration on Hessian-vector products; RobustDARTS' sign of collapse); 0: never")
    parser.add_argument("--hessian_images", type=int, default=256,
                        help="size of the fixed subset of the architecture half the eigenvalue is "
                             "computed on (shared out among torchrun processes)")
    parser.add_argument("--hessian_iterations", type=int, default=20,
                        help="at most this many power iterations, each one Hessian-vector product over "
                             "the subset; fewer when the estimate changes by at most 1e-5 (relative)")
    parser.add_argument("--early_stop", default=None, metavar="RULE",
                        help="stop the search early: 'skip:N' when the derived normal cell holds N or "
                             "more skip_connect, keeping that epoch's genotype (DARTS+); 'hessian' when "
                             "the eigenvalue grows (needs --hessian_every), keeping the genotype of the "
                             "epoch before the window that grew (RobustDARTS)")
    parser.add_argument("--early_stop_window", type=int, default=5,
                        help="--early_stop hessian: compare the mean magnitude of the last this many "
                             "eigenvalues with that of the ones before them")
    parser.add_argument("--early_stop_after", type=int, default=10,
                        help="--early_stop hessian: check only after this epoch")
    parser.add_argument("--early_stop_ratio", type=float, default=1.3,
                        help="--early_stop hessian: stop when the mean magnitude grew more than this factor")


def early_stop_rule(args: argparse.Namespace) -> Optional[EarlyStop]:
    """The flags of curvature tracking and early stopping, checked; the --early_stop rule."""
    if args.hessian_every < 0:
        raise UserError(f"--hessian_every must be 0 (off) or a number of epochs, got {args.hessian_every}")
    if args.hessian_images < 2 or args.hessian_iterations < 1:
        raise UserError(f"--hessian_images must be at least 2 and --hessian_iterations at least 1, "
                        f"got {args.hessian_images} and {args.hessian_iterations}")
    if args.early_stop is None:
        return None
    rule = EarlyStop.parse(args.early_stop, args.early_stop_window, args.early_stop_after,
                           args.early_stop_ratio)
    if rule.rule == "hessian" and not args.hessian_every:
        raise UserError("--early_stop hessian watches the Hessian eigenvalue: give --hessian_every "
                        "K as well (K=1: every epoch, as RobustDARTS)")
    return rule


def check_search_space_flags(args: argparse.Namespace) -> None:
    """--space, --partial_channels, --edge_norm ('auto': on with partial channels,
    resolved in ``args``) and --arch_warmup_epochs, checked before anything is built."""
    check_space(args.space)
    try:
        check_partial_channels(args.init_ch, args.layers, args.partial_channels)
    except ValueError as error:
        raise UserError(f"--partial_channels: {error} (--init_ch {args.init_ch})") from None
    if args.edge_norm == "auto":
        args.edge_norm = args.partial_channels > 1
    for flag in ("arch_warmup_epochs", "lr_warmup_epochs", "arch_grad_clip"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 (off) or positive, got {getattr(args, flag)}")


def add_search_space_flags(parser: argparse.ArgumentParser) -> None:
    """train_search.py's flags of the operation space, PC-DARTS's partial channels and
    edge normalisation, and the architecture warm-up."""
    parser.add_argument("--space", default="darts", metavar="SPACE",
                        help="the candidate operations of every edge: darts (DARTS's 8), or a "
                             "stress space of RobustDARTS (Zela et al., ICLR 2020), as their "
                             "release defines it: s1 (its own pair of operations on each edge), "
                             "s2 (skip_connect, sep_conv_3x3), s3 (none, skip_connect, "
                             "sep_conv_3x3), s4 (noise, sep_conv_3x3); attentions stay where "
                             "--location puts them.  One of: " + ", ".join(OPERATION_SPACES))
    parser.add_argument("--partial_channels", type=int, default=1, metavar="K",
                        help="PC-DARTS's partial channel connections: each edge's operations run "
                             "on 1/K of its input's channels, the rest bypass them (K must divide "
                             "--init_ch); 1: every channel, the paper's search")
    parser.add_argument("--edge_norm", action=argparse.BooleanOptionalAction, default="auto",
                        help="PC-DARTS's edge normalisation: one more architecture weight per edge, "
                             "softmaxed over each node's incoming edges, which scales the edge and "
                             "ranks it in the genotype ('auto': on with --partial_channels > 1)")
    parser.add_argument("--arch_warmup_epochs", type=int, default=0, metavar="N",
                        help="freeze the architecture for the first N epochs: weight steps only, "
                             "no batch of the architecture half fetched (PC-DARTS: 15 on CIFAR, "
                             "35 on ImageNet)")
    parser.add_argument("--lr_warmup_epochs", type=int, default=0, metavar="N",
                        help="the weights' learning rate rises linearly over the first N epochs, "
                             "lr x (epoch + 1) / N, then follows the cosine where it stands "
                             "(PC-DARTS's ImageNet search: 5); 0: the cosine from the start")
    parser.add_argument("--arch_grad_clip", type=float, default=0.0,
                        help="clip the norm of the architecture gradient to this before each "
                             "Adam step (PC-DARTS's ImageNet search: 5); 0: no clipping")


# PC-DARTS's ImageNet search (Xu et al., ICLR 2020) as their release's
# train_search_imagenet.py runs it; README, "Searching on ImageNet", gives the source of
# every value.  --location stays the user's (no_attention is PC-DARTS's own space).
SEARCH_PRESETS: Dict[str, Dict[str, Any]] = {
    "pc_darts_imagenet": dict(
        dataset="imagenet", imagenet_sample=["0.1", "0.025"], epochs=50, init_ch=16, layers=8,
        batchsz=1024, lr=0.5, lr_min=0.0, lr_warmup_epochs=5, momentum=0.9, wd=3e-4,
        grad_clip=5.0, arch_lr=6e-3, arch_wd=1e-3, arch_grad_clip=5.0, arch_warmup_epochs=35,
        partial_channels=2, edge_norm=True),
}


def add_preset_flag(parser: argparse.ArgumentParser) -> None:
    """train_search.py's --preset (read by ``parse_search_args``)."""
    def flag(name: str, value: Any) -> str:
        if isinstance(value, bool):
            return f"--{name}" if value else f"--no-{name}"
        return f"--{name} {' '.join(value) if isinstance(value, list) else value}"
    described = "; ".join(f"{name}: " + " ".join(flag(*item) for item in values.items())
                          for name, values in SEARCH_PRESETS.items())
    parser.add_argument("--preset", default=None, choices=sorted(SEARCH_PRESETS),
                        help=f"settings of a published search, standing in for the defaults of "
                             f"the flags not given ({described}: PC-DARTS's ImageNet search, "
                             f"from their train_search_imagenet.py; see the README)")


def parse_search_args(parser: argparse.ArgumentParser,
                      argv: Optional[List[str]] = None) -> argparse.Namespace:
    """train_search.py's flags: those given, the --preset's values for the others, the
    defaults for the rest."""
    preset = parser.parse_known_args(argv)[0].preset
    # argparse leaves alone what the namespace already holds, unless a flag is given.
    return parser.parse_args(argv, namespace=argparse.Namespace(**SEARCH_PRESETS.get(preset, {})))


def search_channels_last(args: argparse.Namespace, device: torch.device) -> bool:
    """``--channels_last`` resolved.  ``auto`` stays off for an ImageNet supernet on the
    CPU whose stem is narrower than 16 channels (--init_ch 5 or less): with torch 2.14.1,
    oneDNN corrupts memory in the channels-last backward of a 1x1 stride-2 convolution
    with fewer than 16 input channels at 48x48 pixels and more, which the first cell's
    FactorizedReduce of stem0's 56x56 output then is."""
    if (args.channels_last == "auto" and args.dataset == "imagenet" and device.type == "cpu"
            and 3 * args.init_ch < 16):
        return False
    return resolve_channels_last(args.channels_last, device)


def resolve_recompute(requested: "bool | str", device: torch.device) -> Tuple[bool, str]:
    """``--recompute`` resolved: (on or off, why), for the run's log.  ``auto`` is on for
    the CPU, where memory is scarce and a pass is compute-bound, off on GPUs, where
    the extra forward doubles a launch-bound step for memory the card has to spare."""
    if requested != "auto":
        return bool(requested), "as requested"
    if device.type == "cpu":
        return True, "auto: on for the CPU, a third of the memory for one more forward per pass"
    return False, ("auto: off on a GPU, where it costs about 2x the time; turn it on with "
                   "--recompute on a small card or for a wide supernet")


def search(args: argparse.Namespace) -> None:
    """train_search.py's whole run on every process of this launch."""
    try:
        location = AttLocation.parse(args.location)
    except ValueError as error:
        raise UserError(f"--location: {error}") from None
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    check_search_space_flags(args)
    check_variant_flags(args)
    early_stop = early_stop_rule(args)
    with parallel.process_group() as runtime:
        args.channels_last = search_channels_last(args, runtime.device)
        args.recompute, recompute_reason = resolve_recompute(args.recompute, runtime.device)
        args.cuda_graphs, strict_graphs, graphs_reason = resolve_cuda_graphs(args, runtime)
        args.device_loader, loader_reason = data.use_device_loader(args.device_loader,
                                                                   runtime.device, args.dataset)
        reasons = {"recompute": recompute_reason, "cuda_graphs": graphs_reason,
                   "device_loader": loader_reason}
        with kernel_choice(args.deterministic, runtime.device):
            run_search(args, location, runtime, early_stop, reasons, strict_graphs)


def kept_genotype(summaries: List[Dict[str, Any]], epoch: int) -> Genotype:
    """The genotype of ``epoch`` among the per-epoch summaries."""
    return genotype_from_dict(next(s["genotype"] for s in summaries if s["epoch"] == epoch))


# -- a search run, part by part -------------------------------------------------------------

@dataclass
class SearchData:
    """The two halves of the training split (or ImageNet's two samples) and their loaders."""
    weight_half: Dataset
    arch_half: Dataset
    num_classes: int
    train_loader: DataLoader
    arch_batches: data.CyclingLoader
    valid_loader: DataLoader
    hessian_images: int
    origin: str = ""
    sample_lists: Optional[Dict[str, List[str]]] = None  # an ImageNet sample to write


@dataclass
class Supernet:
    """The supernet and what trains it: weight optimizer, architect, precision, the
    CUDA graphs of the iteration (bilevel, and weights only while the architecture is
    frozen) and the evaluation, the eigenvalue's fixed batches."""
    network: Network
    model: nn.Module
    optimizer: torch.optim.SGD
    architect: Architect
    precision: Precision
    graph: StepGraph
    frozen_graph: StepGraph
    eval_graph: StepGraph
    hessian_batches: List[Batch]

    @property
    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"weight_optimizer": self.optimizer, "arch_optimizer": self.architect.optimizer}


@dataclass
class SearchState:
    """Where the search stands: the next epoch, each epoch's genotype and eigenvalue
    (what --early_stop decides on), an early stop already taken, the last genotype."""
    start_epoch: int
    summaries: List[Dict[str, Any]]
    stopped: Optional[Dict[str, Any]]
    previous: Genotype
    final: Genotype


def search_images(args: argparse.Namespace,
                  resume_dir: Optional[str]) -> Tuple[Dataset, Dataset, str, Optional[Dict]]:
    """The images that train the weights and those that train the architecture, where
    they come from, and the ImageNet sample's file lists to write into a new run's
    directory (``resume_dir``: a resumed run's, whose lists are read back)."""
    cutout_length = args.cutout_length if args.cutout else 0
    if args.dataset == "imagenet":
        sample = imagenet_sample.search_sample(args.data, args.imagenet_sample, args.seed,
                                               resume_dir, cutout_length)
        return sample.weights, sample.architecture, sample.description, sample.lists
    dataset = data.cifar_split(args.data, args.dataset, train=True, cutout_length=cutout_length)
    weight_half, arch_half = data.split_for_search(dataset, args.train_portion)
    return weight_half, arch_half, f"--train_portion {args.train_portion:g} of {args.data}", None


def load_search_data(args: argparse.Namespace, runtime: Runtime,
                     resume_dir: Optional[str] = None) -> SearchData:
    """The weight and architecture halves, with this process's loaders."""
    weight_half, arch_half, origin, sample_lists = search_images(args, resume_dir)
    cutout_length = args.cutout_length if args.cutout else 0
    # drop_last: a final batch of one image would break the BatchNorm1d inside BAM, and
    # a CUDA graph replays one batch shape.
    if args.device_loader:  # the same images per batch, augmented on the device
        pixels = data.cifar_train_pixels(args.data, args.dataset, workers=args.workers)[:2]
        train_loader, arch_loader = (
            data.device_cifar_loader(pixels, half, args.batchsz, runtime, args.dataset,
                                     cutout_length, seed, args.channels_last)
            for half, seed in ((weight_half, args.seed), (arch_half, args.seed + 1)))
    else:
        train_loader, arch_loader = (
            data.make_loader(half, args.batchsz, runtime, shuffle=True, workers=args.workers,
                             seed=seed, drop_last=True)
            for half, seed in ((weight_half, args.seed), (arch_half, args.seed + 1)))
    arch_batches = data.CyclingLoader(arch_loader)
    valid_loader = data.make_eval_loader(arch_half, args.batchsz, runtime, args.workers)
    if len(train_loader) == 0 or len(arch_batches.loader) == 0:
        raise UserError(f"{len(weight_half)} and {len(arch_half)} images for the weights and the "
                        f"architecture ({origin}) leave less than one batch of --batchsz "
                        f"{args.batchsz} per process in one of them")
    hessian_images = min(args.hessian_images, len(arch_half))
    if args.hessian_every and hessian_images < 2 * runtime.world_size:
        raise UserError(f"--hessian_images {args.hessian_images} ({len(arch_half)} images in the "
                        f"architecture half) leaves a process fewer than 2 images, which "
                        f"BatchNorm needs")
    return SearchData(weight_half, arch_half, data.num_classes_of(weight_half), train_loader,
                      arch_batches, valid_loader, hessian_images, origin, sample_lists)


def build_supernet(args: argparse.Namespace, location: AttLocation, runtime: Runtime,
                   halves: SearchData, graphs: Tuple[StepGraph, StepGraph, StepGraph]) -> Supernet:
    """The supernet on this process's device, wrapped for data parallelism, its
    optimizers and ``graphs`` (``cuda_graphs.run_graphs``: the search iteration's, the
    warm-up epochs' and evaluation's).  Optimizers use their multi-tensor (foreach)
    kernels: a handful of launches per step instead of several per parameter tensor."""
    precision = Precision(args.amp, args.amp_dtype, runtime.device)
    supernet = NetworkImageNet if args.dataset == "imagenet" else Network
    network = supernet(args.init_ch, halves.num_classes, args.layers, nn.CrossEntropyLoss(),
                       location, recompute=args.recompute, partial_channels=args.partial_channels,
                       edge_norm=args.edge_norm, operation_space=args.space,
                       relaxation=args.relaxation, op_threshold=args.op_threshold,
                       aux_skip=args.aux_skip)
    network.to(runtime.device, memory_format=memory_format(args.channels_last))
    model = parallel.wrap(network, runtime, ignore=list(network.named_arch_parameters()))
    optimizer = torch.optim.SGD(network.weights(), args.lr, momentum=args.momentum,
                                weight_decay=args.wd, foreach=True)
    architect = Architect(model, optimizer, args.arch_lr, args.arch_wd, args.unrolled,
                          capturable=args.cuda_graphs, variant=Variant(args, network),
                          grad_clip=args.arch_grad_clip)
    if args.cuda_graphs:  # after a failed capture its steps are eager again
        graphs[0].group.capturable.append(architect.optimizer)
    # The same images every time the eigenvalue is measured, after a resume too.
    hessian_batches = (curvature.fixed_subset(halves.arch_half, halves.hessian_images,
                                              args.batchsz, runtime, args.channels_last)
                       if args.hessian_every else [])
    return Supernet(network, model, optimizer, architect, precision, *graphs, hessian_batches)


def start_or_resume(state: Optional[Dict[str, Any]], path: Optional[str], net: Supernet,
                    halves: SearchData, args: argparse.Namespace, runtime: Runtime,
                    location: AttLocation, reasons: Dict[str, str], log: RunLog,
                    run_dir: Optional[str]) -> SearchState:
    """A resumed search's state from its checkpoint, or a new search's, logged."""
    network = net.network
    # How this process computes: a resumed run may do it otherwise than its checkpoint's.
    modes = (f"recompute {'on' if args.recompute else 'off'} ({reasons['recompute']}); CUDA "
             f"graphs {'on' if args.cuda_graphs else 'off'} ({reasons['cuda_graphs']}); device "
             f"loader {'on' if args.device_loader else 'off'} ({reasons['device_loader']}); "
             f"{deterministic_mode(args)}")
    if state is not None:
        halves.arch_batches.load_state_dict(state["arch_batches"])
        restore(state, path, network, net.optimizers, net.precision, runtime, args.seed)
        log(f"resuming {run_dir} after epoch {state['epoch']}/{args.epochs}; operation space "
            f"{args.space}; {net.precision!r}; {modes}; collapse fixes: {describe_variant(args)}")
        log(f"images: {halves.origin}")
        summaries = list(state.get("epoch_summaries", []))
        stopped = state.get("early_stop")
        final = kept_genotype(summaries, stopped["kept_epoch"]) if stopped else network.genotype()
        return SearchState(state["epoch"], summaries, stopped,
                           genotype_from_dict(state["genotype"]), final)
    log(f"run directory {run_dir}")
    log(f"args {vars(args)}")
    log(f"supernet: location {location}, operation space {args.space}, "
        f"{count_parameters(network) / 1e6:.6f} M "
        f"parameters (architecture included); {len(halves.weight_half)} images train the "
        f"weights, {len(halves.arch_half)} the architecture, {halves.num_classes} classes; "
        f"{runtime.world_size} process(es) on {runtime.device}, {net.precision!r}, "
        f"{'channels-last' if args.channels_last else 'contiguous'} layout, cells "
        f"{'recomputed in backward' if args.recompute else 'kept for backward'}, "
        f"{'second' if args.unrolled else 'first'} order")
    log(describe_space(network))
    log(f"images: {halves.origin}")
    log(f"partial channels: {describe_partial_channels(args)}")
    log(f"collapse fixes: {describe_variant(args)}")
    log(modes)
    if args.hessian_every:
        log(f"hessian: dominant eigenvalue of the validation loss's Hessian in architecture "
            f"space every {args.hessian_every} epoch(s), on a fixed subset of "
            f"{halves.hessian_images} images of the architecture half (power iteration: at "
            f"most {args.hessian_iterations} Hessian-vector products, relative tolerance "
            f"{curvature.TOLERANCE:g})")
    # The first epoch's genotype is compared with the initial architecture's.
    genotype = network.genotype()
    return SearchState(0, [], None, genotype, genotype)


# What a checkpoint written before these flags existed was searched with.
EARLIER_FLAGS = {"partial_channels": 1, "edge_norm": False, "arch_warmup_epochs": 0,
                 "space": "darts", "lr_warmup_epochs": 0, "arch_grad_clip": 0.0, "preset": None}


def run_search(args: argparse.Namespace, location: AttLocation, runtime: Runtime,
               early_stop: Optional[EarlyStop], reasons: Dict[str, str],
               strict_graphs: bool) -> None:
    """This process's part of the search: data, supernet, resume, then the epochs
    (``strict_graphs``: a failed CUDA-graph capture stops the run)."""
    path = checkpoint_file(args.checkpoint_path) if args.checkpoint_path else None
    state = load_checkpoint(path, args, "search", ("weight_optimizer", "arch_optimizer",
                                                   "arch_batches"),
                            earlier={**EARLIER_FLAGS, **VARIANT_FLAGS}) if path else None
    # Same seed on every process: identical initial weights and architecture.
    set_seed(args.seed)
    halves = load_search_data(args, runtime,
                              os.path.dirname(os.path.abspath(path)) if path else None)
    # Created only once the data is there: a failed start leaves no empty directory.
    run_dir = run_directory(path, args.exp_path, runtime)
    log = RunLog(run_dir)
    if halves.sample_lists is not None and runtime.is_main:
        imagenet_sample.write_lists(run_dir, halves.sample_lists)
    net = build_supernet(args, location, runtime, halves,
                         # Iterations of the warm-up epochs (weight step only) are a graph
                         # of their own, with their own warm-up: the first bilevel iteration
                         # must not be captured before the architecture optimizer has made
                         # its state.
                         run_graphs(args.cuda_graphs, strict_graphs, log, steps=2))
    progress_state = start_or_resume(state, path, net, halves, args, runtime, location, reasons,
                                     log, run_dir)
    metrics = Metrics(run_dir, resumed_after=progress_state.start_epoch)
    if state is None:
        log(metrics.describe())
    schedule = (warmed_up_cosine_schedule(args.epochs, args.lr_min, args.lr_warmup_epochs)
                if args.lr_warmup_epochs else cosine_schedule(args.epochs, args.lr_min))
    scheduler = resumed_schedule(schedule, net.optimizer, progress_state.start_epoch)
    if progress_state.stopped is not None:
        log(f"this search stopped early after epoch {progress_state.stopped['epoch']}: "
            f"{progress_state.stopped['reason']}; nothing to resume")
    last_epoch = args.epochs if progress_state.stopped is None else progress_state.start_epoch
    epochs = progress(range(progress_state.start_epoch, last_epoch), runtime, desc="epochs",
                      initial=progress_state.start_epoch, total=args.epochs)
    clock = RunClock(progress_state.start_epoch, args.epochs)
    for epoch in epochs:
        result = train_and_validate(net, halves, scheduler, epoch, runtime, args, log)
        epochs.set_postfix_str(f"train {result['train_acc'].percent():.2f}% "
                               f"valid {result['valid_acc'].percent():.2f}%")
        iterations = len(halves.train_loader)
        speed = clock.epoch_done(iterations * args.batchsz * runtime.world_size, iterations,
                                 result["step_seconds"], result["seconds"])
        if end_of_epoch(net, halves, progress_state, result, speed, early_stop, args, runtime,
                        metrics, scheduler, log, run_dir):
            break
    epochs.close()
    metrics.close()
    finish(net.network, progress_state, args, runtime, log, run_dir)


def train_and_validate(net: Supernet, halves: SearchData, scheduler: LRScheduler, epoch: int,
                       runtime: Runtime, args: argparse.Namespace, log: RunLog) -> Dict[str, Any]:
    """One epoch of search iterations, then the supernet on the architecture half."""
    started = time.time()
    lr = scheduler.get_last_lr()[0]
    halves.train_loader.sampler.set_epoch(epoch)
    frozen = epoch < args.arch_warmup_epochs
    variant = net.architect.variant
    schedule = variant.start_epoch(epoch) if variant is not None else ""
    if schedule:
        log(f"epoch {epoch + 1}/{args.epochs} collapse fixes: {schedule}")
    train_loss, train_acc = search_epoch(net.model, net.architect, net.optimizer,
                                         halves.train_loader, halves.arch_batches, lr,
                                         net.precision, runtime, args, log,
                                         net.frozen_graph if frozen else net.graph, frozen)
    step_seconds = time.time() - started
    scheduler.step()
    # DDP's forward synchronises; each process evaluates its share with the bare network.
    valid_loss, valid_acc = evaluate_supernet(net.network if runtime.distributed else net.model,
                                              halves.valid_loader, net.precision, runtime,
                                              args.channels_last, net.eval_graph)
    return {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "valid_loss": valid_loss, "valid_acc": valid_acc, "step_seconds": step_seconds,
            "seconds": time.time() - started}


def describe_partial_channels(args: argparse.Namespace) -> str:
    """The flags of PC-DARTS's search (partial channels, edge normalisation, warm-ups,
    architecture-gradient clipping, the preset), for the run's log."""
    channels = (f"K={args.partial_channels}, each edge's operations see 1/{args.partial_channels} "
                f"of the channels" if args.partial_channels > 1 else "off (every channel)")
    warmup = (f"architecture frozen for the first {args.arch_warmup_epochs} epoch(s)"
              if args.arch_warmup_epochs else "architecture trained from the first epoch")
    extra = ([f"learning rate warmed up over {args.lr_warmup_epochs} epoch(s)"]
             if args.lr_warmup_epochs else [])
    extra += ([f"architecture gradient clipped to norm {args.arch_grad_clip:g}"]
              if args.arch_grad_clip else [])
    extra += [f"--preset {args.preset}"] if args.preset else []
    return "; ".join([channels, f"edge normalisation {'on' if args.edge_norm else 'off'}",
                      warmup, *extra])


def log_epoch(log: RunLog, result: Dict[str, Any], speed: str, genotype: Genotype,
              arch: Dict[str, List], stats: Dict[str, Any], args: argparse.Namespace) -> None:
    """An epoch's lines in log.txt: metrics and speed, genotype, softmaxed architecture,
    diagnostics."""
    epoch = result["epoch"]
    log(f"epoch {epoch + 1}/{args.epochs} lr {result['lr']:.6e} "
        f"train_loss {result['train_loss']:.4f} train_acc {result['train_acc'].percent():.4f}% "
        f"valid_loss {result['valid_loss']:.4f} valid_acc {result['valid_acc'].percent():.4f}% "
        f"time {result['seconds']:.1f}s {speed}"
        f"{' (architecture frozen)' if epoch < args.arch_warmup_epochs else ''}")
    log(f"genotype {genotype}")
    for name, weights in arch.items():
        rounded = [[round(w, 4) for w in row] if isinstance(row, list) else round(row, 4)
                   for row in weights]
        sigmoid = args.relaxation == "sigmoid" and not name.startswith(EDGE_WEIGHTS)
        log(f"{name} ({'sigmoid' if sigmoid else 'softmax'}) {json.dumps(rounded)}")
    for line in describe(stats, f"epoch {epoch}" if epoch else "the initial architecture"):
        log(line)


def measure_curvature(net: Supernet, halves: SearchData, args: argparse.Namespace,
                      log: RunLog) -> curvature.Eigenvalue:
    """The dominant Hessian eigenvalue in architecture space, logged."""
    started = time.time()
    # The graphs' private pools go before the double backward, which needs the memory.
    net.graph.group.release()
    eigenvalue = curvature.dominant_eigenvalue(net.network, net.hessian_batches,
                                               args.hessian_iterations)
    log(f"hessian: dominant eigenvalue {eigenvalue.value:.6e} ({halves.hessian_images} images, "
        f"{eigenvalue.iterations} power iterations, "
        f"{'converged' if eigenvalue.converged else 'not converged'}: last relative "
        f"change {eigenvalue.change:.1e}) time {time.time() - started:.1f}s")
    return eigenvalue


def end_of_epoch(net: Supernet, halves: SearchData, search_state: SearchState,
                 result: Dict[str, Any], speed: str, early_stop: Optional[EarlyStop],
                 args: argparse.Namespace, runtime: Runtime, metrics: Metrics,
                 scheduler: LRScheduler, log: RunLog, run_dir: Optional[str]) -> bool:
    """What follows an epoch: log, diagnostics, eigenvalue, early stop, genotype file,
    history, metrics, checkpoint.  Returns whether the search stops here."""
    network, epoch = net.network, result["epoch"]
    genotype = network.genotype()
    arch = network.softmaxed_arch()
    genotype_dict = genotype_to_dict(genotype)
    stats = epoch_diagnostics(network, genotype, search_state.previous)
    log_epoch(log, result, speed, genotype, arch, stats, args)
    accuracies = {"train_acc": result["train_acc"].percent(),
                  "valid_acc": result["valid_acc"].percent()}
    figures = {"lr": result["lr"], "train_loss": result["train_loss"],
               "valid_loss": result["valid_loss"], **accuracies}
    record = {"epoch": epoch + 1, **figures, "genotype": genotype_dict, "arch": arch,
              "candidates": candidate_names(network), "diagnostics": stats}
    row = {**figures, "seconds": result["seconds"], **scalars(stats)}
    eigenvalue = None
    if args.hessian_every and (epoch + 1) % args.hessian_every == 0:
        eigenvalue = measure_curvature(net, halves, args, log)
        record["hessian"] = {"eigenvalue": eigenvalue.value, "images": halves.hessian_images,
                             "iterations": eigenvalue.iterations,
                             "converged": eigenvalue.converged}
        row["hessian_eigenvalue"] = eigenvalue.value
    summaries = search_state.summaries
    summaries.append({"epoch": epoch + 1, "genotype": genotype_dict,
                      "eigenvalue": eigenvalue.value if eigenvalue else None})
    stop = early_stop.check(summaries) if early_stop else None
    search_state.final = kept_genotype(summaries, stop.kept_epoch) if stop else genotype
    if stop:
        record["early_stop"] = stop.to_dict()
    if runtime.is_main:
        save_genotype(search_state.final, os.path.join(run_dir, GENOTYPE))
        record_epoch(run_dir, epoch + 1, record)
    metrics.write(epoch + 1, row, {f"arch/{name}": heatmap_image(weights, record["candidates"][name])
                                   for name, weights in arch.items()} if metrics.writer else None)
    save_checkpoint(run_dir, runtime, network, net.optimizers, scheduler, net.precision,
                    epoch + 1, args, genotype, arch_batches=halves.arch_batches.state_dict(),
                    epoch_summaries=summaries, early_stop=stop.to_dict() if stop else None)
    search_state.previous = genotype
    if stop:
        log(f"early stop after epoch {epoch + 1}: {stop.reason}")
    return stop is not None


def finish(network: Network, search_state: SearchState, args: argparse.Namespace,
           runtime: Runtime, log: RunLog, run_dir: Optional[str]) -> None:
    """The last lines: under torchrun each process's architecture hash (and eigenvalues),
    for checking that the ranks agree; the genotype kept."""
    if runtime.distributed:
        print(f"rank {runtime.rank}: architecture sha256 {arch_digest(network)}", flush=True)
        if args.hessian_every:
            eigenvalues = [s["eigenvalue"] for s in search_state.summaries
                           if s["eigenvalue"] is not None]
            print(f"rank {runtime.rank}: hessian eigenvalues {eigenvalues}", flush=True)
    log(f"final genotype {search_state.final} written to {os.path.join(str(run_dir), GENOTYPE)}")
