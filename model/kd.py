"""KD (Luhman & Luhman 2021): the student's x0 from a point of the teacher's ODE trajectory must be the
trajectory's clean end, one timestep for the whole clip. Single-step KD starts from the trajectory's noise;
multi-step KD from the state at one of the student's sampling timesteps, drawn per sample.

The data are the ODE pairs of pipeline/ode_pairs.py (FastGen's KD samples in this repo's layout): `real` is the
clean end ode_latents[:, -1], `path` the states before it ode_latents[:, :-1] [B, P, C, F, H, W] with their exact
t ode_t[:, :-1], `noise` the first state path[:, 0] (the teacher's starting noise). The student's
`student_sample_steps` must divide P and its timestep list `t_list` must match the path's t at the states it
uses (path index j * P / student_sample_steps for step j), within `t_tolerance`: an error names both otherwise.

How this differs from ode_init / causal_kd: those are causal (a state per block, clean blocks as context, one
block-causal forward); KD gives every frame the same t and every frame a loss, so it trains any network,
bidirectional or causal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.conditions import conditions
from pipeline.rollout import DEFAULT_STEPS
from trainer.objective import Objective, StepOutput, TrainContext
from utils.scheduler import flow_to_x0

KD_DEFAULTS: dict[str, Any] = {
    "student_sample_steps": 4,  # the student's sampling steps (1: single-step KD from the trajectory's noise)
    "t_list": list(DEFAULT_STEPS),  # the student's timesteps, one per step; must match the path's t
    "t_tolerance": 15.0,  # |t_list - path t| allowed: pairs hold the teacher grid's nearest states, not exact t
}


def aligned_path_indices(
    path_t: torch.Tensor, student_sample_steps: int, t_list: list[float], tolerance: float, check: bool = True
) -> list[int]:
    """The path index of each student step, j * P / student_sample_steps, after checking (`check`) that the
    student's timesteps match the path's. The check reads path_t on the host: objectives run it on their first
    batch only, since every pair of a folder shares one solver grid (its manifest's settings).

    path_t [B, P] (the t of the path's states, float64) -> [student_sample_steps] indices into the path. Raises a
    ValueError naming the config keys and both timestep lists when they do not align.
    """
    num_states = path_t.shape[1]
    if student_sample_steps < 1 or len(t_list) != student_sample_steps:
        raise ValueError(
            f"objective.t_list has {len(t_list)} timesteps but objective.student_sample_steps={student_sample_steps}: "
            "give one timestep per student step"
        )
    if num_states % student_sample_steps:
        raise ValueError(
            f"the ODE pairs hold a path of {num_states} states, which objective.student_sample_steps="
            f"{student_sample_steps} does not divide: use a divisor of {num_states}, or regenerate the pairs with "
            "scripts/generate_ode_pairs.py --student-steps <the student's timesteps>"
        )
    stride = num_states // student_sample_steps
    indices = [j * stride for j in range(student_sample_steps)]
    used = path_t[:, indices].double()  # [B, steps]
    wanted = torch.tensor(t_list, dtype=torch.float64, device=used.device)
    mismatch = float((used - wanted).abs().max()) if check else 0.0
    if mismatch > tolerance:
        found = [round(v, 2) for v in path_t[0].double().tolist()]
        raise ValueError(
            f"objective.t_list {list(t_list)} does not align with the ODE path: its states at indices {indices} have "
            f"t {[found[i] for i in indices]} (the whole path: {found}), off by up to {mismatch:.2f} > "
            f"objective.t_tolerance={tolerance}. Set t_list to the path's timesteps, or regenerate the pairs with "
            "--student-steps set to the student's"
        )
    return indices


def kd_inputs(
    batch: dict[str, torch.Tensor], ctx: TrainContext, opts: dict[str, Any], check: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t [B, C, F, H, W], t [B] float64, real [B, C, F, H, W]): per sample one student step drawn uniformly,
    its path state and exact t, and the clean end."""
    for key in ("ode_latents", "ode_t"):
        if key not in batch:
            raise ValueError(f"kd needs batch['{key}']: ODE pairs (data.type=ode_pairs, scripts/generate_ode_pairs.py)")
    states, ode_t = batch["ode_latents"], batch["ode_t"]
    if states.shape[1] < 2:
        raise ValueError(f"ode_latents holds {states.shape[1]} state(s); KD needs a path state and the clean end")
    steps = int(opts["student_sample_steps"])
    indices = aligned_path_indices(ode_t[:, :-1], steps, [float(t) for t in opts["t_list"]], float(opts["t_tolerance"]),
                                   check)  # fmt: skip
    b = states.shape[0]
    step = (ctx.rand(b) * steps).long().clamp(max=steps - 1)  # [B]
    index = torch.tensor(indices, device=step.device)[step].to(states.device)
    rows = torch.arange(b, device=states.device)
    return states[rows, index], ode_t[rows, index], states[:, -1]


class KD(Objective):
    """Batch: ode_latents [B, S, 16, F, H, W] (the last state clean), ode_t [B, S], and the conditioning.

    loss = MSE(x0 of student(path state, its t), clean end), every frame at the sample's one t.
    """

    name = "kd"
    required_roles = ("generator",)
    trainable_roles = ("generator",)
    defaults: dict[str, Any] = dict(KD_DEFAULTS)

    def __init__(self, cfg: Any, roles: dict, ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = {**self.defaults, **dict(cfg or {})}
        self.path_checked = False  # the t_list check runs on the first batch (a host read), not every step

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        model = self.roles["generator"]
        x_t, t, real = kd_inputs(batch, self.ctx, self.opts, check=not self.path_checked)
        self.path_checked = True
        flow = model(x_t, t, **conditions(model, batch))
        x0 = flow_to_x0(flow.float(), x_t.float(), t)
        return StepOutput({"generator": F.mse_loss(x0, real.float())}, {"t_mean": t.float().mean()})
