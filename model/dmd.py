"""DMD (distribution matching distillation): the generator's samples move along fake score - real score, where
the real score is the pose teacher with CFG and the fake score a critic trained by flow matching on the
generator's samples; the self_forcing stage is DMD on Self-Forcing rollouts. Also the base class of every
distribution-matching objective (DMD, SiD, Self-Forcing): sampling from the generator, the critic's loss, and
the critic-every-step / generator-every-k schedule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.flow_matching import draw_timesteps, flow_matching_loss
from pipeline.conditions import cfg_conditions, conditions, latent_shape
from pipeline.rollout import DEFAULT_STEPS, cfg_flow
from pipeline.self_forcing_rollout import backward_simulation, self_forcing_rollout
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import add_noise, flow_to_x0
from wan.modules.causal_model import CausalWanModel


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """(fake_x0 - real_x0) / mean|x - real_x0|, the mean per sample over every non-batch dim (float64 math).

    x, real_x0, fake_x0 [B, ...] -> [B, ...] in x's dtype.
    """
    dims = tuple(range(1, x.dim()))
    norm = (x.double() - real_x0.double()).abs().mean(dim=dims, keepdim=True)  # [B, 1, ...]
    return ((fake_x0.double() - real_x0.double()) / norm).to(x.dtype)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE(x, stopgrad(x - grad)): its gradient wrt x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad.float()).detach())


class DistributionMatching(Objective):
    """Generator + frozen teacher (real score) + critic (fake score). The critic steps every iteration on
    detached generator samples, the generator every `gen_every` iterations; subclasses define the sampler
    (`generate`) and the generator's loss (`generator_loss`).

    Batch: context, neg_context (CFG), clip_fea, y, pose, ref_pose (optional). No data latents.
    """

    required_roles = ("generator", "teacher", "critic")
    trainable_roles = ("generator", "critic")
    defaults: dict[str, Any] = {
        "gen_every": 5,  # generator step every k-th iteration, critic every iteration
        "guidance": 1.5,  # real score CFG u + w (c - u); the UniAnimate teacher samples at 1.5
        "shift": 5.0,  # score timesteps t = 1000 * shift_sigma(u), clamped to [min_t, max_t]
        "min_t": 20.0,
        "max_t": 980.0,
        "steps": list(DEFAULT_STEPS),  # the generator's denoising steps; one exit step per iteration among them
    }

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = {**self.defaults, **dict(cfg or {})}
        self.steps = [float(s) for s in self.opts["steps"]]
        if int(self.opts["gen_every"]) < 1:
            raise ValueError(f"gen_every={self.opts['gen_every']} must be >= 1")
        if not isinstance(roles["generator"], CausalWanModel):
            raise TypeError(f"{self.name} distils into the causal student: roles.generator must be a causal preset")

    def due(self, iteration: int) -> tuple[str, ...]:
        if iteration % int(self.opts["gen_every"]) == 0:
            return ("generator", "critic")
        return ("critic",)

    # -- pieces

    def generate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's sample [B, 16, F, H, W]: full-sequence backward simulation to a shared exit step."""
        generator = self.roles["generator"]
        exit_index = self.ctx.shared_randint(0, len(self.steps))
        shape = latent_shape(generator, batch)
        cond = conditions(generator, batch)
        return backward_simulation(generator, cond, shape, self.steps, exit_index, self.ctx.randn)

    def score_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t [B]) for the scores: one t per sample, the same noisy x_t for real and fake score."""
        t = draw_timesteps(self.ctx, (x.shape[0],), self.opts).to(x.device)
        return add_noise(x, self.ctx.randn(*x.shape).to(x.dtype), t), t

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher = self.roles["teacher"]
        cond, uncond = cfg_conditions(teacher, batch, float(self.opts["guidance"]))
        flow = cfg_flow(teacher, x_t, t, cond, uncond, float(self.opts["guidance"]))
        return flow_to_x0(flow.float(), x_t.float(), t)

    def fake_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        critic = self.roles["critic"]
        return flow_to_x0(critic(x_t, t, **conditions(critic, batch)).float(), x_t.float(), t)

    def critic_loss(self, sample: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flow matching of the critic on detached generator samples (the fake distribution)."""
        critic = self.roles["critic"]
        t = draw_timesteps(self.ctx, (sample.shape[0],), self.opts).to(sample.device)
        noise = self.ctx.randn(*sample.shape).to(sample.dtype)
        return flow_matching_loss(critic, sample.detach(), noise, t, conditions(critic, batch))

    def generator_loss(self, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def sample_losses(self, sample: torch.Tensor, batch: dict[str, torch.Tensor], due: tuple[str, ...]) -> dict:
        """Losses of the roles that learn from detached generator samples (here the critic)."""
        return {"critic": self.critic_loss(sample, batch)} if "critic" in due else {}

    # -- step

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        losses, logs = {}, {}
        if "generator" in due:
            x = self.generate(batch)
            losses["generator"], logs = self.generator_loss(x, batch)
            sample = x.detach()  # the critic learns from the same sample
        else:
            with torch.no_grad():
                sample = self.generate(batch)
        losses.update(self.sample_losses(sample, batch, due))
        return StepOutput(losses, logs)


class DMD(DistributionMatching):
    name = "dmd"

    def generator_loss(self, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            x_t, t = self.score_inputs(x.detach())
            real = self.real_x0(x_t, t, batch)
            fake = self.fake_x0(x_t, t, batch)
            grad = dmd_gradient(x.detach().float(), real, fake)
        logs = {"dmd_grad_abs": grad.abs().mean(), "t_mean": t.mean()}
        return dmd_loss(x, grad), logs


class SelfForcing(DMD):
    """DMD on Self-Forcing samples: the generator rolls the clip out block by block through its KV cache, as at
    inference, with gradient only through each block's exit step."""

    name = "self_forcing"
    sequence_parallel = False  # the rollout runs the generator through its KV cache with gradient

    def generate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        generator = self.roles["generator"]
        exit_index = self.ctx.shared_randint(0, len(self.steps))
        shape = latent_shape(generator, batch)
        cond = conditions(generator, batch)
        return self_forcing_rollout(generator, cond, shape, self.steps, exit_index, self.ctx.randn, self.ctx.dtype)
