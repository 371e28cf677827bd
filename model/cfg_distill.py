"""CFG distillation: a network with the guidance scale w as an input (guidance_embed: sinusoid(w * 1000) -> MLP
added to the time embedding, zero-initialised so it starts as its base) learns the teacher's guided flow
u + w (c - u) in one forward, w drawn per sample. Sampling then costs one forward per step instead of two
(pipeline.rollout.cfg_flow takes that path for any guided network). For the teacher (2x fewer NFE), and for a
causal student alike (CausalWanModel shares the embedding; the stream then guides at no extra cost)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.flow_matching import draw_timesteps
from pipeline.conditions import conditions
from pipeline.rollout import guided_flow, is_guided, stack_branches
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import add_noise


class CFGDistillation(Objective):
    """Generator (guided, trainable, usually initialised from the teacher) and the frozen CFG teacher.

    Batch: latents, context, neg_context, and the conditioning (clip_fea, y, pose, ref_pose for pose models).
    loss = MSE(generator(x_t, t, w), u + w (c - u)) with c, u the teacher's conditional and unconditional flows
    (Conditions.unconditional: negative prompt, no pose tokens), x_t the data latents noised to t.
    """

    name = "cfg_distill"
    required_roles = ("generator", "teacher")
    trainable_roles = ("generator",)
    defaults: dict[str, Any] = {
        "guidance_min": 1.0,  # w ~ U[guidance_min, guidance_max] per sample; sample within this range later
        "guidance_max": 3.0,
        "shift": 5.0,  # training timesteps t = 1000 * shift_sigma(u), u ~ U[0, 1), as the teacher was trained
        "min_t": 0.0,
        "max_t": 1000.0,
    }

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = {**self.defaults, **dict(cfg or {})}
        if not is_guided(roles["generator"]):
            raise TypeError("cfg_distill trains a network with the guidance scale as an input: set "
                            "roles.generator.guidance_embed=true")  # fmt: skip
        if is_guided(roles["teacher"]):
            raise TypeError("cfg_distill's teacher must guide with two forwards (u + w (c - u)); roles.teacher is "
                            "CFG-distilled already (guidance_embed): use the CFG teacher")  # fmt: skip
        if not 0.0 <= float(self.opts["guidance_min"]) <= float(self.opts["guidance_max"]):
            raise ValueError(f"objective.guidance_min={self.opts['guidance_min']} and guidance_max="
                             f"{self.opts['guidance_max']} must satisfy 0 <= min <= max")  # fmt: skip

    def draw_guidance(self, batch_size: int) -> torch.Tensor:
        """w [B] ~ U[guidance_min, guidance_max] from the per-sample streams."""
        lo, hi = float(self.opts["guidance_min"]), float(self.opts["guidance_max"])
        return lo + (hi - lo) * self.ctx.rand(batch_size)

    @torch.no_grad()
    def teacher_target(self, x_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor, batch: dict) -> torch.Tensor:
        """u + w (c - u) of the teacher, fp32 [B, C, F, H, W]; w [B]."""
        teacher = self.roles["teacher"]
        cond = conditions(teacher, batch)
        uncond = cond.unconditional(batch["neg_context"])
        # both branches in one batch-2B forward, as cfg_flow does (w is per sample here, so not cfg_flow itself)
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), **stack_branches(cond, uncond))
        return guided_flow(*both.chunk(2), w)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        for key in ("latents", "neg_context"):
            if key not in batch:
                raise ValueError(f"cfg_distill needs batch['{key}'] (data.type=latents from preprocess_data.py)")
        generator = self.roles["generator"]
        x0 = batch["latents"]
        b = x0.shape[0]
        w = self.draw_guidance(b).to(x0.device)
        t = draw_timesteps(self.ctx, (b,), self.opts).to(x0.device)  # [B]
        x_t = add_noise(x0, self.ctx.randn(*x0.shape).to(x0.dtype), t)
        target = self.teacher_target(x_t, t, w, batch)
        flow = generator(x_t, t, **conditions(generator, batch), guidance=w)
        return StepOutput({"generator": F.mse_loss(flow.float(), target)}, {"t_mean": t.mean(), "w_mean": w.mean()})
