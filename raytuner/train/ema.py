"""An exponential moving average of the adapter weights (``use_ema``, ``ema_decay``).

Only the LoKr weights move, so only they are averaged: a few megabytes even on the 14B model.
The average is kept in float32 beside the live weights and swapped in for validation and export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class AdapterEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimiser step."""

    def __init__(self, parameters: list[torch.nn.Parameter], *, decay: float) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"ema_decay = {decay}: expected a value in (0, 1]")
        self.parameters = parameters
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        """Start the average from the live weights (a restored adapter without its EMA)."""
        self.averages = [p.detach().to(torch.float32).clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        for average, parameter in zip(self.averages, self.parameters, strict=True):
            average.lerp_(parameter.detach().to(torch.float32), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the live parameters inside the block, the trained ones after."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.averages, strict=True):
                parameter.copy_(average.to(parameter.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved, strict=True):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "averages": [a.cpu() for a in self.averages]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        averages = state["averages"]
        assert isinstance(averages, list)
        if len(averages) != len(self.averages):
            raise ValueError(f"EMA state holds {len(averages)} tensors, the adapter has {len(self.averages)}")
        self.averages = [
            a.to(device=p.device, dtype=torch.float32) for a, p in zip(averages, self.parameters, strict=True)
        ]
