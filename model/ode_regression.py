"""ODE init: regress the causal student's one-step x0 prediction onto the clean end of teacher ODE trajectories,
each block at its own randomly chosen trajectory state, in one block-causal forward."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.conditions import conditions
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import add_noise, flow_to_x0
from wan.modules.causal_model import CausalWanModel


def gather_states(
    ode_latents: torch.Tensor, ode_t: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame f, the state ode_latents[:, index[:, f], :, f] and its t.

    ode_latents [B, S, C, F, H, W], ode_t [B, S], index [B, F] (long) -> x_t [B, C, F, H, W], t [B, F].
    """
    b, _, c, f, h, w = ode_latents.shape
    frames_first = ode_latents.permute(0, 3, 1, 2, 4, 5)  # [B, F, S, C, H, W]
    pick = index.view(b, f, 1, 1, 1, 1).expand(b, f, 1, c, h, w)
    x_t = frames_first.gather(2, pick).squeeze(2).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W] -> [B, C, F, H, W]
    return x_t, ode_t.gather(1, index)


def causal_regression(
    model: CausalWanModel,
    batch: dict[str, torch.Tensor],
    ctx: TrainContext,
    choices: torch.Tensor,
    context_noise: float = 0.0,
) -> StepOutput:
    """The regression both ode_init and causal_kd train: per block and sample one trajectory state drawn uniformly
    from `choices` (indices into ode_latents' S states; S - 1, the clean end, makes the block clean context with
    no loss), one block-causal forward, MSE of the x0 prediction to the clean end over the noisy blocks' frames.
    A clean-context block enters at t = context_noise (the clean end re-noised with fresh noise when > 0), the
    level its K/V are written at when sampling.

    batch: ode_latents [B, S, C, F, H, W] (the last state clean), ode_t [B, S], the conditioning; choices [K] long.
    """
    states, ode_t = batch["ode_latents"], batch["ode_t"]
    b, s, _, num_frames = states.shape[:4]
    n = model.num_frame_per_block
    blocks = -(-num_frames // n)
    pick = (ctx.rand(b, blocks) * len(choices)).long().clamp(max=len(choices) - 1)  # [B, blocks]
    index = choices.to(pick.device)[pick].repeat_interleave(n, dim=1)[:, :num_frames].to(states.device)  # [B, F]
    x_t, t = gather_states(states, ode_t, index)
    noisy = index < s - 1  # [B, F]
    if context_noise > 0:
        t_context = torch.full_like(t, float(context_noise))
        renoised = add_noise(states[:, -1], ctx.randn(*x_t.shape).to(x_t.device, x_t.dtype), t_context)
        x_t = torch.where(noisy[:, None, :, None, None], x_t, renoised)
        t = torch.where(noisy, t, t_context)
    flow = model(x_t, t, **conditions(model, batch))  # block-causal full-sequence forward
    x0 = flow_to_x0(flow.float(), x_t.float(), t)
    loss = masked_frame_mse(x0, states[:, -1].float(), noisy)
    return StepOutput({"generator": loss}, {"t_mean": t.float().mean(), "clean_frames": 1 - noisy.float().mean()})


def check_ode_batch(batch: dict[str, torch.Tensor], stage: str) -> None:
    """The batch holds ODE pairs with at least one noisy state and the clean end; else an error naming the fix."""
    if "ode_latents" not in batch or "ode_t" not in batch:
        raise ValueError(f"{stage} needs ode_latents and ode_t in the batch (data.type=ode_pairs)")
    s = batch["ode_latents"].shape[1]
    if s < 2:
        raise ValueError(f"ode_latents holds {s} state(s); it needs at least one noisy state and the clean end")


class ODERegression(Objective):
    """Batch: ode_latents [B, S, 16, F, H, W] (the last state clean), ode_t [B, S], and the conditioning.

    One state per block and sample over every captured state, the clean end included: a block at t = 0 is the
    clean context that later blocks see at inference (CausVid / Self-Forcing); it has no loss. The causal_kd
    stage (model/causal_kd.py) is this regression with the student's timestep list checked against the pairs and
    an optional context noise; with context_noise 0 and every state a student step, the two are the same.
    """

    name = "ode_init"
    required_roles = ("generator",)
    trainable_roles = ("generator",)
    defaults: dict[str, Any] = {}

    def __init__(self, cfg: Any, roles: dict, ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        if not isinstance(roles["generator"], CausalWanModel):
            raise TypeError(f"{self.name} trains the causal student: roles.generator must be a causal preset")

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        check_ode_batch(batch, self.name)
        choices = torch.arange(batch["ode_latents"].shape[1])
        return causal_regression(self.roles["generator"], batch, self.ctx, choices)


def masked_frame_mse(pred: torch.Tensor, target: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """MSE over the frames where `frames` is true, 0 (with a graph) when none is.

    pred, target [B, C, F, H, W], frames [B, F] bool -> scalar.
    """
    mask = frames[:, None, :, None, None].to(pred.dtype).expand_as(pred)
    return ((pred - target).pow(2) * mask).sum() / mask.sum().clamp(min=1)
