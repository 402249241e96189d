"""``nn.Linear`` through ``mmcore.ops.linear``: the same parameters and state-dict names; decoding steps on the CPU
(a few rows, no gradients) run the streaming C++ kernel instead of BLAS."""

from __future__ import annotations

import torch
from torch import nn

from mmcore import ops


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
