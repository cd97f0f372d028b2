"""The images of a search on ImageNet (``train_search.py --dataset imagenet``), as
PC-DARTS searches: a per-class random sample of the training split trains the weights
and a disjoint one the architecture (``--imagenet_sample 0.1 0.025``: 10% and 2.5% of
every class), under PC-DARTS's search transforms.

``--data DIR`` holds ImageNet as ``DIR/train/<wnid>/<images>``.  A new search lists
that folder once (torchvision's ImageFolder rules: classes are the sorted sub-folders,
images are files with an image extension), draws each class's sample with a generator
seeded by ``--seed`` (classes in sorted order), and writes the two samples into its
run directory as file lists, one path a line relative to ``DIR/train``
(``imagenet_sample/weights.txt``, ``imagenet_sample/architecture.txt``).  A resumed
search reads them back instead of listing 1.28 M files again.  The lists are also what
``rsync --files-from`` takes to copy the sample elsewhere.

``--imagenet_sample prepared``: DIR already is the sample, laid out as PC-DARTS's
README asks (their ``imagenet_search``): ``DIR/train/<wnid>/`` trains the weights,
``DIR/val/<wnid>/`` the architecture.
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from runtime.atomic import atomic_write_text
from runtime.data import IMAGENET_STATS, Cutout
from runtime.errors import UserError

# PC-DARTS's search crop (train_search_imagenet.py): the supernet's input size.
CROP = 224
SAMPLE_DIR = "imagenet_sample"
PARTS = ("weights", "architecture")
PREPARED = "prepared"
T = TypeVar("T")


def search_transforms(cutout_length: int = 0) -> transforms.Compose:
    """PC-DARTS's ImageNet search augmentation, for both samples: random resized crop
    to 224, horizontal flip, normalisation (no colour jitter, unlike final training);
    then cutout when asked (--cutout)."""
    steps = [transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(),
             transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
    if cutout_length > 0:
        steps.append(Cutout(cutout_length))
    return transforms.Compose(steps)


class ListedImages(Dataset):
    """The images ``files`` (paths relative to ``root``, ``<class>/<file>``) labelled by
    their class's index in ``classes``: an ImageFolder that never lists its folder."""

    def __init__(self, root: str, files: Sequence[str], classes: Sequence[str],
                 transform: transforms.Compose):
        index = {name: i for i, name in enumerate(classes)}
        self.root, self.classes, self.transform = root, list(classes), transform
        self.samples = [(os.path.join(root, path), index[path.split("/", 1)[0]]) for path in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return self.transform(datasets.folder.default_loader(path)), target


@dataclass
class SearchSample:
    """The two samples of an ImageNet search; ``lists``: what to write to the run
    directory (None when they came from there, or from a prepared folder)."""
    weights: Dataset
    architecture: Dataset
    description: str
    lists: Optional[Dict[str, List[str]]] = None


# -- the flag ------------------------------------------------------------------------------

def parse_fractions(values: Sequence[str]) -> Optional[Tuple[float, float]]:
    """``--imagenet_sample``: two fractions (weights, architecture), or None for
    ``prepared``."""
    if list(values) == [PREPARED]:
        return None
    try:
        weights, architecture = (float(v) for v in values)
    except ValueError:
        raise UserError(f"--imagenet_sample takes two fractions of every class, for the "
                        f"weights and the architecture (PC-DARTS: 0.1 0.025), or '{PREPARED}'; "
                        f"got {' '.join(values)}") from None
    if not (weights > 0 and architecture > 0 and weights + architecture <= 1):
        raise UserError(f"--imagenet_sample {weights:g} {architecture:g}: both fractions must be "
                        f"above 0 and together at most 1 (the two samples are disjoint)")
    return weights, architecture


# -- drawing, writing and reading the sample ------------------------------------------------

def laid_out_like_imagenet(folder: str, read: Callable[[], T]) -> T:
    """``read()`` of an image folder; a missing folder, one without class folders or a
    class folder without images is one error line."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder: --dataset imagenet needs --data DIR with the "
                        f"ImageNet training images in DIR/train/<wnid>/ (and, for "
                        f"--imagenet_sample {PREPARED}, the architecture's in DIR/val/<wnid>/)")
    try:
        return read()
    except FileNotFoundError as error:
        raise UserError(f"{folder} is not laid out like ImageNet ({error}); expected "
                        f"{folder}/<wnid>/<images>, one folder per class") from None


def list_train_folder(train_dir: str) -> Dict[str, List[str]]:
    """Every image of ``train_dir`` by class, as paths relative to it, sorted
    (ImageFolder's rules: classes are the sub-folders, images the files with an image
    extension)."""
    def read() -> Dict[str, List[str]]:
        classes, class_to_idx = datasets.folder.find_classes(train_dir)
        samples = datasets.folder.make_dataset(train_dir, class_to_idx,
                                               extensions=datasets.folder.IMG_EXTENSIONS)
        by_class: Dict[str, List[str]] = {name: [] for name in classes}
        for path, target in samples:
            by_class[classes[target]].append(os.path.relpath(path, train_dir).replace(os.sep, "/"))
        return by_class
    return laid_out_like_imagenet(train_dir, read)


def draw_sample(by_class: Dict[str, List[str]], fractions: Tuple[float, float], seed: int,
                train_dir: str) -> Dict[str, List[str]]:
    """Per class, ``round(fraction x images)`` (at least one) random images for the
    weights and as many others for the architecture; the classes in sorted order share
    one generator seeded by ``seed``.  Each list is sorted."""
    generator = torch.Generator().manual_seed(seed)
    lists: Dict[str, List[str]] = {part: [] for part in PARTS}
    for name in sorted(by_class):
        files = by_class[name]
        counts = [max(1, round(fraction * len(files))) for fraction in fractions]
        if sum(counts) > len(files):
            raise UserError(f"{train_dir}/{name} holds {len(files)} image(s): too few for a sample "
                            f"of at least one image for the weights and one other for the "
                            f"architecture (--imagenet_sample {fractions[0]:g} {fractions[1]:g})")
        order = torch.randperm(len(files), generator=generator).tolist()
        lists["weights"] += sorted(files[i] for i in order[:counts[0]])
        lists["architecture"] += sorted(files[i] for i in order[counts[0]:sum(counts)])
    return lists


def list_path(run_dir: str, part: str) -> str:
    return os.path.join(run_dir, SAMPLE_DIR, f"{part}.txt")


def write_lists(run_dir: str, lists: Dict[str, List[str]]) -> None:
    """The samples as text files in ``run_dir/imagenet_sample/`` (atomically)."""
    for part in PARTS:
        atomic_write_text(list_path(run_dir, part), "".join(f"{path}\n" for path in lists[part]))


def read_lists(run_dir: str, train_dir: str) -> Optional[Dict[str, List[str]]]:
    """The samples a run wrote, or None when it wrote none; each listed class must be a
    folder of ``train_dir`` holding that class's first listed image."""
    if not all(os.path.isfile(list_path(run_dir, part)) for part in PARTS):
        return None
    lists = {}
    for part in PARTS:
        with open(list_path(run_dir, part)) as f:
            lists[part] = [line.rstrip("\n") for line in f if line.strip()]
    firsts: Dict[str, str] = {}  # each class's first listed image
    for part in PARTS:
        for path in lists[part]:
            firsts.setdefault(path.split("/", 1)[0], path)
    missing = next((path for path in firsts.values()
                    if not os.path.isfile(os.path.join(train_dir, path))), None)
    if missing is not None:
        raise UserError(f"the sample listed in {os.path.join(run_dir, SAMPLE_DIR)} is not under "
                        f"{train_dir} ({missing} is missing): resume with --data pointing at "
                        f"the ImageNet folder this search started with")
    return lists


# -- the datasets ----------------------------------------------------------------------------

def listed_sample(data_dir: str, fractions: Tuple[float, float], seed: int,
                  resume_dir: Optional[str], transform: transforms.Compose) -> SearchSample:
    """The samples of a resumed run's lists, else newly drawn from ``data_dir/train``."""
    train_dir = os.path.join(data_dir, "train")
    lists = read_lists(resume_dir, train_dir) if resume_dir else None
    if lists is not None:
        origin, new = f"read from {os.path.join(resume_dir, SAMPLE_DIR)} (not listed again)", None
    else:
        lists = new = draw_sample(list_train_folder(train_dir), fractions, seed, train_dir)
        origin = (f"{fractions[0]:g} and {fractions[1]:g} of every class of {train_dir}, drawn "
                  f"with seed {seed}")
    classes = sorted({path.split("/", 1)[0] for part in PARTS for path in lists[part]})
    weights, architecture = (ListedImages(train_dir, lists[part], classes, transform)
                             for part in PARTS)
    return SearchSample(weights, architecture, f"per-class sample: {origin}", new)


def prepared_sample(data_dir: str, transform: transforms.Compose) -> SearchSample:
    """A folder that already is the sample: ``train/`` for the weights, ``val/`` for the
    architecture, with the same classes."""
    parts = [laid_out_like_imagenet(folder, lambda: datasets.ImageFolder(folder, transform=transform))
             for folder in (os.path.join(data_dir, "train"), os.path.join(data_dir, "val"))]
    if parts[0].classes != parts[1].classes:
        raise UserError(f"{data_dir}/train and {data_dir}/val hold different classes "
                        f"({len(parts[0].classes)} and {len(parts[1].classes)} folders): a "
                        f"prepared sample needs the same class folders in both")
    return SearchSample(parts[0], parts[1], f"prepared sample: {data_dir}/train for the weights, "
                                            f"{data_dir}/val for the architecture")


def search_sample(data_dir: str, sample: Sequence[str], seed: int, resume_dir: Optional[str],
                  cutout_length: int = 0) -> SearchSample:
    """The weight and architecture samples of an ImageNet search (see the module's
    docstring); ``resume_dir``: the run directory of a resumed search."""
    fractions = parse_fractions(sample)
    transform = search_transforms(cutout_length)
    if fractions is None:
        return prepared_sample(data_dir, transform)
    return listed_sample(data_dir, fractions, seed, resume_dir, transform)
