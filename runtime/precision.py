"""Mixed precision for search and training: one object owning the autocast
context and, for float16, the gradient scaler; IEEE float32 where TF32 would round
too coarsely; and how kernels are chosen (``--deterministic``).

bfloat16 (the default with ``--amp``) has float32's range and needs no scaling;
float16 needs a GradScaler against underflow.  Parameters and optimizer state stay
in float32: autocast only changes the dtype inside forward passes.  The search's
architecture step ignores it and runs in float32 (see architect.py)."""
import argparse
import contextlib
import os
from typing import Any, ContextManager, Iterator, Mapping, Tuple

import torch

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision:
    def __init__(self, enabled: bool, dtype: str, device: torch.device):
        self.enabled = enabled
        self.dtype = AMP_DTYPES[dtype]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=enabled and self.dtype == torch.float16)

    def autocast(self) -> ContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def load_scaler_state(self, state: Mapping[str, Any]) -> None:
        """The gradient scaler's state from a checkpoint.  One written without float16
        (float32, bfloat16: an empty state) leaves a float16 run's scaler at its start."""
        if state:
            self.scaler.load_state_dict(state)

    def __repr__(self) -> str:
        if not self.enabled:
            return "float32"
        return f"autocast {str(self.dtype).replace('torch.', '')} on {self.device_type}" + (
            " with gradient scaling" if self.scaler.is_enabled() else "")


def float32_settings() -> Tuple[str, str, str]:
    """How CUDA computes float32 now: the matrix-product precision ('highest' is IEEE),
    and the ``fp32_precision`` of matrix products and of cuDNN's convolutions
    ('ieee' or 'tf32')."""
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision)


IEEE_FLOAT32 = ("highest", "ieee", "ieee")  # float32_settings() inside exact_float32()


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """CUDA's float32 matrix products and convolutions in IEEE float32, not TF32, inside
    the block; the settings before it come back after (on an exception too).

    On Ampere and newer cards cuDNN convolves float32 in TF32 by default, whose 10-bit
    mantissa rounds at about 5e-4 (relative): the architect's finite-difference
    perturbation (about 1e-4 of a weight) would round away.  These are host-side
    settings, read when a kernel is chosen (or captured): no synchronisation.
    Convolutions take torch 2.9+'s ``fp32_precision`` (the legacy ``allow_tf32``
    flags are being deprecated); matrix products go through
    ``set_float32_matmul_precision``, which keeps the legacy and the new setting in
    step: torch refuses a matrix product while the two disagree."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = float32_settings()
    torch.set_float32_matmul_precision("highest")
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.fp32_precision, conv.fp32_precision = before[1:]


# cuBLAS's deterministic workspace setting, which torch.use_deterministic_algorithms
# requires on CUDA: read when cuBLAS starts, so set before the run's first kernel.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def add_deterministic_flag(parser: argparse.ArgumentParser) -> None:
    """``--deterministic``, for the search and the train and test scripts
    (``kernel_choice``)."""
    parser.add_argument("--deterministic", action="store_true",
                        help="the same numbers from run to run on a GPU too (same card and "
                             "software): cuDNN's deterministic kernels without benchmarking, "
                             "torch.use_deterministic_algorithms with CUBLAS_WORKSPACE_CONFIG, "
                             "deterministic replacements where an op has none; slower")


def deterministic_mode(args: argparse.Namespace) -> str:
    """``--deterministic`` as the run's log says it."""
    return ("deterministic kernels (--deterministic)" if args.deterministic else
            "fastest kernels (cuDNN benchmarks on a GPU; --deterministic for repeatable runs)")


@contextlib.contextmanager
def kernel_choice(deterministic: bool, device: torch.device) -> Iterator[None]:
    """How the run's kernels are chosen, inside the block; the settings before it come
    back after.  By default cuDNN benchmarks its convolution algorithms on a GPU
    (fastest, but the choice, and some kernels' atomic additions, vary from run to
    run).  ``deterministic``: cuDNN's deterministic algorithms without benchmarking,
    ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel
    raises; the project replaces those it uses, e.g. ``attentions.global_max_pool``)
    and cuBLAS's deterministic workspace (an environment variable a user set wins)."""
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              os.environ.get(CUBLAS_WORKSPACE[0]))
    if deterministic:
        os.environ.setdefault(*CUBLAS_WORKSPACE)
        cudnn.benchmark, cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True)
    else:
        cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
        if before[4] is None:
            os.environ.pop(CUBLAS_WORKSPACE[0], None)


def add_precision_flags(parser: argparse.ArgumentParser,
                        channels_last_default: "bool | str" = False) -> None:
    """``--amp``, ``--amp_dtype`` and ``--channels_last`` for any script's parser.

    ``channels_last_default="auto"`` (the search): on for the CPU, off on GPUs.  The
    training scripts keep it opt-in: with torch 2.14.1, oneDNN's channels-last weight
    gradient of a 1x1 stride-2 convolution with 4 output channels at 56x56 corrupts
    the heap (a tiny ImageNet network's FactorizedReduce), while the search supernet
    only sees 32x32 and smaller inputs, where channels-last gradients were checked."""
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: autocast forward passes (bfloat16 by default)")
    parser.add_argument("--amp_dtype", choices=sorted(AMP_DTYPES), default="bfloat16",
                        help="autocast dtype with --amp; float16 adds a gradient scaler")
    auto = " ('auto': on for the CPU, off on GPUs)" if channels_last_default == "auto" else ""
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction,
                        default=channels_last_default,
                        help="keep activations in channels-last memory layout (faster convolutions "
                             "on CPUs, and on GPUs mainly with --amp)" + auto)


def resolve_channels_last(requested: "bool | str", device: torch.device) -> bool:
    """``--channels_last`` as given; ``"auto"`` means on for the CPU only, where oneDNN
    runs the supernet's convolutions and pooling 1.4-1.9x faster channels-last
    (bench/search_step.py); on GPUs the gain depends on --amp."""
    return device.type == "cpu" if requested == "auto" else bool(requested)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
