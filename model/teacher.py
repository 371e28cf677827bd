"""Teacher training (UniAnimate-DiT's recipe): flow matching over the whole clip with the bidirectional i2v pose
model, Wan's timestep loss weight, and condition dropout so that CFG works at sampling — per sample, the pose
inputs (tokens and ref-pose map) dropped, CLIP + y dropped, and the exact unconditional branch of CFG
(negative prompt, no pose tokens, ref-pose map kept: pipeline.conditions.cfg_conditions).

The reference image and its pose come from a random frame of the clip (the world picks one per clip; a sample may
carry alternates, `ref_choices_*`, of which one is drawn per step). Full training of every parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from model.flow_matching import draw_timesteps, dropout_conditions, weighted_flow_mse
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import add_noise, flow_target
from wan.modules.causal_model import CausalWanModel

REF_CHOICE_KEYS = ("y", "clip_fea", "ref_pose")  # batch[f"ref_choices_{k}"]: [B, K, ...] alternates of batch[k]


def pick_reference(batch: dict[str, torch.Tensor], choice: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch with y, clip_fea and ref_pose replaced by alternate `choice` [B] (long) of `ref_choices_*`.

    A batch without alternates is returned unchanged.
    """
    if f"ref_choices_{REF_CHOICE_KEYS[0]}" not in batch:
        return batch
    out = dict(batch)
    rows = torch.arange(choice.shape[0], device=choice.device)
    for key in REF_CHOICE_KEYS:
        out[key] = batch[f"ref_choices_{key}"][rows, choice.to(batch[f"ref_choices_{key}"].device)]
    return out


def unconditional_rows(cond: dict, batch: dict[str, torch.Tensor], drop: torch.Tensor) -> dict:
    """Rows where drop [B] is 1 become CFG's unconditional branch: the negative prompt and no pose tokens (y with
    its ref-pose map and CLIP stay, as cfg_conditions builds it at sampling)."""
    out = dict(cond)
    keep = (1 - drop).to(cond["context"].dtype)
    out["context"] = cond["context"] * keep.view(-1, 1, 1) + batch["neg_context"].to(cond["context"].dtype) * (
        1 - keep
    ).view(-1, 1, 1)
    if cond.get("add_condition") is not None:
        out["add_condition"] = cond["add_condition"] * keep.to(cond["add_condition"].dtype).view(-1, 1, 1)
    return out


class PoseTeacherTraining(Objective):
    """Batch: latents, context, neg_context, clip_fea, y, pose, ref_pose (+ optional ref_choices_*)."""

    name = "teacher"
    required_roles = ("teacher",)
    trainable_roles = ("teacher",)
    defaults: dict[str, Any] = {
        "shift": 5.0,  # training timesteps t = 1000 * shift_sigma(u), u ~ U[0, 1), as the teacher samples
        "min_t": 0.0,
        "max_t": 1000.0,
        "training_weight": True,  # Wan's per-timestep loss weight (utils.scheduler.training_weight)
        "pose_dropout": 0.05,  # UniAnimate: pose tokens and ref-pose map zeroed
        "image_dropout": 0.1,  # UniAnimate: CLIP features and y zeroed
        "uncond_dropout": 0.1,  # CFG's unconditional branch exactly: negative prompt, no pose tokens
    }

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = {**self.defaults, **dict(cfg or {})}
        teacher = roles["teacher"]
        if isinstance(teacher, CausalWanModel) or getattr(teacher, "model_type", None) != "i2v":
            raise TypeError("the teacher stage trains a bidirectional i2v model: roles.teacher needs e.g. "
                            "world_teacher or wan_14b_i2v_pose_teacher")  # fmt: skip
        if teacher.pose_dim is None:
            raise TypeError(f"roles.teacher ({type(teacher).__name__}) has no pose encoders (pose_dim is None)")

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        for key in ("latents", "neg_context"):
            if key not in batch:
                raise ValueError(f"the teacher stage needs batch['{key}'] (data.type=latents from preprocess_data.py)")
        model = self.roles["teacher"]
        x0 = batch["latents"]
        b = x0.shape[0]
        if "ref_choices_y" in batch:
            k = batch["ref_choices_y"].shape[1]
            batch = pick_reference(batch, (self.ctx.rand(b) * k).long().clamp(max=k - 1))
        keep_pose = (self.ctx.rand(b) >= self.opts["pose_dropout"]).float()
        keep_image = (self.ctx.rand(b) >= self.opts["image_dropout"]).float()
        uncond = (self.ctx.rand(b) < self.opts["uncond_dropout"]).float()
        t = draw_timesteps(self.ctx, (b,), self.opts).to(x0.device)  # [B]
        noise = self.ctx.randn(*x0.shape).to(x0.dtype)
        cond = unconditional_rows(dropout_conditions(model, batch, keep_pose, keep_image), batch, uncond)
        x_t = add_noise(x0, noise, t)
        flow = model(x_t, t, **cond)
        loss = weighted_flow_mse(flow, flow_target(x0, noise), t, self.opts["shift"],
                                 self.opts["training_weight"])  # fmt: skip
        logs = {"t_mean": t.mean(), "pose_kept": keep_pose.mean(), "image_kept": keep_image.mean(),
                "uncond": uncond.mean()}  # fmt: skip
        return StepOutput({"teacher": loss}, logs)
