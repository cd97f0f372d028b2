"""What every run shares (experiment.py): top-k counts, the resumed learning-rate
schedule and the resume rule for flags."""
import argparse

import pytest
import torch
from torch.optim.lr_scheduler import StepLR

from runtime import experiment
from runtime.errors import UserError


def test_topk_correct_counts_targets_among_the_top_k():
    logits = torch.tensor([[0.1, 0.9, 0.0],    # top-1 class 1, top-2 {1, 0}
                           [0.8, 0.1, 0.3],    # top-1 class 0, top-2 {0, 2}
                           [0.2, 0.3, 0.5],    # top-1 class 2, top-2 {2, 1}
                           [0.6, 0.3, 0.1]])   # top-1 class 0, top-2 {0, 1}
    targets = torch.tensor([1, 2, 0, 1])
    assert experiment.topk_correct(logits, targets, (1, 2)).tolist() == [1, 3]


def _optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.025, momentum=0.9)


def _straight_run(epochs: int, make_scheduler) -> tuple:
    """The learning rate of each epoch of an uninterrupted run, and the optimizer state
    after each epoch."""
    optimizer = _optimizer()
    scheduler = make_scheduler(optimizer)
    rates, states = [], []
    for _ in range(epochs):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        states.append(optimizer.state_dict())
    return rates, states


def _resumed(state: dict, make_scheduler, done: int) -> tuple:
    optimizer = _optimizer()
    optimizer.load_state_dict(state)
    return optimizer, experiment.resumed_schedule(make_scheduler, optimizer, done)


@pytest.mark.parametrize("make_scheduler", [
    experiment.cosine_schedule(7, 0.001), lambda optimizer: StepLR(optimizer, 2, gamma=0.97)],
    ids=["cosine", "step"])
@pytest.mark.parametrize("done", [1, 4])
def test_resumed_schedule_is_bit_identical_to_an_uninterrupted_one(make_scheduler, done):
    straight, states = _straight_run(7, make_scheduler)
    optimizer, scheduler = _resumed(states[done - 1], make_scheduler, done)
    rates = []
    for _ in range(done, 7):
        rates.append(scheduler.get_last_lr()[0])
        assert optimizer.param_groups[0]["lr"] == rates[-1]
        optimizer.step()
        scheduler.step()
    assert rates == straight[done:]


def test_an_extended_run_follows_the_schedule_of_its_new_length():
    """A finished 3-epoch run resumed with --epochs 6 runs its epochs 4-6 at the rates
    of a 6-epoch run, whatever the 3-epoch schedule had reached."""
    _, finished = _straight_run(3, experiment.cosine_schedule(3, 0.001))
    longer, _ = _straight_run(6, experiment.cosine_schedule(6, 0.001))
    optimizer, scheduler = _resumed(finished[-1], experiment.cosine_schedule(6, 0.001), 3)
    rates = []
    for _ in range(3, 6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == longer[3:]


def test_resume_rule_lets_only_the_free_flags_differ(tmp_path):
    saved = {"lr": 0.025, "epochs": 2, "data": "old", "amp": False}
    path = tmp_path / "checkpoint.pt"
    torch.save({key: 0 for key in experiment.CHECKPOINT_KEYS} | {"args": saved, "extra": 1}, path)
    free = argparse.Namespace(lr=0.025, epochs=5, data="new", amp=True)
    assert experiment.load_checkpoint(str(path), free, "search", ("extra",))["extra"] == 1
    with pytest.raises(UserError, match="--lr 0.025, not 0.1"):
        experiment.load_checkpoint(str(path), argparse.Namespace(**{**vars(free), "lr": 0.1}),
                                   "search", ("extra",))
    with pytest.raises(UserError, match="not a resumable training checkpoint .no 'best_acc'"):
        experiment.load_checkpoint(str(path), free, "training", ("best_acc",))
