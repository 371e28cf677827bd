"""pipeline/ode_pairs.py and scripts/generate_ode_pairs.py: capture at the student's timesteps with the exact t,
both solvers on an exact flow, CFG, the causal variant's causality, the on-disk format and Dataset, resume,
rank sharding and the settings check."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, rel_err, tiny_inputs, tiny_pose
from torch.utils.data import Dataset

from pipeline.conditions import cfg_conditions, conditions
from pipeline.ode_pairs import (
    ODEPairDataset,
    ODEPairSettings,
    capture_indices,
    causal_trajectory,
    generate_ode_pairs,
    integrate,
    sample_path,
    teacher_trajectory,
)
from pipeline.rollout import DEFAULT_STEPS, cfg_flow
from utils.scheduler import add_noise, unipc_grid
from wan.checkpoint import save_weights
from wan.configs import build_model

FRAMES, HEIGHT, WIDTH = 6, 2, 4
FAST = ODEPairSettings(num_steps=8)  # the 8-step shift-5 grid holds states near 1000, 937.5, 833.3, 625


class ConditioningSource(Dataset):
    """Conditioning samples (no batch dim) with whole-number pose frames, as drawn skeletons are."""

    def __init__(self, n: int):
        self.items = []
        for i in range(n):
            inputs = tiny_inputs(1, FRAMES, HEIGHT, WIDTH, seed=10 + i)
            pose, ref = tiny_pose(1, FRAMES, HEIGHT, WIDTH, seed=20 + i)
            self.items.append(
                {
                    "context": inputs["context"][0],
                    "neg_context": 0.1 * inputs["context"][0].flip(0),
                    "clip_fea": inputs["clip_fea"][0],
                    "y": inputs["y"][0],
                    "pose": pose[0].round(),
                    "ref_pose": ref[0].round(),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def _batch(i: int = 0) -> dict[str, torch.Tensor]:
    return {k: v[None] for k, v in ConditioningSource(i + 1)[i].items()}


def test_capture_indices_nearest_and_distinct():
    _, grid_t = unipc_grid(8, 5.0)
    idx = capture_indices(grid_t, DEFAULT_STEPS)
    assert idx == [0, 2, 4, 6]
    for i, t in zip(idx, DEFAULT_STEPS, strict=True):
        assert abs(float(grid_t[i]) - t) == min(abs(float(g) - t) for g in grid_t)
    with pytest.raises(ValueError, match="num_steps"):
        capture_indices(unipc_grid(3, 5.0)[1], DEFAULT_STEPS)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_integrate_on_an_exact_flow_lands_on_x0_and_stores_exact_t(solver):
    """With the straight path's true flow every state is add_noise(x0, eps, t) at its stored t."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, 2, 4, generator=g), torch.randn(2, 16, 3, 2, 4, generator=g)
    settings = ODEPairSettings(num_steps=8, solver=solver)
    _, grid_t = unipc_grid(8, 5.0)
    start = add_noise(x0, eps, grid_t[0].expand(2))
    states, clean, exact_t = integrate(lambda x, t: eps - x0, start, settings)
    assert exact_t.dtype == torch.float64
    assert exact_t.tolist() == grid_t[[0, 2, 4, 6]].tolist() + [0.0]
    assert torch.allclose(clean, x0, atol=1e-4)
    for state, t in zip(states, exact_t, strict=False):
        assert torch.allclose(state, add_noise(x0, eps, t.expand(2)), atol=1e-4)


def test_cfg_flow_is_u_plus_w_c_minus_u():
    """Unconditional branch: negative prompt, no pose tokens, the same CLIP and y (ref-pose map kept)."""
    teacher = randomize(build_model("tiny_teacher"), seed=1)
    batch = _batch()
    x = torch.randn(1, 16, FRAMES, HEIGHT, WIDTH)
    t = torch.tensor([700.0])
    with torch.no_grad():
        cond, uncond = cfg_conditions(teacher, batch, 2.5)
        full = conditions(teacher, batch)
        c = teacher(x, t, **full)
        u = teacher(x, t, batch["neg_context"], full["clip_fea"], full["y"], None)
        assert uncond["add_condition"] is None and torch.equal(uncond["context"], batch["neg_context"])
        assert torch.equal(uncond["y"], full["y"]) and not torch.equal(full["y"], batch["y"])
        assert torch.allclose(cfg_flow(teacher, x, t, cond, uncond, 2.5), u + 2.5 * (c - u), atol=1e-6)
        assert torch.equal(cfg_flow(teacher, x, t, cond, None, 1.0), c)


@pytest.mark.parametrize("per_frame_t", [False, True])
def test_batched_cfg_equals_two_forwards(per_frame_t):
    """Both CFG branches as one batch-2B forward (zero pose tokens for the unconditional half, prompts of other
    lengths padded) equal the two separate forwards up to float32 rounding of other batch shapes."""
    teacher = randomize(build_model("tiny_teacher"), seed=1)
    batch = {k: torch.cat([v, v.flip(0) if v.is_floating_point() else v]) for k, v in _batch().items()}
    batch["neg_context"] = batch["neg_context"][:, :3]  # a shorter negative prompt
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, FRAMES, HEIGHT, WIDTH, generator=g)
    t = torch.rand(2, FRAMES, generator=g) * 1000 if per_frame_t else torch.tensor([700.0, 300.0])
    with torch.no_grad():
        cond, uncond = cfg_conditions(teacher, batch, 2.5)
        two = cfg_flow(teacher, x, t, cond, uncond, 2.5, batched=False)
        one = cfg_flow(teacher, x, t, cond, uncond, 2.5)
    assert rel_err(one, two) < 1e-5


def test_teacher_trajectory_shapes():
    teacher = randomize(build_model("tiny_teacher"), seed=1)
    noise = torch.randn(1, 16, FRAMES, HEIGHT, WIDTH)
    ode_latents, ode_t = teacher_trajectory(teacher, _batch(), noise, FAST)
    assert ode_latents.shape == (1, 5, 16, FRAMES, HEIGHT, WIDTH) and ode_t.shape == (5,)
    assert torch.equal(ode_latents[:, 0], noise)  # the first captured state is the starting noise
    assert torch.isfinite(ode_latents).all()


def test_causal_variant_is_block_causal():
    """Block 0's pairs do not depend on later frames; block 1's depend on the model's own block 0."""
    student = randomize(build_model("tiny"), seed=2)
    batch = _batch()
    noise = torch.randn(1, 16, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    settings = ODEPairSettings(num_steps=8, guidance=2.0)
    full, ode_t = causal_trajectory(student, batch, noise, settings)
    assert full.shape == (1, 5, 16, FRAMES, HEIGHT, WIDTH) and ode_t[-1] == 0
    # A 3-frame clip with the same conditioning (pose tokens come from the whole pose clip, sliced per block).
    short, _ = causal_trajectory(student, batch, noise[:, :, :3], settings)
    assert torch.allclose(full[..., :3, :, :], short, atol=1e-5)
    other = noise.clone()
    other[:, :, :3] += 1.0  # another block 0 changes block 1's context, hence its trajectory
    changed, _ = causal_trajectory(student, batch, other, settings)
    assert not torch.allclose(changed[:, -1, :, 3:], full[:, -1, :, 3:], atol=1e-3)


def test_generate_shards_resumes_and_reads_back(tmp_path):
    teacher = randomize(build_model("tiny_teacher"), seed=1).requires_grad_(False)
    source = ConditioningSource(3)
    out = tmp_path / "pairs"
    assert generate_ode_pairs(teacher, source, out, FAST, rank=1, world_size=2) == [1]
    assert generate_ode_pairs(teacher, source, out, FAST, rank=0, world_size=2) == [0, 2]
    assert generate_ode_pairs(teacher, source, out, FAST, rank=0, world_size=2) == []  # resumed: nothing to do

    first = sample_path(out, 0).read_bytes()
    sample_path(out, 0).unlink()
    sample_path(out, 2).write_bytes(sample_path(out, 2).read_bytes()[:100])  # a torn file is regenerated
    assert generate_ode_pairs(teacher, source, out, FAST) == [0, 2]
    assert sample_path(out, 0).read_bytes() == first  # noise depends on (seed, index) only

    data = ODEPairDataset(out)
    assert len(data) == 3
    item = data[1]
    assert item["ode_latents"].shape == (5, 16, FRAMES, HEIGHT, WIDTH) and item["ode_t"].dtype == torch.float64
    for key, value in source[1].items():
        assert torch.equal(item[key], value), key  # pose stored as uint8, read back exactly as float
    assert item["pose"].dtype == torch.float32

    with pytest.raises(ValueError, match="other settings"):
        generate_ode_pairs(teacher, source, out, ODEPairSettings(num_steps=8, guidance=3.0))


def test_batched_generation_equals_one_by_one(tmp_path):
    teacher = randomize(build_model("tiny_teacher"), seed=1).requires_grad_(False)
    source = ConditioningSource(3)
    assert generate_ode_pairs(teacher, source, tmp_path / "one", FAST) == [0, 1, 2]
    assert generate_ode_pairs(teacher, source, tmp_path / "batched", FAST, batch_size=2) == [0, 1, 2]
    one, batched = ODEPairDataset(tmp_path / "one"), ODEPairDataset(tmp_path / "batched")
    for i in range(3):
        a, b = one[i], batched[i]
        assert set(a) == set(b) and torch.equal(a["ode_t"], b["ode_t"]) and torch.equal(a["pose"], b["pose"])
        # fp32 batched kernels may sum in another order: 1e-5 relative over an 8-step solve
        assert rel_err(b["ode_latents"], a["ode_latents"]) < 1e-5
    with pytest.raises(ValueError, match="batch_size=0"):
        generate_ode_pairs(teacher, source, tmp_path / "none", FAST, batch_size=0)


def test_script_end_to_end(tmp_path):
    from scripts.generate_ode_pairs import main

    weights = tmp_path / "teacher.safetensors"
    save_weights(randomize(build_model("tiny_teacher"), seed=1), weights)
    out = tmp_path / "pairs"
    args = ["--preset", "tiny_teacher", "--weights", str(weights), "--synthetic", "2", "--out", str(out),
            "--latent-frames", "3", "--latent-size", "2", "4", "--num-steps", "8", "--dtype", "fp32",
            "--batch-size", "2"]  # fmt: skip
    assert main(args) == 0
    data = ODEPairDataset(out)
    assert len(data) == 2 and data.settings["num_steps"] == 8
    assert data[0]["ode_latents"].shape == (5, 16, 3, 2, 4)
