"""Network presets (official Wan2.1 sizes, the causal pose student, and a tiny one for CPU tests) and
`build_model`, the one way code in this repo makes a network from a preset name or a config dict."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from wan.loading import PoseWeightsLoader
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel

_WAN_SHARED = dict(
    patch_size=(1, 2, 2), text_len=512, freq_dim=256, text_dim=4096, out_dim=16, eps=1e-6,
    qk_norm=True, cross_attn_norm=True, clip_dim=1280, pose_dim=None,
)  # fmt: skip
_WAN_1_3B = dict(_WAN_SHARED, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_WAN_14B = dict(_WAN_SHARED, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_I2V = dict(model_type="i2v", in_dim=36)
_T2V = dict(model_type="t2v", in_dim=16)
_CAUSAL = dict(num_frame_per_block=3, local_attn_size=-1, sink_size=0)
UNIANIMATE_POSE_DIM = 5120  # the released pose encoders end in 5120 channels (the 14B width)

# arch: "bidirectional" -> WanModel, "causal" -> CausalWanModel; everything else is constructor kwargs.
PRESETS: dict[str, dict[str, Any]] = {
    "wan_1.3b_t2v": dict(arch="bidirectional", **_WAN_1_3B, **_T2V),
    "wan_14b_t2v": dict(arch="bidirectional", **_WAN_14B, **_T2V),
    "wan_14b_i2v": dict(arch="bidirectional", **_WAN_14B, **_I2V),
    # The distillation teacher: I2V-14B + merged UniAnimate LoRA + its pose encoders (pose_dim == dim: no proj).
    "wan_14b_i2v_pose_teacher": dict(arch="bidirectional", **_WAN_14B, **_I2V) | {"pose_dim": UNIANIMATE_POSE_DIM},
    # The student: causal 1.3B with i2v inputs (y, CLIP) and pose_proj 5120 -> 1536.
    "wan_1.3b_causal_pose": dict(arch="causal", **_WAN_1_3B, **_I2V, **_CAUSAL) | {"pose_dim": UNIANIMATE_POSE_DIM},
    "wan_1.3b_causal_t2v": dict(arch="causal", **_WAN_1_3B, **_T2V, **_CAUSAL),
    # The DMD critic (fake score): bidirectional 1.3B with the student's inputs, initialised from the base model.
    "wan_1.3b_pose_critic": dict(arch="bidirectional", **_WAN_1_3B, **_I2V) | {"pose_dim": UNIANIMATE_POSE_DIM},
    # CPU tests: every code path of the real student (i2v, CLIP branch, pose_proj, causal blocks), tiny sizes.
    "tiny": dict(
        arch="causal",
        model_type="i2v",
        patch_size=(1, 2, 2),
        text_len=16,
        in_dim=36,
        dim=32,
        ffn_dim=64,
        freq_dim=32,
        text_dim=24,
        out_dim=16,
        num_heads=2,
        num_layers=2,
        eps=1e-6,
        qk_norm=True,
        cross_attn_norm=True,
        clip_dim=40,
        pose_dim=48,
        num_frame_per_block=3,
        local_attn_size=-1,
        sink_size=0,
    ),  # fmt: skip
}
# The synthetic pose world (utils/world/synthetic_pose.py: 128x128, 81 frames -> latents [16, 21, 16, 16] through the
# toy VAE, 64 tokens per latent frame). Text and CLIP widths are those of assets/world_encoders.
_WORLD = dict(
    patch_size=(1, 2, 2), text_len=32, freq_dim=256, text_dim=64, out_dim=16, eps=1e-6, qk_norm=True,
    cross_attn_norm=True, clip_dim=64, **_I2V,
)  # fmt: skip
# Teacher: bidirectional i2v pose model, pose_dim == dim like the 14B teacher (7.1M params, 14 MB in fp16).
PRESETS["world_teacher"] = dict(arch="bidirectional", **_WORLD, dim=256, ffn_dim=768, num_heads=4, num_layers=6,
                                pose_dim=256)  # fmt: skip
# Student: causal, smaller, pose encoders of the teacher's width + pose_proj 256 -> 192 (4.1M params, 8 MB).
PRESETS["world_student"] = dict(arch="causal", **_WORLD, dim=192, ffn_dim=576, num_heads=3, num_layers=6,
                                pose_dim=256, **_CAUSAL)  # fmt: skip
# DMD critic (fake score): the student's network, bidirectional.
PRESETS["world_critic"] = {k: v for k, v in PRESETS["world_student"].items() if k not in _CAUSAL} | {
    "arch": "bidirectional"
}
PRESETS["tiny_bidirectional"] = {k: v for k, v in PRESETS["tiny"].items() if k not in _CAUSAL} | {
    "arch": "bidirectional"
}
PRESETS["tiny_teacher"] = PRESETS["tiny_bidirectional"] | {"pose_dim": PRESETS["tiny"]["dim"]}


def get_config(name: str) -> dict[str, Any]:
    """A copy of a preset, e.g. get_config('wan_1.3b_causal_pose')."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def build_model(
    config: str | dict[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pose_weights_path: str | os.PathLike | None = None,
    **overrides: Any,
) -> WanModel:
    """Make a WanModel or CausalWanModel from a preset name or config dict (+ keyword overrides).

    device="meta" builds the structure without memory (state_dict keys and shapes of the 14B models).
    pose_weights_path: the pose encoders' weights (e.g. UniAnimate's checkpoint), read at the first encode_pose.
    """
    cfg = get_config(config) if isinstance(config, str) else copy.deepcopy(dict(config))
    cfg.update(overrides)
    arch = cfg.pop("arch", "causal" if "num_frame_per_block" in cfg else "bidirectional")
    if arch == "causal":
        cls = CausalWanModel
    elif arch == "bidirectional":
        cls = WanModel
        extra = sorted(k for k in _CAUSAL if k in cfg)
        if extra:
            raise ValueError(f"{extra} are causal-model options; set arch='causal' or drop them")
    else:
        raise ValueError(f"arch={arch!r}: expected 'causal' or 'bidirectional'")
    cfg["patch_size"] = tuple(cfg.get("patch_size", (1, 2, 2)))
    loader = None if pose_weights_path is None else PoseWeightsLoader(pose_weights_path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)  # built in its dtype: a 14B model never exists in fp32 first
    try:
        with torch.device(device or "cpu"):
            model = cls(**cfg, pose_loader=loader)
    finally:
        torch.set_default_dtype(previous)
    return model


def model_config(model: WanModel) -> dict[str, Any]:
    """The constructor config of a built model (saved beside weights so a checkpoint rebuilds its network)."""
    keys = (
        "model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
        "num_heads", "num_layers", "eps", "qk_norm", "cross_attn_norm", "pose_dim", "clip_dim",
    )  # fmt: skip
    cfg: dict[str, Any] = {k: getattr(model, k) for k in keys}
    cfg["patch_size"] = list(cfg["patch_size"])
    if model.guidance_embed:  # only when set: configs saved before CFG distillation existed stay as they were
        cfg["guidance_embed"] = True
    if isinstance(model, CausalWanModel):
        cfg.update(arch="causal", num_frame_per_block=model.num_frame_per_block,
                   local_attn_size=model.local_attn_size, sink_size=model.sink_size)  # fmt: skip
    else:
        cfg["arch"] = "bidirectional"
    return cfg
