"""Build the networks a stage needs (generator, teacher, critic, discriminator) from the config: preset,
weights, trainable or frozen, and FSDP2 sharding per block when distributed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.config import ConfigError
from utils.dist import DistInfo
from wan.checkpoint import load_pose_weights, load_weights
from wan.configs import build_model
from wan.modules.model import WanModel

log = logging.getLogger(__name__)
POSE_MODULES = ("dwpose_embedding", "randomref_embedding_pose", "pose_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parallel_mode(cfg: Any, dist: DistInfo) -> str:
    """'none' in one process; else fsdp (FSDP2, the default on CUDA and CPU/gloo alike) or ddp (replicated
    networks, gradients averaged after backward)."""
    if dist.world_size == 1 or cfg.train.distributed == "none":
        return "none"
    if cfg.train.distributed == "auto":
        return "fsdp"
    if cfg.train.distributed not in ("fsdp", "ddp"):
        raise ConfigError(f"train.distributed={cfg.train.distributed!r}: expected auto, fsdp, ddp or none")
    return cfg.train.distributed


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters kept whole on every rank under FSDP2: the pose encoders, which run outside forward()
    (encode_pose once per clip, with pose_proj folded into the last conv)."""
    return [p for name in POSE_MODULES if hasattr(model, name) for p in getattr(model, name).parameters()]


def shard_fsdp2(model: WanModel, bf16: bool) -> WanModel:
    """fully_shard each block, then the root; bf16 compute with fp32 gradient reduction when bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: the blocks take the fp32 residual stream and float64 RoPE tables as inputs and
    # cast at each matmul themselves; FSDP2's default would round both to bf16.
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        cast_forward_inputs=False,
    )
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(replicated_params(model)))
    return model


def build_role(name: str, role_cfg: Any, cfg: Any, dist: DistInfo, trainable: bool) -> WanModel:
    if role_cfg.preset is None:
        raise ConfigError(
            f"stage {cfg.stage!r} needs roles.{name}.preset (set it in configs/model/{cfg.model}.yaml or on the "
            f"command line, e.g. roles.{name}.preset=tiny)"
        )
    mode = parallel_mode(cfg, dist)
    bf16 = cfg.train.dtype == "bf16"
    if cfg.train.dtype not in DTYPES:
        raise ConfigError(f"train.dtype={cfg.train.dtype!r}: expected one of {sorted(DTYPES)}")
    # FSDP2 keeps fp32 master shards and computes in bf16; elsewhere the params are the compute dtype.
    param_dtype = torch.float32 if (mode == "fsdp" or not bf16) else torch.bfloat16
    model = build_model(role_cfg.preset, device=dist.device, dtype=param_dtype)
    pose_missing = model.pose_dim is not None
    if role_cfg.weights is not None:
        if not Path(role_cfg.weights).exists():
            raise FileNotFoundError(
                f"roles.{name}.weights={role_cfg.weights} does not exist: fix the path (download_models.py fetches "
                "the official checkpoints; scripts/merge_lora.py builds the pose teacher)"
            )
        report = load_weights(model, role_cfg.weights, allow_fresh=list(role_cfg.allow_fresh), ema=role_cfg.weights_ema)
        pose_missing = any(k.startswith(("dwpose_embedding.", "randomref_embedding_pose.")) for k in report.fresh_init)
    else:
        log.warning("roles.%s (%s) starts from its random init: roles.%s.weights is null", name, role_cfg.preset, name)
    # pose_weights_path fills pose encoders the checkpoint lacks (never overwrites trained ones); loaded now,
    # before any sharding, since training always uses pose.
    if role_cfg.pose_weights_path is not None and pose_missing:
        load_pose_weights(model, role_cfg.pose_weights_path)
    model.requires_grad_(trainable).train(trainable)
    # Every role: frozen ones too, since some objectives (SiD) backpropagate through the teacher and critic.
    model.gradient_checkpointing = bool(cfg.train.gradient_checkpointing)
    if mode == "fsdp":
        shard_fsdp2(model, bf16)
    return model
