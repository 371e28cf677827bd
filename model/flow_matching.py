"""Flow-matching pieces the objectives share: training timesteps from the per-sample RNG streams, the
flow-matching losses (optionally with Wan's per-timestep weight) and UniAnimate's condition dropout."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.conditions import Conditions, conditions
from trainer.objective import TrainContext
from utils.scheduler import NUM_TRAIN_TIMESTEPS, add_noise, flow_target, shift_sigma, training_weight
from wan.modules.model import WanModel


def timesteps_from_uniform(u: torch.Tensor, shift: float, min_t: float, max_t: float) -> torch.Tensor:
    """t = 1000 * shift_sigma(u), clamped to [min_t, max_t]: u ~ U[0, 1) gives the shifted training timesteps."""
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
