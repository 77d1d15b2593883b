"""The precision the adapted transformer runs in, for training, evaluation and validation alike.

``mixed_precision`` ``bf16`` (the default) runs the frozen base in bfloat16 under autocast with
the LoKr weights in float32; ``no`` runs float32 throughout. One definition keeps the train and
eval numbers in the same units.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast for ``mixed_precision`` ``bf16``; nothing for ``no``."""
    if mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
