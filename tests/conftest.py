"""Shared test helpers: tiny models with random weights everywhere (the official init zeroes the head, which
would make every output trivially equal), and skip rules for GPU / real-weight tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, std): no zero-initialised path hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a tensor as a weight file stores them (byte-for-byte comparisons of any dtype and shape)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tiny_inputs(batch=2, frames=9, height=8, width=12, text_dim=24, text_tokens=10, clip_dim=40, clip_tokens=7, seed=1):
    """Latent-space inputs for the tiny preset: x [B,16,F,H,W], y [B,20,F,H,W], t [B,F], context, clip."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, frames, height, width, generator=g),
        y=torch.randn(batch, 20, frames, height, width, generator=g),
        t=torch.rand(batch, frames, generator=g) * 1000,
        context=torch.randn(batch, text_tokens, text_dim, generator=g),
        clip_fea=torch.randn(batch, clip_tokens, clip_dim, generator=g),
    )


def tiny_pose(batch=2, latent_frames=9, height=8, width=12, seed=2):
    """Pose frames [B,3,4F-3,8H,8W] and a reference pose [B,3,8H,8W] in 0..255 matching tiny latents."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(batch, 3, 4 * latent_frames - 3, 8 * height, 8 * width, generator=g) * 255
    ref = torch.rand(batch, 3, 8 * height, 8 * width, generator=g) * 255
    return frames, ref


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_weights = pytest.mark.skipif(
    not os.environ.get("WAN_MODELS_DIR"), reason="set WAN_MODELS_DIR to a folder with the real Wan2.1 checkpoints"
)


@pytest.fixture(scope="session")
def world_teacher_file(tmp_path_factory) -> Path:
    """A world teacher export (random weights, the shipped layout): roles.teacher.weights of the world configs."""
    from wan.checkpoint import save_weights
    from wan.configs import build_model

    path = tmp_path_factory.mktemp("world_teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(build_model("world_teacher"), path)
    return path
