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
them off otherwise, and under torchrun whatever its size (DistributedDataParallel
needs 11 eager iterations and its own construction on a side stream before a
capture, and the search would capture NCCL's all_reduce and broadcast).

A batch is copied once, straight into the static inputs (``feed``), not first to the
device and then into them.

Capture is ``thread_local``: the DataLoaders' pin-memory threads keep calling CUDA
while a step is captured, which would invalidate a ``global`` capture.  A capture or
a replay that fails anyway goes to the run's ``GraphGroup``: under ``auto`` one
line in the log (the root cause: a capture that fails inside CUDA raises again when
it ends, "operation failed due to a previous error during capture", with the first
error as its ``__context__``) and eager steps from then on (a failed capture ran no
kernel, so the step it was capturing runs once, eagerly); with ``--cuda_graphs`` a
``UserError``.  A failed capture leaves the process as it found it: the stream that
was current is current again (torch 2.14's ``graph.__exit__`` ends the capture
before it leaves its stream, so a failing end would leave the capture stream
current: the capture runs inside a stream context of our own), the failed graph and
its pool are dropped, and the optimizers made capturable for the graphs take the
eager step again (``capturable=False``).

Memory: a graph's private pool holds its step's intermediates until the graph, its
static tensors and whatever else points into the pool (the gradients a step leaves
behind) are gone.  ``reset`` drops the graph's own references, a capture those of the
run's other graphs (``GraphGroup``), and the steps leave no gradients
(``experiment.weight_step``): each capture (whose entry empties PyTorch's cache) and
the Hessian's double backward find the old pools free.
"""
import argparse
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from runtime import parallel
from runtime.errors import UserError
from runtime.parallel import Runtime

Shapes = Tuple[Tuple[Tuple[int, ...], torch.dtype], ...]


def add_cuda_graph_flag(parser: argparse.ArgumentParser) -> None:
    """``--cuda_graphs``, for the search and the train and test scripts alike."""
    parser.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default="auto",
                        help="capture each step once per epoch in a CUDA graph and replay it: one "
                             "launch instead of thousands ('auto': on for one CUDA device in one "
                             "process, off on the CPU, under torchrun and with DataParallel; given "
                             "under torchrun, an error)")


def use_cuda_graphs(requested: "bool | str", device: torch.device, replicas: int = 1,
                    scaled: bool = False, process_group: bool = False) -> Tuple[bool, str]:
    """``--cuda_graphs`` resolved: (on or off, why), for the run's log.  ``auto`` means on
    for a step on one CUDA device (``replicas``: the processes or DataParallel replicas
    a step spans; their collectives and scatters are not captured) in a process
    outside torchrun (``process_group``: one is initialised, of any size; given
    explicitly there, the flag is an error).  ``scaled``: the step uses float16's
    gradient scaler, which reads its overflow check back to the host every step."""
    if process_group and requested is True:
        raise UserError("--cuda_graphs cannot be used under torchrun: DistributedDataParallel "
                        "and the search's all_reduce and broadcast cannot be captured; leave "
                        "the flag out (graphs are then off under torchrun)")
    if device.type != "cuda":
        return False, f"off on {device.type}: graphs are CUDA's"
    if process_group:
        return False, ("off under torchrun: DistributedDataParallel and the collectives of a "
                       "step cannot be captured")
    if replicas > 1:
        return False, f"off: a step spans {replicas} devices"
    if scaled:
        return False, "off: float16's gradient scaler synchronises every step (use bfloat16)"
    if requested == "auto":
        return True, "one CUDA device: whole steps captured and replayed"
    return bool(requested), "as requested"


def resolve_cuda_graphs(args: argparse.Namespace, runtime: Runtime) -> Tuple[bool, bool, str]:
    """A script's ``--cuda_graphs`` in this process: (on, strict, why).  ``strict``:
    the flag was given, so a failed capture stops the run."""
    scaled = getattr(args, "amp", False) and getattr(args, "amp_dtype", "") == "float16"
    enabled, why = use_cuda_graphs(args.cuda_graphs, runtime.device, parallel.replicas(runtime),
                                   scaled, process_group=dist.is_initialized())
    return enabled, args.cuda_graphs is True, why


def place_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Put each parameter's step counter where this optimizer's step reads it: on the
    parameter's device for a capturable or fused step, on the CPU for the eager one
    (a host number: no read-back per step)."""
    for group in optimizer.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.to(param.device if on_device else "cpu", torch.float32)


def root_cause(error: BaseException) -> BaseException:
    """The first error of ``error``'s chain of contexts."""
    seen = {id(error)}
    while error.__context__ is not None and id(error.__context__) not in seen:
        error = error.__context__
        seen.add(id(error))
    return error


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def _shapes(tensors: Sequence[torch.Tensor]) -> Shapes:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class GraphGroup:
    """The ``StepGraph``s of one run.  They share what a failed capture or replay does:
    with ``strict`` (``--cuda_graphs`` given) the run stops with one line; otherwise one
    line goes to ``log`` and every step of every graph runs eagerly for the rest of the
    run.  And they hold one private memory pool at a time: ``release`` drops their
    graphs, as every capture does first for the others' (each graph of a run is
    captured anew before its next use anyway: every epoch, every evaluation)."""

    def __init__(self, strict: bool, log: Callable[[str], None] = print):
        self.strict = strict
        self.log = log
        self.failed = False
        self.graphs: List["StepGraph"] = []
        # Optimizers created capturable for the graphs: eager again after a fallback.
        self.capturable: List[torch.optim.Optimizer] = []

    def release(self, keep: Optional["StepGraph"] = None) -> None:
        for graph in self.graphs:
            if graph is not keep:
                graph.reset()

    def fail(self, what: str, error: Exception) -> None:
        """``what`` failed with ``error``: stop (strict), or log the root cause and run
        every step eagerly from now on."""
        cause = root_cause(error)
        then = "" if cause is error else f"; then {_first_line(error)}"
        reason = f"{what} failed ({_first_line(cause)}{then})"
        if self.strict:
            raise UserError(f"CUDA graphs: {reason}; --cuda_graphs was given, so the run stops: "
                            f"run with --no-cuda_graphs (or leave the flag out to fall back to "
                            f"eager steps)") from None
        self.failed = True
        for optimizer in self.capturable:
            for group in optimizer.param_groups:
                group["capturable"] = False
            place_step_counters(optimizer)
        self.log(f"CUDA graphs: {reason}; the run continues without CUDA graphs, every step "
                 f"eager (--no-cuda_graphs turns them off and silences this line)")


def run_graphs(enabled: bool, strict: bool, log: Callable[[str], None],
               steps: int = 1) -> Tuple["StepGraph", ...]:
    """A run's ``StepGraph``s, one ``GraphGroup``: ``steps`` step graphs (3 warm-up
    steps each), then its evaluation's (1); their steps are given by ``reset``."""
    group = GraphGroup(strict, log)
    return (*(StepGraph(None, enabled, group=group) for _ in range(steps)),
            StepGraph(None, enabled, warmup=1, group=group))


class StepGraph:
    """Run ``step`` eagerly, or captured in a CUDA graph and replayed (see the module
    docstring).  ``enabled=False`` is exactly ``step``: the CPU's path.  ``step`` may
    be given later, by ``reset``.  ``group``: the run's graphs (without one, a failed
    capture or replay raises its error)."""

    def __init__(self, step: Optional[Callable[..., Any]], enabled: bool, warmup: int = 3,
                 group: Optional[GraphGroup] = None):
        self.step = step
        self._enabled = enabled
        self.warmup = warmup
        self.group = group
        if group is not None:
            group.graphs.append(self)
        self.warmed = 0
        self.captures = 0
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_inputs: List[torch.Tensor] = []
        self._static_outputs: Any = None
        self._shapes: Optional[Shapes] = None

    @property
    def enabled(self) -> bool:
        return self._enabled and not (self.group is not None and self.group.failed)

    def reset(self, step: Optional[Callable[..., Any]] = None) -> None:
        """What the step reads besides its inputs changed (or, given, the step itself):
        capture anew at the next call.  Drops the graph and its static tensors, so
        that its memory pool can be freed.  Warm-up is done once per ``StepGraph``."""
        if step is not None:
            self.step = step
        self._graph = None
        self._static_inputs, self._static_outputs, self._shapes = [], None, None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def feed(self, place: Callable[..., Sequence[torch.Tensor]], *batch: torch.Tensor,
             first: int = 0) -> Tuple[torch.Tensor, ...]:
        """``batch`` (on the host or the device) where the next call takes it, as its
        inputs ``first``, ``first + 1``, ...: copied straight into the static inputs
        when the next call replays the graph (one copy per batch, nothing allocated),
        else brought to the device by ``place`` for an eager step or a capture."""
        statics = self._static_inputs[first:first + len(batch)]
        if (self.enabled and self._graph is not None
                and _shapes(batch) == self._shapes[first:first + len(batch)]):
            for static, tensor in zip(statics, batch):
                static.copy_(tensor, non_blocking=True)
            return tuple(statics)
        return tuple(place(*batch))

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if not self.enabled:
            return self.step(*inputs)
        if self._graph is not None and _shapes(inputs) != self._shapes:
            return self.step(*inputs)
        if self._graph is None:
            if self.warmed < self.warmup:
                self.warmed += 1
                return self._on_side_stream(inputs)
            if not self._guarded("capturing the step", self._capture, inputs):
                return self.step(*inputs)
        for static, tensor in zip(self._static_inputs, inputs):
            if tensor is not static:  # fed already (``feed``)
                static.copy_(tensor, non_blocking=True)
        if not self._guarded("replaying the step", self._graph.replay):
            return self.step(*inputs)
        return self._static_outputs

    def _guarded(self, what: str, action: Callable[..., Any], *args: Any) -> bool:
        """Run ``action``; whether it succeeded.  A failure (no kernel ran: a capture
        records kernels without running them, a replay that fails does not launch)
        drops the graph and goes to the group."""
        try:
            action(*args)
        except Exception as error:  # CUDA's errors come as RuntimeErrors, mostly
            if self.group is None:
                raise
            self.reset()
            self.group.fail(what, error)
            return False
        return True

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
        if self.group is not None:
            self.group.release(keep=self)  # before the capture empties PyTorch's cache
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        try:
            # The capture stream entered in a context of our own as well: torch 2.14's
            # graph.__exit__ ends the capture before it leaves the stream, so a failing
            # end would leave the capture stream current for the rest of the run.
            # thread_local: CUDA calls of other threads (pin memory) cannot break the capture.
            with torch.cuda.stream(stream), torch.cuda.graph(
                    graph, stream=stream, capture_error_mode="thread_local"):
                self._static_outputs = self.step(*self._static_inputs)
        except Exception:
            _drop(graph)
            raise
        self._graph = graph
        self.captures += 1


def _drop(graph: torch.cuda.CUDAGraph) -> None:
    """Free what a failed capture holds, its graph and private pool, then PyTorch's
    cache.  (Should this raise as well, the capture's error stays the root cause.)"""
    graph.reset()
    torch.cuda.empty_cache()
