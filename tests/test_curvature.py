"""curvature.py: the dominant eigenvalue of the validation loss's Hessian in architecture
space, against the explicitly built float64 Hessian, and computed without touching the
search (random state, BatchNorm statistics, gradients, modes, recompute flag).

A tiny supernet (C=4, 3 cells of one node, 16x16 images, no attention: 32 architecture
parameters, so that building the Hessian row by row stays cheap) and two batches of 5
and 3 random images."""
import copy

import pytest
import torch
import torch.nn as nn

from model_search import Network
from runtime import curvature
from runtime.precision import IEEE_FLOAT32, float32_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def _network(recompute: bool = False) -> Network:
    torch.manual_seed(2)
    return Network(4, 10, 3, nn.CrossEntropyLoss(), "no_attention", steps=1, multiplier=1,
                   image_size=16, recompute=recompute)


def _batches(dtype: torch.dtype = torch.float32, sizes: tuple = (5, 3)) -> list:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(sum(sizes), 3, 16, 16, generator=generator).to(dtype)
    targets = torch.randint(0, 10, (sum(sizes),), generator=generator)
    return list(zip(images.split(list(sizes)), targets.split(list(sizes))))


def _explicit_hessian(network: Network, batches: list) -> torch.Tensor:
    """The Hessian of the mean loss over ``batches`` (training-mode BatchNorm, per batch)
    with respect to all architecture parameters, row by row from the exact gradient."""
    arch = network.named_arch_parameters()
    weights = {name: w.detach() for name, w in network.named_weights()}
    total = sum(len(targets) for _, targets in batches)
    network.train()
    loss = 0.0
    for images, targets in batches:
        buffers = {name: b.clone() for name, b in network.named_buffers()}
        loss = loss + network.loss(images, targets, {**weights, **arch, **buffers}) * len(targets) / total
    gradient = torch.cat([g.flatten() for g in
                          torch.autograd.grad(loss, list(arch.values()), create_graph=True)])
    rows = [torch.cat([h.flatten() for h in
                       torch.autograd.grad(gradient[i], list(arch.values()), retain_graph=True)])
            for i in range(gradient.numel())]
    return torch.stack(rows)


def test_power_iteration_finds_the_largest_magnitude_eigenvalue_of_the_float64_hessian():
    network = _network()
    exact = _explicit_hessian(copy.deepcopy(network).double(), _batches(torch.float64))
    assert torch.allclose(exact, exact.T, rtol=0, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(exact)
    first, second = eigenvalues[eigenvalues.abs().argsort(descending=True)[:2]].tolist()
    # Precondition of the tolerance below: power iteration's Rayleigh quotient converges
    # like r = (second/first)^2 per iteration, so stopping at a relative change of 1e-5
    # leaves an error below 1e-5 * r/(1 - r) < 2.7e-5 for r < 0.85^2; float32 products
    # add about 1e-6 on this network.
    assert abs(second / first) < 0.85, (first, second)

    result = curvature.dominant_eigenvalue(network, _batches(), max_iterations=200)

    assert result.converged and result.change <= curvature.TOLERANCE
    assert result.value == pytest.approx(first, rel=1e-4)


def test_the_eigenvalue_changes_nothing_in_the_search():
    """Random state, BatchNorm running statistics, parameters and their gradients, module
    modes and the recompute flag are as before; recomputed cells (which refuse double
    backward) and an enclosing autocast region give the same eigenvalue, bit for bit."""
    plain = curvature.dominant_eigenvalue(_network(), _batches(), max_iterations=3)
    network = _network(recompute=True)
    network.eval()
    network.cells[0].train()
    state = {name: t.clone() for name, t in network.state_dict().items()}
    modes = [m.training for m in network.modules()]
    rng = torch.get_rng_state()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = curvature.dominant_eigenvalue(network, _batches(), max_iterations=3)

    assert result == plain and result.iterations == 3 and not result.converged
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(t, state[name]) for name, t in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())
    assert [m.training for m in network.modules()] == modes
    assert network.recompute is True


def test_fixed_subset_is_the_same_every_time_and_shared_out_among_processes():
    from runtime.parallel import Runtime

    class Noisy(torch.utils.data.Dataset):
        """Images drawn from the global random state, as augmentation would."""
        def __len__(self):
            return 11

        def __getitem__(self, k):
            return torch.rand(3, 4, 4) + k, k % 3

    rng = torch.get_rng_state()
    one = curvature.fixed_subset(Noisy(), 9, 4, Runtime(torch.device("cpu")), False)
    again = curvature.fixed_subset(Noisy(), 9, 4, Runtime(torch.device("cpu")), True)
    assert torch.equal(torch.get_rng_state(), rng)
    # 9 images in batches of 4: the remainder spread, never a batch of one image.
    assert [len(targets) for _, targets in one] == [5, 4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, again))
    assert again[0][0].is_contiguous(memory_format=torch.channels_last)
    shares = [curvature.fixed_subset(Noisy(), 9, 4, Runtime(torch.device("cpu"), rank, 2), False)
              for rank in (0, 1)]
    assert [torch.cat([t for _, t in share]).tolist() for share in shares] == [
        [k % 3 for k in (0, 2, 4, 6, 8)], [k % 3 for k in (1, 3, 5, 7)]]


def test_the_products_run_in_ieee_float32_as_the_architect_passes(monkeypatch, tf32_allowed):
    """On an Ampere or newer card cuDNN convolves float32 in TF32 by default: about 1e-3
    relative noise per product against the 1e-5 tolerance.  Every forward of the power
    iteration sees IEEE float32; the settings before it come back after."""
    network = _network()
    seen = []
    loss = Network.loss

    def recording(self, *args, **kwargs):
        seen.append(float32_settings())
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(Network, "loss", recording)
    curvature.dominant_eigenvalue(network, _batches(), max_iterations=2)
    assert len(seen) == 4 and set(seen) == {IEEE_FLOAT32}  # 2 products of 2 batches
    assert float32_settings() == tf32_allowed
