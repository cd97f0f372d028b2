"""Where a run executes: device choice, process group, and the one place that
decides how a model is wrapped.

- started by ``torchrun``: one process per device, DistributedDataParallel
  (``nccl`` on GPUs, ``gloo`` on CPU), every split sharded by a DistributedSampler;
- otherwise, several visible GPUs: DataParallel over all of them (as the original);
- otherwise one GPU, or the CPU.
"""
import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Only the main process logs and writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def setup() -> Runtime:
    """Initialise the process group under torchrun and pick this process's device."""
    if launched_by_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return Runtime(device, dist.get_rank(), dist.get_world_size(), local_rank)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Runtime(device)


def teardown(finished: bool = True) -> None:
    """Leave the process group.  After a run that ``finished``, every rank first waits for
    the others at a barrier and frees what still refers to the group (a DDP reducer in a
    reference cycle): a gloo rank that leaves while its peer is still in a collective, or
    whose worker threads outlive the interpreter, aborts the process at exit ("terminate
    called without an active exception").  After an error no barrier: the other ranks may
    never reach it."""
    if dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[Runtime]:
    """``setup()`` for the body of a run, ``teardown()`` after it, whatever happens."""
    runtime = setup()
    try:
        yield runtime
    except BaseException:
        teardown(finished=False)
        raise
    teardown()


def data_parallel(runtime: Runtime) -> bool:
    """One process driving every visible GPU (DataParallel), as the original did."""
    return not runtime.distributed and runtime.device.type == "cuda" and torch.cuda.device_count() > 1


def replicas(runtime: Runtime) -> int:
    """How many devices one step of this process's model spans (processes or replicas)."""
    return torch.cuda.device_count() if data_parallel(runtime) else runtime.world_size


def cuda_devices(runtime: Runtime) -> List[torch.device]:
    """The CUDA devices this process's steps run on, and draw random numbers on: every
    visible GPU under DataParallel, else its own; none on the CPU."""
    if runtime.device.type != "cuda":
        return []
    if data_parallel(runtime):
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    index = runtime.device.index
    return [torch.device("cuda", torch.cuda.current_device() if index is None else index)]


def wrap(model: nn.Module, runtime: Runtime, ignore: Sequence[str] = ()) -> nn.Module:
    """Wrap ``model`` (already on ``runtime.device``) for data parallelism.

    ``ignore`` names parameters DDP must not synchronise (the architecture
    parameters: their gradients are reduced by the architect, not by DDP)."""
    if runtime.distributed:
        if ignore:
            # DDP's reducer spells the name of a parameter registered on the root
            # module with a leading dot (".alphas_normal"), while the rest of DDP
            # uses the plain name: give both, or the reducer waits for gradients
            # the weight step never produces and fails at the second iteration.
            names = list(ignore) + [f".{name}" for name in ignore if "." not in name]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, names)
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if data_parallel(runtime):
        return nn.DataParallel(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a DDP/DataParallel wrapper."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors over processes in place (no-op outside torchrun)."""
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Make every process hold rank ``src``'s values (bit-identical), in place."""
    if not dist.is_initialized():
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=src)


def sum_over_processes(values: List[float], device: torch.device) -> List[float]:
    """Sum scalar statistics (e.g. correct counts) over processes."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_objects(obj: Any) -> List[Any]:
    """Every process's ``obj`` in rank order, on every process (``[obj]`` outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    objects: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects
