"""The architecture step (architect.py): the second-order hypergradient
against double backward, the first-order gradient, what each of several search
iterations may and may not change, DataParallel and mixed precision.

Everything runs in-process on tiny supernets (C=4, 3 cells, 16x16 images).  Claims of
exactness are checked in float64, to 1e-9 relative; the finite difference against
the size of what it approximates; float32 under --amp against bfloat16's own error."""
import contextlib
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode, resolve_name

from architect import Architect
from model_search import Network
from runtime.precision import Precision
from runtime.searching import search_step

CPU = torch.device("cpu")
SIZE = 16          # image side: the supernet builds its attentions for it
MOMENTUM, WEIGHT_DECAY = 0.9, 3e-4
ARCH_LR, ARCH_WD = 3e-4, 1e-3


# -- helpers ---------------------------------------------------------------------------

@pytest.fixture
def float64():
    """float64 by default for the duration of a test (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _batch(batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=generator, dtype=torch.get_default_dtype())
    targets = torch.randint(0, 10, (batch,), generator=generator)
    return images, targets


def _searched_network(location: str, batch: int = 8, C: int = 4, seed: int = 0,
                      recompute: bool = False):
    """A tiny supernet after one real SGD weight step (so momentum buffers exist),
    its weight optimizer, and a training and a validation batch."""
    torch.manual_seed(seed)
    network = Network(C, 10, 3, nn.CrossEntropyLoss(), location, image_size=SIZE,
                      recompute=recompute)
    network.train()
    optimizer = torch.optim.SGD(network.weights(), 0.025, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    images, targets = _batch(batch, seed + 100)
    with network.frozen_architecture():
        loss = network.loss(images, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    assert all("momentum_buffer" in optimizer.state[p] for p in network.weights())
    return network, optimizer, _batch(batch, seed + 200), _batch(batch, seed + 300)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def _relative(value, reference) -> float:
    value, reference = _flat(value), _flat(reference)
    return float((value - reference).norm() / reference.norm())


def _snapshot(tensors) -> List[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _optimizer_state(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """A copy of every tensor of the optimizer's state (momentum buffers, Adam's moments
    and step counts)."""
    return _snapshot(t for state in optimizer.state.values() for t in state.values())


def _bitwise_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def exact_hypergradient(network: Network, optimizer: torch.optim.SGD, train, valid, lr: float,
                        momentum: bool = True) -> List[torch.Tensor]:
    """d/dA L_val(w'(A), A) with w'(A) = w - lr (mu m + grad_w L_train(w, A) + wd w),
    by double backward (create_graph) through the virtual step; train-mode BN on
    fresh copies of the running statistics."""
    buffers = dict(network.named_buffers())
    weights = {name: w.detach().requires_grad_(True) for name, w in network.named_weights()}
    arch = {name: a.detach().clone().requires_grad_(True)
            for name, a in network.named_arch_parameters().items()}

    def loss(w: Dict[str, torch.Tensor], batch) -> torch.Tensor:
        tensors = {**w, **arch, **{k: b.clone() for k, b in buffers.items()}}
        return network.criterion(functional_call(network, tensors, (batch[0],)), batch[1])

    grads = torch.autograd.grad(loss(weights, train), list(weights.values()), create_graph=True)
    virtual = {}
    for (name, parameter), grad in zip(network.named_weights(), grads):
        buffer = optimizer.state[parameter]["momentum_buffer"]
        step = grad + WEIGHT_DECAY * parameter.detach()
        if momentum:
            step = step + MOMENTUM * buffer
        virtual[name] = parameter.detach() - lr * step
    return list(torch.autograd.grad(loss(virtual, valid), list(arch.values())))


class SmoothKinks(TorchFunctionMode):
    """Replaces the supernet's non-smooth functions by smooth ones of the same shape:
    ReLU -> softplus, max pooling -> average pooling, channel/global max -> logsumexp.

    Double backward treats ReLU'' as 0 while a finite difference across a kink does
    not, so on the real network the two legitimately differ by tens of percent; with
    smooth functions they must agree to the truncation error of the difference.
    Any other non-smooth function seen on a tensor that needs a gradient is recorded
    in ``unhandled`` (the test then fails, naming it, rather than being flaky)."""

    SUSPECT = ("relu", "max", "min", "abs", "clamp", "hardtanh", "threshold", "sign",
               "dropout", "round", "floor", "ceil", "hardswish", "hardsigmoid", "elu")
    SMOOTH = ("softmax", "log_softmax", "softmin", "logsumexp")

    def __init__(self, beta: float = 5.0):
        super().__init__()
        self.beta = beta
        self.replaced: Dict[str, int] = {}
        self.unhandled: Dict[str, int] = {}

    def _relu(self, input, *args, **kwargs):
        return F.softplus(input, beta=self.beta)

    @staticmethod
    def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    return_indices=False):
        assert dilation in (1, (1, 1)) and not return_indices
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode=ceil_mode,
                            count_include_pad=False)

    @staticmethod
    def _adaptive_max_pool2d(input, output_size, return_indices=False):
        assert output_size in (1, (1, 1)) and not return_indices
        return torch.logsumexp(input.flatten(2), dim=-1)[..., None, None]

    @staticmethod
    def _amax(input, dim=(), keepdim=False):
        return torch.logsumexp(input, dim=dim, keepdim=keepdim)

    @staticmethod
    def _max(input, dim, keepdim=False):
        # max along a dimension (CBAM's channel max): (values, indices) as torch.max gives.
        return torch.return_types.max((torch.logsumexp(input, dim=dim, keepdim=keepdim),
                                       input.detach().argmax(dim=dim, keepdim=keepdim)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or repr(func)
        short = name.rsplit(".", 1)[-1]
        replacement = {
            "relu": self._relu, "relu_": self._relu,
            "max_pool2d": self._max_pool2d,
            "adaptive_max_pool2d": self._adaptive_max_pool2d,
            "amax": self._amax, "max": self._max,
        }.get(short)
        if replacement is not None:
            self.replaced[short] = self.replaced.get(short, 0) + 1
            return replacement(*args, **kwargs)
        if (any(s in short for s in self.SUSPECT) and short not in self.SMOOTH
                and any(isinstance(a, torch.Tensor) and a.requires_grad
                        for a in list(args) + list(kwargs.values()))):
            self.unhandled[name] = self.unhandled.get(name, 0) + 1
        return func(*args, **kwargs)


# -- 1. second order against double backward -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("location", ["after_every", "end", "double_mixed"])
def test_second_order_gradient_matches_double_backward(location, float64):
    network, optimizer, train, valid = _searched_network(location)
    lr = 0.3
    architect = Architect(network, optimizer, ARCH_LR, ARCH_WD, unrolled=True)
    smooth = SmoothKinks()
    with smooth:
        second = architect.second_order_gradient(*train, *valid, lr)
        exact = exact_hypergradient(network, optimizer, train, valid, lr)
        first = architect.first_order_gradient(*valid)
        without_momentum = (exact_hypergradient(network, optimizer, train, valid, lr, momentum=False)
                            if location == "after_every" else None)
    assert not smooth.unhandled, f"non-smooth functions left in the supernet: {smooth.unhandled}"
    assert smooth.replaced.get("relu", 0) + smooth.replaced.get("relu_", 0) > 0
    assert smooth.replaced.get("max_pool2d", 0) > 0

    assert [g.shape for g in second] == [a.shape for a in network.arch_parameters()]
    # A central difference of step 0.01 along the unit direction is off by O(1e-4)
    # (times curvature ratios) of what it approximates: it must recover the
    # second-order correction (exact - first order), and the momentum's part of it,
    # to within 1% of their size.  (Both are of the order of the gradient itself here.)
    error = _relative(second, exact)
    correction = _relative(first, exact)
    assert error < 0.01 * correction, (
        f"finite-difference hypergradient off by {error:.2e} from double backward, "
        f"the second-order correction being {correction:.2e} (relative to the gradient)")
    if without_momentum is not None:
        momentum_part = _relative(without_momentum, exact)
        assert error < 0.01 * momentum_part, f"{error:.2e} against momentum's {momentum_part:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("unrolled", [False, True], ids=["first_order", "second_order"])
def test_recomputed_cells_give_the_same_architecture_gradient(unrolled, float64):
    """train_search.py recomputes cells in backward by default: every pass of the
    architect (virtual step, validation pass, both perturbed passes) must give what
    plain autograd gives.  (SmoothKinks cannot reach a recomputation, which runs
    inside the autograd engine, so this compares the real, kinked network.)"""
    plain, optimizer, train, valid = _searched_network("after_every")
    recomputed, recomputed_optimizer, _, _ = _searched_network("after_every", recompute=True)
    grads = {}
    for name, network, weight_optimizer in (("plain", plain, optimizer),
                                            ("recomputed", recomputed, recomputed_optimizer)):
        architect = Architect(network, weight_optimizer, ARCH_LR, ARCH_WD, unrolled=unrolled)
        grads[name] = (architect.second_order_gradient(*train, *valid, 0.025) if unrolled
                       else architect.first_order_gradient(*valid))
    assert _relative(grads["recomputed"], grads["plain"]) < 1e-9


# -- 2. first order --------------------------------------------------------------------

@pytest.mark.parametrize("location", ["after_every", "after_every_and_end"])
def test_first_order_gradient_is_the_validation_gradient(location, float64):
    network, optimizer, _, (images, targets) = _searched_network(location)
    architect = Architect(network, optimizer, ARCH_LR, ARCH_WD, unrolled=False)
    got = architect.first_order_gradient(images, targets)
    expected = torch.autograd.grad(network.loss(images, targets), network.arch_parameters())
    assert len(got) == len(expected)
    assert _relative(got, expected) < 1e-9


# -- 3. one search iteration -----------------------------------------------------------

ITERATIONS = 3  # the second is the first to start from state the first left behind


# Both orders, both ways of running cells; second order without recomputation is the
# slowest and adds nothing the other three do not cover.
@pytest.mark.parametrize("unrolled, recompute", [(False, False), (False, True), (True, True)],
                         ids=["first_order-plain", "first_order-recomputed", "second_order-recomputed"])
def test_search_iterations_move_only_what_they_should(unrolled, recompute):
    """Three search iterations on new batches each, the later ones starting from the
    Adam state, momentum buffers and BN statistics the earlier ones left."""
    network, optimizer, _, _ = _searched_network("after_every_and_end", recompute=recompute)
    arch_ids = {id(a) for a in network.arch_parameters()}
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert grouped and not {id(p) for p in grouped} & arch_ids
    assert {id(p) for p in grouped} == {id(p) for p in network.weights()}

    architect = Architect(network, optimizer, ARCH_LR, ARCH_WD, unrolled=unrolled)
    assert {id(p) for group in architect.optimizer.param_groups for p in group["params"]} == arch_ids
    weights, arch = list(network.weights()), network.arch_parameters()
    buffers = [b for _, b in network.named_buffers()]

    observed = {}
    real_step = architect.step

    def spy(*args, **kwargs):
        real_step(*args, **kwargs)
        observed.update(w=_snapshot(weights), a=_snapshot(arch), b=_snapshot(buffers))

    architect.step = spy
    for iteration in range(ITERATIONS):
        train, valid = _batch(8, 400 + 2 * iteration), _batch(8, 401 + 2 * iteration)
        w0, a0, b0 = _snapshot(weights), _snapshot(arch), _snapshot(buffers)
        if iteration == 1:
            # The gradient alone (virtual step, finite difference) leaves w, A, the BN
            # statistics and both optimizers' state alone.
            optimizers = _optimizer_state(optimizer) + _optimizer_state(architect.optimizer)
            grads = (architect.second_order_gradient(*train, *valid, lr=0.025) if unrolled
                     else architect.first_order_gradient(*valid))
            assert all(torch.isfinite(g).all() for g in grads)
            assert _bitwise_equal(_snapshot(weights), w0)
            assert _bitwise_equal(_snapshot(arch), a0)
            assert _bitwise_equal(_snapshot(buffers), b0)
            assert _bitwise_equal(_optimizer_state(optimizer) + _optimizer_state(architect.optimizer),
                                  optimizers)
            assert all(p.grad is None for p in arch)

        # A whole search iteration, observed between its two steps.
        observed.clear()
        search_step(network, architect, optimizer, Precision(False, "bfloat16", CPU), train, valid,
                    0.025, 5.0)
        assert observed, f"iteration {iteration + 1}: search_step took no architecture step"
        # The architecture step: A moves, w and the BN statistics do not.
        assert not any(torch.equal(x, y) for x, y in zip(observed["a"], a0))
        assert _bitwise_equal(observed["w"], w0)
        assert _bitwise_equal(observed["b"], b0)
        # The weight step: w and BN statistics move, A does not (bitwise).
        assert _bitwise_equal(_snapshot(arch), observed["a"])
        assert not _bitwise_equal(_snapshot(weights), w0)
        assert not _bitwise_equal(_snapshot(buffers), b0)
        assert all(p.requires_grad for p in arch)
    assert all(state["step"] == ITERATIONS for state in architect.optimizer.state.values())


# -- 4. DataParallel ----------------------------------------------------------------------

def test_dataparallel_wrapped_model_gives_the_same_gradients(float64):
    network, optimizer, train, valid = _searched_network("after_every")
    bare = Architect(network, optimizer, ARCH_LR, ARCH_WD, unrolled=True)
    wrapped = Architect(nn.DataParallel(network), optimizer, ARCH_LR, ARCH_WD, unrolled=True)
    assert wrapped.network is network
    for got, expected in ((wrapped.first_order_gradient(*valid), bare.first_order_gradient(*valid)),
                          (wrapped.second_order_gradient(*train, *valid, 0.025),
                           bare.second_order_gradient(*train, *valid, 0.025))):
        assert len(got) == len(expected)
        assert _relative(got, expected) < 1e-9


# -- 5. mixed precision --------------------------------------------------------------------

BF16 = Precision(True, "bfloat16", CPU)


@pytest.mark.slow
def test_bfloat16_second_order_step(monkeypatch):
    """Under --amp (bfloat16 autocast around the search step) the second-order step
    computes in float32: its hypergradient is the float32 one up to float32 rounding,
    which is 2^16 times finer than bfloat16's, so it must be at least 100 times closer
    to it than the hypergradient of bfloat16 passes is (measured 45% off with AVX-512,
    50% with AVX2; the float32 one came out identical, bit for bit, on both).
    It keeps float32 state and leaves the weights and BN statistics alone."""
    network, optimizer, train, valid = _searched_network("after_every", batch=16)
    lr = 0.025
    reference = Architect(network, optimizer, ARCH_LR, ARCH_WD, unrolled=True)
    expected = reference.second_order_gradient(*train, *valid, lr)
    architect = Architect(network, optimizer, ARCH_LR, ARCH_WD, unrolled=True)
    weights, buffers = list(network.weights()), [b for _, b in network.named_buffers()]
    w0, b0, a0 = _snapshot(weights), _snapshot(buffers), _snapshot(network.arch_parameters())

    with BF16.autocast():
        got = architect.second_order_gradient(*train, *valid, lr)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got)

    # The same step had the architect not switched autocast off: bfloat16 passes.
    real_autocast = torch.autocast

    def autocast_never_off(device_type, dtype=None, enabled=True, **kwargs):
        return real_autocast(device_type, dtype=dtype, **kwargs) if enabled else contextlib.nullcontext()

    with monkeypatch.context() as patch:
        patch.setattr(torch, "autocast", autocast_never_off)
        with BF16.autocast():
            in_bfloat16 = Architect(network, optimizer, ARCH_LR, ARCH_WD,
                                    unrolled=True).second_order_gradient(*train, *valid, lr)
    bfloat16_error = _relative(in_bfloat16, expected)
    assert _relative(got, expected) <= bfloat16_error / 100, (_relative(got, expected), bfloat16_error)

    with BF16.autocast():
        architect.step(*train, *valid, lr)
    assert all(a.dtype == torch.float32 for a in network.arch_parameters())
    assert not any(torch.equal(x, y) for x, y in zip(network.arch_parameters(), a0))
    assert _bitwise_equal(_snapshot(weights), w0)
    assert _bitwise_equal(_snapshot(buffers), b0)
