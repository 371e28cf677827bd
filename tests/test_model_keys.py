"""state_dict keys of the real presets equal the official key lists, built here from the published layout
(REFERENCE section 1 and UniAnimate's pose encoders), not from our own model."""

import pytest
import torch

from wan.configs import build_model


def official_keys(num_layers: int, i2v: bool) -> set[str]:
    keys = {"patch_embedding.weight", "patch_embedding.bias", "head.modulation", "head.head.weight", "head.head.bias"}
    for m in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"):
        keys |= {f"{m}.weight", f"{m}.bias"}
    for i in range(num_layers):
        b = f"blocks.{i}."
        keys.add(b + "modulation")
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                keys |= {f"{b}{attn}.{lin}.weight", f"{b}{attn}.{lin}.bias"}
            keys |= {f"{b}{attn}.norm_q.weight", f"{b}{attn}.norm_k.weight"}
        keys |= {b + "norm3.weight", b + "norm3.bias"}
        keys |= {f"{b}ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        if i2v:
            keys |= {f"{b}cross_attn.{m}.{p}" for m in ("k_img", "v_img") for p in ("weight", "bias")}
            keys.add(f"{b}cross_attn.norm_k_img.weight")
    if i2v:
        keys |= {f"img_emb.proj.{j}.{p}" for j in (0, 1, 3, 4) for p in ("weight", "bias")}
    return keys


def pose_keys(with_ref: bool) -> set[str]:
    keys = {f"dwpose_embedding.{j}.{p}" for j in (0, 2, 4, 6, 8, 10, 12) for p in ("weight", "bias")}
    if with_ref:
        keys |= {f"randomref_embedding_pose.{j}.{p}" for j in (0, 2, 4, 6, 8, 10) for p in ("weight", "bias")}
    return keys


@pytest.mark.parametrize(
    "preset, layers, i2v, extra, n_params",
    [
        ("wan_1.3b_t2v", 30, False, set(), 1.42e9),
        ("wan_14b_t2v", 40, False, set(), 14.3e9),
        ("wan_14b_i2v", 40, True, set(), 16.4e9),
        ("wan_14b_i2v_pose_teacher", 40, True, pose_keys(True), None),
        ("wan_1.3b_causal_pose", 30, True, pose_keys(True) | {"pose_proj.weight", "pose_proj.bias"}, None),
    ],
)
def test_preset_keys_equal_official(preset, layers, i2v, extra, n_params):
    model = build_model(preset, device="meta")
    assert set(model.state_dict()) == official_keys(layers, i2v) | extra
    if n_params is not None:
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - n_params) / n_params < 0.01, count


def test_official_shapes_14b_i2v():
    sd = build_model("wan_14b_i2v_pose_teacher", device="meta").state_dict()
    assert sd["patch_embedding.weight"].shape == (5120, 36, 1, 2, 2)
    assert sd["blocks.0.modulation"].shape == (1, 6, 5120)
    assert sd["head.modulation"].shape == (1, 2, 5120)
    assert sd["head.head.weight"].shape == (64, 5120)
    assert sd["blocks.0.ffn.0.weight"].shape == (13824, 5120)
    assert sd["blocks.0.self_attn.norm_q.weight"].shape == (5120,)
    assert sd["img_emb.proj.0.weight"].shape == (1280,)
    assert sd["img_emb.proj.3.weight"].shape == (5120, 1280)
    assert sd["time_projection.1.weight"].shape == (6 * 5120, 5120)
    assert sd["text_embedding.0.weight"].shape == (5120, 4096)
    assert sd["dwpose_embedding.12.weight"].shape == (5120, 16, 1, 2, 2)
    assert sd["randomref_embedding_pose.10.weight"].shape == (20, 16, 3, 3)


def test_student_pose_proj_shape_and_zero_init():
    model = build_model("wan_1.3b_causal_pose", device="meta")
    assert model.pose_proj.weight.shape == (1536, 5120)
    tiny = build_model("tiny")
    assert torch.count_nonzero(tiny.pose_proj.weight) == 0 and torch.count_nonzero(tiny.pose_proj.bias) == 0
    assert not hasattr(build_model("tiny_teacher"), "pose_proj")  # absent when dim == pose_dim
