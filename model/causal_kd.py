"""CausalKD (Yin et al. 2024, CausVid; FastGen's CausalKD): KD for the causal student on ODE pairs with
inhomogeneous timesteps: per block and sample one of the student's sampling steps or the clean end (the cached
context), one block-causal forward, MSE of the x0 prediction to the clean end over the noisy blocks.

It is the ODE-init regression (model/ode_regression.causal_regression, shared) with two differences:
- the states it uses are the student's sampling steps (`student_sample_steps`, `t_list`), checked against the
  pairs' timesteps as KD checks them (model/kd.aligned_path_indices); ode_init takes every stored state unchecked;
- `context_noise`: clean-context blocks enter at t = context_noise, the clean end re-noised with fresh noise, to
  match a sampler that writes its cache at that level (pipeline.rollout's context_t). 0 (the default) is the clean
  context of inference; then, with a student step for every stored state, causal_kd equals ode_init.
Stage 2 of the 3-stage pipeline (ODE pairs -> CausalKD -> Self-Forcing): scripts/causal_kd_pipeline.py.
"""

from __future__ import annotations

from typing import Any

import torch

from model.kd import KD_DEFAULTS, aligned_path_indices
from model.ode_regression import ODERegression, causal_regression, check_ode_batch
from trainer.objective import StepOutput, TrainContext


class CausalKD(ODERegression):
    """Batch: ode_latents [B, S, 16, F, H, W] (the last state clean), ode_t [B, S], and the conditioning."""

    name = "causal_kd"
    defaults: dict[str, Any] = {
        **KD_DEFAULTS,
        "context_noise": 0.0,  # t of the clean-context blocks (the cached context); 0: clean, as inference writes it
    }

    def __init__(self, cfg: Any, roles: dict, ctx: TrainContext):
        super().__init__(cfg, roles, ctx)
        self.opts = {**self.defaults, **dict(cfg or {})}
        if not 0.0 <= float(self.opts["context_noise"]) < 1000.0:
            raise ValueError(f"objective.context_noise={self.opts['context_noise']} must be in [0, 1000)")
        self.path_checked = False  # as KD: the t_list check on the first batch only

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        check_ode_batch(batch, self.name)
        o = self.opts
        steps = [float(t) for t in o["t_list"]]
        path_t = batch["ode_t"][:, :-1]
        indices = aligned_path_indices(path_t, int(o["student_sample_steps"]), steps, float(o["t_tolerance"]),
                                       check=not self.path_checked)  # fmt: skip
        self.path_checked = True
        choices = torch.tensor([*indices, path_t.shape[1]])  # the student's steps, then the clean end (context)
        return causal_regression(self.roles["generator"], batch, self.ctx, choices, float(o["context_noise"]))
