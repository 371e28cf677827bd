"""The optional GAN term of Self-Forcing (DMD2-style): a discriminator made of a bidirectional Wan backbone with
small heads on its block features (~1/2, 3/4 and the last block) sees noisy real latents and noisy generator
samples; non-saturating softplus losses, optional R1 on the real inputs (a finite-difference estimate: exact R1
needs double backward through attention, which the fused SDPA kernels lack). Stage `self_forcing_gan`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.dmd import SelfForcing
from pipeline.conditions import conditions
from trainer.objective import TrainContext
from utils.scheduler import add_noise
from wan.modules.model import WanModel


def discriminator_layers(num_layers: int) -> list[int]:
    """Blocks whose outputs feed a head: about 1/2, 3/4 and the last of num_layers (deduplicated)."""
    return sorted({max(0, round(num_layers * f) - 1) for f in (0.5, 0.75, 1.0)})


class FeatureDiscriminator(nn.Module):
    """backbone(x, t, **cond) with a head per chosen block: LayerNorm, Linear, SiLU, Linear -> one logit per
    token, averaged over tokens and summed over heads. forward -> logits [B]."""

    def __init__(self, backbone: WanModel, layers: Sequence[int] | None = None):
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers) if layers is not None else discriminator_layers(backbone.num_layers)
        bad = [i for i in self.layers if not 0 <= i < backbone.num_layers]
        if bad:
            raise ValueError(f"discriminator layers {bad} do not exist in a {backbone.num_layers}-block backbone")
        dim = backbone.dim
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1)) for _ in self.layers
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        features: dict[int, torch.Tensor] = {}
        hooks = [
            self.backbone.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: features.__setitem__(i, out))
            for i in self.layers
        ]
        try:
            out = self.backbone(x, t, **cond)
        finally:
            for hook in hooks:
                hook.remove()
        # features [B, L, dim] -> head -> [B, L, 1] -> mean over tokens -> [B]
        pairs = zip(self.layers, self.heads, strict=True)
        logits = sum(head(features[i].float()).mean(dim=(1, 2)) for i, head in pairs)
        # The backbone's output joins with weight 0: under FSDP2 the root's parameters are gathered again for a
        # backward only through a hook on that output, and a later backward (the trainer runs one per role)
        # would otherwise find them freed.
        return logits + 0.0 * out.float().mean(dim=tuple(range(1, out.dim())))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator: softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the generator: softplus(-D(fake))."""
    return F.softplus(-fake_logits).mean()


def approx_r1_penalty(real_logits: torch.Tensor, perturbed_logits: torch.Tensor, sigma: float) -> torch.Tensor:
    """R1 = 0.5 E|dD/dx|^2 estimated as 0.5 E[(D(x + sigma eps) - D(x))^2] / sigma^2, eps ~ N(0, I): to first
    order (D(x + sigma eps) - D(x)) / sigma = dD/dx . eps, whose square has expectation |dD/dx|^2."""
    return 0.5 * (perturbed_logits.float() - real_logits.float()).pow(2).mean() / sigma**2


class SelfForcingGAN(SelfForcing):
    """Self-Forcing DMD plus a GAN term; the discriminator steps every iteration like the critic.

    Batch: as self_forcing, plus real latents: `latents` (data) or the clean end of `ode_latents`.
    """

    name = "self_forcing_gan"
    required_roles = ("generator", "teacher", "critic", "discriminator")
    trainable_roles = ("generator", "critic", "discriminator")
    defaults: dict[str, Any] = {
        **SelfForcing.defaults,
        "gan_weight": 3e-3,  # weight of the generator's GAN loss next to the DMD loss (DMD2's order)
        "r1_weight": 0.0,  # gamma of R1 on real inputs; 0 turns it off
        "r1_sigma": 0.01,  # perturbation of the finite-difference R1 estimate
    }

    @classmethod
    def prepare_role(cls, name: str, module: nn.Module, cfg: Any = None) -> nn.Module:
        """The trainer's hook between building a role and making its optimizer: heads on the discriminator."""
        if name == "discriminator" and not isinstance(module, FeatureDiscriminator):
            return FeatureDiscriminator(module)
        return module

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        if not isinstance(roles["discriminator"], FeatureDiscriminator):
            raise TypeError(
                "roles.discriminator must be a FeatureDiscriminator: build it with "
                "SelfForcingGAN.prepare_role('discriminator', backbone) before making its optimizer"
            )

    def due(self, iteration: int) -> tuple[str, ...]:
        return (*super().due(iteration), "discriminator")

    def logits(self, x: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        disc = self.roles["discriminator"]
        return disc(x, t, **conditions(disc.backbone, batch))

    def generator_loss(self, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, logs = super().generator_loss(x, batch)
        x_t, t = self.score_inputs(x)
        gan = generator_gan_loss(self.logits(x_t, t, batch))  # discriminator grads dropped by the trainer
        logs["gan_generator"] = gan.detach()
        return loss + float(self.opts["gan_weight"]) * gan, logs

    def sample_losses(self, sample: torch.Tensor, batch: dict[str, torch.Tensor], due: tuple[str, ...]) -> dict:
        losses = super().sample_losses(sample, batch, due)
        if "discriminator" in due:
            if "latents" in batch:
                real = batch["latents"]
            elif "ode_latents" in batch:
                real = batch["ode_latents"][:, -1]
            else:
                raise ValueError("self_forcing_gan needs real latents: 'latents' or 'ode_latents' in the batch")
            fake_t, t = self.score_inputs(sample.detach())
            real_t = add_noise(real, self.ctx.randn(*real.shape).to(real.dtype), t)
            real_logits = self.logits(real_t, t, batch)
            loss = discriminator_loss(real_logits, self.logits(fake_t, t, batch))
            r1_weight, sigma = float(self.opts["r1_weight"]), float(self.opts["r1_sigma"])
            if r1_weight > 0:
                perturbed = real_t + sigma * self.ctx.randn(*real.shape).to(real.dtype)
                loss = loss + r1_weight * approx_r1_penalty(real_logits, self.logits(perturbed, t, batch), sigma)
            losses["discriminator"] = loss
        return losses
