"""Step distillation (distill_wan2.1's two modes), on data latents noised to a point of the teacher's N-step
grid (utils.scheduler.solver_grid, the official shifted grid with the clean end 0), for t2v and i2v networks:

- half (progressive distillation): one student Euler step from t_i to t_{i+2} must land where two teacher Euler
  steps (t_i -> t_{i+1} -> t_{i+2}) land, at the same noise level t_{i+2} (the reference compares different
  levels; this does not). The student regresses the flow whose single step lands there,
  (x_{i+2} - x_i) / (sigma_{i+2} - sigma_i). The distilled network samples with Euler on the N/2-step grid
  (every other point of the N-step grid): `solver: euler`, `num_steps: N/2`.
- consistency: the student's x0 at (x_i, t_i) must equal an EMA target's x0 at the state k teacher Euler steps
  later, (x_{i+k}, t_{i+k}); at t = 0 the target's x0 is that state itself (x0 = x_t - sigma * flow). The EMA
  target is the trainer's EMA of the generator (roles.generator.ema_decay), swapped into the generator for one
  no-grad forward. The distilled network samples few-step (x0, re-noise): `solver: few_step` (bidirectional) or
  the student's block stream (causal).

The teacher's flow is cfg_flow at `guidance` (two forwards; one for a CFG-distilled teacher). The student runs
one forward: with a guidance embedding it gets w = `guidance` as input, without one it learns the guided flow
itself and samples at guidance 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.conditions import Conditions, cfg_conditions, conditions
from pipeline.rollout import cfg_flow, guidance_input
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import add_noise, euler_flow, euler_step, flow_to_x0, solver_grid

MODES = ("half", "consistency")


def teacher_euler(
    flow_fn, x: torch.Tensor, grid_t: torch.Tensor, start: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """`num_steps` Euler steps of the flow ODE from x at grid_t[start] (per sample) along the grid.

    flow_fn(x, t [B]) -> flow; x [B, C, F, H, W]; grid_t [N + 1] float64; start [B] long -> x at grid_t[start + k].
    """
    for k in range(num_steps):
        t, t_next = grid_t[start + k], grid_t[start + k + 1]  # [B] float64
        x = euler_step(x, flow_fn(x, t), t, t_next)
    return x


class StepDistillation(Objective):
    """Generator (the student, usually initialised from the teacher) and the frozen teacher.

    Batch: latents, context (+ neg_context when guidance != 1), and the conditioning (t2v: context only; i2v:
    clip_fea, y; pose models: pose, ref_pose).
    """

    name = "step_distill"
    required_roles = ("generator", "teacher")
    trainable_roles = ("generator",)
    defaults: dict[str, Any] = {
        "distill_mode": "half",  # half or consistency (module docstring)
        "teacher_steps": 50,  # N: the teacher's Euler grid; half mode: the student samples N/2 steps
        "shift": 5.0,  # the grid's shift (utils.scheduler.unipc_grid), as the teacher samples
        "guidance": 1.0,  # the teacher's CFG u + w (c - u); the student learns the guided flow
        "consistency_k": 1,  # consistency: teacher steps between the student's point and the target's
    }

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = o = {**self.defaults, **dict(cfg or {})}
        self.mode, n, k = str(o["distill_mode"]), int(o["teacher_steps"]), int(o["consistency_k"])
        if self.mode not in MODES:
            raise ValueError(f"objective.distill_mode={self.mode!r}: expected one of {MODES}")
        if self.mode == "half" and (n < 2 or n % 2):
            raise ValueError(f"objective.teacher_steps={n}: half mode needs an even number (the student takes N/2)")
        if self.mode == "consistency":
            if not 1 <= k <= n:
                raise ValueError(f"objective.consistency_k={k} must be in [1, teacher_steps={n}]")
            if "generator" not in ctx.emas:
                raise ValueError("distill_mode=consistency needs the EMA target: set roles.generator.ema_decay "
                                 "(e.g. 0.95)")  # fmt: skip
        self.grid = solver_grid(n, float(o["shift"]))  # [N + 1] float64, the last 0

    def teacher_flow(self, cond: Conditions, uncond: Conditions | None):
        teacher, w = self.roles["teacher"], float(self.opts["guidance"])
        return lambda x, t: cfg_flow(teacher, x, t, cond, uncond, w)

    def student_flow(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """One forward of the generator (w as input when it is CFG-distilled), fp32."""
        generator = self.roles["generator"]
        w = guidance_input(generator, float(self.opts["guidance"]), x.shape[0], x.device)
        return generator(x, t, **cond, **w).float()

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        if "latents" not in batch:
            raise ValueError("step_distill needs batch['latents'] (data.type=latents from preprocess_data.py)")
        generator = self.roles["generator"]
        x0 = batch["latents"]
        b, n = x0.shape[0], int(self.opts["teacher_steps"])
        hop = 2 if self.mode == "half" else int(self.opts["consistency_k"])
        # per sample a grid point from which `hop` teacher steps stay on the grid: [0, N - hop], in half mode the
        # student's own grid points (even indices)
        points = n // 2 if self.mode == "half" else n - hop + 1
        start = (self.ctx.rand(b) * points).long().clamp(max=points - 1) * (2 if self.mode == "half" else 1)
        grid = self.grid.to(x0.device)
        t, t_end = grid[start.to(x0.device)], grid[(start + hop).to(x0.device)]  # [B] float64
        x_t = add_noise(x0, self.ctx.randn(*x0.shape).to(x0.dtype), t)
        with torch.no_grad():
            teacher_cond, teacher_uncond = cfg_conditions(self.roles["teacher"], batch, float(self.opts["guidance"]))
            x_end = teacher_euler(self.teacher_flow(teacher_cond, teacher_uncond), x_t.float(), grid,
                                  start.to(x0.device), hop)  # fmt: skip
        logs = {"t_mean": t.float().mean(), "t_end_mean": t_end.float().mean()}
        if self.mode == "half":
            target = euler_flow(x_t.float(), x_end, t, t_end)  # one student step lands on the teacher's two
            loss = F.mse_loss(self.student_flow(x_t, t, conditions(generator, batch)), target)
            return StepOutput({"generator": loss}, logs)
        # the EMA target's forward (its own pose tokens included) comes before any forward with gradient: the swap
        # writes the generator's weights in place
        with torch.no_grad(), self.ctx.emas["generator"].swapped_in(generator):
            target_flow = self.student_flow(x_end, t_end, conditions(generator, batch))
            target_x0 = flow_to_x0(target_flow, x_end, t_end)  # at t_end = 0: x_end itself
        x0_pred = flow_to_x0(self.student_flow(x_t, t, conditions(generator, batch)), x_t.float(), t)
        return StepOutput({"generator": F.mse_loss(x0_pred, target_x0)}, logs)
