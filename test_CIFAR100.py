"""Test trained weights on the CIFAR-100 test split.

    python test_CIFAR100.py --auxiliary --model_path cifar100_att.pt --arch Att_DARTS
"""
import argparse

from runtime import training
from runtime.errors import run_cli

parser = argparse.ArgumentParser(description="Report the top-1 accuracy and error of trained "
                                             "weights on the CIFAR-100 test split.")
training.add_test_args(parser, training.CIFAR_DEFAULTS)


def main() -> None:
    training.test(parser.parse_args(), "cifar100")


if __name__ == "__main__":
    run_cli(main)
