"""Toy objectives for testing the trainer loop independently of the real methods."""

import torch
import torch.nn.functional as F

from pipeline.conditions import conditions
from trainer.objective import Objective, StepOutput
from utils.scheduler import add_noise, flow_to_x0


class ToyDenoise(Objective):
    """x0 regression of the generator at one noise level: a loss that must fall when the loop works."""

    name = "toy"
    required_roles = ("generator",)
    trainable_roles = ("generator",)
    defaults = {"t": 999.0, "nan_at": -1}

    def train_step(self, batch, iteration, due):
        gen = self.roles["generator"]
        x0 = batch["latents"]
        noise = self.ctx.randn(*x0.shape)
        t = torch.full((x0.shape[0],), float(self.cfg.t), device=x0.device)
        x_t = add_noise(x0, noise, t)
        pred = flow_to_x0(gen(x_t, t, **conditions(gen, batch)).float(), x_t, t)
        loss = F.mse_loss(pred, x0.float())
        if iteration == self.cfg.nan_at:
            loss = loss * float("nan")
        return StepOutput({"generator": loss}, {"t_mean": t.mean()})


class ToyTwoRoles(ToyDenoise):
    """Generator every `gen_every` iterations, critic every iteration (the DMD schedule's shape)."""

    name = "toy_two"
    required_roles = ("generator", "critic")
    trainable_roles = ("generator", "critic")
    defaults = {"t": 500.0, "nan_at": -1, "gen_every": 2}

    def due(self, iteration):
        return ("generator", "critic") if iteration % self.cfg.gen_every == 0 else ("critic",)

    def train_step(self, batch, iteration, due):
        out = super().train_step(batch, iteration, due) if "generator" in due else StepOutput({})
        critic = self.roles["critic"]
        x0 = batch["latents"]
        t = torch.full((x0.shape[0],), 700.0, device=x0.device)
        x_t = add_noise(x0, self.ctx.randn(*x0.shape), t)
        out.losses["critic"] = F.mse_loss(flow_to_x0(critic(x_t, t, **conditions(critic, batch)).float(), x_t, t), x0)
        return out


REGISTRY = {cls.name: cls for cls in (ToyDenoise, ToyTwoRoles)}
