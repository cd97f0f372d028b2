"""Datasets, augmentation and loaders shared by the search and training scripts.

``--data DIR`` is either a torchvision CIFAR root (downloaded on first use) or an
image folder: ``DIR/train/<class>/*`` plus ``DIR/test/`` or ``DIR/val/`` for the
held-out split.  Folders let users search and train on their own images (and let
the tests run offline).  Loaders always shard through a DistributedSampler (one
replica outside torchrun) whose order depends only on (seed, epoch), so resumed
runs see the same batches; evaluation loaders (``make_eval_loader``) give every
image to exactly one process instead.  Where loader workers cannot keep up with a
GPU, ``DeviceCIFARLoader`` makes the CIFAR training batches on the device, from
the split kept there as uint8 (``cifar_train_pixels``).
"""
import argparse
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets, transforms

from runtime.errors import UserError
from runtime.parallel import Runtime

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_CLASSES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


class Cutout:
    """Zero a ``length`` x ``length`` square centred at a random pixel (clipped at
    the border) of a (C, H, W) tensor."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        y = int(torch.randint(height, (1,)))
        x = int(torch.randint(width, (1,)))
        half = self.length // 2
        image = image.clone()
        image[:, max(0, y - half):min(height, y + half), max(0, x - half):min(width, x + half)] = 0
        return image


def cifar_transforms(dataset: str, train: bool, cutout_length: int = 0,
                     from_folder: bool = False) -> transforms.Compose:
    """CIFAR augmentation: crop 32 (padding 4), flip, normalise, optional cutout.
    Images from a folder are first brought to 32x32."""
    mean, std = CIFAR_STATS.get(dataset, CIFAR_STATS["cifar10"])
    steps = [transforms.Resize((32, 32))] if from_folder else []
    if train:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if train and cutout_length > 0:
        steps.append(Cutout(cutout_length))
    return transforms.Compose(steps)


def imagenet_transforms(train: bool) -> transforms.Compose:
    if train:
        steps = [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
        ]
    else:
        steps = [transforms.Resize(256), transforms.CenterCrop(224)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)])


def _folder(path: str, transform: transforms.Compose) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"image folder {path} is unusable: {error} "
                        f"(expected {path}/<class name>/<images>)") from None


def held_out_folder(data_dir: str) -> Optional[str]:
    for name in ("test", "val"):
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return path
    return None


def _torchvision_cifar(data_dir: str, dataset: str, train: bool,
                      transform: Optional[transforms.Compose] = None) -> Dataset:
    """torchvision's CIFAR split under ``data_dir``, downloaded there on first use."""
    if dataset not in CIFAR_CLASSES:
        raise UserError(f"unknown dataset {dataset!r}; valid: {', '.join(CIFAR_CLASSES)}")
    try:
        return CIFAR_CLASSES[dataset](root=data_dir, train=train, download=True, transform=transform)
    except Exception as error:  # network errors come as URLError, OSError, RuntimeError...
        raise UserError(
            f"{dataset.upper()} is not under {os.path.abspath(data_dir)} and could not be downloaded "
            f"({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}); "
            f"download it there by hand, or point --data at a folder holding train/<class>/ images"
        ) from None


def cifar_split(data_dir: str, dataset: str, train: bool, cutout_length: int = 0,
                augment: bool = True) -> Dataset:
    """The CIFAR train split (augmented unless ``augment`` is False) or test split:
    ``DIR/train`` / ``DIR/test|val`` image folders when present, else torchvision's
    CIFAR under DIR (downloaded on first use)."""
    train_folder = os.path.join(data_dir, "train")
    augmented = train and augment
    if os.path.isdir(train_folder):
        path = train_folder if train else held_out_folder(data_dir)
        if path is None:
            raise UserError(f"{data_dir} has a train/ folder but no test/ or val/ folder "
                            f"for evaluation; add one (same class subfolders)")
        return _folder(path, cifar_transforms(dataset, augmented, cutout_length, from_folder=True))
    return _torchvision_cifar(data_dir, dataset, train,
                              cifar_transforms(dataset, augmented, cutout_length))


def imagenet_split(data_dir: str, train: bool, augment: bool = True) -> Dataset:
    """ImageNet (or any image folder) ``DIR/train`` and ``DIR/val``: never downloaded."""
    path = os.path.join(data_dir, "train") if train else held_out_folder(data_dir)
    if path is None or not os.path.isdir(path):
        missing = os.path.join(data_dir, "train" if train else "val")
        raise UserError(f"ImageNet folder {missing} not found: put the ILSVRC2012 images in "
                        f"{data_dir}/train/<wnid>/ and {data_dir}/val/<wnid>/")
    return _folder(path, imagenet_transforms(train and augment))


def num_classes_of(dataset: Dataset) -> int:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


def make_loader(dataset: Dataset, batch_size: int, runtime: Runtime, shuffle: bool,
                workers: int, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A loader over this process's shard.  Call ``loader.sampler.set_epoch(epoch)``
    before each epoch: the order depends only on (seed, epoch).

    Its workers are not persistent: a persistent worker seeds its random state once and
    carries it from pass to pass, so the augmentation of a pass would depend on the
    passes before it, and a resumed run (or ``CyclingLoader``) would draw other crops
    than an uninterrupted one.  New workers each pass draw their seeds from the global
    generator, which checkpoints restore."""
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=runtime.device.type == "cuda", drop_last=drop_last,
                      persistent_workers=False)


class ShardSampler(Sampler[int]):
    """Process ``rank`` takes images rank, rank + world_size, ...: every image exactly
    once over all processes.  DistributedSampler pads (or drops) to equal shards,
    which would count some test images twice (or never)."""

    def __init__(self, dataset: Dataset, runtime: Runtime):
        self.indices = range(runtime.rank, len(dataset), runtime.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_eval_loader(dataset: Dataset, batch_size: int, runtime: Runtime,
                     workers: int) -> DataLoader:
    """A loader over this process's share of an evaluation split, in a fixed order;
    summed over processes, the counts cover the split exactly once.  Nothing random
    happens in its workers, so they persist from one evaluation to the next."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset, runtime),
                      num_workers=workers, pin_memory=runtime.device.type == "cuda",
                      persistent_workers=workers > 0)


class CyclingLoader:
    """Endless batches from one dataset: a new shuffled pass starts when the previous
    one ends, inside one persistent iterator.  ``state_dict`` records the pass and
    position so that a resumed run continues with the same batches."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.cycle = 0
        self.position = 0
        self._iterator: Optional[Iterator] = None

    def _start(self) -> None:
        """Begin pass ``self.cycle`` (replaying ``self.position`` batches after a resume).

        Neither starting a pass nor replaying one moves the global random state, and
        the workers' seeds depend only on (seed, pass): a resumed run continues with
        the very batches and random draws of an uninterrupted one."""
        sampler = self.loader.sampler
        sampler.set_epoch(self.cycle)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sampler.seed * 1_000_003 + self.cycle)
            self._iterator = iter(self.loader)
            for _ in range(self.position):
                next(self._iterator)

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.cycle += 1
            self.position = 0
            self._start()
            batch = next(self._iterator)
        self.position += 1
        return batch

    def __iter__(self) -> "CyclingLoader":
        return self

    def state_dict(self) -> Dict[str, int]:
        return {"cycle": self.cycle, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.cycle, self.position = int(state["cycle"]), int(state["position"])
        self._iterator = None


def split_for_search(dataset: Dataset, train_portion: float,
                     rest: Optional[Dataset] = None,
                     flag: str = "--train_portion") -> Tuple[Dataset, Dataset]:
    """First ``train_portion`` of the images train the weights, the rest the architecture
    (taken from ``rest``, the same images under other transforms, when given; ``flag``
    names the portion in errors).

    CIFAR's files are in random order, so the split is contiguous as in the original;
    an image folder is sorted by class, so its images are first permuted (fixed seed)
    to give both halves every class."""
    if not 0 < train_portion < 1:
        raise UserError(f"{flag} must be between 0 and 1, got {train_portion}")
    split = int(len(dataset) * train_portion)
    if split == 0 or split == len(dataset):
        raise UserError(f"{flag} {train_portion} leaves one part of the "
                        f"{len(dataset)} training images empty")
    indices = list(range(len(dataset)))
    if isinstance(dataset, datasets.ImageFolder):
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return (torch.utils.data.Subset(dataset, indices[:split]),
            torch.utils.data.Subset(dataset if rest is None else rest, indices[split:]))


# -- a training loader that lives on the device -------------------------------------------

def use_device_loader(requested: "bool | str", device: torch.device, dataset: str) -> Tuple[bool, str]:
    """``--device_loader`` resolved: (on or off, why), for the run's log.  ``auto``: on
    for CIFAR on a GPU, where workers decoding and augmenting images fall behind the
    step; off on the CPU, where the step is the bottleneck and workers run beside it."""
    if dataset not in CIFAR_CLASSES:
        return False, f"off: {dataset} images are decoded by the DataLoader's workers"
    if requested != "auto":
        return bool(requested), "as requested"
    if device.type == "cuda":
        return True, "auto: on a GPU, the split is augmented on the device"
    return False, f"auto: off on {device.type}, DataLoader workers augment beside the step"


def add_device_loader_flag(parser: argparse.ArgumentParser) -> None:
    """``--device_loader``, for the search and the CIFAR train scripts."""
    parser.add_argument("--device_loader", action=argparse.BooleanOptionalAction, default="auto",
                        help="keep the training split on the device as uint8 and crop, flip and "
                             "cut out batches there, instead of DataLoader workers ('auto': on "
                             "for a GPU)")


def cifar_train_pixels(data_dir: str, dataset: str,
                       workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The CIFAR training split as (uint8 images (N, 3, 32, 32), int64 labels, classes),
    for ``DeviceCIFARLoader``: from ``DIR/train/<class>/`` images when present (decoded
    once, by ``workers`` processes, with the pixels the folder loader gives), else from
    torchvision's CIFAR files under DIR (downloaded on first use), as ``cifar_split``."""
    train_folder = os.path.join(data_dir, "train")
    if os.path.isdir(train_folder):
        # Resize is the folder pipeline's own step: a no-op on 32x32 images.
        folder = _folder(train_folder, transforms.Compose([transforms.Resize((32, 32)),
                                                           transforms.PILToTensor()]))
        batches = list(DataLoader(folder, batch_size=500, num_workers=workers))
        images = torch.cat([batch for batch, _ in batches])
        labels = torch.cat([targets for _, targets in batches])
        return images, labels, len(folder.classes)
    split = _torchvision_cifar(data_dir, dataset, train=True)
    images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # from N x 32 x 32 x 3
    return images, torch.as_tensor(split.targets, dtype=torch.long), len(split.classes)


class DeviceCIFARLoader:
    """CIFAR training batches made on the device from a uint8 copy of the split kept
    there: at thousands of images/s per GPU, decoding and augmenting in loader
    workers can become the limit.

    Each image gets the augmentation of ``cifar_transforms(dataset, train=True,
    cutout_length)``, in distribution: a 32x32 crop of the image zero-padded by 4
    (offsets uniform on 0..8), a horizontal flip with probability 1/2, ToTensor and
    Normalize (the same float32 operations, so the same values), then ``Cutout``'s
    square (centre uniform over the image, clipped at the border).  The whole batch
    is drawn and transformed at once, with static shapes and no read-back to the
    host.  Stands in for ``make_loader(..., shuffle=True, drop_last=True)``: the
    same images per batch and process (the order is that loader's
    DistributedSampler, exposed as ``sampler``), ``len`` batches per epoch,
    ``set_epoch`` (or ``sampler.set_epoch``) before each; the draws come from a
    generator on the device seeded from (seed, epoch, rank), so an epoch is the
    same after a resume.  Yields (float32 images in the requested memory format,
    int64 labels), on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 runtime: Runtime, dataset: str = "cifar10", cutout_length: int = 0,
                 seed: int = 0, channels_last: bool = False):
        if images.dtype != torch.uint8 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"expected uint8 images of shape (N, 3, 32, 32), got "
                             f"{images.dtype} {tuple(images.shape)}")
        self.device = runtime.device
        self.rank = runtime.rank
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.long)
        self.batch_size = batch_size
        self.cutout_length = cutout_length
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler = DistributedSampler(range(len(images)), num_replicas=runtime.world_size,
                                          rank=runtime.rank, shuffle=True, seed=seed,
                                          drop_last=True)
        # Built once: torchvision's normalize makes them from lists on every call, a
        # blocking host-to-device copy per batch.
        mean, std = CIFAR_STATS.get(dataset, CIFAR_STATS["cifar10"])
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.pixels = torch.arange(32, device=self.device)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _generator(self) -> torch.Generator:
        """This epoch's and this process's own stream of draws."""
        entropy = [self.sampler.seed % 2 ** 64, self.sampler.epoch, self.rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
        return torch.Generator(self.device).manual_seed(seed)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.device, non_blocking=True)
        generator = self._generator()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start:start + self.batch_size]
            yield self._augment(self.images[indices], generator), self.labels[indices]

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Crop, flip, normalise and cut out a (B, 3, 32, 32) uint8 batch."""
        size, pixels = images.shape[0], self.pixels
        offsets = torch.randint(0, 9, (size, 2), generator=generator, device=self.device)
        flips = torch.rand(size, generator=generator, device=self.device) < 0.5
        rows = offsets[:, :1] + pixels  # rows and columns of the padded image, (B, 32)
        columns = offsets[:, 1:] + torch.where(flips[:, None], 31 - pixels, pixels)
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4)).view(size, 3, 40 * 40)
        where = (rows[:, :, None] * 40 + columns[:, None, :]).view(size, 1, 32 * 32)
        crops = padded.gather(2, where.expand(size, 3, 32 * 32)).view(size, 3, 32, 32)
        crops = crops.contiguous(memory_format=self.memory_format)
        # ToTensor's and Normalize's float32 operations, in place (the layout is kept).
        out = crops.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
        if self.cutout_length > 0:
            half = self.cutout_length // 2  # Cutout's square: [y - half, y + half), clipped
            centres = torch.randint(0, 32, (size, 2), generator=generator, device=self.device)
            inside = (pixels >= centres[:, :, None] - half) & (pixels < centres[:, :, None] + half)
            out.masked_fill_(inside[:, 0, None, :, None] & inside[:, 1, None, None, :], 0)
        return out


def device_cifar_loader(pixels: Tuple[torch.Tensor, torch.Tensor], part: Dataset, batch_size: int,
                        runtime: Runtime, dataset: str, cutout_length: int, seed: int,
                        channels_last: bool) -> DeviceCIFARLoader:
    """A ``DeviceCIFARLoader`` over the images of ``part``, where ``make_loader(part,
    batch_size, runtime, shuffle=True, seed=seed, drop_last=True)`` would be:
    ``part`` is the training split whose (images, labels) are ``pixels``
    (``cifar_train_pixels``), or a ``Subset`` of it (a half of the search, the
    trained part of ``--holdout_portion``)."""
    images, labels = pixels
    if isinstance(part, Subset):
        images, labels = images[part.indices], labels[part.indices]
    return DeviceCIFARLoader(images, labels, batch_size, runtime, dataset,
                             cutout_length=cutout_length, seed=seed, channels_last=channels_last)
