"""SiD (score identity distillation, Zhou et al. 2024): the generator minimises a Fisher-divergence estimate
built from the real score (pose teacher with CFG) and the fake score (critic) at the same noisy x_t, with
gradients through both scores' inputs. The critic trains exactly as in DMD."""

from __future__ import annotations

from typing import Any

import torch

from model.dmd import DistributionMatching


def sid_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean[(r - f) * ((r - x) - alpha (r - f)) / stopgrad(mean|x - r|)], the normaliser per sample over every
    non-batch dim. Equals (1 - alpha)|r - f|^2 + (r - f)(f - x), normalised. x, real_x0 (r), fake_x0 (f) [B, ...]."""
    x, r, f = x.float(), real_x0.float(), fake_x0.float()
    dims = tuple(range(1, x.dim()))
    norm = (x - r).abs().mean(dim=dims, keepdim=True).detach()  # [B, 1, ...]
    return ((r - f) * ((r - x) - alpha * (r - f)) / norm).mean()


class SiD(DistributionMatching):
    name = "sid"
    defaults: dict[str, Any] = {
        **DistributionMatching.defaults,
        "alpha": 1.0,  # SiD's alpha; 1.2 in the image paper, 1.0 in Self-Forcing's video SiD
    }

    def generator_loss(self, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # x_t carries the generator's gradient into both scores; the trainer keeps the critic's parameter
        # gradient from this loss out of the critic's optimizer (trainer.trainer.backward_per_role).
        x_t, t = self.score_inputs(x)
        real = self.real_x0(x_t, t, batch)
        fake = self.fake_x0(x_t, t, batch)
        loss = sid_loss(x, real, fake, float(self.opts["alpha"]))
        return loss, {"score_gap_abs": (real - fake).detach().abs().mean(), "t_mean": t.mean()}
