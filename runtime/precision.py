"""Mixed precision for search and training: one object owning the autocast
context and, for float16, the gradient scaler.

bfloat16 (the default with ``--amp``) has float32's range and needs no scaling;
float16 needs a GradScaler against underflow.  Parameters and optimizer state stay
in float32: autocast only changes the dtype inside forward passes.  The search's
architecture step ignores it and runs in float32 (see architect.py)."""
import argparse
import contextlib
from typing import ContextManager

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

    def __repr__(self) -> str:
        if not self.enabled:
            return "float32"
        return f"autocast {str(self.dtype).replace('torch.', '')} on {self.device_type}" + (
            " with gradient scaling" if self.scaler.is_enabled() else "")


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
