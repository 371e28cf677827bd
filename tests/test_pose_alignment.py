"""Pose encoders: output shapes at 480x832 and at a tiny size, pose tokens equal the patch grid, the folded
pose_proj equals Linear after the conv, and a pose clip of the wrong length is a clear error."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, rel_err, tiny_inputs, tiny_pose

from wan.configs import build_model
from wan.modules.pose import pose_latent_frames


def test_encoder_shapes_at_480x832_81_frames():
    """Real size on the meta device (no memory): 81 pose frames -> 21 latent frames x 30x52 tokens."""
    model = build_model("wan_1.3b_causal_pose", device="meta")
    pose = torch.empty(1, 3, 81, 480, 832, device="meta")
    ref = torch.empty(1, 3, 480, 832, device="meta")
    tokens, ref_map = model.encode_pose(pose, ref)
    assert tokens.shape == (1, 21 * 30 * 52, 1536)  # 32760 tokens: exactly the patch grid of [16,21,60,104]
    assert ref_map.shape == (1, 20, 1, 60, 104)  # added to y [1, 20, 21, 60, 104]
    teacher = build_model("wan_14b_i2v_pose_teacher", device="meta")
    tokens, _ = teacher.encode_pose(pose, ref)
    assert tokens.shape == (1, 32760, 5120)


def test_tiny_tokens_equal_patch_grid_and_reference_formula():
    model = randomize(build_model("tiny"))
    pose, ref = tiny_pose(batch=1, latent_frames=5, height=8, width=12)
    tokens, ref_map = model.encode_pose(pose, ref)
    assert tokens.shape == (1, 5 * 4 * 6, 32) and ref_map.shape == (1, 20, 1, 8, 12)
    # Reference: UniAnimate's unfolded computation followed by pose_proj as a separate Linear.
    x = torch.cat([pose[:, :, :1].repeat(1, 1, 3, 1, 1), pose], dim=2) / 255.0
    feat = model.dwpose_embedding(x)  # [1, 48, 5, 4, 6]
    expected = model.pose_proj(feat.flatten(2).transpose(1, 2))
    assert rel_err(tokens, expected) < 1e-6
    expected_ref = model.randomref_embedding_pose(ref / 255.0)[:, :, None]
    assert torch.allclose(ref_map, expected_ref)


def test_pose_tokens_are_added_after_patch_embedding():
    model = randomize(build_model("tiny_bidirectional")).eval()
    inp = tiny_inputs(batch=1, frames=3)
    tokens = torch.randn(1, 3 * 24, 32)
    with torch.no_grad():
        base, grid = model.embed_video(inp["x"], inp["y"], None)
        posed, _ = model.embed_video(inp["x"], inp["y"], tokens)
    assert grid == (3, 4, 6)
    assert torch.allclose(posed - base, tokens, atol=1e-6)


def test_pose_alignment_error_names_both_counts():
    model = randomize(build_model("tiny"))
    inp = tiny_inputs(batch=1, frames=9)
    pose, _ = tiny_pose(batch=1, latent_frames=7)  # a clip for 7 latent frames driving a 9-frame video
    tokens, _ = model.encode_pose(pose)
    with pytest.raises(ValueError, match=r"cover 7 latent frames but the video has 9 latent frames: give 33 pose"):
        model(**inp, add_condition=tokens)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        model.encode_pose(torch.zeros(1, 3, 10, 64, 96))
    assert pose_latent_frames(81) == 21


def test_pose_resolution_mismatch_is_an_error():
    model = build_model("tiny")
    pose, ref = tiny_pose(batch=1, latent_frames=3, height=8, width=12)
    with pytest.raises(ValueError, match="ref_pose must be"):
        model.encode_pose(pose, F.interpolate(ref, size=(32, 32)))
    tokens, _ = model.encode_pose(torch.zeros(1, 3, 9, 64, 64))  # 4x4 grid
    with pytest.raises(ValueError, match=r"cover 2 latent frames but the video has 3.*pixel size \(64x96"):
        model(**tiny_inputs(batch=1, frames=3), add_condition=tokens)
