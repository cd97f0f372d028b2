"""Test trained weights on the CIFAR-10 test split (SPEC §8).

    python test_CIFAR10.py --auxiliary --model_path cifar10_att.pt --arch Att_DARTS
"""
import argparse

import training
import utils

parser = argparse.ArgumentParser(description="Report the top-1 accuracy and error of trained "
                                             "weights on the CIFAR-10 test split.")
training.add_test_args(parser, training.CIFAR_DEFAULTS)


def main() -> None:
    training.test(parser.parse_args(), "cifar10")


if __name__ == "__main__":
    utils.run_cli(main)
