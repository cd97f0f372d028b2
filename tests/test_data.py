"""data.py's CyclingLoader: endless passes over the architecture half, each in a new
order, and a resumed loader that continues with the very batches of an uninterrupted
one, at a pass boundary and across it."""
import pytest
import torch
from torch.utils.data import Dataset

from runtime import data
from runtime.parallel import Runtime

RUNTIME = Runtime(torch.device("cpu"))
IMAGES, BATCH = 10, 4  # 2 batches per pass (drop_last), 2 images left out of each pass


class NumberedNoise(Dataset):
    """Item i: (i, a random draw): the draw stands in for random augmentation."""

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int):
        return index, torch.rand(())


def _cycling(workers: int) -> data.CyclingLoader:
    return data.CyclingLoader(data.make_loader(NumberedNoise(), BATCH, RUNTIME, shuffle=True,
                                               workers=workers, seed=3, drop_last=True))


def _take(loader: data.CyclingLoader, count: int) -> list:
    return [(indices.tolist(), draws.tolist()) for indices, draws in
            (next(loader) for _ in range(count))]


def test_each_pass_is_a_new_order_of_distinct_images():
    loader = _cycling(workers=0)
    passes = [sum((indices for indices, _ in _take(loader, 2)), []) for _ in range(3)]
    for images in passes:
        assert len(set(images)) == 2 * BATCH and set(images) <= set(range(IMAGES))
    assert passes[0] != passes[1] != passes[2]
    assert loader.state_dict() == {"cycle": 2, "position": 2}
    next(loader)
    assert loader.state_dict() == {"cycle": 3, "position": 1}


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stop", [1, 2, 3], ids=["mid_pass", "end_of_pass", "next_pass"])
def test_a_resumed_loader_continues_with_the_same_batches(stop, workers):
    """Stopped after ``stop`` batches and rebuilt from its state_dict (with the global
    random state the run had there, as a checkpoint restores it), the loader gives
    the batches, random draws included, that the uninterrupted one gave; replaying a
    pass up to its position leaves the global random state alone."""
    torch.manual_seed(0)
    straight = _take(_cycling(workers), 6)

    torch.manual_seed(0)
    interrupted = _cycling(workers)
    first = _take(interrupted, stop)
    state, rng = interrupted.state_dict(), torch.get_rng_state()
    resumed = _cycling(workers)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    rest = _take(resumed, 6 - stop)
    assert first + rest == straight


def test_starting_and_replaying_passes_leave_the_global_random_state_alone():
    """The rest of a run (drop-path, the other loaders) draws from the global
    generator, which a checkpoint restores: the loader must not move it, neither when
    a pass starts nor when a resumed loader replays its pass.  (The items' own random
    draws happen in the worker here.)"""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = _cycling(workers=1)
    _take(loader, 5)  # three passes started
    resumed = _cycling(workers=1)
    resumed.load_state_dict({"cycle": 1, "position": 1})
    _take(resumed, 2)  # a replay, then a new pass
    assert torch.equal(torch.get_rng_state(), before)
