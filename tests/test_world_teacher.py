"""The shipped world teacher (assets/world_teacher) knows the world: loaded through its preset, it samples a
held-out clip (a test seed, never trained on) with a short sampler on the CPU, and the decoded frames follow the
driving pose far above anything random weights reach; without its pose input it does not.
docs/results/world_teacher.md has the full table (32 clips, 100 NFE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.world import TEST_SEED, Sampler, held_out_clips, sample_clip, score, to_frames, world_encoders
from wan.checkpoint import load_model
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "world_teacher" / "teacher.safetensors"
FRAMES = 21  # 6 latent frames: a short clip keeps the test well under a minute on one core
SHORT = Sampler(num_steps=6, guidance=1.5, shift=5.0)  # 12 NFE


@pytest.fixture(scope="module")
def world():
    enc = world_encoders("cpu")
    return enc, held_out_clips(enc, [TEST_SEED + 7], num_frames=FRAMES)[0]


def pck(model, world, use_pose: bool = True) -> float:
    enc, clip = world
    latents = sample_clip(model, clip.batch, SHORT, seed=0, use_pose=use_pose)
    with torch.no_grad():
        frames = to_frames(enc.vae.decode(latents)[0])
    return score(frames, clip)["pck@0.05"]


def test_shipped_teacher_follows_the_pose_of_a_held_out_clip(world):
    teacher = load_model(SHIPPED, device="cpu", dtype=torch.float32).eval().requires_grad_(False)
    assert type(teacher).__name__ == "WanModel" and teacher.pose_dim == 256  # the world_teacher preset
    shipped = pck(teacher, world)
    torch.manual_seed(0)
    random = pck(build_model("world_teacher").eval().requires_grad_(False), world)
    no_pose = pck(teacher, world, use_pose=False)
    # measured on this clip (2026-12-02, 2-core CPU): PCK@0.05 shipped 0.832, random 0.000, no pose 0.000
    assert shipped >= 0.5, shipped
    assert random < 0.1 and no_pose < 0.2, (random, no_pose)
