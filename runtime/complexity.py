"""What a final network costs: parameters, multiply-accumulates, peak memory, latency.

Every measurement runs the network in eval mode without gradients, so the
auxiliary head and drop-path do not run, and leaves the network as it found it:
each module's train/eval mode is restored, BatchNorm statistics are not updated
(eval mode), and the random number generators are not used (the inputs are zeros).

- Parameters leave out the auxiliary head, as papers report them.
- Multiply-accumulates (MACs) are counted by ``torch.utils.flop_counter``, which
  counts convolutions, linear layers and matrix products (mm, addmm, bmm) at
  2 FLOPs per MAC; elementwise ops, activations, pooling, BatchNorm, softmax and
  bias additions are not counted.  The attention modules' convolutions, linear
  layers and the double attention's bmm are included.
- Peak memory: on a CUDA device, the caching allocator's peak
  (``torch.cuda.max_memory_allocated``); elsewhere, the peak bytes of tensor
  storages alive during the forward, followed op by op (``LiveTensorBytes``).
  Both include the weights and the input.
"""
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

# The ImageNet "mobile setting" of NASNet, DARTS and their successors: at most
# 600 M multiply-accumulates per 224x224 image.
MOBILE_SETTING_MACS = 600_000_000


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module's own mode is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def zeros_input(model: nn.Module, input_size: Tuple[int, int, int], batch: int) -> torch.Tensor:
    """A batch of zero images of size (channels, height, width) on the model's device
    and in its dtype (zeros: drawing random inputs would move the RNG)."""
    parameter = next(model.parameters())
    return torch.zeros(batch, *input_size, dtype=parameter.dtype, device=parameter.device)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the network, auxiliary head excluded."""
    return sum(p.numel() for name, p in model.named_parameters()
               if "auxiliary_head" not in name.split("."))


def count_macs(model: nn.Module, input_size: Tuple[int, int, int]) -> int:
    """Multiply-accumulates per image of size (channels, height, width): one batch-1
    forward in eval mode; convolutions, linear layers and matrix products only."""
    with evaluating(model), FlopCounterMode(display=False) as counter:
        model(zeros_input(model, input_size, 1))
    # Every formula of the flop counter is 2 x (multiply-accumulates).
    return counter.get_total_flops() // 2


class LiveTensorBytes(TorchDispatchMode):
    """While active, follows the bytes of the tensor storages alive and keeps their peak.

    Starts from ``tensors`` (weights, input); each op's outputs are added, and after
    each op the storages freed since (weak references that expired) are dropped.
    Live bytes only grow when an op returns, so the peak over these moments is the
    peak of tensors alive.  Scratch memory a kernel frees before returning is not
    seen, and a storage shared by several views counts once."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        super().__init__()
        self.live: Dict[StorageWeakRef, int] = {}
        self.peak = 0
        self.add(tensors)

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            self.live.setdefault(StorageWeakRef(storage), storage.nbytes())
        self.live = {ref: size for ref, size in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def measure_peak_memory(model: nn.Module, input_size: Tuple[int, int, int], batch: int) -> int:
    """Peak bytes during one no-grad eval forward of a batch, weights and input included
    (CUDA: the allocator's peak; other devices: ``LiveTensorBytes``)."""
    device = next(model.parameters()).device
    with evaluating(model):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(zeros_input(model, input_size, batch))
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        images = zeros_input(model, input_size, batch)
        with LiveTensorBytes([*model.parameters(), *model.buffers(), images]) as tracker:
            model(images)
        return tracker.peak


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def measure_latency(model: nn.Module, input_size: Tuple[int, int, int], batch: int,
                    warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of ``repeats`` no-grad eval forwards of a batch, timed after
    ``warmup`` untimed ones (allocator, kernel selection and caches settle)."""
    device = next(model.parameters()).device
    with evaluating(model):
        images = zeros_input(model, input_size, batch)
        for _ in range(warmup):
            model(images)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(images)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class BatchCost:
    batch: int
    peak_bytes: int
    latency_s: float


@dataclass
class Cost:
    parameters: int
    auxiliary_parameters: int
    macs: int  # per image
    device: torch.device
    batches: List[BatchCost]


def measure(model: nn.Module, input_size: Tuple[int, int, int], batches: Sequence[int],
            repeats: int = 10) -> Cost:
    """Everything above for a network on its device: parameters, MACs per image, and
    peak memory and latency at each batch size of ``batches``."""
    parameters = count_parameters(model)
    return Cost(
        parameters=parameters,
        auxiliary_parameters=sum(p.numel() for p in model.parameters()) - parameters,
        macs=count_macs(model, input_size),
        device=next(model.parameters()).device,
        batches=[BatchCost(batch, measure_peak_memory(model, input_size, batch),
                           measure_latency(model, input_size, batch, repeats=repeats))
                 for batch in batches],
    )
