"""What one step asks of the device, seen from the CPU.

On a GPU the search and training steps are launch-bound: tens of thousands of small
kernels, each launched from Python.  ``OpCounter`` counts the ATen ops a block of
code dispatches (views and detaches left out: they launch no kernel), which is that
load measured on any machine.  ``HostSyncGuard`` fails on any op that makes the host
wait for the device (``.item()``, ``nonzero``, a device-to-host copy, ...): one of
those inside a step stalls the launch queue, and none may sit inside a CUDA graph.
Both are ``TorchDispatchMode``s: they see every op of the forward and of autograd's
backward on the calling thread, whatever the device.
"""
from collections import Counter
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must read back before it can go on.
HOST_SYNCING = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Views and detaches only relabel memory; every other op launches work."""
    return not func.is_view


class OpCounter(TorchDispatchMode):
    """Count the ATen ops dispatched inside ``with OpCounter() as ops:``.

    ``ops.total`` is the number that launched work; ``ops.counts`` has it per op name
    (``aten.convolution`` ...), for finding what to fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class HostSyncError(RuntimeError):
    """An op inside a guarded block would make the host wait for the device."""


def _indexes_with_a_mask(func: torch._ops.OpOverload, args: Any) -> bool:
    """``x[mask]`` and ``x[mask] = v``: a boolean index is a data-dependent shape."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                    aten._index_put_impl_.default):
        return False
    return any(index is not None and index.dtype == torch.bool for index in args[1])


def _is_device_to_host(func: torch._ops.OpOverload, args: Any, kwargs: Any) -> bool:
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    if func is aten.copy_.default:
        destination, source = args[0], args[1]
        return destination.device.type == "cpu" and source.device.type != "cpu"
    target = kwargs.get("device")
    return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"


class HostSyncGuard(TorchDispatchMode):
    """Raise ``HostSyncError`` on any op that synchronises the host with the device.

    ``host_tensors``: tensors that live on the host in a GPU run too (an Adam step
    counter without ``capturable``), whose reads cost no synchronisation.  On a CPU
    every tensor is on the host, so this is how a CPU test finds the reads a GPU
    would wait for."""

    def __init__(self, host_tensors: Optional[Iterable[torch.Tensor]] = None) -> None:
        super().__init__()
        self.host_pointers = {t.data_ptr() for t in (host_tensors or ())}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNCING:
            reads_host_tensor = (func is aten._local_scalar_dense.default
                                 and args[0].data_ptr() in self.host_pointers)
            if not reads_host_tensor:
                raise HostSyncError(f"{func} waits for the device (a tensor read back to Python "
                                    f"or a data-dependent shape) inside a guarded step")
        elif _indexes_with_a_mask(func, args):
            raise HostSyncError(f"{func} with a boolean mask: its result's shape depends on the "
                                f"data (use torch.where)")
        elif _is_device_to_host(func, args, kwargs):
            raise HostSyncError(f"{func}: a device-to-host copy inside a guarded step")
        return func(*args, **kwargs)
