"""Seeded weights and digests for the tests that compare today's code with values
recorded from an earlier commit (``tests/data/*_reference.json``).

Weights are not stored: every entry of a ``state_dict`` is drawn from a generator
seeded by its position, so a network with the same layout (names may change, order
and shapes may not) gets the same values.  Results are stored as digests (norm and
two seeded random projections) where a full tensor would be large."""
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch
import torch.nn as nn

DATA = Path(__file__).resolve().parent / "data"
ARCH_PREFIXES = ("alphas_", "betas_", "gammas_")


def load_reference(name: str) -> Dict[str, Any]:
    with open(DATA / f"{name}.json") as f:
        return json.load(f)


@torch.no_grad()
def fill_seeded(module: nn.Module) -> None:
    """Overwrite every floating-point entry of ``module.state_dict()``: entry i from
    ``torch.Generator().manual_seed(1000 + i)``, scaled by what it is (fan-in for
    weights, positive running variances, 0.5 for architecture parameters)."""
    fill_seeded_state(module.state_dict(keep_vars=True))


@torch.no_grad()
def fill_seeded_state(state: Dict[str, torch.Tensor]) -> None:
    """``fill_seeded`` on the entries of a state dict, in place."""
    for i, (name, tensor) in enumerate(state.items()):
        if not tensor.is_floating_point():
            continue
        generator = torch.Generator().manual_seed(1000 + i)
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if name.endswith("running_var"):
            values = values.abs() + 0.5
        elif name.endswith("running_mean"):
            values = 0.1 * values
        elif name.startswith(ARCH_PREFIXES):
            values = 0.5 * values
        elif tensor.dim() >= 2:
            values = values / math.sqrt(tensor[0].numel())
        else:
            values = 0.1 * values + (1.0 if name.endswith("weight") else 0.0)
        tensor.copy_(values)


def fill_seeded_supernet(network: nn.Module) -> None:
    """``fill_seeded`` on the supernet's per-edge layout, the one the values were
    recorded with (one MixedOp per edge), loaded through the network's conversion."""
    state = {k: v.clone() for k, v in network.per_edge_layout(network.state_dict()).items()}
    fill_seeded_state(state)
    network.load_state_dict(state)


def per_edge_order(network: nn.Module, named: Iterable) -> List[torch.Tensor]:
    """The tensors of ``named`` ((state_dict name, tensor) pairs: weights, their
    gradients, buffers) in the per-edge layout's order and blocks (see
    ``fill_seeded_supernet``), for digests recorded with that layout."""
    return list(network.per_edge_layout(dict(named)).values())


def digest(tensors: Iterable[torch.Tensor]) -> List[float]:
    """[norm, projection on seeded normals, projection on seeded uniforms] of the
    tensors taken in order (tensor i uses the generator seeded 5000 + i)."""
    norm2 = first = second = 0.0
    for i, tensor in enumerate(tensors):
        flat = tensor.detach().double().flatten()
        generator = torch.Generator().manual_seed(5000 + i)
        normals = torch.randn(flat.numel(), generator=generator, dtype=torch.float64)
        uniforms = torch.rand(flat.numel(), generator=generator, dtype=torch.float64)
        norm2 += float(flat @ flat)
        first += float(flat @ normals)
        second += float(flat @ uniforms)
    return [math.sqrt(norm2), first, second]


def _flat(value: Any) -> List[float]:
    """The numbers of nested lists (rows may differ in length), in order."""
    if isinstance(value, (list, tuple)):
        return [number for item in value for number in _flat(item)]
    return [float(value)]


def assert_close(value: Any, reference: Any, rtol: float = 1e-8, atol: float = 1e-12,
                 where: str = "") -> None:
    """Nested lists/numbers equal up to float64 rounding: |a - b| <= atol + rtol |b|.

    Recorded and recomputed values differ only by the order of float64 operations
    (other kernels, another CPU kind: measured up to 1e-11 relative), so 1e-8 is
    far above rounding and far below any change of the math."""
    got = torch.tensor(_flat(value), dtype=torch.float64)
    expected = torch.tensor(_flat(reference), dtype=torch.float64)
    assert got.shape == expected.shape, f"{where}: {got.shape} vs {expected.shape}"
    error = (got - expected).abs() - (atol + rtol * expected.abs())
    worst = int(error.argmax()) if error.numel() else 0
    assert error.numel() == 0 or float(error.max()) <= 0, (
        f"{where}: entry {worst} is {float(got[worst])!r}, recorded {float(expected[worst])!r}")
