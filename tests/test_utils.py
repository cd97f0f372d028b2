"""Metrics helpers of utils.py: top-k accuracy and the running-average meter."""
import pytest
import torch

import utils


def test_accuracy_is_top_k_percent_of_the_batch():
    logits = torch.tensor([[0.1, 0.9, 0.0],    # top-1 class 1, top-2 {1, 0}
                           [0.8, 0.1, 0.3],    # top-1 class 0, top-2 {0, 2}
                           [0.2, 0.3, 0.5],    # top-1 class 2, top-2 {2, 1}
                           [0.6, 0.3, 0.1]])   # top-1 class 0, top-2 {0, 1}
    targets = torch.tensor([1, 2, 0, 1])
    top1, top2 = utils.accuracy(logits, targets, topk=(1, 2))
    assert top1 == pytest.approx(25.0)
    assert top2 == pytest.approx(75.0)
    assert utils.topk_correct(logits, targets, (1, 2)).tolist() == [1, 3]


def test_average_meter_weights_by_sample_count():
    meter = utils.AverageMeter()
    meter.update(1.0, n=1)
    meter.update(4.0, n=3)
    assert meter.count == 4
    assert meter.avg == pytest.approx(13.0 / 4)
    meter.reset()
    assert meter.count == 0 and meter.avg == 0.0
