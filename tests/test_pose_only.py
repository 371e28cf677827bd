"""Pose-only input (a pose clip with no reference pose): the ref-pose map is absent (zero, as in the
teacher's condition dropout), pose tokens still steer the output, and no pose equals the plain model."""

import torch
from conftest import randomize, rel_err, tiny_inputs, tiny_pose

from wan.configs import build_model


def test_pose_only_equals_zero_ref_map_and_pose_changes_output():
    model = randomize(build_model("tiny")).eval()
    inp = tiny_inputs(batch=1, frames=3)
    pose, ref = tiny_pose(batch=1, latent_frames=3)
    with torch.no_grad():
        tokens, ref_map = model.encode_pose(pose)  # pose only
        assert ref_map is None
        pose_only = model(**inp, add_condition=tokens)
        tokens_r, ref_map = model.encode_pose(pose, ref)
        assert torch.equal(tokens, tokens_r)  # the reference pose never touches the pose tokens
        with_ref = model(**dict(inp, y=inp["y"] + ref_map), add_condition=tokens)
        no_pose = model(**inp)
        zero_tokens = model(**inp, add_condition=torch.zeros_like(tokens))
    assert rel_err(pose_only, no_pose) > 1e-3  # pose tokens steer the output
    assert rel_err(with_ref, pose_only) > 1e-3  # so does the reference pose
    assert rel_err(zero_tokens, no_pose) < 1e-7  # zero tokens are the unconditional path


def test_zero_initialised_pose_proj_changes_nothing_yet():
    """A fresh student (pose_proj = 0) gives the same output with or without pose tokens."""
    model = build_model("tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("pose_proj"):
                p.normal_(0, 0.1)
    model.eval()
    inp = tiny_inputs(batch=1, frames=3)
    pose, _ = tiny_pose(batch=1, latent_frames=3)
    with torch.no_grad():
        tokens, _ = model.encode_pose(pose)
        assert torch.count_nonzero(tokens) == 0
        assert torch.equal(model(**inp, add_condition=tokens), model(**inp))
