"""Final networks and checkpoint compatibility with the original release."""
import json

import pytest
import torch
import torch.nn as nn

import genotypes
import model as model_module
from genotypes import Genotype
from model import Cell, NetworkCIFAR, NetworkImageNet
from runtime import complexity, experiment
from runtime.errors import UserError

ATT_DARTS_CIFAR_PARAMS = 3_231_343


@pytest.fixture(scope="module")
def cifar_att():
    """NetworkCIFAR(36, 10, 20, True, Att_DARTS), built once for the module."""
    torch.manual_seed(0)
    return NetworkCIFAR(36, 10, 20, True, genotypes.Att_DARTS)


def _count_without_aux(net):
    return sum(p.numel() for name, p in net.named_parameters()
               if not name.startswith("auxiliary_head."))


def _small(genotype=genotypes.Att_DARTS, auxiliary=True, C=8, layers=5, seed=0):
    torch.manual_seed(seed)
    return NetworkCIFAR(C, 10, layers, auxiliary, genotype)


# -- sizes and layout -------------------------------------------------------------

def test_cifar_att_darts_parameter_count(cifar_att):
    assert _count_without_aux(cifar_att) == ATT_DARTS_CIFAR_PARAMS
    assert complexity.count_parameters(cifar_att) == ATT_DARTS_CIFAR_PARAMS
    # the auxiliary head exists and is excluded
    assert sum(p.numel() for p in cifar_att.auxiliary_head.parameters()) > 0


def test_cifar_state_dict_matches_reference(cifar_att, reference_state_dict_json):
    reference = json.loads(reference_state_dict_json.read_text())
    ours = {k: list(v.shape) for k, v in cifar_att.state_dict().items()}
    missing = sorted(set(reference) - set(ours))
    unexpected = sorted(set(ours) - set(reference))
    assert not missing, f"missing keys, e.g. {missing[:5]}"
    assert not unexpected, f"unexpected keys, e.g. {unexpected[:5]}"
    wrong = [(k, ours[k], reference[k]) for k in reference if ours[k] != reference[k]]
    assert not wrong, f"shape mismatches, e.g. {wrong[:5]}"


def test_cifar_darts_v2_is_3_3_million():
    net = NetworkCIFAR(36, 10, 20, True, genotypes.DARTS_V2)
    assert round(complexity.count_parameters(net) / 1e6, 1) == 3.3
    assert round(_count_without_aux(net) / 1e6, 1) == 3.3


@pytest.mark.parametrize("name,millions", [("Att_DARTS", 4.6), ("DARTS", 4.7)])
def test_imagenet_parameter_counts(name, millions):
    net = NetworkImageNet(48, 1000, 14, True, genotypes.NAMED_GENOTYPES[name])
    assert round(complexity.count_parameters(net) / 1e6, 1) == millions
    assert round(_count_without_aux(net) / 1e6, 1) == millions


def test_imagenet_forward():
    torch.manual_seed(0)
    net = NetworkImageNet(48, 1000, 14, True, genotypes.Att_DARTS)
    net.eval()
    with torch.no_grad():
        logits, aux = net(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and aux is None
    assert torch.isfinite(logits).all()
    net.train()
    with torch.no_grad():
        logits, aux = net(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and aux.shape == (2, 1000)


def test_imagenet_first_cell_treats_its_input_as_reduced():
    net = NetworkImageNet(16, 10, 5, False, genotypes.DARTS)
    assert type(net.cells[0].preprocess0).__name__ == "FactorizedReduce"
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]


# -- forward contract -------------------------------------------------------------

def test_forward_returns_aux_in_train_only(cifar_att):
    x = torch.randn(2, 3, 32, 32)
    cifar_att.train()
    with torch.no_grad():
        logits, aux = cifar_att(x)
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    cifar_att.eval()
    with torch.no_grad():
        logits, aux = cifar_att(x)
    assert logits.shape == (2, 10) and aux is None


def test_no_auxiliary_head_when_disabled():
    net = _small(auxiliary=False)
    assert not any(name.startswith("auxiliary_head") for name, _ in net.named_parameters())
    net.train()
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux is None


def test_cell_widths_follow_concat():
    net = _small(genotypes.NASNet, C=8, layers=3)
    # NASNet: normal concat has 5 states, reduce concat 3.
    assert [c.multiplier for c in net.cells] == [5, 3, 3]
    logits, _ = net.eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 10)


def test_bottleneck_attention_is_built_at_concat_width():
    g = genotypes.Att_DARTS._replace(normal_bottleneck="SE", reduce_bottleneck="CBAM")
    net = _small(g)
    cell = net.cells[0]
    assert cell._bottleneck is not None
    lin = [m for m in cell._bottleneck.modules() if isinstance(m, nn.Linear)]
    assert lin[0].in_features == 4 * 8
    net.eval()
    assert net(torch.randn(1, 3, 32, 32))[0].shape == (1, 10)


# -- drop-path -------------------------------------------------------------------

def test_drop_path_prob_defaults_to_zero(cifar_att):
    assert cifar_att.drop_path_prob == 0
    assert NetworkImageNet(16, 10, 3, False, genotypes.DARTS).drop_path_prob == 0


def test_att_darts_droppable_edges(cifar_att):
    normal = [c for c in cifar_att.cells if not c.reduction]
    reduce_ = [c for c in cifar_att.cells if c.reduction]
    # Normal: every skip_connect edge is stride 1 and carries CBAM -> never dropped.
    expected_normal = [True, True, True, False, False, True, False, False]
    # Reduce: skip_connects read node 0 (index 2) -> stride 1 -> never dropped.
    expected_reduce = [True, True, True, False, False, True, False, True]
    assert all(c._droppable == expected_normal for c in normal)
    assert all(c._droppable == expected_reduce for c in reduce_)


def test_droppable_rules_on_a_custom_genotype():
    g = Genotype(
        normal=[("sep_conv_3x3", 0, "Identity"), ("skip_connect", 1, "CBAM"),
                ("skip_connect", 0, ""), ("sep_conv_3x3", 1, ""),
                ("max_pool_3x3", 2, "SE"), ("skip_connect", 3, "Identity"),
                ("dil_conv_3x3", 0, "BAM"), ("avg_pool_3x3", 1, "Identity")],
        normal_concat=[2, 3, 4, 5],
        reduce=[("skip_connect", 0, "SE"), ("skip_connect", 1, ""),
                ("skip_connect", 2, "SE"), ("sep_conv_3x3", 0, "Identity"),
                ("max_pool_3x3", 1, "CBAM"), ("skip_connect", 3, ""),
                ("skip_connect", 0, "Identity"), ("avg_pool_3x3", 4, "DoubleAttention")],
        reduce_concat=[2, 3, 4, 5],
    )
    normal = Cell(g, 16, 16, 8, False, False, 8, 8)
    reduce_ = Cell(g, 16, 16, 8, True, False, 4, 4)
    assert normal._droppable == [False, False, False, True, True, False, True, False]
    # stride-2 skip_connect is a FactorizedReduce: droppable unless its attention is Identity
    assert reduce_._droppable == [True, True, False, False, True, False, False, True]


def test_identity_attention_as_first_element_is_never_dropped():
    g = Genotype(normal=[("Identity", 0, ""), ("Identity", 1, "CBAM"),
                         ("sep_conv_3x3", 0, ""), ("skip_connect", 2, "")],
                 normal_concat=[2, 3], reduce=[("max_pool_3x3", 0, ""), ("max_pool_3x3", 1, "")],
                 reduce_concat=[2])
    cell = Cell(g, 16, 16, 8, False, False, 8, 8)
    # ("Identity", 1, "CBAM") passes its input through like (skip_connect, 1, CBAM)
    assert cell._droppable == [False, False, True, False]


NEVER_DROPPED = Genotype(
    normal=[("skip_connect", 0, "CBAM"), ("sep_conv_3x3", 1, "Identity"),
            ("skip_connect", 2, "SE"), ("avg_pool_3x3", 0, "Identity"),
            ("skip_connect", 1, ""), ("dil_conv_3x3", 3, "Identity"),
            ("skip_connect", 4, "CBAM"), ("max_pool_3x3", 2, "Identity")],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0, "Identity"), ("sep_conv_3x3", 1, "Identity"),
            ("skip_connect", 2, "CBAM"), ("skip_connect", 0, "Identity"),
            ("skip_connect", 3, "SE"), ("avg_pool_3x3", 1, "Identity"),
            ("skip_connect", 4, ""), ("skip_connect", 2, "CBAM")],
    reduce_concat=[2, 3, 4, 5],
)


def _train_outputs(net, x, seeds, drop_prob):
    net.train()
    net.drop_path_prob = drop_prob
    outs = []
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            outs.append(net(x)[0])
    return outs


def test_drop_path_only_touches_droppable_edges(monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    # No droppable edge: seeds do not matter even at drop_path_prob 0.99.
    net = _small(NEVER_DROPPED)
    assert not any(any(c._droppable) for c in net.cells)
    a, b = _train_outputs(net, x, [0, 1], 0.99)
    assert torch.equal(a, b)
    a, b = _train_outputs(net, x, [0, 1], 0.5)
    assert torch.equal(a, b)
    # Att_DARTS has droppable edges: seeds change the output (at 0.99 nearly every
    # droppable edge is dropped under any seed, so use 0.5 here)...
    net = _small(genotypes.Att_DARTS)
    a, b = _train_outputs(net, x, [0, 1], 0.5)
    assert not torch.allclose(a, b)
    # ...but not with drop_path_prob 0, nor in eval mode.
    a, b = _train_outputs(net, x, [0, 1], 0.0)
    assert torch.equal(a, b)
    net.eval()
    net.drop_path_prob = 0.99
    with torch.no_grad():
        torch.manual_seed(0)
        a = net(x)[0]
        torch.manual_seed(1)
        b = net(x)[0]
    assert torch.equal(a, b)
    # drop_path runs exactly once per droppable edge.
    calls = []
    original = model_module.drop_path

    def counting(h, p):
        calls.append(p)
        return original(h, p)

    monkeypatch.setattr(model_module, "drop_path", counting)
    _train_outputs(net, x, [0], 0.3)
    assert len(calls) == sum(sum(c._droppable) for c in net.cells)
    assert set(calls) == {0.3}


def test_drop_path_scales_kept_samples():
    torch.manual_seed(0)
    x = torch.ones(1000, 1, 1, 1)
    y = model_module.drop_path(x, 0.25)
    kept = y != 0
    # Kept samples are divided by the keep probability: exactly 1 / 0.75 in float32.
    assert torch.equal(y[kept], torch.ones_like(y[kept]) / 0.75)
    # 1000 draws with probability 0.75: the kept fraction's standard deviation is
    # 0.014, so it lies within +-0.1 (7 deviations) of 0.75.
    assert 0.65 < kept.float().mean() < 0.85


# -- checkpoints -------------------------------------------------------------------

def _random_state(net, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=g, dtype=value.dtype)
            if key.endswith("running_var"):
                state[key] = state[key].abs() + 0.1
        else:
            state[key] = torch.full_like(value, seed + 3)
    return state


@pytest.mark.parametrize("layout", ["bare", "module_prefix", "wrapped", "wrapped_module_prefix"])
def test_load_weights_layouts(cifar_att, tmp_path, layout):
    state = _random_state(cifar_att, seed=len(layout))
    if layout == "bare":
        saved = state
    elif layout == "module_prefix":
        saved = {f"module.{k}": v for k, v in state.items()}
    elif layout == "wrapped":
        saved = {"state_dict": state, "epoch": 3}
    else:
        saved = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "weights.pt"
    torch.save(saved, path)
    fresh = NetworkCIFAR(36, 10, 20, True, genotypes.Att_DARTS)
    loaded_before = fresh.state_dict()
    assert not torch.equal(loaded_before["classifier.weight"], state["classifier.weight"])
    experiment.load_weights(fresh, str(path))
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _first_difference(model, state):
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state or state[key].shape != tensor.shape:
            return key
    return next(k for k in state if k not in expected)


def _load_error(net, path):
    with pytest.raises(UserError) as info:
        experiment.load_weights(net, str(path))
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert str(path) in message
    return message


def test_mismatched_checkpoint_names_first_differing_key(tmp_path):
    source = _small(genotypes.DARTS_V2)
    path = tmp_path / "darts_v2.pt"
    torch.save(source.state_dict(), path)
    target = _small(genotypes.Att_DARTS)
    key = _first_difference(target, source.state_dict())
    message = _load_error(target, path)
    assert repr(key) in message or key in message


def test_wrong_width_names_key_and_shapes(tmp_path):
    path = tmp_path / "c8.pt"
    torch.save(_small(C=8).state_dict(), path)
    target = _small(C=12)
    message = _load_error(target, path)
    assert _first_difference(target, _small(C=8).state_dict()) in message


def test_extra_keys_are_reported(tmp_path):
    path = tmp_path / "aux.pt"
    source = _small(auxiliary=True)
    torch.save(source.state_dict(), path)
    target = _small(auxiliary=False)
    message = _load_error(target, path)
    assert "auxiliary_head" in message


@pytest.mark.parametrize("content", ["text", "list", "empty", "missing"])
def test_non_checkpoint_files_raise_user_error(tmp_path, content):
    path = tmp_path / "not_a_checkpoint.pt"
    if content == "text":
        path.write_text("this is not a checkpoint\nsecond line\n")
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "empty":
        path.write_bytes(b"")
    _load_error(_small(), path)
