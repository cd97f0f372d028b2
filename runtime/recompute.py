"""Recomputation of supernet cell parts in backward (``--recompute``), and the
BatchNorm switch its re-run forwards (and the architect's passes) share.

A part is a function ``part(cell, *inputs)`` over a cell's submodules; SearchCell
(model_search.py) cuts a cell into parts (its input preprocessings, the edges
leaving each state, the cell end) and runs each through ``RecomputedPart``.
"""
import collections.abc
import contextlib
import threading
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call

# The random draws of the part this thread is running under RecomputedPart: recorded
# by its forward (a list), replayed by its recomputation (an iterator); None outside.
_draws = threading.local()


def standard_normal(shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Fresh N(0, 1) samples of ``shape`` in ``like``'s dtype and device.  Inside a
    recomputed part these are the samples the part's forward drew: a recomputation
    must see the random numbers its forward saw (RobustDARTS's noise op)."""
    draws = getattr(_draws, "tape", None)
    if isinstance(draws, collections.abc.Iterator):
        return next(draws)
    sample = torch.randn(shape, dtype=like.dtype, device=like.device)
    if draws is not None:
        draws.append(sample)
    return sample


@contextlib.contextmanager
def _random_draws(tape: "list | Iterator[torch.Tensor]") -> Iterator[None]:
    """Record this thread's ``standard_normal`` samples into a list, or replay them
    from an iterator, within the block."""
    outer = getattr(_draws, "tape", None)
    _draws.tape = tape
    try:
        yield
    finally:
        _draws.tape = outer


@contextlib.contextmanager
def batch_statistics_only(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Within this block the training-mode BatchNorms ``norms`` normalise with batch
    statistics (as always in training mode) but leave their running statistics alone:
    for forwards that must not count as a training step (the architect's passes, a
    recomputation in backward).  Cheaper than substituting scratch copies of every
    running statistic."""
    tracking = [norm.track_running_stats for norm in norms]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm, tracked in zip(norms, tracking):
            norm.track_running_stats = tracked


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def batch_norms(module: nn.Module) -> List[nn.Module]:
    """Every BatchNorm inside ``module``."""
    return [m for m in module.modules() if isinstance(m, BATCH_NORMS)]


class PartModule(nn.Module):
    """``part(cell, *inputs)`` as a module, for ``functional_call``."""

    def __init__(self, cell: nn.Module, part: Callable):
        super().__init__()
        self.cell, self.part = cell, part

    def forward(self, *inputs):
        return self.part(self.cell, *inputs)


class RecomputedPart(torch.autograd.Function):
    """Run ``part(cell, *inputs)`` without keeping its activations; rebuild them in backward.

    Every edge of the supernet evaluates all candidates, so the activations kept for
    backward dominate a search's memory (1.6-2.0 GB per pass at batch 16, up to
    0.42 GB in one cell).  Forward runs without a graph and keeps only the part's
    inputs; backward runs the part again and differentiates that, so at most one
    node's activations (the largest has 5 of a cell's 14 edges) exist at a time.
    The parameters of the part are explicit inputs: the recomputation uses the
    tensors of the forward even when that forward ran inside the architect's
    ``functional_call``, and gradients reach them through ``autograd.grad`` too.

    Why not ``torch.utils.checkpoint``: its reentrant form refuses ``autograd.grad``
    (which the architect uses), and its non-reentrant form runs a Python hook for
    each of the ~2700 tensors a cell saves, which cost twice the recomputation
    itself here (measured: +1.2 s against +0.6 s per pass).  A part's random draws
    (``standard_normal``: RobustDARTS's noise op, the only random op of a search cell)
    are kept from the forward and replayed by the recomputation, instead of replaying
    the RNG state: nothing to save or restore on the device, and safe in a CUDA graph.
    """

    @staticmethod
    def forward(ctx, part: Callable, cell: nn.Module, norms: List[nn.Module], names: List[str],
                num_inputs: int, *inputs_and_params: Optional[torch.Tensor]):
        ctx.part, ctx.cell, ctx.norms, ctx.names, ctx.num_inputs = part, cell, norms, names, num_inputs
        device = next(t for t in inputs_and_params if t is not None).device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*inputs_and_params)
        ctx.draws = []
        with _random_draws(ctx.draws):
            return part(cell, *inputs_and_params[:num_inputs])

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        if torch.is_grad_enabled():
            # Refused rather than silently wrong: a gradient graph built here would
            # miss the second derivatives of this part.
            raise RuntimeError("double backward (create_graph=True) through recomputed cells is "
                               "not supported: build the supernet with recompute=False")
        needs_grad = ctx.needs_input_grad[5:]
        saved = [t if t is None else t.detach().requires_grad_(needed)
                 for t, needed in zip(ctx.saved_tensors, needs_grad)]
        inputs, params = saved[:ctx.num_inputs], saved[ctx.num_inputs:]
        tensors = {"cell." + name: p for name, p in zip(ctx.names, params)}
        device, autocast, dtype = ctx.autocast
        # Training-mode BatchNorm normalises with batch statistics; the running
        # statistics were updated by the forward and must not be updated twice.
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast), \
                batch_statistics_only(ctx.norms), _random_draws(iter(ctx.draws)):
            outputs = functional_call(PartModule(ctx.cell, ctx.part), tensors, tuple(inputs),
                                      tie_weights=False)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # (An output may not depend on anything that needs a gradient, e.g. the
        # preprocessing of a cell input computed from detached weights.)
        differentiable = [(out, grad) for out, grad in zip(outputs, grad_outputs) if out.requires_grad]
        wanted = [t for t, needed in zip(saved, needs_grad) if needed]
        grads = iter(torch.autograd.grad([out for out, _ in differentiable],
                                         wanted, [grad for _, grad in differentiable],
                                         allow_unused=True))
        return (None,) * 5 + tuple(next(grads) if needed else None for needed in needs_grad)
