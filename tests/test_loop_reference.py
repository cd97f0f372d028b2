"""The search and training loops compute what they computed before they became library
functions: one float64 epoch of each, on seeded tiny networks and random images,
against the values recorded from the earlier code (tests/data/loop_reference.json).

Search: a supernet (C=4, 4 cells, 16x16 images, after_every), one epoch of 3 search
steps (first or second order) at lr 0.025, then the evaluation on the architecture
half.  Training: NetworkCIFAR(4, 10, 3 cells, auxiliary head, Att_DARTS) with
drop-path 0.1, one epoch of 6 steps, then top-1/top-5 on a test split.  Everything
in-process, one thread, no loader workers."""
import argparse

import pytest
import torch
import torch.nn as nn
from reference_values import (assert_close, digest, fill_seeded, fill_seeded_supernet,
                              load_reference, per_edge_order)
from torch.utils.data import TensorDataset

from architect import Architect
from genotypes import Att_DARTS
from model import NetworkCIFAR
from model_search import Network
from runtime import data, searching, training
from runtime.experiment import RunLog
from runtime.parallel import Runtime
from runtime.precision import Precision

RUNTIME = Runtime(torch.device("cpu"))
FLOAT32 = Precision(False, "bfloat16", RUNTIME.device)
NO_LOG = RunLog(None)


@pytest.fixture(scope="module")
def reference() -> dict:
    return load_reference("loop_reference")


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(count: int, size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count, 3, size, size, generator=generator, dtype=torch.float64),
                         torch.randint(0, 10, (count,), generator=generator))


def _loader(dataset: TensorDataset, seed: int) -> torch.utils.data.DataLoader:
    return data.make_loader(dataset, 8, RUNTIME, shuffle=True, workers=0, seed=seed, drop_last=True)


@pytest.mark.parametrize("order", [1, 2])
def test_one_search_epoch_matches_the_recorded_one(order, reference):
    recorded = reference[f"search_order_{order}"]
    torch.manual_seed(2)
    weight_half, arch_half = _images(24, 16, 10), _images(16, 16, 11)
    train_loader = _loader(weight_half, seed=2)
    arch_batches = data.CyclingLoader(_loader(arch_half, seed=3))
    network = Network(4, 10, 4, nn.CrossEntropyLoss(), "after_every", image_size=16).double()
    fill_seeded_supernet(network)
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=order == 2)
    args = argparse.Namespace(channels_last=False, grad_clip=5.0, report_freq=100)
    train_loader.sampler.set_epoch(0)

    train_loss, train_acc = searching.search_epoch(network, architect, optimizer, train_loader,
                                                   arch_batches, 0.025, FLOAT32, RUNTIME, args,
                                                   NO_LOG)
    valid_loss, valid_acc = searching.evaluate_supernet(
        network, data.make_eval_loader(arch_half, 8, RUNTIME, 0), FLOAT32, RUNTIME, False)

    assert train_acc.total == 24 and valid_acc.total == 16
    assert_close([train_loss, train_acc.percent(), valid_loss, valid_acc.percent()],
                 [recorded[key] for key in ("train_loss", "train_acc", "valid_loss", "valid_acc")],
                 where="metrics")
    arch = network.named_arch_parameters()
    assert sorted(arch) == sorted(recorded["arch"])
    for name, values in recorded["arch"].items():
        assert_close(arch[name].detach().tolist(), values, where=name)
    assert_close(digest(per_edge_order(network, network.named_weights())), recorded["weights"],
                 where="weights")
    genotype = network.genotype()
    assert [list(edge) for edge in genotype.normal] == recorded["genotype"]["normal"]
    assert [list(edge) for edge in genotype.reduce] == recorded["genotype"]["reduce"]
    assert arch_batches.state_dict() == recorded["arch_batches"]


def test_one_training_epoch_matches_the_recorded_one(reference):
    recorded = reference["train"]
    torch.manual_seed(2)
    train_set, test_set = _images(48, 32, 20), _images(24, 32, 21)
    network = NetworkCIFAR(4, 10, 3, True, Att_DARTS).double()
    fill_seeded(network)
    network.drop_path_prob = 0.1
    loader = _loader(train_set, seed=2)
    loader.sampler.set_epoch(0)
    optimizer = torch.optim.SGD(network.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    args = argparse.Namespace(channels_last=False, grad_clip=5.0, report_freq=100,
                              auxiliary_weight=0.4)

    train_loss, train_acc = training.train_epoch(network, loader, nn.CrossEntropyLoss(), optimizer,
                                                 FLOAT32, RUNTIME, args, NO_LOG)
    test = training.test_accuracy(network, data.make_eval_loader(test_set, 8, RUNTIME, 0), RUNTIME,
                                  FLOAT32, False, (1, 5))

    assert train_acc.total == 48
    assert_close([train_loss, train_acc.percent()], [recorded["train_loss"], recorded["train_acc"]],
                 where="metrics")
    assert (test.correct, test.total) == (recorded["correct"], recorded["total"])
    assert_close(digest(list(network.parameters())), recorded["weights"], where="weights")
