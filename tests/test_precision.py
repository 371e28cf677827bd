"""bf16 training keeps fp32 master weights: through the trainer's own role setup (build_role, make_optimizer,
EMA), AdamW at distillation learning rates moves the weights as an fp32 run does, where bf16 parameters would
round most updates away."""

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from model import objective_registry
from trainer.ema import EMA
from trainer.objective import objective_defaults
from trainer.roles import build_role, make_optimizer, parallel_mode
from utils.config import ConfigError, load_config
from utils.dist import init_distributed, init_single_process_group

ROOT = Path(__file__).resolve().parents[1]


def role_setup(dtype: str, lr: float):
    cfg = load_config(
        ROOT / "configs" / "stages" / "dmd.yaml",
        ["model=tiny", f"train.dtype={dtype}", "train.gradient_checkpointing=false", f"roles.generator.lr={lr}"],
        objective_defaults(objective_registry()),
    )
    dist = init_distributed("cpu")
    if parallel_mode(cfg, dist) == "fsdp":
        init_single_process_group(dist.device)
    model = build_role("generator", cfg.roles.generator, cfg, dist, trainable=True)
    return model, make_optimizer(model, cfg.roles.generator), cfg


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value laid out as the parameter p (a DTensor under FSDP2)."""
    return distribute_tensor(value, p.device_mesh, p.placements) if isinstance(p, DTensor) else value.to(p.dtype)


def train_ten_steps(dtype: str, lr: float) -> tuple[dict, dict, dict, list[torch.dtype]]:
    """Weights N(0, 0.02^2), the same fixed gradients each step; returns initial, final and EMA weights."""
    model, opt, _ = role_setup(dtype, lr)
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    init = {n: 0.02 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(like(p, init[n]))
    ema = EMA(model, decay=0.9)  # shadows start at the initial weights
    grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    for step in range(10):
        for n, p in params.items():
            p.grad = like(p, grads[n] * (1 + 0.1 * step))
        opt.step()
        ema.update(model, step)
    final = {n: full(p) for n, p in params.items()}
    shadow = {n: full(v) for n, v in ema.state_dict().items()}
    return init, final, shadow, [p.dtype for p in params.values()]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.parametrize("lr", [2e-6, 4e-7])
def test_bf16_training_moves_weights_as_fp32_does(lr):
    init, ref_final, ref_shadow, _ = train_ten_steps("fp32", lr)
    _, final, shadow, dtypes = train_ten_steps("bf16", lr)
    assert set(dtypes) == {torch.float32}  # master weights, also for the replicated pose encoders
    names = sorted(init)
    ref_update = torch.cat([(ref_final[n] - init[n]).flatten() for n in names])
    update = torch.cat([(final[n] - init[n]).flatten() for n in names])
    assert cosine(update, ref_update) >= 0.99
    moved, ref_moved = update != 0, ref_update != 0
    assert float(ref_moved.float().mean()) > 0.99
    assert float((moved == ref_moved).float().mean()) >= 0.99
    # the EMA shadow follows as in fp32 (a bf16 shadow would round its 10% steps of a 1e-6 move to nothing)
    ref_ema = torch.cat([(ref_shadow[n] - init[n]).flatten() for n in names])
    ema = torch.cat([(shadow[n] - init[n]).flatten() for n in names])
    assert cosine(ema, ref_ema) >= 0.99
    assert float(ema.norm() / ref_ema.norm()) == pytest.approx(1.0, rel=0.02)


def test_bf16_outside_fsdp2_is_refused_with_the_fix():
    cfg = load_config(
        ROOT / "configs" / "stages" / "dmd.yaml",
        ["model=tiny", "train.dtype=bf16", "train.distributed=ddp"],
        objective_defaults(objective_registry()),
    )
    with pytest.raises(ConfigError, match=r"train.distributed=auto.*or train.dtype=fp32"):
        parallel_mode(cfg, init_distributed("cpu"))


def test_bf16_training_runs_the_fp32_pose_encoders_in_bf16():
    """The pose encoders stay fp32 masters outside the FSDP2 blocks; under bf16 training they compute in bf16
    (autocast) like the blocks, their gradients land in fp32, and the tokens match an fp32 encode to bf16 precision."""
    model, _, _ = role_setup("bf16", 2e-6)
    assert model.pose_compute_dtype == torch.bfloat16
    assert model.dwpose_embedding[0].weight.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (*model.dwpose_embedding.parameters(), *model.pose_proj.parameters()):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pose = torch.randint(0, 256, (1, 3, 5, 32, 32), generator=g).float()
    tokens, _ = model.encode_pose(pose)
    assert tokens.dtype == torch.bfloat16
    tokens.float().square().mean().backward()
    assert model.dwpose_embedding[0].weight.grad.dtype == torch.float32
    assert model.dwpose_embedding[0].weight.grad.abs().sum() > 0
    model.pose_compute_dtype = None  # the same network in fp32: the reference
    ref, _ = model.encode_pose(pose)
    assert ref.dtype == torch.float32
    rel = float((tokens.detach().double() - ref.double()).norm() / ref.double().norm())
    assert rel < 2e-2  # bf16 keeps 8 mantissa bits: ~0.4% per op, a few layers deep
