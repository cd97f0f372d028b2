"""Curvature of the validation loss in architecture space: the dominant eigenvalue of
the Hessian of L_val(w, A) with respect to the architecture parameters A.

RobustDARTS (Zela et al., ICLR 2020) showed that this eigenvalue grows as a DARTS
search drifts towards parameter-free operations, and that the architectures found
where it is large generalise badly.  ``--hessian_every K`` computes it every K epochs.

How it is computed, so that computing it changes nothing in the search:

- power iteration on exact Hessian-vector products (double backward), in IEEE
  float32 (on CUDA not TF32, whose ~1e-3 relative noise per product is far above the
  1e-5 tolerance: the architect's context, ``precision.exact_float32``) and outside
  autocast, from a fixed start vector drawn by a private generator;
- on a fixed subset of the architecture half (``fixed_subset``), in batches of the
  search's batch size; BatchNorm normalises with batch statistics, as in the
  architect's validation loss, and leaves its running statistics alone;
- the weights are held fixed (detached); recomputed cells refuse double backward,
  so the supernet runs its plain forward for these products;
- random draws of the forward (RobustDARTS's noise op, ``--space s4``) come from a
  forked random state, seeded per batch: every product sees the same noise, so the
  power iteration works on one Hessian, and the search's random streams do not move;
- under torchrun each process takes its share of the subset, the products are
  averaged over processes (the mean of each process's mean: the subset's mean when
  it divides evenly) and rank 0's is broadcast: every rank holds the same vectors,
  stops at the same iteration and returns the same eigenvalue.

Power iteration converges like (second / first)^2 per iteration, the eigenvalues
ordered by magnitude: slowly when the two largest are close in magnitude, whatever
their signs.  ``Eigenvalue.converged`` says whether it met the tolerance.
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from model_search import Network
from runtime.parallel import Runtime, all_reduce_mean_, broadcast_
from runtime.precision import exact_float32
from runtime.recompute import batch_norms, batch_statistics_only

Batch = Tuple[torch.Tensor, torch.Tensor]

# Power iteration stops when the eigenvalue estimate changes by at most this much
# (relative) from one iteration to the next.
TOLERANCE = 1e-5


@dataclass
class Eigenvalue:
    """The dominant eigenvalue (largest magnitude, with its sign), the power iterations
    it took and the relative change of the estimate at the last one."""
    value: float
    iterations: int
    change: float
    converged: bool


def fixed_subset(dataset: Dataset, count: int, batch_size: int, runtime: Runtime,
                 channels_last: bool, seed: int = 0) -> List[Batch]:
    """This process's share of the first ``count`` images of ``dataset`` (image k goes
    to process k mod world size) on the device, in batches of ``batch_size`` images
    (the remainder spread over them: BatchNorm needs two images per batch).

    The dataset's random augmentation is drawn from ``seed``, inside a forked random
    state: the subset is the same every epoch and after a resume, and the search's
    random streams do not move."""
    indices = list(range(runtime.rank, min(count, len(dataset)), runtime.world_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [dataset[k] for k in indices]
    images = torch.stack([image for image, _ in samples]).to(
        runtime.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    targets = torch.tensor([int(target) for _, target in samples], device=runtime.device)
    parts = max(1, len(samples) // batch_size)
    return list(zip(images.tensor_split(parts), targets.tensor_split(parts)))


@contextlib.contextmanager
def double_backward_mode(network: Network) -> Iterator[None]:
    """Training mode (BatchNorm on batch statistics, as in the architect's step) with
    plain forwards (``RecomputedPart`` refuses double backward), IEEE float32 outside
    autocast; every module's mode, the recompute flag and the float32 settings are
    restored after."""
    modes = [(module, module.training) for module in network.modules()]
    recompute = network.recompute
    network.train()
    network.recompute = False
    try:
        with torch.autocast(next(network.parameters()).device.type, enabled=False), \
                exact_float32():
            yield
    finally:
        network.recompute = recompute
        for module, training in modes:
            module.training = training


def hessian_vector_product(network: Network, batches: Sequence[Batch],
                           vector: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """H v, H the Hessian of the mean validation loss over ``batches`` (this process's)
    with respect to the architecture parameters, at fixed weights.  Call it inside
    ``double_backward_mode``."""
    arch = network.named_arch_parameters()
    weights = {name: w.detach() for name, w in network.named_weights()}
    # Training-mode BatchNorm would update the running statistics: not here.
    norms = batch_norms(network)
    total = sum(targets.numel() for _, targets in batches)
    product = [torch.zeros_like(p) for p in arch.values()]
    for index, (images, targets) in enumerate(batches):
        torch.manual_seed(index)  # the same draws at every product (dominant_eigenvalue forks)
        with batch_statistics_only(norms):
            loss = network.loss(images, targets, {**weights, **arch})
        grads = torch.autograd.grad(loss, list(arch.values()), create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        share = targets.numel() / total
        for out, h in zip(product, torch.autograd.grad(dot, list(arch.values()))):
            out.add_(h, alpha=share)
    return product


def dominant_eigenvalue(network: Network, batches: Sequence[Batch], max_iterations: int,
                        tolerance: float = TOLERANCE) -> Eigenvalue:
    """Power iteration on Hessian-vector products of the validation loss in
    architecture space (see the module docstring): stops when the estimate changes by
    at most ``tolerance`` (relative) or after ``max_iterations`` products.  The same
    result on every process."""
    arch = network.arch_parameters()
    generator = torch.Generator().manual_seed(0)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in arch]
    vector = _normalised(vector)
    estimate, change, iteration = 0.0, float("inf"), 0
    device = next(network.parameters()).device
    # The CPU's state always; a GPU's (all of them: manual_seed seeds every one) on CUDA.
    forked = (torch.random.fork_rng(device_type=device.type) if device.type != "cpu"
              else torch.random.fork_rng(devices=[]))
    with double_backward_mode(network), forked:
        for iteration in range(1, max_iterations + 1):
            product = hessian_vector_product(network, batches, vector)
            all_reduce_mean_(product)
            broadcast_(product)  # bit-identical on every rank, whatever the reduction order
            previous = estimate
            # Rayleigh quotient of the unit vector (in float64: 392+ terms).
            estimate = float(sum((v.double() * h.double()).sum() for v, h in zip(vector, product)))
            norm = _norm(product)
            if norm == 0.0:  # no curvature along v (nor along any vector H maps v from)
                change = 0.0
                break
            vector = [h / norm for h in product]
            if iteration > 1:
                change = abs(estimate - previous) / abs(estimate) if estimate else float("inf")
                if change <= tolerance:
                    break
    return Eigenvalue(estimate, iteration, change, change <= tolerance)


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def _normalised(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    norm = _norm(tensors)
    return [t / norm for t in tensors]
