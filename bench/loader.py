"""Images/s of the CIFAR training loaders: the DataLoader at several worker counts, and
the DeviceCIFARLoader.

    python bench/loader.py --mini                 # cifar10-mini (2,500 images)
    python bench/loader.py                        # the 50,000 images of cifar10-train.tar.gz
    python bench/loader.py --device cuda          # batches delivered on the GPU

Both deliver what a training step takes: augmented batches (crop, flip, normalise,
cutout 16 unless --cutout_length 0) on --device, in training order.  The DataLoader
(``data.make_loader`` over ``data.cifar_split``) decodes the JPEGs with PIL and
augments in its workers; the device loader decodes the split once
(``data.cifar_train_pixels``, counted in its setup time) and augments on the device.
"setup" is the time to the first batch (worker start-up, decoding); images/s is the
steady rate after it, over up to --images images.  The archive
(``../shared/data/cifar10-train.tar.gz``, read-only) is extracted once under --cache.
"""
import argparse
import os
import shutil
import sys
import tarfile
import time
from typing import Callable, Iterable, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from runtime import data  # noqa: E402
from runtime.errors import UserError, run_cli  # noqa: E402
from runtime.experiment import to_device  # noqa: E402
from runtime.parallel import Runtime  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                             "att-darts")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--mini", action="store_true", help="cifar10-mini instead of the 50,000 images")
parser.add_argument("--device", default="cpu", help="where the batches are delivered")
parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4],
                    help="DataLoader worker counts (the largest also decodes for the device loader)")
parser.add_argument("--batch", type=int, default=96, help="batch size (train_CIFAR10.py's)")
parser.add_argument("--cutout_length", type=int, default=16, help="cutout side; 0: no cutout")
parser.add_argument("--channels_last", action="store_true", help="channels-last batches")
parser.add_argument("--images", type=int, default=20_000,
                    help="images timed per loader at most (one epoch at most)")
parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the archive is extracted")
parser.add_argument("--threads", type=int, default=0,
                    help="intra-op threads of this process (0: torch's default); 1 on a loaded machine, "
                         "where threads contending for cores slow small tensor ops many times over")


def extracted_archive(cache: str) -> str:
    """The archive's image folder under ``cache``, extracted on first use (into a
    temporary folder renamed at the end, so that an interrupted run leaves no
    half-extracted folder behind to be taken for the whole)."""
    archive = os.path.join(SHARED_DATA, "cifar10-train.tar.gz")
    root = os.path.join(cache, "cifar10-train")
    if os.path.isdir(os.path.join(root, "train")):
        return root
    if not os.path.isfile(archive):
        raise UserError(f"{archive} not found: bench/loader.py needs the shared folder ../shared/data "
                        f"(or run it with --mini)")
    partial = f"{root}.partial-{os.getpid()}"
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    try:
        os.replace(partial, root)
    except OSError:  # another run extracted it meanwhile
        shutil.rmtree(partial)
    return root


def timed(make: Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]], runtime: Runtime,
          args: argparse.Namespace) -> Tuple[float, float]:
    """(seconds from ``make()`` to the first batch, images/s after it, over up to
    ``args.images`` images), each batch on the device as ``run_epoch`` receives it."""
    def wait() -> None:
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)

    started = time.perf_counter()
    setup, steady_start, count = 0.0, 0.0, 0
    for number, (images, targets) in enumerate(make()):
        images, targets = to_device(images, targets, runtime, args.channels_last)
        if number == 0:
            wait()
            steady_start = time.perf_counter()
            setup = steady_start - started
            continue
        count += len(targets)
        if count >= args.images:
            break
    wait()
    return setup, count / (time.perf_counter() - steady_start)


def main() -> None:
    args = parser.parse_args()
    runtime = Runtime(torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.zeros(1, device=runtime.device)  # the device's start-up is no loader's setup time
    root = os.path.join(SHARED_DATA, "cifar10-mini") if args.mini else extracted_archive(args.cache)
    if not os.path.isdir(os.path.join(root, "train")):
        raise UserError(f"{root}/train not found: bench/loader.py needs the shared folder "
                        f"../shared/data")
    train_set = data.cifar_split(root, "cifar10", train=True, cutout_length=args.cutout_length)
    print(f"{len(train_set)} training images under {root}, batch {args.batch}, cutout "
          f"{args.cutout_length}, {'channels-last' if args.channels_last else 'contiguous'} on "
          f"{runtime.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rows = []
    for workers in args.workers:
        def dataloader() -> Iterable:
            return data.make_loader(train_set, args.batch, runtime, shuffle=True, workers=workers,
                                    drop_last=True)
        rows.append((f"DataLoader, {workers} workers", *timed(dataloader, runtime, args)))

    def device_loader() -> Iterable:
        images, labels, _ = data.cifar_train_pixels(root, "cifar10", workers=max(args.workers))
        return data.DeviceCIFARLoader(images, labels, args.batch, runtime, "cifar10",
                                      args.cutout_length, channels_last=args.channels_last)
    rows.append((f"DeviceCIFARLoader (decoded by {max(args.workers)} workers)",
                 *timed(device_loader, runtime, args)))

    width = max(len(name) for name, _, _ in rows)
    print(f"{'loader':<{width}}  {'setup s':>8}  {'images/s':>9}")
    for name, setup, rate in rows:
        print(f"{name:<{width}}  {setup:>8.2f}  {rate:>9.0f}")


if __name__ == "__main__":
    run_cli(main)
