"""The original release's checkpoint layout for cells using every attention module,
and the upgrade of this project's earlier checkpoints to it."""
import json
import math
import re

import pytest
import torch
import torch.nn as nn

from attentions import ATTENTIONS
from genotypes import Genotype
from model import NetworkCIFAR, NetworkImageNet, upgrade_state_dict
from operations import FactorizedReduce, Identity
from runtime.experiment import load_state_dict_checked

CONCAT = [2, 3, 4, 5]

ATTENTION_EDGES = [
    ("sep_conv_3x3", 0, "SE"), ("sep_conv_3x3", 1, "GE_theta-plus"),
    ("skip_connect", 0, "BAM"), ("sep_conv_3x3", 1, "CBAM"),
    ("max_pool_3x3", 0, "DoubleAttention"), ("sep_conv_3x3", 1, "Identity"),
    ("skip_connect", 2, "SE"), ("dil_conv_3x3", 0, "GE_theta-plus"),
]
MIXED_EDGES = [
    ("SE", 0, "sep_conv_3x3"), ("GE_theta-plus", 1, "BAM"),
    ("CBAM", 2, "skip_connect"), ("sep_conv_3x3", 1, "DoubleAttention"),
    ("BAM", 3, "max_pool_3x3"), ("DoubleAttention", 0, "SE"),
    ("SE", 4, "dil_conv_5x5"), ("GE_theta-plus", 2, "CBAM"),
]


def _same_cells(edges, bottleneck=""):
    return Genotype(edges, CONCAT, edges, CONCAT, bottleneck, bottleneck)


# The three genotypes of state_dict_cifar_all_attentions.json, by layout name.  The
# file gives "end" only its bottleneck; its ops are those of "attentions" (this
# reproduces the listed keys exactly).
GENOTYPES = {
    "attentions_cifar": _same_cells(ATTENTION_EDGES),
    "mixed_cifar": _same_cells(MIXED_EDGES),
    "end_cifar": _same_cells([(op, index, "") for op, index, _ in ATTENTION_EDGES], "CBAM"),
}


@pytest.fixture(scope="module")
def original_layouts(shared_dir):
    """{layout name: {key: shape}} of the original's NetworkCIFAR(16, 10, 8, True, g)."""
    path = shared_dir / "reference" / "state_dict_cifar_all_attentions.json"
    if not path.exists():
        pytest.skip(f"reference listing not found at {path}")
    reference = json.loads(path.read_text())
    listed = reference["genotypes"]
    assert [tuple(e) for e in listed["attentions"]] == ATTENTION_EDGES
    assert [tuple(e) for e in listed["mixed"]] == MIXED_EDGES
    assert listed["end_bottleneck"] == "CBAM"
    return reference["layouts"]


def _random_value(key, shape, generator, dtype=torch.float32):
    """A tensor of ``shape`` for state_dict entry ``key``: BN statistics in range and
    weights scaled by fan-in, so a deep random network stays finite."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=generator, dtype=dtype) + 0.5
    value = torch.randn(shape, generator=generator, dtype=dtype)
    if len(shape) > 1:
        return value / math.sqrt(math.prod(shape[1:]))
    return value * 0.1 + (1.0 if key.endswith(".weight") else 0.0)


def _differences(ours, reference):
    missing = [k for k in reference if k not in ours]
    unexpected = [k for k in ours if k not in reference]
    wrong = [(k, ours[k], reference[k])
             for k in reference if k in ours and ours[k] != reference[k]]
    return missing, unexpected, wrong


# -- the original's layout ------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(GENOTYPES))
def test_cifar_state_dict_matches_the_original(layout, original_layouts):
    reference = original_layouts[layout]
    net = NetworkCIFAR(16, 10, 8, True, GENOTYPES[layout])
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    missing, unexpected, wrong = _differences(ours, reference)
    assert not missing, f"{len(missing)} missing keys, e.g. {missing[:5]}"
    assert not unexpected, f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}"
    assert not wrong, f"{len(wrong)} shape mismatches, e.g. {wrong[:5]}"
    # Registration order too: an optimizer's state is stored by parameter position.
    assert list(ours) == list(reference)


@pytest.mark.parametrize("layout", sorted(GENOTYPES))
def test_a_checkpoint_of_the_original_loads_strict(layout, original_layouts):
    g = torch.Generator().manual_seed(0)
    state = {k: _random_value(k, shape, g) for k, shape in original_layouts[layout].items()}
    net = NetworkCIFAR(16, 10, 8, True, GENOTYPES[layout])
    net.load_state_dict(state, strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        logits, _ = net.eval()(x)
        train_logits, aux = net.train()(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert torch.isfinite(train_logits).all() and torch.isfinite(aux).all()


# -- the same rules on every network ------------------------------------------------

def _check_first_layers(net, genotype):
    """Attention-first edges: bare in normal cells; in reduction cells wrapped as
    Sequential(skip_connect(C, stride, affine=False), attention) on every edge."""
    for cell in net.cells:
        edges = genotype.reduce if cell.reduction else genotype.normal
        for (name, index, _), layer in zip(edges, cell._first_layers):
            if name not in ATTENTIONS:
                continue
            attention_type = ATTENTIONS[name]
            if not cell.reduction:
                assert type(layer) is attention_type
                continue
            assert isinstance(layer, nn.Sequential) and len(layer) == 2
            assert type(layer[1]) is attention_type
            if index < 2:
                assert isinstance(layer[0], FactorizedReduce) and not layer[0].bn.affine
            else:
                assert isinstance(layer[0], Identity)
                assert not list(layer[0].state_dict())


@pytest.mark.parametrize("layout", sorted(GENOTYPES))
def test_reduction_cells_wrap_attention_first_edges(layout):
    genotype = GENOTYPES[layout]
    _check_first_layers(NetworkCIFAR(16, 10, 8, True, genotype), genotype)
    _check_first_layers(NetworkImageNet(16, 10, 8, True, genotype), genotype)


def _cell_entries(cell):
    """Cell-relative key -> shape, without the preprocessing (it depends on the stems)."""
    return {k: list(v.shape) for k, v in cell.state_dict().items()
            if not k.startswith(("preprocess0.", "preprocess1."))}


@pytest.mark.parametrize("layout", sorted(GENOTYPES))
def test_imagenet_cells_are_named_like_cifar_cells(layout):
    genotype = GENOTYPES[layout]
    cifar = NetworkCIFAR(16, 10, 8, True, genotype)
    imagenet = NetworkImageNet(16, 10, 8, True, genotype)
    sizes = [28, 28, 14, 14, 14, 7, 7, 7]  # 224 after three stride-2 stem convs, then halved twice
    assert [c.reduction for c in imagenet.cells] == [c.reduction for c in cifar.cells]
    for i, (c, n) in enumerate(zip(cifar.cells, imagenet.cells)):
        ours, theirs = _cell_entries(n), _cell_entries(c)
        assert list(ours) == list(theirs), f"cell {i}: {_differences(ours, theirs)[:2]}"
        for key, shape in ours.items():
            if key.endswith("downop.dwconv.weight"):
                # Gather-Excite's depthwise kernel spans the whole map of the cell.
                assert shape == theirs[key][:2] + [sizes[i], sizes[i]], key
            else:
                assert shape == theirs[key], key


def test_imagenet_network_with_attention_first_edges_runs():
    torch.manual_seed(0)
    net = NetworkImageNet(16, 10, 8, False, GENOTYPES["mixed_cifar"]).eval()
    with torch.no_grad():
        logits, _ = net(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


# -- this project's earlier checkpoints ------------------------------------------------

PREVIOUS_NAMES = [
    (re.compile(r"\._mask\.excitation\.0\."), "._mask.2."),
    (re.compile(r"\._mask\.excitation\.2\."), "._mask.4."),
    (re.compile(r"\._mask\.downop\.dwconv\."), "._mask.gather.0."),
    (re.compile(r"\._mask\.downop\.bn\."), "._mask.gather.1."),
    (re.compile(r"\._mask\.mlp\."), "._mask.excite."),
]


def _to_previous_layout(state, genotype, net):
    """``state`` renamed back to this project's earlier layout: SE / Gather-Excite
    names, and bare attention-first edges at stride 1 in reduction cells."""
    bare = set()
    for i, cell in enumerate(net.cells):
        edges = genotype.reduce if cell.reduction else genotype.normal
        bare.update(f"cells.{i}._first_layers.{e}.1._mask."
                    for e, (name, index, _) in enumerate(edges)
                    if cell.reduction and name in ATTENTIONS and index >= 2)
    previous = {}
    for key, value in state.items():
        for prefix in bare:
            key = key.replace(prefix, prefix[:-len("1._mask.")] + "_mask.")
        for pattern, old in PREVIOUS_NAMES:
            key = pattern.sub(old, key)
        previous[key] = value
    return previous


def _double_net(genotype, seed):
    torch.manual_seed(seed)
    return NetworkCIFAR(8, 10, 5, True, genotype).double().eval()


@pytest.mark.parametrize("layout", ["attentions_cifar", "mixed_cifar"])
def test_previous_checkpoint_upgrades_and_computes_the_same(layout):
    genotype = GENOTYPES[layout]
    source = _double_net(genotype, seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: _random_value(k, v.shape, g, v.dtype) if v.is_floating_point() else v
             for k, v in source.state_dict().items()}
    source.load_state_dict(state)
    previous = _to_previous_layout(source.state_dict(), genotype, source)
    renamed = set(previous) - set(state)
    assert any("._mask.4." in k for k in renamed) and any(".gather." in k for k in renamed)
    if layout == "mixed_cifar":
        assert any(re.search(r"_first_layers\.\d+\._mask\.", k) for k in renamed
                   if k.startswith("cells.1."))

    target = _double_net(genotype, seed=2)
    upgraded = upgrade_state_dict(target, previous)
    assert list(upgraded) == list(target.state_dict())
    target.load_state_dict(upgraded, strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])

    # The run mechanics load it through the network's own upgrade, knowing no class.
    loaded = _double_net(genotype, seed=3)
    load_state_dict_checked(loaded, previous, "previous.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], source(x)[0])


def test_upgrade_keeps_current_and_unknown_keys():
    genotype = GENOTYPES["mixed_cifar"]
    net = NetworkCIFAR(8, 10, 5, True, genotype)
    state = net.state_dict()
    # A current state_dict passes through unchanged.
    upgraded = upgrade_state_dict(net, state)
    assert list(upgraded) == list(state)
    assert all(upgraded[k] is v for k, v in state.items())
    # Keys the model does not expect, before or after a move, stay for the caller to report.
    unknown = {
        "module.classifier.weight": torch.zeros(1),
        "cells.1._first_layers.3._mask.excitation.0.weight": torch.zeros(1),  # an op edge
        "cells.1._first_layers.0._mask.bogus": torch.zeros(1),
    }
    assert list(upgrade_state_dict(net, unknown)) == list(unknown)
