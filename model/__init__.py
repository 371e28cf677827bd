"""Training objectives, one file each; REGISTRY maps a config's `stage:` to its class."""

from __future__ import annotations

from model.causal_kd import CausalKD
from model.cfg_distill import CFGDistillation
from model.dmd import DMD, SelfForcing
from model.draft import DRaFT
from model.gan import SelfForcingGAN
from model.kd import KD
from model.ode_regression import ODERegression
from model.pose_finetune import PoseFinetune
from model.sid import SiD
from model.step_distill import StepDistillation
from model.teacher import PoseTeacherTraining
from trainer.objective import Objective

REGISTRY: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        ODERegression, PoseFinetune, DMD, SiD, SelfForcing, SelfForcingGAN, PoseTeacherTraining, KD, CausalKD,
        CFGDistillation, StepDistillation, DRaFT,
    )
}  # fmt: skip


def objective_registry() -> dict[str, type[Objective]]:
    """A copy of REGISTRY: what train.py hands the trainer (which never imports the objectives itself)."""
    return dict(REGISTRY)
