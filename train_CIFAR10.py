"""Train a final network on CIFAR-10 from scratch.

    python train_CIFAR10.py --auxiliary --cutout --arch Att_DARTS
    python -m torch.distributed.run --nproc_per_node 4 train_CIFAR10.py --auxiliary --cutout
"""
import argparse

import torch.nn as nn

from runtime import training
from runtime.errors import run_cli
from runtime.experiment import cosine_schedule

parser = argparse.ArgumentParser(description="Train a final Att-DARTS network on CIFAR-10 from "
                                             "scratch; the run ends by testing trained.pt.")
training.add_train_args(parser, training.CIFAR_DEFAULTS, cutout=True)


def main() -> None:
    args = parser.parse_args()
    training.train(args, "cifar10", nn.CrossEntropyLoss(), cosine_schedule(args.epochs))


if __name__ == "__main__":
    run_cli(main)
