"""Train a final network on ImageNet from scratch.

    python train_ImageNet.py --auxiliary --arch Att_DARTS --data /path/to/imagenet

``--data`` holds ``train/<wnid>/`` and ``val/<wnid>/`` image folders (any image
folder works; the class count comes from it).  Unlike the original release, the
training really uses the label-smoothed loss and the step decay of the learning rate.
"""
import argparse

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import StepLR

from runtime import training
from runtime.errors import run_cli

parser = argparse.ArgumentParser(description="Train a final Att-DARTS network on ImageNet from "
                                             "scratch; the run ends by testing trained.pt on val/.")
training.add_train_args(parser, training.IMAGENET_DEFAULTS, cutout=False)
parser.add_argument("--label_smooth", type=float, default=0.1,
                    help="label smoothing of the training loss (default: %(default)s)")
parser.add_argument("--gamma", type=float, default=0.97,
                    help="learning rate decay factor (default: %(default)s)")
parser.add_argument("--decay_period", type=int, default=1,
                    help="multiply the learning rate by --gamma every this many epochs "
                         "(default: %(default)s)")


def build_criterion(args: argparse.Namespace) -> nn.Module:
    """Cross-entropy against targets smoothed towards the uniform distribution."""
    return nn.CrossEntropyLoss(label_smoothing=args.label_smooth)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> StepLR:
    return StepLR(optimizer, args.decay_period, gamma=args.gamma)


def main() -> None:
    args = parser.parse_args()
    training.train(args, "imagenet", build_criterion(args),
                   lambda optimizer: build_scheduler(optimizer, args), topk=(1, 5))


if __name__ == "__main__":
    run_cli(main)
