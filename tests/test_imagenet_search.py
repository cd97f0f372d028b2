"""The search on ImageNet (train_search.py --dataset imagenet, PC-DARTS's way): the
per-class sample and its file lists, folders that are not ImageNet, the supernet at
every --location, the preset and its learning-rate warm-up and architecture-gradient
clipping, the reproduce pipeline's ImageNet jobs.

Slow tier, on a generated ImageNet-like folder (4 classes, 64x80 PNGs, upscaled by the
224-pixel crops): a search resumed on its sample after the folder changed, which ends
as the uninterrupted one; a bad folder from the command line; reproduce.py --dataset
imagenet end to end.  Each search epoch is 3 iterations (24 images for the weights at
batch 8) and 12 images train the architecture."""
import argparse
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from training_helpers import (REPO, command, one_line_error, only_run_dir, random_image_folder,
                              run_in_process, run_parallel, run_script)

import train_search
from architect import Architect
from attentions import GEThetaPlusMask
from model_search import AttLocation, Network, NetworkImageNet
from runtime import imagenet_sample, pipeline, searching
from runtime.errors import UserError
from runtime.experiment import resumed_schedule, warmed_up_cosine_schedule

SAMPLE = ["0.5", "0.25"]


def touch_folder(root: Path, counts: dict) -> Path:
    """``root/train/<class>/i.png`` (empty files: only listed, never opened)."""
    for name, count in counts.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(count):
            (root / "train" / name / f"{i}.png").touch()
    return root


# -- the sample ---------------------------------------------------------------------------

def test_the_sample_is_a_seeded_disjoint_share_of_every_class(tmp_path):
    data = touch_folder(tmp_path, {"n02": 40, "n01": 20, "n03": 7})
    (data / "train" / "n02" / "notes.txt").touch()  # not an image: never drawn
    train = str(data / "train")
    listed = imagenet_sample.list_train_folder(train)
    assert sorted(listed) == ["n01", "n02", "n03"] and len(listed["n02"]) == 40
    lists = imagenet_sample.draw_sample(listed, (0.1, 0.025), 2, train)
    per_class = {part: {name: sum(path.startswith(name + "/") for path in lists[part])
                        for name in listed} for part in imagenet_sample.PARTS}
    # round(fraction x images), at least one per class
    assert per_class == {"weights": {"n01": 2, "n02": 4, "n03": 1},
                         "architecture": {"n01": 1, "n02": 1, "n03": 1}}
    assert not set(lists["weights"]) & set(lists["architecture"])
    assert all(part == sorted(part) for part in lists.values())
    assert imagenet_sample.draw_sample(listed, (0.1, 0.025), 2, train) == lists
    assert imagenet_sample.draw_sample(listed, (0.1, 0.025), 3, train) != lists


def test_a_resumed_search_reads_its_lists_and_never_lists_the_folder(tmp_path, monkeypatch):
    data = random_image_folder(tmp_path / "data", classes=3, train=8, val=0, size=(64, 80))
    first = imagenet_sample.search_sample(str(data), SAMPLE, 2, None)
    assert [len(first.lists[part]) for part in imagenet_sample.PARTS] == [12, 6]
    run = tmp_path / "run"
    imagenet_sample.write_lists(str(run), first.lists)
    assert (run / "imagenet_sample" / "weights.txt").read_text().splitlines() == first.lists["weights"]

    def listing(*_):
        raise AssertionError("the folder was listed again")
    monkeypatch.setattr(imagenet_sample, "list_train_folder", listing)
    again = imagenet_sample.search_sample(str(data), SAMPLE, 2, str(run))
    assert again.lists is None and "read from" in again.description
    assert again.weights.samples == first.weights.samples
    assert again.architecture.samples == first.architecture.samples
    image, label = again.weights[0]  # PC-DARTS's search crop of a 64x80 image
    assert image.shape == (3, 224, 224) and label == again.weights.classes.index(
        os.path.basename(os.path.dirname(again.weights.samples[0][0])))
    with pytest.raises(UserError, match="resume with --data pointing at the ImageNet folder"):
        imagenet_sample.search_sample(str(tmp_path / "moved"), SAMPLE, 2, str(run))


def test_a_prepared_folder_is_the_sample(tmp_path):
    data = random_image_folder(tmp_path / "data", classes=2, train=3, val=2, size=(64, 80))
    sample = imagenet_sample.search_sample(str(data), ["prepared"], 2, None)
    assert (len(sample.weights), len(sample.architecture)) == (6, 4) and sample.lists is None
    assert sample.weights.root.endswith("train") and sample.architecture.root.endswith("val")
    assert sample.architecture[0][0].shape == (3, 224, 224)


def test_folders_not_laid_out_like_imagenet_are_one_clear_line(tmp_path):
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    (flat / "0.png").touch()
    empty_class = touch_folder(tmp_path / "empty", {"n01": 4})
    (empty_class / "train" / "n02").mkdir()
    prepared_other = touch_folder(tmp_path / "other", {"n01": 2, "n02": 2})
    (prepared_other / "val" / "n01").mkdir(parents=True)
    (prepared_other / "val" / "n01" / "0.png").touch()
    cases = [
        (tmp_path / "absent", SAMPLE, "is not a folder: --dataset imagenet needs --data DIR"),
        (tmp_path / "flat", SAMPLE, "is not laid out like ImageNet"),
        (empty_class, SAMPLE, r"is not laid out like ImageNet \(.*n02"),
        (touch_folder(tmp_path / "one", {"n01": 1}), SAMPLE, "n01 holds 1 image"),
        (touch_folder(tmp_path / "noval", {"n01": 2}), ["prepared"], "val is not a folder"),
        (prepared_other, ["prepared"], "hold different classes"),
        (empty_class, ["0.1"], "takes two fractions"),
        (empty_class, ["a", "b"], "takes two fractions"),
        (empty_class, ["0.8", "0.3"], "together at most 1"),
        (empty_class, ["0", "0.1"], "above 0"),
    ]
    for data, sample, message in cases:
        with pytest.raises(UserError, match=message) as error:
            imagenet_sample.search_sample(str(data), sample, 2, None)
        assert "\n" not in str(error.value)


# -- the supernet, the preset, the schedule, the clipping ------------------------------------

# The quick tier keeps one location per stage layout; the wider spaces are slow.
@pytest.mark.parametrize("location", [
    loc.value if loc.value in ("after_every", "end", "no_attention")
    else pytest.param(loc.value, marks=pytest.mark.slow) for loc in AttLocation])
def test_every_location_builds_the_imagenet_supernet_for_its_cells_sizes(location):
    torch.manual_seed(0)
    network = NetworkImageNet(4, 5, 3, nn.CrossEntropyLoss(), location, image_size=64,
                              partial_channels=2, edge_norm=True)
    with torch.no_grad():
        assert network(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    gathers = {i: {m.downop.dwconv.kernel_size for m in cell.modules()
                   if isinstance(m, GEThetaPlusMask)} for i, cell in enumerate(network.cells)}
    if location != "no_attention":  # 64 px: the cells see 8, then 4 and 2 after each reduction
        assert gathers == {0: {(8, 8)}, 1: {(4, 4)}, 2: {(2, 2)}}
    assert len(network.genotype().normal) == 8


def test_the_preset_stands_in_for_the_flags_not_given():
    args = searching.parse_search_args(train_search.parser,
                                       ["--preset", "pc_darts_imagenet", "--batchsz", "8"])
    assert (args.batchsz, args.lr, args.lr_min, args.lr_warmup_epochs, args.arch_lr,
            args.arch_grad_clip, args.arch_warmup_epochs, args.partial_channels, args.epochs,
            args.dataset, args.imagenet_sample) == (8, 0.5, 0.0, 5, 6e-3, 5.0, 35, 2, 50,
                                                    "imagenet", ["0.1", "0.025"])
    plain = searching.parse_search_args(train_search.parser, [])
    assert (plain.batchsz, plain.lr, plain.dataset, plain.preset) == (64, 0.025, "cifar10", None)
    assert "pc_darts_imagenet" in train_search.parser.format_help()


def test_the_learning_rate_warms_up_then_follows_the_cosine():
    def lrs(epochs_done: int, count: int):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler = resumed_schedule(warmed_up_cosine_schedule(50, 0.0, 5), optimizer, epochs_done)
        out = []
        for _ in range(count):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out
    uninterrupted = lrs(0, 50)
    assert uninterrupted[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert uninterrupted[5:] == pytest.approx(
        [0.25 * (1 + math.cos(math.pi * e / 50)) for e in range(5, 50)])
    assert lrs(3, 10) == uninterrupted[3:13] and lrs(7, 5) == uninterrupted[7:12]


def test_the_architecture_gradient_is_clipped_before_the_step():
    torch.manual_seed(0)
    network = Network(4, 10, 3, nn.CrossEntropyLoss(), "no_attention", image_size=8)
    optimizer = torch.optim.SGD(network.weights(), 0.1)
    batch = (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    architect = Architect(network, optimizer, 6e-3, 1e-3, unrolled=False, grad_clip=1e-4)
    norm = torch.cat([g.flatten() for g in architect.first_order_gradient(*batch)]).norm()
    seen = []
    step = architect.optimizer.step
    architect.optimizer.step = lambda: (seen.append(torch.cat(
        [p.grad.flatten() for p in network.arch_parameters()]).norm()), step())
    architect.step(*batch, *batch, 0.1)
    assert norm > 1e-3 and float(seen[0]) == pytest.approx(1e-4, rel=1e-5)


# -- the pipeline's ImageNet jobs ----------------------------------------------------------------

def pipeline_options(tmp_path: Path, *args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pipeline.add_reproduce_args(parser)
    return parser.parse_args(["--dir", str(tmp_path), "--data", str(tmp_path), *args])


def test_the_imagenet_pipeline_searches_with_the_preset_and_trains_with_the_imagenet_scripts(
        tmp_path):
    options = pipeline_options(tmp_path, "--preset", "pc_darts_imagenet")
    settings = pipeline.resolve_settings(options)
    assert settings["dataset"] == "imagenet" and settings["search_batchsz"] == 128
    [search] = pipeline.search_jobs(settings, options, str(tmp_path))
    assert search.script == "train_search.py"
    assert " --dataset imagenet " in " ".join(search.flags) + " "
    assert "--preset" in search.flags and "--train_portion" not in search.flags
    final = pipeline.training_job(settings, options, str(tmp_path), "final", "final-seed2",
                                  "cell.json", 2)
    assert final.script == "train_ImageNet.py" and "--cutout" not in final.flags
    assert pipeline.test_job(settings, options, str(tmp_path), final, "cell.json").script == \
        "test_imagenet.py"
    with pytest.raises(UserError, match="--preset pc_darts_imagenet searches and trains on ImageNet"):
        pipeline.resolve_settings(pipeline_options(tmp_path, "--preset", "pc_darts_imagenet",
                                                   "--dataset", "cifar10"))


# -- slow: train_search.py and reproduce.py on a generated ImageNet-like folder ----------------

@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    return random_image_folder(tmp_path_factory.mktemp("imagenet"), classes=4, train=12, val=4,
                               size=(64, 80))


def tiny_search(data: Path, exp: Path, epochs: int, *extra: str) -> list:
    """PC-DARTS's preset at a tiny size: the architecture frozen for the first epoch,
    the learning rate warmed up over it."""
    return ["--preset", "pc_darts_imagenet", "--data", str(data), "--exp_path", str(exp),
            "--imagenet_sample", *SAMPLE, "--init_ch", "4", "--layers", "3", "--batchsz", "8",
            "--workers", "0", "--epochs", str(epochs), "--arch_warmup_epochs", "1",
            "--lr_warmup_epochs", "1", *extra]


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_search_resumes_on_its_own_sample_and_ends_as_an_uninterrupted_one(imagenet_like,
                                                                            tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(imagenet_like / "train", target_is_directory=True)
    trace = {"ATT_DARTS_TRACE_ARCH": "1"}
    results = run_parallel({"whole": command("train_search.py",
                                             *tiny_search(imagenet_like, tmp_path / "whole", 2)),
                            "first": command("train_search.py",
                                             *tiny_search(data, tmp_path / "part", 1))},
                           env=trace)
    for result in results.values():
        _ok(result)
    run = only_run_dir(tmp_path / "part")
    lists = {part: (run / "imagenet_sample" / f"{part}.txt").read_text()
             for part in imagenet_sample.PARTS}
    assert [len(text.splitlines()) for text in lists.values()] == [24, 12]
    assert "per-class sample: 0.5 and 0.25 of every class" in (run / "log.txt").read_text()
    # The folder the run was drawn from changes: the resumed run must not draw again.
    (data / "train").unlink()
    changed = data / "train"
    for class_dir in sorted((imagenet_like / "train").iterdir()):
        (changed / class_dir.name).mkdir(parents=True)
        images = sorted(class_dir.iterdir())
        for image in images:
            (changed / class_dir.name / image.name).symlink_to(image)
        (changed / class_dir.name / "more.png").symlink_to(images[0])  # a draw would differ
    resumed = _ok(run_script("train_search.py", *tiny_search(data, tmp_path / "part", 2),
                             "--checkpoint_path", str(run), env=trace))
    assert {part: (run / "imagenet_sample" / f"{part}.txt").read_text()
            for part in imagenet_sample.PARTS} == lists
    assert "read from" in (run / "log.txt").read_text()
    # 3 iterations per epoch; the architecture moved in the second epoch only.
    steps = re.findall(r"epoch (\d+) step (\d+) architecture sha256 (\w+)",
                       results["first"].stdout + resumed.stdout)
    assert [(int(e), int(s)) for e, s, _ in steps] == [(1, 1), (1, 2), (1, 3),
                                                       (2, 1), (2, 2), (2, 3)]
    assert len({digest for e, _, digest in steps if e == "1"}) == 1
    assert len({digest for e, _, digest in steps if e == "2"}) == 3
    whole = only_run_dir(tmp_path / "whole")
    ours, theirs = (torch.load(path / "checkpoint.pt", weights_only=True) for path in (run, whole))
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in ours["state_dict"].items():
        assert torch.equal(value, theirs["state_dict"][key]), key
    assert (run / "genotype.json").read_text() == (whole / "genotype.json").read_text()


@pytest.mark.slow
def test_a_folder_that_is_not_imagenet_is_one_line_and_leaves_no_run(tmp_path):
    data = touch_folder(tmp_path / "data", {"n01": 1, "n02": 5})
    result = run_in_process("train_search.py", *tiny_search(data, tmp_path / "exp", 1))
    assert "n01 holds 1 image(s): too few" in one_line_error(result)
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_reproduce_on_imagenet_searches_selects_trains_and_tests(imagenet_like, tmp_path):
    directory = tmp_path / "pipe"
    result = subprocess.run(
        [*command("reproduce.py"), "--preset", "tiny", "--dataset", "imagenet",
         "--data", str(imagenet_like), "--dir", str(directory), "--workers", "0",
         "--searches", "1", "--finals", "1", "--search_batchsz", "8", "--select_batchsz", "8",
         "--search_args", "--imagenet_sample 0.5 0.25"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=900)
    _ok(result)
    state = (directory / pipeline.STATE).read_text()
    for script in ("train_search.py", "train_ImageNet.py", "test_imagenet.py"):
        assert script in state
    card = (directory / "results.json").read_text()
    assert '"test_error": {' in card and "imagenet" in card
    assert "top-5 acc" in (directory / "jobs" / "test-seed2" / "job.log").read_text()
