"""data.py's DeviceCIFARLoader against the DataLoader path it stands in for.

The synthetic images encode their own coordinates (channel 0: row + 1, channel 1:
column + 1, channel 2: 200; the zero padding stays 0), so each output image tells
its crop offsets, its flip and its cutout square; a second split of random pixels
with the same labels gets the very same draws (they depend on the seed, epoch,
rank and batch only), which lets one image be compared bit for bit with the
torchvision pipeline given the same decisions.  The statistical bounds are
chi-square quantiles at p = 1e-6: at a fixed seed a test passes or fails for good,
and a sampler off by one offset (0..7) exceeds them many times over."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from runtime import data, searching
from runtime.dispatch import HostSyncGuard
from runtime.parallel import Runtime

# Small tensors: one thread is as fast, and immune to the thread contention of a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")

CPU = Runtime(torch.device("cpu"))
MEAN, STD = (torch.tensor(v).view(1, 3, 1, 1) for v in data.CIFAR_STATS["cifar10"])
PIXELS = torch.arange(32)
CHI2_BOUND = {80: 155.1, 31: 83.6}  # chi2.ppf(1 - 1e-6, degrees of freedom)


def coordinate_images(count: int) -> torch.Tensor:
    rows = (PIXELS + 1).view(32, 1).expand(32, 32)
    images = torch.stack([rows, rows.t(), torch.full((32, 32), 200)]).to(torch.uint8)
    return images.expand(count, 3, 32, 32).contiguous()


def random_images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))


def loader(images: torch.Tensor, runtime: Runtime = CPU, **options) -> data.DeviceCIFARLoader:
    options = {"batch_size": 64, "cutout_length": 16, "seed": 7, **options}
    return data.DeviceCIFARLoader(images, torch.arange(len(images)), runtime=runtime, **options)


def chi_square(values: torch.Tensor, cells: int) -> float:
    counts = torch.bincount(values, minlength=cells).double()
    expected = len(values) / cells
    return float(((counts - expected) ** 2 / expected).sum())


def read_back(images: torch.Tensor, cutout_length: int) -> dict:
    """Crop offsets (y, x), flips and cutout centres of coordinate images, after
    checking that each image is exactly that crop, flip and clipped square."""
    cut = (images == 0).all(dim=1)  # a normalised pixel is never exactly 0
    value = torch.round((images * STD + MEAN) * 255).long()
    real = ~cut & (value[:, 0] > 0)
    rows, columns = PIXELS.view(32, 1), PIXELS.view(1, 32)

    def constant(offset_map: torch.Tensor):  # (is it one offset over the real pixels, which)
        low = offset_map.masked_fill(~real, 99).amin((1, 2))
        return low == offset_map.masked_fill(~real, -99).amax((1, 2)), low

    y_ok, y = constant(value[:, 0] - 1 - rows + 4)
    plain, x_plain = constant(value[:, 1] - 1 - columns + 4)
    flipped, x_flipped = constant(value[:, 1] - 1 - (31 - columns) + 4)
    assert y_ok.all() and (plain ^ flipped).all(), "an output is not a translated (flipped) crop"
    x = torch.where(flipped, x_flipped, x_plain)
    source_rows, source_columns = torch.broadcast_tensors(
        y.view(-1, 1, 1) + rows - 4,
        x.view(-1, 1, 1) + torch.where(flipped.view(-1, 1, 1), 31 - columns, columns) - 4)
    inside = (source_rows >= 0) & (source_rows < 32) & (source_columns >= 0) & (source_columns < 32)
    expected = torch.stack([source_rows + 1, source_columns + 1, torch.full_like(source_rows, 200)], 1)
    expected = torch.where(inside[:, None], expected, 0)
    assert torch.equal(torch.where(cut[:, None], 0, value), torch.where(cut[:, None], 0, expected))
    result = {"y": y, "x": x, "flip": flipped}
    if cutout_length:
        half = cutout_length // 2
        centres = []
        for hit in (cut.any(2), cut.any(1)):  # rows, columns with a cut pixel: [start, end)
            start, end = hit.int().argmax(1), 32 - hit.flip(1).int().argmax(1)
            centres.append(torch.where(start > 0, start + half, end - half))
        square = [(PIXELS >= c[:, None] - half) & (PIXELS < c[:, None] + half) for c in centres]
        assert torch.equal(cut, square[0][:, :, None] & square[1][:, None, :]), "not Cutout's square"
        result["centre_y"], result["centre_x"] = centres
    else:
        assert not cut.any()
    return result


def draws(device_loader: data.DeviceCIFARLoader, epochs: int, cutout_length: int) -> dict:
    parts = []
    for epoch in range(epochs):
        device_loader.set_epoch(epoch)
        parts += [read_back(images, cutout_length) for images, _ in device_loader]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def test_crops_flips_and_cutouts_have_the_training_distribution():
    """4,096 draws: offsets uniform over the 9 x 9 grid, half the images flipped,
    cutout centres uniform over the image (squares clipped, checked in read_back)."""
    found = draws(loader(coordinate_images(512)), epochs=8, cutout_length=16)
    count = len(found["y"])
    assert count == 4096
    assert chi_square(found["y"] * 9 + found["x"], 81) < CHI2_BOUND[80]
    too_narrow = torch.randint(0, 8, (count, 2), generator=torch.Generator().manual_seed(0))
    assert chi_square(too_narrow[:, 0] * 9 + too_narrow[:, 1], 81) > 5 * CHI2_BOUND[80]
    assert abs(int(found["flip"].sum()) - count / 2) < 5 * (count / 4) ** 0.5
    for axis in ("centre_y", "centre_x"):
        assert chi_square(found[axis], 32) < CHI2_BOUND[31]
    clipped = (found["centre_y"] < 8) | (found["centre_y"] > 23)
    assert 0.3 < float(clipped.double().mean()) < 0.7  # 16 of 32 rows clip the square


def torchvision_reference(image: torch.Tensor, decisions: dict, cutout_length: int,
                          monkeypatch) -> torch.Tensor:
    """``cifar_transforms(train=True)`` itself on ``image``, its random draws forced to
    ``decisions`` (crop y, x; flip; cutout centre y, x, in the order it draws them)."""
    integers = [decisions["y"], decisions["x"]]
    if cutout_length:
        integers += [decisions["centre_y"], decisions["centre_x"]]
    integers = iter(integers)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor([next(integers)]))
        flip = torch.tensor([0.0 if decisions["flip"] else 1.0])  # RandomHorizontalFlip: rand < 0.5
        patch.setattr(torch, "rand", lambda *args, **kwargs: flip)
        pipeline = data.cifar_transforms("cifar10", train=True, cutout_length=cutout_length)
        output = pipeline(Image.fromarray(image.permute(1, 2, 0).numpy()))
    assert next(integers, None) is None
    return output


@pytest.mark.parametrize("cutout_length", [16, 7, 0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_images_equal_the_torchvision_pipeline_given_the_same_draws(cutout_length, channels_last,
                                                                    monkeypatch):
    """Bit for bit: ToTensor's and Normalize's float32 operations, Cutout's square
    (odd lengths too: Cutout's square is 2 * (length // 2) wide)."""
    pixels = random_images(256)
    coordinates = next(iter(loader(coordinate_images(256), cutout_length=cutout_length)))[0]
    images, labels = next(iter(loader(pixels, cutout_length=cutout_length, channels_last=channels_last)))
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last
                                else torch.contiguous_format)
    found = read_back(coordinates, cutout_length)
    for i in range(0, 64, 8):
        decisions = {key: value[i].item() for key, value in found.items()}
        reference = torchvision_reference(pixels[labels[i]], decisions, cutout_length, monkeypatch)
        assert torch.equal(images[i], reference)


def test_processes_share_out_the_split_as_the_dataloader_path_does():
    """Three processes: disjoint shards covering the split, each in the batches
    ``make_loader`` gives that process, with their own augmentation draws."""
    images, offsets = [], []
    for rank in range(3):
        runtime = Runtime(torch.device("cpu"), rank=rank, world_size=3)
        batches = list(loader(coordinate_images(576), runtime))
        reference = data.make_loader(torch.utils.data.TensorDataset(torch.arange(576)), 64, runtime,
                                     shuffle=True, workers=0, seed=7, drop_last=True)
        assert len(batches) == 3 and [labels.tolist() for _, labels in batches] == \
            [indices.tolist() for (indices,) in reference]
        images += [index for _, labels in batches for index in labels.tolist()]
        offsets.append(read_back(batches[0][0], 16)["y"])
    assert sorted(images) == list(range(576))
    assert not torch.equal(offsets[0], offsets[1])


def test_epochs_reshuffle_and_runs_repeat():
    device_loader = loader(random_images(256))
    first = list(device_loader)
    assert len(device_loader) == len(first) == 4
    device_loader.set_epoch(1)
    second = list(device_loader)
    assert sorted(torch.cat([labels for _, labels in second]).tolist()) == list(range(256))
    assert not torch.equal(first[0][1], second[0][1])
    device_loader.set_epoch(0)
    for again in (list(device_loader), list(loader(random_images(256)))):
        assert all(torch.equal(a, b) for batch, other in zip(first, again) for a, b in zip(batch, other))
    other_seed = next(iter(loader(random_images(256), seed=8)))
    assert not torch.equal(other_seed[0], first[0][0])


def test_batches_are_made_without_waiting_for_the_device():
    """No read-back or data-dependent shape while an epoch starts and runs."""
    device_loader = loader(random_images(256), channels_last=True)
    with HostSyncGuard():
        batches = iter(device_loader)
        for _ in range(3):
            images, labels = next(batches)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_on_the_gpu_need_no_synchronisation_and_are_the_training_transforms():
    runtime = Runtime(torch.device("cuda"))
    device_loader = loader(coordinate_images(256), runtime)
    with HostSyncGuard():
        batches = iter(device_loader)
        made = [next(batches) for _ in range(3)]
    for images, labels in made:
        assert images.is_cuda and labels.is_cuda
        read_back(images.cpu(), 16)


def test_a_resumed_cycling_loader_continues_with_the_same_batches():
    """CyclingLoader (the search's architecture batches) drives it as a DataLoader."""
    def take(cycling, count):
        return [next(cycling) for _ in range(count)]

    straight = take(data.CyclingLoader(loader(random_images(128))), 5)
    interrupted = data.CyclingLoader(loader(random_images(128)))
    first = take(interrupted, 3)
    resumed = data.CyclingLoader(loader(random_images(128)))
    resumed.load_state_dict(interrupted.state_dict())
    for batch, other in zip(straight, first + take(resumed, 2)):
        assert torch.equal(batch[0], other[0]) and torch.equal(batch[1], other[1])


def test_evaluation_workers_persist_and_repeat_the_same_batches():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    eval_loader = data.make_eval_loader(dataset, 4, CPU, workers=1)
    passes = [[indices.tolist() for (indices,) in eval_loader] for _ in range(2)]
    assert eval_loader.persistent_workers
    assert passes[0] == passes[1] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_pixels_from_torchvision_cifar_files(monkeypatch, tmp_path):
    class Files:  # what datasets.CIFAR10 holds: N x 32 x 32 x 3 uint8, a list of targets
        classes = list("abcdefghij")
        data = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
        targets = [3, 1, 4, 1, 5, 9]

        def __init__(self, root, train, download, transform):
            assert train and transform is None

    monkeypatch.setitem(data.CIFAR_CLASSES, "cifar10", Files)
    images, labels, classes = data.cifar_train_pixels(str(tmp_path), "cifar10")
    assert classes == 10 and labels.tolist() == Files.targets
    assert torch.equal(images, torch.from_numpy(Files.data).permute(0, 3, 1, 2))
    assert images.is_contiguous()


def test_pixels_from_an_image_folder_are_the_decoded_images(cifar_mini):
    images, labels, classes = data.cifar_train_pixels(str(cifar_mini), "cifar10", workers=1)
    folder = datasets.ImageFolder(str(cifar_mini / "train"))
    assert classes == 10 and images.shape == (2500, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == folder.targets
    for i in range(0, 2500, 50):
        decoded = np.array(Image.open(folder.samples[i][0]).convert("RGB"))
        assert torch.equal(images[i], torch.from_numpy(decoded).permute(2, 0, 1))


def test_an_empty_image_folder_is_one_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(data.UserError, match=f"image folder {tmp_path / 'train'} is unusable"):
        data.cifar_train_pixels(str(tmp_path), "cifar10")


def test_the_search_halves_on_the_device_hold_the_dataloaders_images(tmp_path):
    """train_search.py --device_loader: the weight half's batches, epoch after epoch, and
    the architecture half's endless batches (across passes, and resumed) hold the images
    the DataLoader halves hold, batch for batch.  Uniform images (a colour per image)
    tell which image is where: no crop or flip moves their centre pixel, which the two
    pipelines compute with the same float32 operations."""
    for index in range(30):  # 15 images a half: 3 batches of 4 a pass
        folder = tmp_path / "train" / f"c{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([8 * index, 250 - 8 * index, 25 * (index % 10)], dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (32, 32, 3)).copy()).save(folder / f"{index}.png")

    def halves(device_loader: bool) -> searching.SearchData:
        args = argparse.Namespace(data=str(tmp_path), dataset="cifar10", cutout=False,
                                  cutout_length=16, train_portion=0.5, batchsz=4, workers=0,
                                  seed=2, channels_last=False, hessian_every=0, hessian_images=4,
                                  device_loader=device_loader)
        return searching.load_search_data(args, CPU)

    def seen(batches) -> list:
        return [(images[:, :, 16, 16], labels) for images, labels in batches]

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for pair in zip(a, b)
                                        for x, y in zip(*pair))

    host, device = halves(False), halves(True)
    assert isinstance(device.train_loader, data.DeviceCIFARLoader) and len(device.train_loader) == 3
    for epoch in range(2):
        for loader in (host.train_loader, device.train_loader):
            loader.sampler.set_epoch(epoch)
        assert same(seen(host.train_loader), seen(device.train_loader))
    assert same(*[seen(next(half.arch_batches) for _ in range(4)) for half in (host, device)])
    resumed = halves(True).arch_batches  # after the first batch of the second pass
    resumed.load_state_dict(device.arch_batches.state_dict())
    assert same(seen(next(host.arch_batches) for _ in range(3)), seen(next(resumed) for _ in range(3)))
