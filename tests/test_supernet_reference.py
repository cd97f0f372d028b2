"""The supernet computes what it computed before it was made faster: logits, weight
and architecture gradients, first- and second-order architecture gradients, BN
statistics and the derived genotype, for every --location, against float64 values
recorded on commit 41124d5 (tests/data/supernet_reference.json, written by the
procedure below with that commit's code).

Weights come from ``reference_values.fill_seeded`` (every state entry, BN statistics
included, drawn from its own seed, so sibling edges hold different statistics and
an eval forward would notice whose were used), applied to the per-edge layout of
that commit and loaded through the network's conversion; digests take the tensors
in that layout's order (``per_edge_order``).  Recorded and recomputed values
differ only in the order of float64 operations: 1e-8 relative is far above that and
far below any change of the math."""
from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
from reference_values import (assert_close, digest, fill_seeded_supernet, load_reference,
                              per_edge_order)

from architect import Architect
from model_search import Network

REFERENCE = load_reference("supernet_reference")
LOCATIONS = [name for name in REFERENCE if name != "about"]
SIZE, BATCH, C, LAYERS = 16, 6, 4, 4
LR, MOMENTUM, WEIGHT_DECAY = 0.025, 0.9, 3e-4


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (BATCH,), generator=generator))


def _as_lists(tensors) -> list:
    return [t.tolist() for t in tensors]


def _check(location: str, recompute: bool, with_momentum: bool) -> None:
    recorded: Dict[str, Any] = REFERENCE[location]
    network = Network(C, 10, LAYERS, nn.CrossEntropyLoss(), location, image_size=SIZE,
                      recompute=recompute).double()
    fill_seeded_supernet(network)
    network.train()
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    (x_train, y_train), (x_valid, y_valid) = _batch(1), _batch(2)
    where = f"{location}{' recomputed' if recompute else ''}"

    logits = network(x_train)
    names, weights = zip(*network.named_weights())
    grads = torch.autograd.grad(network.criterion(logits, y_train), list(weights) + network.arch_parameters())
    assert_close(logits.tolist(), recorded["logits"], where=f"{where}: logits")
    assert_close(digest(per_edge_order(network, zip(names, grads))), recorded["weight_grads"],
                 where=f"{where}: weight gradients")
    assert_close(_as_lists(grads[len(weights):]), recorded["arch_grads"], where=f"{where}: architecture gradients")
    buffers = network.per_edge_layout(dict(network.named_buffers()))
    statistics = [b for name, b in buffers.items() if "running" in name]
    assert_close(digest(statistics), recorded["running_stats"], where=f"{where}: BN running statistics")

    network.load_state_dict(initial)
    optimizer = torch.optim.SGD(network.weights(), LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    architect = Architect(network, optimizer, 3e-4, 1e-3, unrolled=True)
    assert_close(_as_lists(architect.first_order_gradient(x_valid, y_valid)), recorded["first_order"],
                 where=f"{where}: first-order gradient")
    assert_close(_as_lists(architect.second_order_gradient(x_train, y_train, x_valid, y_valid, LR)),
                 recorded["second_order"], where=f"{where}: second-order gradient")

    with network.frozen_architecture():
        loss = network.loss(x_train, y_train)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert_close(digest(per_edge_order(network, network.named_weights())), recorded["after_weight_step"],
                 where=f"{where}: weight step")
    if with_momentum:
        assert_close(_as_lists(architect.second_order_gradient(x_train, y_train, x_valid, y_valid, LR)),
                     recorded["second_order_with_momentum"],
                     where=f"{where}: second-order gradient with momentum")

    network.eval()
    with torch.no_grad():
        assert_close(network(x_valid).tolist(), recorded["eval_logits"], where=f"{where}: eval logits")
    genotype = network.genotype()
    assert [list(edge) for edge in genotype.normal] == recorded["genotype"]["normal"]
    assert [list(edge) for edge in genotype.reduce] == recorded["genotype"]["reduce"]
    assert genotype.normal_bottleneck == recorded["genotype"]["normal_bottleneck"]
    assert genotype.reduce_bottleneck == recorded["genotype"]["reduce_bottleneck"]


def test_reference_covers_every_location():
    from model_search import AttLocation
    assert sorted(LOCATIONS) == sorted(location.value for location in AttLocation)


@pytest.mark.parametrize("location", LOCATIONS)
def test_supernet_matches_the_recorded_values(location):
    _check(location, recompute=False, with_momentum=location == "after_every")


@pytest.mark.slow
def test_recomputed_supernet_matches_the_recorded_values():
    """The paper's location, cells recomputed in backward (the default); the other
    locations' recomputation is compared with their plain forward in float64 by
    tests/test_model_search.py."""
    _check("after_every", recompute=True, with_momentum=True)
