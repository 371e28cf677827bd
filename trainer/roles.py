"""Build the networks a stage needs (generator, teacher, critic, discriminator) from the config: preset,
weights, trainable or frozen, and FSDP2 sharding per block when distributed."""

from __future__ import annotations

import logging
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.config import DTYPES, ConfigError
from utils.dist import DistInfo
from utils.lora import lora_scale
from wan.checkpoint import load_pose_weights, load_weights
from wan.configs import build_model
from wan.modules.model import WanModel
from wan.modules.sequence_parallel import SequenceParallel

log = logging.getLogger(__name__)
POSE_MODULES = ("dwpose_embedding", "randomref_embedding_pose", "pose_proj")
TRAIN_DTYPES = ("fp32", "bf16")  # fp16 would need loss scaling, which the trainer does not do


def parallel_mode(cfg: Any, dist: DistInfo) -> str:
    """'none' (one process, fp32), 'fsdp' (FSDP2: the default with torchrun, and bf16 training in one process
    too, over a process group of one) or 'ddp' (replicated fp32 networks, gradients averaged after backward).

    bf16 training always goes through FSDP2, which keeps fp32 master weights and computes in bf16: AdamW's
    updates at distillation learning rates (1e-6 and below) are smaller than half a bf16 ulp of most weights,
    so bf16 parameters would drop most of them (and a bf16 EMA would stall).
    """
    if cfg.train.distributed not in ("auto", "fsdp", "ddp", "none"):
        raise ConfigError(f"train.distributed={cfg.train.distributed!r}: expected auto, fsdp, ddp or none")
    bf16 = cfg.train.dtype == "bf16"
    if bf16 and cfg.train.distributed in ("ddp", "none"):
        raise ConfigError(
            f"train.dtype=bf16 with train.distributed={cfg.train.distributed}: bf16 trains through FSDP2 (fp32 "
            "master weights, bf16 compute), since bf16 parameters lose most AdamW updates. Set "
            "train.distributed=auto (or fsdp), or train.dtype=fp32"
        )
    if dist.world_size == 1 and not bf16:
        return "none"
    if cfg.train.distributed == "auto":
        return "fsdp"
    return cfg.train.distributed


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters kept whole on every rank under FSDP2: the pose encoders, which run outside forward()
    (encode_pose once per clip, with pose_proj folded into the last conv)."""
    return [p for name in POSE_MODULES if hasattr(model, name) for p in getattr(model, name).parameters()]


def forward_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters used inside forward() (all but the pose encoders). Under sequence parallelism each
    rank holds its own tokens' share of their gradient; the pose encoders' gradient is whole on every rank."""
    replicated = {id(p) for p in replicated_params(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in replicated]


def shard_fsdp2(model: WanModel, bf16: bool) -> WanModel:
    """fully_shard each block, then the root; bf16 compute with fp32 gradient reduction when bf16 (frozen roles
    are stored in bf16 already and are not cast)."""
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
    if bf16 and model.pose_dim is not None:
        model.pose_compute_dtype = torch.bfloat16  # the ignored pose encoders: bf16 compute like the blocks
    return model


def role_param_dtype(cfg: Any, trainable: bool) -> torch.dtype:
    """Trainable roles keep fp32 master weights (FSDP2 casts them to bf16 for compute under train.dtype=bf16);
    frozen roles are stored in the compute dtype, since no optimizer updates them."""
    if cfg.train.dtype not in TRAIN_DTYPES:
        raise ConfigError(f"train.dtype={cfg.train.dtype!r}: expected one of {list(TRAIN_DTYPES)}")
    return torch.float32 if trainable else DTYPES[cfg.train.dtype]


def build_role(name: str, role_cfg: Any, cfg: Any, dist: DistInfo, trainable: bool, sp_group: Any = None) -> WanModel:
    """The role's network: preset, weights, pose weights, trainable or frozen, FSDP2 when distributed, and
    sequence parallelism over sp_group (a ProcessGroup; None: off)."""
    if role_cfg.preset is None:
        raise ConfigError(
            f"stage {cfg.stage!r} needs roles.{name}.preset (set it in configs/model/{cfg.model}.yaml or on the "
            f"command line, e.g. roles.{name}.preset=tiny)"
        )
    mode = parallel_mode(cfg, dist)
    param_dtype = role_param_dtype(cfg, trainable)
    guided = {"guidance_embed": True} if role_cfg.guidance_embed else {}  # CFG distillation's w input
    model = build_model(role_cfg.preset, device=dist.device, dtype=param_dtype, **guided)
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
    if role_cfg.lora.rank:
        if not trainable:
            raise ConfigError(
                f"roles.{name}.lora.rank={role_cfg.lora.rank}: stage {cfg.stage!r} keeps roles.{name} frozen, so it "
                f"trains no adapter; set roles.{name}.lora.rank=0"
            )
        attach_lora(model, role_cfg.lora, name)
    # Every role: frozen ones too, since some objectives (SiD) backpropagate through the teacher and critic.
    model.gradient_checkpointing = bool(cfg.train.gradient_checkpointing)
    if sp_group is not None:
        model.sequence_parallel = SequenceParallel(sp_group)
    if mode == "fsdp":
        shard_fsdp2(model, bf16=cfg.train.dtype == "bf16" and param_dtype == torch.float32)
    return model


def attach_lora(model: WanModel, lora_cfg: Any, name: str) -> None:
    """LoRA adapters (peft) on the modules named by lora.targets; every base weight frozen except the parameters
    lora.full names (fnmatch). The adapters start at zero (B = 0), so the network starts as its base;
    `model.lora_scale` (alpha / rank) and `model.lora_full` (the fully trained names) are what export needs."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = int(lora_cfg.rank)
    if rank < 0:
        raise ConfigError(f"roles.{name}.lora.rank={rank}: expected 0 (off) or a positive rank")
    alpha = float(lora_cfg.alpha) if lora_cfg.alpha is not None else float(rank)
    full = [str(p) for p in lora_cfg.full]
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(lora_cfg.targets),
                                           lora_dropout=float(lora_cfg.dropout), bias="none"), model)  # fmt: skip
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(
            f"roles.{name}.lora.targets={list(lora_cfg.targets)} match no module of the network ({err}); targets are "
            "module-name suffixes such as q, k, v, o, ffn.0, ffn.2"
        ) from err
    names = [n for n, _ in model.named_parameters()]
    unmatched = [pat for pat in full if not any(fnmatch(n, pat) for n in names)]
    if unmatched:
        raise ConfigError(f"roles.{name}.lora.full={unmatched} match no parameter (e.g. dwpose_embedding.*)")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n or any(fnmatch(n, pat) for pat in full))
    model.lora_scale = lora_scale(rank, alpha)
    model.lora_alpha = alpha
    model.lora_full = [n for n in names if any(fnmatch(n, pat) for pat in full)]
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    log.info("roles.%s: LoRA rank %d (alpha %g) on %s: %.2fM adapter parameters, %d fully trained tensors", name,
             rank, alpha, list(lora_cfg.targets), adapters / 1e6, len(model.lora_full))  # fmt: skip


def make_optimizer(model: nn.Module, role_cfg: Any) -> torch.optim.AdamW:
    """AdamW over the role's trainable parameters; FSDP2-sharded (DTensor) and replicated parameters in separate
    groups, since the fused multi-tensor step cannot mix the two kinds in one group."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]  # fmt: skip
    return torch.optim.AdamW(
        [{"params": g} for g in groups], lr=role_cfg.lr, betas=tuple(role_cfg.betas),
        weight_decay=role_cfg.weight_decay, eps=role_cfg.eps,
    )  # fmt: skip
