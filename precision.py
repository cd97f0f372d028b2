"""Mixed precision for search and training: one object owning the autocast
context and, for float16, the gradient scaler.

bfloat16 (the default with ``--amp``) has float32's range and needs no scaling;
float16 needs a GradScaler against underflow.  Parameters and optimizer state stay
in float32: autocast only changes the dtype inside forward passes.  The search's
architecture step ignores it and runs in float32 (see architect.py)."""
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


def add_precision_flags(parser) -> None:
    """``--amp``, ``--amp_dtype`` and ``--channels_last`` for any script's parser."""
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: autocast forward passes (bfloat16 by default)")
    parser.add_argument("--amp_dtype", choices=sorted(AMP_DTYPES), default="bfloat16",
                        help="autocast dtype with --amp; float16 adds a gradient scaler")
    parser.add_argument("--channels_last", action="store_true",
                        help="keep activations in channels-last memory layout (faster convs on GPUs)")


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
