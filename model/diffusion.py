"""Pose finetune: flow matching on data latents for the causal student, with teacher forcing (each block is
denoised given the clean cached K/V of the ground-truth blocks before it) and UniAnimate's condition dropout.
Also the flow-matching pieces the distillation objectives share (timestep draw, the loss)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.conditions import Conditions, conditions
from pipeline.rollout import Block, block_rollout
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import NUM_TRAIN_TIMESTEPS, add_noise, flow_target, shift_sigma, training_weight
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel


def timesteps_from_uniform(u: torch.Tensor, shift: float, min_t: float, max_t: float) -> torch.Tensor:
    """t = 1000 * shift_sigma(u), clamped to [min_t, max_t] (utils.scheduler.sample_timesteps from given u)."""
    return (NUM_TRAIN_TIMESTEPS * shift_sigma(u.double(), shift)).clamp(min_t, max_t).float()


def draw_timesteps(ctx: TrainContext, shape: tuple[int, ...], opts: dict[str, Any]) -> torch.Tensor:
    """Per-sample training timesteps of `shape` ([B] or [B, blocks]) from the objective's shift/min_t/max_t."""
    return timesteps_from_uniform(ctx.rand(*shape), opts["shift"], opts["min_t"], opts["max_t"])


def flow_matching_loss(
    model: WanModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditions
) -> torch.Tensor:
    """MSE between model(x_t, t) and the flow eps - x0. x0, noise [B, C, F, H, W], t [B] or [B, F]."""
    x_t = add_noise(x0, noise, t)
    return F.mse_loss(model(x_t, t, **cond).float(), flow_target(x0, noise).float())


def weighted_flow_mse(
    flow: torch.Tensor, target: torch.Tensor, t: torch.Tensor, shift: float, weighted: bool
) -> torch.Tensor:
    """MSE of the flow, each frame's squared error times training_weight(t) of its timestep when `weighted`.

    flow, target [B, C, F, H, W], t [B] or [B, F] -> scalar.
    """
    err = (flow.float() - target.float()).pow(2)
    if not weighted:
        return err.mean()
    w = training_weight(t, shift)
    w = w.view(-1, 1, 1, 1, 1) if w.dim() == 1 else w[:, None, :, None, None]  # [B, 1, F or 1, 1, 1]
    return (err * w).mean()


def dropout_conditions(
    model: WanModel, batch: dict[str, torch.Tensor], keep_pose: torch.Tensor, keep_image: torch.Tensor
) -> Conditions:
    """conditions(model, batch) with UniAnimate's per-sample dropout: keep_pose [B] (0 zeroes the pose tokens and
    the ref-pose map), keep_image [B] (0 zeroes CLIP and y). The embeddings are zeroed, not the pose pixels."""
    cond = conditions(model, batch, use_pose=False)
    tokens, ref_map = model.encode_pose(batch["pose"], batch.get("ref_pose"))
    cond = cond.replace(pose_tokens=tokens * keep_pose.to(tokens.dtype).view(-1, 1, 1))  # [B, F*h*w, dim]
    if cond.y is not None:
        y = cond.y * keep_image.to(cond.y.dtype).view(-1, 1, 1, 1, 1)
        if ref_map is not None:
            y = y + (ref_map * keep_pose.to(ref_map.dtype).view(-1, 1, 1, 1, 1)).to(y.dtype)
        cond = cond.replace(clip_fea=cond.clip_fea * keep_image.to(cond.clip_fea.dtype).view(-1, 1, 1), y=y)
    return cond


def teacher_forcing_flow(
    model: CausalWanModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clean: torch.Tensor,
    cond: Conditions,
    cache_dtype: torch.dtype,
) -> torch.Tensor:
    """The flow of each noisy block given the clean blocks before it: block_rollout with a policy whose block is
    one forward (with gradient, cache read detached) on x_t's block and whose clean context is the data's.

    The clean-context pass carries no gradient (the cache is a constant to each block's loss), unlike one
    block-causal forward over [clean, noisy], which would also train the keys/values of the clean frames; in a
    tiny CPU toy the two gradients differed by 0.6%. It keeps memory per block flat and matches inference,
    where the cache is written by a no-grad clean pass too.

    x_t, clean [B, C, F, H, W], t [B, F] -> flow [B, C, F, H, W].
    """

    def forced(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        frames = block.frames
        return block.flow(x_t[:, :, frames], t[:, frames]), clean[:, :, frames]

    _, _, num_frames, height, width = x_t.shape
    blocks = block_rollout(model, cond, num_frames, (height, width), forced, cache_dtype=cache_dtype)
    return torch.cat([flow for _, flow in blocks], dim=2)


class PoseFinetune(Objective):
    """Flow matching on data latents with teacher forcing; one t per block and sample.

    Batch: latents, context, clip_fea, y, pose, ref_pose (optional).
    """

    name = "pose_finetune"
    required_roles = ("generator",)
    trainable_roles = ("generator",)
    defaults = {
        "shift": 5.0,  # training timesteps t = 1000 * shift_sigma(u), u ~ U[0, 1)
        "min_t": 0.0,
        "max_t": 1000.0,
        "pose_dropout": 0.05,  # UniAnimate: both pose inputs zeroed
        "image_dropout": 0.1,  # UniAnimate: CLIP features and y zeroed
        "training_weight": True,  # Wan's per-timestep loss weight (utils.scheduler.training_weight), as UniAnimate
    }

    def __init__(self, cfg: Any, roles: dict, ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = {**self.defaults, **dict(cfg or {})}
        generator = roles["generator"]
        if not isinstance(generator, CausalWanModel) or generator.pose_dim is None:
            raise TypeError("pose_finetune trains the causal pose student: roles.generator needs a causal pose preset")

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        if "latents" not in batch:
            raise ValueError("pose_finetune trains on data: the batch needs 'latents' (data.type=latents)")
        model = self.roles["generator"]
        x0 = batch["latents"]
        b, _, num_frames = x0.shape[:3]
        n = model.num_frame_per_block
        blocks = -(-num_frames // n)
        keep_pose = (self.ctx.rand(b) >= self.opts["pose_dropout"]).float()
        keep_image = (self.ctx.rand(b) >= self.opts["image_dropout"]).float()
        t = draw_timesteps(self.ctx, (b, blocks), self.opts).repeat_interleave(n, dim=1)[:, :num_frames]  # [B, F]
        noise = self.ctx.randn(*x0.shape).to(x0.dtype)
        cond = dropout_conditions(model, batch, keep_pose, keep_image)
        x_t = add_noise(x0, noise, t)
        flow = teacher_forcing_flow(model, x_t, t, x0, cond, self.ctx.dtype)
        loss = weighted_flow_mse(flow, flow_target(x0, noise), t, self.opts["shift"], self.opts["training_weight"])
        logs = {"t_mean": t.mean(), "pose_kept": keep_pose.mean(), "image_kept": keep_image.mean()}
        return StepOutput({"generator": loss}, logs)
