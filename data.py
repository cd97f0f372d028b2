"""Datasets, augmentation and loaders shared by the search and training scripts.

``--data DIR`` is either a torchvision CIFAR root (downloaded on first use) or an
image folder: ``DIR/train/<class>/*`` plus ``DIR/test/`` or ``DIR/val/`` for the
held-out split.  Folders let users search and train on their own images (and let
the tests run offline).  Loaders always shard through a DistributedSampler (one
replica outside torchrun) whose order depends only on (seed, epoch), so resumed
runs see the same batches; evaluation loaders (``make_eval_loader``) give every
image to exactly one process instead.
"""
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

from errors import UserError
from parallel import Runtime

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


def cifar_split(data_dir: str, dataset: str, train: bool, cutout_length: int = 0) -> Dataset:
    """The CIFAR train split (augmented) or test split: ``DIR/train`` / ``DIR/test|val``
    image folders when present, else torchvision's CIFAR under DIR (downloaded on first use)."""
    train_folder = os.path.join(data_dir, "train")
    if os.path.isdir(train_folder):
        path = train_folder if train else held_out_folder(data_dir)
        if path is None:
            raise UserError(f"{data_dir} has a train/ folder but no test/ or val/ folder "
                            f"for evaluation; add one (same class subfolders)")
        return _folder(path, cifar_transforms(dataset, train, cutout_length, from_folder=True))
    if dataset not in CIFAR_CLASSES:
        raise UserError(f"unknown dataset {dataset!r}; valid: {', '.join(CIFAR_CLASSES)}")
    transform = cifar_transforms(dataset, train, cutout_length)
    try:
        return CIFAR_CLASSES[dataset](root=data_dir, train=train, download=True, transform=transform)
    except Exception as error:  # network errors come as URLError, OSError, RuntimeError...
        raise UserError(
            f"{dataset.upper()} is not under {os.path.abspath(data_dir)} and could not be downloaded "
            f"({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}); "
            f"download it there by hand, or point --data at a folder holding train/<class>/ images"
        ) from None


def imagenet_split(data_dir: str, train: bool) -> Dataset:
    """ImageNet (or any image folder) ``DIR/train`` and ``DIR/val``: never downloaded."""
    path = os.path.join(data_dir, "train") if train else held_out_folder(data_dir)
    if path is None or not os.path.isdir(path):
        missing = os.path.join(data_dir, "train" if train else "val")
        raise UserError(f"ImageNet folder {missing} not found: put the ILSVRC2012 images in "
                        f"{data_dir}/train/<wnid>/ and {data_dir}/val/<wnid>/")
    return _folder(path, imagenet_transforms(train))


def num_classes_of(dataset: Dataset) -> int:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


def make_loader(dataset: Dataset, batch_size: int, runtime: Runtime, shuffle: bool,
                workers: int, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A loader over this process's shard.  Call ``loader.sampler.set_epoch(epoch)``
    before each epoch: the order depends only on (seed, epoch)."""
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
    summed over processes, the counts cover the split exactly once."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset, runtime),
                      num_workers=workers, pin_memory=runtime.device.type == "cuda")


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


def split_for_search(dataset: Dataset, train_portion: float) -> Tuple[Dataset, Dataset]:
    """First ``train_portion`` of the images train the weights, the rest the architecture.

    CIFAR's files are in random order, so the split is contiguous as in the original;
    an image folder is sorted by class, so its images are first permuted (fixed seed)
    to give both halves every class."""
    if not 0 < train_portion < 1:
        raise UserError(f"--train_portion must be between 0 and 1, got {train_portion}")
    split = int(len(dataset) * train_portion)
    if split == 0 or split == len(dataset):
        raise UserError(f"--train_portion {train_portion} leaves one half of the "
                        f"{len(dataset)} training images empty")
    indices = list(range(len(dataset)))
    if isinstance(dataset, datasets.ImageFolder):
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return (torch.utils.data.Subset(dataset, indices[:split]),
            torch.utils.data.Subset(dataset, indices[split:]))
