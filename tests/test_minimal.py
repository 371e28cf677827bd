"""The tiny model end to end in latent space: streaming generation is deterministic for a seed, every block
comes out finite and of the right shape, the pose clip steers it. (README's main command, the CLI writing an
mp4, is tests/test_inference_cli.py.)"""

import torch
from conftest import randomize, rel_err, tiny_inputs, tiny_pose

from pipeline.conditions import Conditions
from pipeline.rollout import stream_latents
from wan.configs import build_model


def _generate(model, cond, seed):
    blocks = list(stream_latents(model, cond, 9, (8, 12), generator=torch.Generator().manual_seed(seed)))
    assert [s for s, _ in blocks] == [0, 3, 6]
    return torch.cat([b for _, b in blocks], dim=2)


def test_stream_is_deterministic_and_pose_steers_it():
    model = randomize(build_model("tiny"), std=0.05).eval()
    inp = tiny_inputs(batch=1, frames=9)
    pose, ref = tiny_pose(batch=1, latent_frames=9)
    with torch.no_grad():
        tokens, ref_map = model.encode_pose(pose, ref)
    cond = Conditions(inp["context"], inp["clip_fea"], inp["y"] + ref_map, tokens)
    a, b = _generate(model, cond, 0), _generate(model, cond, 0)
    assert a.shape == (1, 16, 9, 8, 12) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert rel_err(_generate(model, cond, 1), a) > 1e-2
    no_pose = Conditions(inp["context"], inp["clip_fea"], inp["y"] + ref_map, None)
    assert rel_err(_generate(model, no_pose, 0), a) > 1e-3
