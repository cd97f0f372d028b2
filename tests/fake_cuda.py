"""torch.cuda's graph machinery on the CPU, for the tests of the CUDA-graph path
(cuda_graphs.py) on a machine without a GPU.

``FakeCuda().install(monkeypatch)`` replaces ``torch.cuda.CUDAGraph``, ``graph``,
``Stream``, ``stream`` and ``current_stream``:

- streams: ``current`` is the fake's current stream; ``stream(s)`` makes ``s`` current
  and puts the one before back on exit, as ``torch.cuda.StreamContext`` does;
- capture (``graph``) in torch 2.14's order: ``__enter__`` enters a stream context of
  its capture stream, then begins; ``__exit__`` ends the capture, *then* leaves the
  stream context, so a capture whose end fails leaves the capture stream current;
- a capture runs the step (on the CPU nothing else can record it) and puts every
  tensor of ``holders`` (modules, optimizers) and the random state back as it found
  them: a real capture records kernels without running them.  It fails where asked:
  ``fail_at`` (the attempts, counted from 1, whose end raises ``FAILURE``) and
  ``step_fails_at`` (those whose step raises ``ROOT_CAUSE`` inside the capture; the
  end then raises ``SECONDARY``, as CUDA does, with the first as its context);
- what a capture bakes in besides tensors is frozen with it: the step function (its
  closure: the virtual step's learning rate), every optimizer's hyper-parameters
  (``param_groups`` without the parameters) and every module's plain attributes
  (``training``, ``drop_path_prob``, ...);
- a replay runs the captured step on the static inputs with those frozen values (the
  current ones come back after it) and copies its outputs into the static outputs,
  as a real replay computes into them.
"""
import weakref
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from runtime.cuda_graphs import StepGraph

FAILURE = "CUDA error: operation not permitted when stream is capturing"
ROOT_CAUSE = "CUDA error: operation not permitted when stream is capturing (the root cause)"
SECONDARY = "CUDA error: operation failed due to a previous error during capture"
PLAIN = (bool, int, float, str)


class FakeStream:
    def __init__(self, name: str):
        self.name = name

    def wait_stream(self, other: "FakeStream") -> None:
        pass

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeCuda:
    """See the module docstring."""

    def __init__(self, fail_at=(), step_fails_at=()):
        self.fail_at, self.step_fails_at = set(fail_at), set(step_fails_at)
        self.holders: List[object] = []
        self.attempts = 0
        self.modes: List[str] = []
        self.graphs: List[weakref.ref] = []
        self.alive_at_capture: List[int] = []
        self.grads_at_capture: List[int] = []
        self.dropped = 0  # failed graphs reset
        self.default = FakeStream("default")
        self.current = self.default
        self.capturing: Any = None  # the StepGraph whose capture is under way

    # -- what a capture restores and freezes ---------------------------------------------------

    def tensors(self) -> List[torch.Tensor]:
        found = []
        for holder in self.holders:
            if isinstance(holder, nn.Module):
                found += list(holder.parameters()) + list(holder.buffers())
            else:
                found += [v for state in holder.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor)]
        return found

    def python_values(self) -> List[Tuple[Any, Dict[str, Any]]]:
        """Every optimizer's hyper-parameters and every module's plain attributes."""
        values = []
        for holder in self.holders:
            if isinstance(holder, nn.Module):
                values += [(module, {k: v for k, v in vars(module).items() if isinstance(v, PLAIN)})
                           for module in holder.modules()]
            else:
                values += [(group, {k: v for k, v in group.items() if k != "params"})
                           for group in holder.param_groups]
        return values

    @staticmethod
    def set_python_values(values: List[Tuple[Any, Dict[str, Any]]]) -> None:
        for owner, attributes in values:
            if isinstance(owner, dict):
                owner.update(attributes)
                continue
            for name in [k for k, v in vars(owner).items() if isinstance(v, PLAIN)]:
                if name not in attributes:  # set since: the class's value was frozen
                    delattr(owner, name)
            for name, value in attributes.items():
                setattr(owner, name, value)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.graphs)

    # -- the fakes ---------------------------------------------------------------------------------

    def install(self, monkeypatch) -> "FakeCuda":
        fake = self
        original = StepGraph._capture

        def capture(graph, inputs):
            fake.capturing = graph
            original(graph, inputs)

        class Graph:
            def __init__(self):
                self.owner = fake.capturing
                self.frozen = None
                fake.graphs.append(weakref.ref(self))

            def reset(self):
                fake.dropped += 1
                self.frozen = None

            def replay(self):
                step, values = self.frozen
                now = fake.python_values()
                fake.set_python_values(values)
                try:
                    outputs = step(*self.owner._static_inputs)
                finally:
                    fake.set_python_values(now)
                for static, new in zip(self.owner._static_outputs, outputs):
                    if static is not None:
                        static.copy_(new)

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                self.before, fake.current = fake.current, self.stream

            def __exit__(self, *exc):
                fake.current = self.before
                return False

        class Capture:
            default_capture_stream = FakeStream("graph's own")

            def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
                fake.modes.append(capture_error_mode)
                self.graph = graph
                self.stream_ctx = StreamContext(stream or Capture.default_capture_stream)

            def __enter__(self):
                fake.attempts += 1
                # This graph exists already: the others must be gone by now.
                fake.alive_at_capture.append(fake.alive() - 1)
                fake.grads_at_capture.append(sum(
                    p.grad is not None for h in fake.holders if isinstance(h, nn.Module)
                    for p in h.parameters()))
                self.saved = [t.clone() for t in fake.tensors()]
                self.rng = torch.get_rng_state()
                self.stream_ctx.__enter__()
                if fake.attempts in fake.step_fails_at:
                    fake.raise_in_step = True

            def __exit__(self, error_type, error, traceback):
                # capture_end first (it raises on a failed capture), then the stream.
                fake.raise_in_step = False
                with torch.no_grad():
                    for tensor, saved in zip(fake.tensors(), self.saved):
                        tensor.copy_(saved)
                torch.set_rng_state(self.rng)
                if error is not None:
                    raise RuntimeError(SECONDARY)
                if fake.attempts in fake.fail_at:
                    raise RuntimeError(FAILURE)
                self.graph.frozen = (self.graph.owner.step, fake.python_values())
                self.stream_ctx.__exit__(error_type, error, traceback)
                return False

        fake.raise_in_step = False
        monkeypatch.setattr(StepGraph, "_capture", capture)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(torch.cuda, "Stream", lambda: FakeStream("side"))
        monkeypatch.setattr(torch.cuda, "stream", StreamContext)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        return self

    def failing_step(self, step):
        """``step``, raising ``ROOT_CAUSE`` when called inside a capture of
        ``step_fails_at`` (an op CUDA does not permit while a stream captures)."""
        def wrapped(*inputs):
            if self.raise_in_step:
                raise RuntimeError(ROOT_CAUSE)
            return step(*inputs)
        return wrapped
