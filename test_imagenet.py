"""Test trained weights on the ImageNet validation split.

    python test_imagenet.py --auxiliary --model_path imagenet_att.pt --arch Att_DARTS --data DIR
"""
import argparse

from runtime import training
from runtime.errors import run_cli

parser = argparse.ArgumentParser(description="Report the top-1 and top-5 accuracy and error of "
                                             "trained weights on the ImageNet val/ folder.")
training.add_test_args(parser, training.IMAGENET_DEFAULTS)


def main() -> None:
    training.test(parser.parse_args(), "imagenet", topk=(1, 5))


if __name__ == "__main__":
    run_cli(main)
