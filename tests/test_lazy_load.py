"""pose_weights_path: nothing is read until the pose encoders are first used, then exactly the pose keys
(UniAnimate layout: `pipe.dit.` prefix, LoRA tensors beside them) are loaded, once."""

import pytest
import torch
from conftest import tiny_pose

import wan.loading as loading
from wan.configs import build_model


def unianimate_checkpoint(path, seed=7):
    """A UniAnimate-style file for the tiny preset: pose encoders + LoRA tensors, all under pipe.dit."""
    donor = build_model("tiny")
    g = torch.Generator().manual_seed(seed)
    data = {}
    for k, v in donor.state_dict().items():
        if k.startswith(("dwpose_embedding.", "randomref_embedding_pose.")):
            data[f"pipe.dit.{k}"] = torch.randn(v.shape, generator=g)
    data["pipe.dit.blocks.0.self_attn.q.lora_A.default.weight"] = torch.randn(4, 32, generator=g)
    data["pipe.dit.blocks.0.self_attn.q.lora_B.default.weight"] = torch.randn(32, 4, generator=g)
    torch.save(data, path)
    return {k.removeprefix("pipe.dit."): v for k, v in data.items() if "lora" not in k}


def test_lazy_pose_weights(tmp_path, monkeypatch):
    expected = unianimate_checkpoint(tmp_path / "unianimate.ckpt")
    reads = []
    real = loading.load_checkpoint
    monkeypatch.setattr(loading, "load_checkpoint", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    model = build_model("tiny", pose_weights_path=str(tmp_path / "unianimate.ckpt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reads == []  # construction reads nothing
    pose, ref = tiny_pose(batch=1, latent_frames=3)
    model.encode_pose(pose, ref)
    assert len(reads) == 1
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(expected)  # exactly the pose keys
    for k, v in expected.items():
        assert torch.equal(after[k], v)
    model.encode_pose(pose, ref)
    assert len(reads) == 1  # loaded once


def test_missing_pose_weights_fail_at_first_use(tmp_path):
    model = build_model("tiny", pose_weights_path=str(tmp_path / "absent.ckpt"))
    pose, _ = tiny_pose(batch=1, latent_frames=3)
    with pytest.raises(FileNotFoundError, match="absent.ckpt.*UniAnimate"):
        model.encode_pose(pose)


def test_pose_weights_of_the_wrong_width_are_rejected(tmp_path):
    unianimate_checkpoint(tmp_path / "u.ckpt")
    model = build_model("tiny", pose_dim=64, pose_weights_path=str(tmp_path / "u.ckpt"))
    pose, _ = tiny_pose(batch=1, latent_frames=3)
    with pytest.raises(loading.CheckpointKeyError, match="dwpose_embedding.12.weight has shape"):
        model.encode_pose(pose)
