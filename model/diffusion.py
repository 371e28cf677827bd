"""The names this module held before it was split into model/flow_matching.py (the shared flow-matching pieces)
and model/pose_finetune.py (the pose_finetune objective), kept for code written against them; import from
those two modules instead."""

from model.flow_matching import (  # noqa: F401
    draw_timesteps,
    dropout_conditions,
    flow_matching_loss,
    timesteps_from_uniform,
    weighted_flow_mse,
)
from model.pose_finetune import PoseFinetune, teacher_forcing_flow  # noqa: F401
