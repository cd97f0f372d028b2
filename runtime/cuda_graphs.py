"""Whole-step CUDA graphs, for the search and the training loops alike.

On a GPU a step of this project is launch-bound: thousands of small kernels, each
launched from Python, leave the card mostly idle.  A CUDA graph records the kernels
of one step once and replays them with one launch.  ``StepGraph`` wraps a step
function ``step(*tensors) -> outputs``:

1. the first ``warmup`` calls run eagerly on a side stream (as PyTorch's CUDA-graph
   guide does): they are real steps on real batches, during which cuDNN and cuBLAS
   choose their kernels and the optimizers create their state;
2. the next call captures one step into a graph, with static copies of its inputs;
3. every later call copies its batch into those static inputs and replays the graph.
   The outputs are the graph's static tensors: read them (or enqueue work on them)
   before the next call overwrites them.

What a step reads besides its tensor inputs is frozen into the graph: the learning
rate, the drop-path probability, flags on modules.  ``reset()`` makes the next call
capture again; the loops call it once per epoch, when those change.  Sharing one
``StepGraph`` over the epochs keeps the warm-up to the run's first steps.  A call whose
inputs have other shapes than the captured ones (the short last batch of an
evaluation) runs eagerly.  Random numbers drawn inside the graph (drop-path masks)
are new at every replay: PyTorch advances the generator's offset per replay.

A capturable step has static shapes, no host synchronisation (``dispatch.HostSyncGuard``
finds those on a CPU) and optimizers created with ``capturable=True`` where they
have that flag.  Graphs need one device and one process: ``use_cuda_graphs`` turns
them off otherwise.
"""
import argparse
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

Shapes = Tuple[Tuple[Tuple[int, ...], torch.dtype], ...]


def add_cuda_graph_flag(parser: argparse.ArgumentParser) -> None:
    """``--cuda_graphs``, for the search and the train and test scripts alike."""
    parser.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default="auto",
                        help="capture each step once per epoch in a CUDA graph and replay it: one "
                             "launch instead of thousands ('auto': on for one CUDA device in one "
                             "process, off on the CPU, under torchrun and with DataParallel)")


def use_cuda_graphs(requested: "bool | str", device: torch.device, replicas: int = 1,
                    scaled: bool = False) -> Tuple[bool, str]:
    """``--cuda_graphs`` resolved: (on or off, why), for the run's log.  ``auto`` means on
    for a step on one CUDA device (``replicas``: the processes or DataParallel replicas
    a step spans; their collectives and scatters are not captured).  ``scaled``: the
    step uses float16's gradient scaler, which reads its overflow check back to the
    host every step."""
    if device.type != "cuda":
        return False, f"off on {device.type}: graphs are CUDA's"
    if replicas > 1:
        return False, f"off: a step spans {replicas} devices"
    if scaled:
        return False, "off: float16's gradient scaler synchronises every step (use bfloat16)"
    if requested == "auto":
        return True, "one CUDA device: whole steps captured and replayed"
    return bool(requested), "as requested"


def _shapes(tensors: Sequence[torch.Tensor]) -> Shapes:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class StepGraph:
    """Run ``step`` eagerly, or captured in a CUDA graph and replayed (see the module
    docstring).  ``enabled=False`` is exactly ``step``: the CPU's path.  ``step`` may
    be given later, by ``reset``."""

    def __init__(self, step: Optional[Callable[..., Any]], enabled: bool, warmup: int = 3):
        self.step = step
        self.enabled = enabled
        self.warmup = warmup
        self.warmed = 0
        self.captures = 0
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_inputs: List[torch.Tensor] = []
        self._static_outputs: Any = None
        self._shapes: Optional[Shapes] = None

    def reset(self, step: Optional[Callable[..., Any]] = None) -> None:
        """What the step reads besides its inputs changed (or, given, the step itself):
        capture anew at the next call.  Warm-up is done once per ``StepGraph``."""
        if step is not None:
            self.step = step
        self._graph = None
        self._static_inputs, self._static_outputs, self._shapes = [], None, None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if not self.enabled:
            return self.step(*inputs)
        if self._graph is not None and _shapes(inputs) != self._shapes:
            return self.step(*inputs)
        if self._graph is None:
            if self.warmed < self.warmup:
                self.warmed += 1
                return self._on_side_stream(inputs)
            self._capture(inputs)
        for static, tensor in zip(self._static_inputs, inputs):
            static.copy_(tensor, non_blocking=True)
        self._graph.replay()
        return self._static_outputs

    def _on_side_stream(self, inputs: Sequence[torch.Tensor]) -> Any:
        """An eager step on a side stream, ordered after and before the current stream's
        work: capture must not see the lazy initialisations a first step does."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self, inputs: Sequence[torch.Tensor]) -> None:
        # clone() keeps each input's memory format (channels-last batches stay so).
        self._static_inputs = [tensor.clone() for tensor in inputs]
        self._shapes = _shapes(inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_outputs = self.step(*self._static_inputs)
        self._graph = graph
        self.captures += 1
