"""Exponential moving average of a network's parameters, sharded exactly like the network (the shadow
tensors are clones of the parameters, DTensors under FSDP2)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in (0, 1)")
        self.decay, self.start = decay, start
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        """Track the weights after an optimizer step: copy before `start`, then shadow += (1-decay)(p - shadow)."""
        weight = 1.0 if iteration < self.start else 1.0 - self.decay
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the model's tracked parameters hold the EMA weights (e.g. a consistency target's
        no-grad forward); its own weights are restored on exit. The values are copied in place into the sharded
        parameters (an FSDP2 model is resharded first, so a forward inside gathers the EMA weights); run the block
        before any forward whose graph a backward still needs, since it writes that graph's weights."""
        _reshard(model)
        own = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.shadow:
                    own[name] = p.detach().clone()
                    p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            _reshard(model)  # FSDP2 keeps the root's parameters gathered after a forward
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in own:
                        p.copy_(own[name])


def _reshard(model: nn.Module) -> None:
    """Register the sharded parameters of every FSDP2 unit of the model (a no-op for a plain model)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
