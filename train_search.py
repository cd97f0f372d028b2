"""Architecture search: learn which operation and attention every cell edge uses
(the search itself is runtime/searching.py).

    python train_search.py --unrolled            # second order, attention after every op
    python train_search.py --location end        # first order, one attention per cell
    python train_search.py --space s3            # in a stress space of RobustDARTS
    python train_search.py --partial_channels 4 --batchsz 256 --lr 0.1 --lr_min 0 \
        --arch_lr 6e-4 --arch_warmup_epochs 15   # PC-DARTS's search settings
    python train_search.py --beta_decay 50 --aux_skip --perturb_alpha random
                                                 # collapse fixes (runtime/collapse_fixes.py), combined
    python train_search.py --preset pc_darts_imagenet --data /path/to/imagenet
                                                 # PC-DARTS's search on ImageNet, with attention

Writes, in a new directory under --exp_path: log.txt, genotype.json (every epoch),
arch_history.jsonl (softmaxed alpha/beta/gamma, metrics and diagnostics per epoch, for
plot_search.py), metrics.csv (plus TensorBoard logs when tensorboard is installed) and
checkpoint.pt (resume with --checkpoint_path); an ImageNet search also its sample's
file lists (imagenet_sample/).
"""
import argparse

from model_search import AttLocation
from runtime import searching
from runtime.collapse_fixes import add_variant_flags
from runtime.cuda_graphs import add_cuda_graph_flag
from runtime.data import add_device_loader_flag
from runtime.errors import run_cli
from runtime.precision import add_deterministic_flag, add_precision_flags

parser = argparse.ArgumentParser(
    description="Att-DARTS architecture search on CIFAR, an image folder, or ImageNet "
                "(PC-DARTS's ImageNet supernet).",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--data", default="data",
                    help="dataset root: torchvision's CIFAR files (downloaded there if missing), or a "
                         "folder holding train/<class>/ images (any classes, resized to 32x32); "
                         "with --dataset imagenet, ImageNet's folder (train/<wnid>/)")
parser.add_argument("--dataset", choices=["cifar10", "cifar100", "imagenet"], default="cifar10",
                    help="which CIFAR to download/normalise for (ignored for class counts of a "
                         "folder); imagenet: PC-DARTS's ImageNet supernet (stride-8 stem, 224x224 "
                         "crops) on per-class samples of --data's train/ (--imagenet_sample)")
parser.add_argument("--imagenet_sample", nargs="+", default=["0.1", "0.025"],
                    metavar="FRACTION",
                    help="--dataset imagenet: the fractions of every class of train/ drawn (with "
                         "--seed) to train the weights and, disjoint, the architecture, written "
                         "to the run directory as file lists and read back on resume; 'prepared': "
                         "--data already is the sample, train/ for the weights and val/ for the "
                         "architecture (--train_portion does not apply)")
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
parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default="auto",
                    help="keep only the inputs of each part of a cell (preprocessings, the edges "
                         "leaving each state, cell end) in the training forward passes and "
                         "recompute the part during backward: same gradients, a third of the "
                         "memory, one more forward per pass ('auto': on for the CPU, off on GPUs; "
                         "turn it on for a small card or a wide supernet)")
add_cuda_graph_flag(parser)
add_device_loader_flag(parser)
add_deterministic_flag(parser)
searching.add_search_space_flags(parser)
searching.add_preset_flag(parser)
searching.add_collapse_flags(parser)
add_variant_flags(parser)
add_precision_flags(parser, channels_last_default="auto")


def main() -> None:
    searching.search(searching.parse_search_args(parser))


if __name__ == "__main__":
    run_cli(main)
