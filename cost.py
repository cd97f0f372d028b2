"""What a final network costs: parameters, multiply-accumulates, peak memory, latency.

    python cost.py --arch Att_DARTS
    python cost.py --arch DARTS_V2 --dataset imagenet
    python cost.py --arch_path exp/train_search-.../genotype.json --batch 96

Parameters leave out the auxiliary head; MACs count convolutions, linear layers
and matrix products per image (see runtime/complexity.py); memory and latency are
measured on the chosen device in eval mode without gradients.
"""
import argparse
from typing import Optional

import torch

import genotypes
from runtime import complexity, training
from runtime.errors import UserError, run_cli

# dataset: (classes, image side, the training scripts' defaults)
DATASETS = {
    "cifar10": (10, 32, training.CIFAR_DEFAULTS),
    "cifar100": (100, 32, training.CIFAR_DEFAULTS),
    "imagenet": (1000, 224, training.IMAGENET_DEFAULTS),
}

parser = argparse.ArgumentParser(description="Parameters, multiply-accumulates, peak memory and "
                                             "latency of a final network.")
parser.add_argument("--arch", default="Att_DARTS",
                    help=f"a genotype in genotypes.py: {', '.join(genotypes.NAMED_GENOTYPES)} "
                         f"(default: %(default)s)")
parser.add_argument("--arch_path", default=None,
                    help="a genotype.json written by train_search.py; wins over --arch")
parser.add_argument("--init_ch", type=int, default=None,
                    help="channels of the first cells (default: the dataset's, 36 on CIFAR, "
                         "48 on ImageNet)")
parser.add_argument("--layers", type=int, default=None,
                    help="number of cells (default: the dataset's, 20 on CIFAR, 14 on ImageNet)")
parser.add_argument("--auxiliary", action="store_true",
                    help="build the auxiliary head too (its parameters are reported apart; "
                         "it does not run in eval mode)")
parser.add_argument("--dataset", default="cifar10",
                    help=f"{', '.join(DATASETS)}: classes, input size and the default --init_ch "
                         f"and --layers of its training script (default: %(default)s)")
parser.add_argument("--batch", type=int, default=32,
                    help="memory and latency are measured at batch 1 and at this batch "
                         "(default: %(default)s)")
parser.add_argument("--repeats", type=int, default=10,
                    help="timed forwards per batch; the median is reported (default: %(default)s)")
parser.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:1, ... (default: the accelerator if there is one, "
                         "else cpu)")


def pick_device(name: Optional[str]) -> torch.device:
    """The named device, or the accelerator when there is one, else the CPU."""
    if name is None:
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; e.g. cpu, cuda, cuda:1") from None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if device.type != "cpu" and (accelerator is None or accelerator.type != device.type
                                 or (device.index or 0) >= torch.accelerator.device_count()):
        raise UserError(f"--device {name}: no such device is available here")
    return device


def complete_args(args: argparse.Namespace) -> None:
    """Fill in the dataset's --init_ch and --layers, and check the flags."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; valid: {', '.join(DATASETS)}")
    defaults = DATASETS[args.dataset][2]
    for flag in ("init_ch", "layers"):
        if getattr(args, flag) is None:
            setattr(args, flag, defaults[flag])
    for flag in ("init_ch", "layers", "batch", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.dataset == "imagenet" and args.init_ch % 2:
        raise UserError(f"--init_ch must be even on imagenet (its first cell halves the "
                              f"resolution with two convolutions of init_ch/2 channels), "
                              f"got {args.init_ch}")
    if args.dataset == "imagenet" and args.layers < 2:
        raise UserError("--layers must be at least 2 on imagenet (two reduction cells "
                              "bring 28x28 down to the 7x7 of the final pooling)")


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def main() -> None:
    args = parser.parse_args()
    complete_args(args)
    genotype = genotypes.resolve_genotype(args.arch, args.arch_path)
    device = pick_device(args.device)
    classes, side, _ = DATASETS[args.dataset]
    model = training.build_network(args, args.dataset, classes, genotype).to(device)
    cost = complexity.measure(model, (3, side, side), (1, args.batch), args.repeats)

    print(f"{args.arch_path or args.arch} on {args.dataset}: {type(model).__name__}, "
          f"C={args.init_ch}, {args.layers} cells, {classes} classes, 3x{side}x{side} input")
    auxiliary = (f"; the auxiliary head has {cost.auxiliary_parameters:,} more"
                 if args.auxiliary else "")
    print(f"parameters  {cost.parameters:,} ({cost.parameters / 1e6:.2f} M), "
          f"auxiliary head excluded{auxiliary}")
    print(f"MACs        {cost.macs:,} per image ({cost.macs / 1e6:.1f} M)")
    print("            (multiply-accumulates of convolutions, linear layers and matrix products; "
          "FLOPs = 2 x MACs; elementwise ops, pooling and BatchNorm not counted)")
    print(f"device      {cost.device}, eval mode, no grad")
    for batch in cost.batches:
        print(f"batch {batch.batch:<5} peak memory {megabytes(batch.peak_bytes)}, "
              f"latency {batch.latency_s * 1e3:.1f} ms")
    if cost.device.type == "cuda":
        method = "the CUDA allocator's peak"
    else:
        method = "bytes of the tensors alive, followed op by op"
    print(f"            (peak memory: {method}, weights and input included; "
          f"latency: median of {args.repeats} forwards after warm-up)")
    if args.dataset == "imagenet":
        fits = cost.macs <= complexity.MOBILE_SETTING_MACS
        print(f"mobile setting (at most {complexity.MOBILE_SETTING_MACS / 1e6:.0f} M MACs): "
              f"{'fits' if fits else 'does not fit'} ({cost.macs / 1e6:.1f} M)")


if __name__ == "__main__":
    run_cli(main)
