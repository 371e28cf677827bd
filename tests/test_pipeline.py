"""The inference pipelines on tiny models: the streaming student (same seed -> same video, streamed frames equal
one-shot generate(), pose tokens steer it and only the conditional CFG branch sees them, a local window streams
past 21 latent frames) and the teacher sampler (UniPC + CFG, pose only in the conditional branch)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from _tiny_encoders import TINY_VAE_CONFIG, vae_official_state_dict
from conftest import randomize, rel_err

from pipeline.bidirectional_inference import TeacherPosePipeline
from pipeline.causal_diffusion_inference import PreparedClip, StreamingPosePipeline, image_condition
from pipeline.conditions import Conditions
from pipeline.rollout import guided_flow, sample_latents, stream_latents
from utils.encoders.wan_wrapper import WanVAE
from utils.scheduler import make_unipc_scheduler
from wan.configs import build_model

HEIGHT, WIDTH = 32, 48  # pixels: latents 4x6, a 2x3 patch grid
PROMPT = "a person is dancing"


def fake_text_encoder(text_len: int = 16, text_dim: int = 24):
    """Prompts -> [B, text_len, text_dim], a fixed random embedding per prompt."""

    def encode(prompts):
        seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in prompts]
        return torch.stack([torch.randn(text_len, text_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])

    return encode


def fake_image_encoder(tokens: int = 5, clip_dim: int = 40):
    """[B, 3, H, W] -> [B, tokens, clip_dim]: a fixed random projection of the 2x2-pooled image."""
    proj = torch.randn(12, tokens * clip_dim, generator=torch.Generator().manual_seed(3))
    return lambda image: (F.adaptive_avg_pool2d(image.float(), 2).flatten(1) @ proj).view(-1, tokens, clip_dim)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(vae_official_state_dict(TINY_VAE_CONFIG), path)
    # Decoding in float64 (encode is always fp32): streamed and one-shot decoding run the 1x1x1 post_quant_conv
    # on chunks of different lengths, which float32 kernels may round differently on another CPU.
    return WanVAE(path, device="cpu", dtype=torch.float64, config=TINY_VAE_CONFIG)


@pytest.fixture(scope="module")
def student():
    return randomize(build_model("tiny"), std=0.05).eval()


def clip_inputs(frames: int, seed: int = 0):
    """ref image [1, 3, H, W] in [-1, 1], pose frames [1, 3, F, H, W] and ref pose [1, 3, H, W] in 0..255."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 2 - 1
    pose = torch.rand(1, 3, frames, HEIGHT, WIDTH, generator=g) * 255
    return ref, pose, torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 255


def pipeline(model, vae, **kwargs) -> StreamingPosePipeline:
    return StreamingPosePipeline(model, vae, fake_text_encoder(), fake_image_encoder(), **kwargs)


def latents_of(pipe, clip: PreparedClip, seed: int) -> torch.Tensor:
    return torch.cat([x for _, x in pipe.latent_blocks(clip, torch.Generator().manual_seed(seed))], dim=2)


def record_pose_calls(model) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Every forward call's (kv cache id, whether add_condition was given)."""
    calls = []

    def hook(module, args, kwargs):
        add_condition = args[5] if len(args) > 5 else kwargs.get("add_condition")
        calls.append((id(kwargs.get("kv_cache")), add_condition is not None))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_guided_flow_is_u_plus_w_times_c_minus_u():
    c, u = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 3, 4, 6)
    for w in (0.0, 1.0, 1.5, 4.0):
        torch.testing.assert_close(guided_flow(c, u, w), w * c + (1 - w) * u, rtol=1e-6, atol=1e-6)


def test_image_condition_layout(vae):
    """y = [4-channel mask of latent frame 0, latents of (reference, black frames)]."""
    ref, _, _ = clip_inputs(1)
    y = image_condition(vae, ref, 9, y_channels=20)
    assert y.shape == (1, 20, 3, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and not y[:, :4, 1:].any()
    video = torch.zeros(1, 3, 9, HEIGHT, WIDTH)
    video[:, :, 0] = ref
    assert torch.equal(y[:, 4:], vae.encode(video))


def test_same_seed_same_video_and_stream_equals_generate(student, vae):
    ref, pose, ref_pose = clip_inputs(21)
    pipe = pipeline(student, vae)
    clip = pipe.prepare(ref, pose, PROMPT, ref_pose=ref_pose)
    assert (clip.num_frames, clip.latent_frames, clip.latent_size) == (21, 6, (4, 6))
    blocks = list(pipe.stream(clip, seed=0))
    assert [(b.latent_start, b.frame_start, b.frames.shape[2]) for b in blocks] == [(0, 0, 9), (3, 9, 12)]
    streamed = torch.cat([b.frames for b in blocks], dim=2)
    assert streamed.shape == (1, 3, 21, HEIGHT, WIDTH) and torch.isfinite(streamed).all()
    assert torch.equal(streamed, torch.cat([b.frames for b in pipe.stream(clip, seed=0)], dim=2))
    # Streaming == one decode of all latents. The decodes differ only in post_quant_conv's chunk length, in
    # float64 (differences ~1e-16); the one float32 step is the final cast, so at most one float32 ulp apart
    # (eps covers every value in [-1, 1]).
    torch.testing.assert_close(streamed, pipe.generate(clip, seed=0), rtol=0, atol=torch.finfo(torch.float32).eps)
    assert rel_err(pipe.generate(clip, seed=1), streamed) > 1e-2


def test_pose_tokens_steer_and_only_the_conditional_branch_sees_them(student, vae):
    ref, pose, ref_pose = clip_inputs(9)
    # Negative prompt = prompt: the unconditional branch differs from the conditional one only by the pose.
    guided = pipeline(student, vae, guidance_scale=3.0, negative_prompt=PROMPT)
    clip = guided.prepare(ref, pose, PROMPT, ref_pose=ref_pose)
    assert clip.uncond.pose_tokens is None and clip.cond.pose_tokens is not None
    assert clip.uncond.y is clip.cond.y and clip.uncond.clip_fea is clip.cond.clip_fea  # ref-pose map in both
    plain = pipeline(student, vae)
    no_pose = PreparedClip(Conditions(clip.cond.context, clip.cond.clip_fea, clip.cond.y), None, 9, clip.latent_size)
    with_pose = PreparedClip(clip.cond, None, 9, clip.latent_size)
    assert rel_err(latents_of(plain, with_pose, 0), latents_of(plain, no_pose, 0)) > 1e-3  # pose steers

    # Without pose tokens the guided prediction is the unconditional one: u + w (u - u) = u, exactly.
    unconditional = PreparedClip(clip.uncond, None, 9, clip.latent_size)
    guided_no_pose = PreparedClip(no_pose.cond, clip.uncond, 9, clip.latent_size)
    assert torch.equal(latents_of(guided, guided_no_pose, 0), latents_of(plain, unconditional, 0))
    assert rel_err(latents_of(guided, clip, 0), latents_of(plain, unconditional, 0)) > 1e-3

    calls, handle = record_pose_calls(student)
    try:
        latents_of(guided, clip, 0)
    finally:
        handle.remove()
    by_cache: dict[int, set[bool]] = {}
    for cache, has_pose in calls:
        by_cache.setdefault(cache, set()).add(has_pose)
    assert sorted(by_cache.values(), key=str) == [{False}, {True}]  # one cache per branch; pose only in one
    assert len(calls) == 2 * 4  # 2 branches x one block (3 latent frames) x 4 steps; no clean pass after the last block


def test_local_window_streams_past_21_latent_frames(student):
    """24 latent frames through a cache of 6 (window 3 + sink 3); while the window still holds every frame
    (the first two blocks) the output equals global attention."""
    windowed = build_model("tiny", local_attn_size=3, sink_size=3).eval()
    windowed.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(0)
    frames, size = 24, (4, 6)
    cond = Conditions(
        context=torch.randn(1, 16, 24, generator=g),
        clip_fea=torch.randn(1, 5, 40, generator=g),
        y=torch.randn(1, 20, frames, *size, generator=g),
        pose_tokens=torch.randn(1, frames * 6, 32, generator=g),
    )
    assert windowed.new_kv_cache(1, None, torch.float32, "cpu").capacity_frames == 6
    local = list(stream_latents(windowed, cond, frames, size, generator=torch.Generator().manual_seed(1)))
    assert [s for s, _ in local] == list(range(0, 24, 3))
    out = torch.cat([x for _, x in local], dim=2)
    assert out.shape == (1, 16, 24, 4, 6) and torch.isfinite(out).all()
    full = stream_latents(student, cond, frames, size, generator=torch.Generator().manual_seed(1))
    first = torch.cat([next(full)[1], next(full)[1]], dim=2)
    assert rel_err(out[:, :, :6], first) < 1e-6


def test_bad_clip_inputs_say_what_to_change(student, vae):
    ref, pose, _ = clip_inputs(9)
    pipe = pipeline(student, vae)
    with pytest.raises(ValueError, match=r"pose clip has 9 frames but 13 .* at most 9 frames"):
        pipe.prepare(ref, pose, PROMPT, num_frames=13)
    with pytest.raises(ValueError, match=r"pose frames are 16x48 .* reference image is 32x48"):
        pipe.prepare(ref, pose[..., :16, :], PROMPT)
    with pytest.raises(ValueError, match=r"multiples of 16 .* e.g. to 32x32"):
        pipe.prepare(ref[..., :40], pose[..., :40], PROMPT)
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        pipe.prepare(ref, pose, PROMPT, num_frames=8)


def test_teacher_cfg_with_pose_only_in_the_conditional_branch(vae):
    teacher = randomize(build_model("tiny_teacher"), std=0.05).eval()
    ref, pose, ref_pose = clip_inputs(9)
    pipe = TeacherPosePipeline(teacher, vae, fake_text_encoder(), fake_image_encoder(), num_steps=3,
                               guidance_scale=2.0, negative_prompt=PROMPT)  # fmt: skip
    clip = pipe.prepare(ref, pose, PROMPT, ref_pose=ref_pose)
    shape = (1, 16, 3, 4, 6)
    poses = []
    handle = teacher.register_forward_pre_hook(
        lambda module, args, kwargs: poses.append(args[5] if len(args) > 5 else kwargs.get("add_condition")),
        with_kwargs=True,
    )
    try:
        guided = sample_latents(teacher, clip.cond, shape, 3, 5.0, 2.0, clip.uncond, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    # one forward per step with both branches as a batch [conditional (pose); unconditional (none: zero tokens)]
    assert len(poses) == 3 and all(p is not None and p.shape[0] == 2 for p in poses)
    assert all(p[0].abs().sum() > 0 and not p[1].any() for p in poses)
    assert torch.equal(
        guided, sample_latents(teacher, clip.cond, shape, 3, 5.0, 2.0, clip.uncond, torch.Generator().manual_seed(0))
    )
    # Guidance of a conditional branch without pose (same prompt) is the unguided unconditional sample.
    # (The guided call runs both branches as one batch of 2: float32 rounding of another shape, hence a tolerance.)
    no_pose = Conditions(clip.cond.context, clip.cond.clip_fea, clip.cond.y)
    assert rel_err(
        sample_latents(teacher, no_pose, shape, 3, 5.0, 2.0, clip.uncond, torch.Generator().manual_seed(0)),
        sample_latents(teacher, clip.uncond, shape, 3, 5.0, 1.0, None, torch.Generator().manual_seed(0)),
    ) < 1e-5
    assert rel_err(guided, sample_latents(teacher, clip.cond, shape, 3, 5.0, 1.0, None,
                                          torch.Generator().manual_seed(0))) > 1e-3  # fmt: skip
    # The same sample from a plain loop over diffusers' UniPC on the official grid (the reference for the shared
    # utils.scheduler.solve_flow_ode): the network sees the truncated int t, the solver its float sigmas.
    scheduler = make_unipc_scheduler(3, 5.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            t_vec = t.float().expand(1)
            c = teacher(x, t_vec, clip.cond.context, clip.cond.clip_fea, clip.cond.y, clip.cond.pose_tokens).float()
            u = teacher(x, t_vec, clip.uncond.context, clip.uncond.clip_fea, clip.uncond.y, None).float()
            x = scheduler.step(u + 2.0 * (c - u), t, x, return_dict=False)[0]
    assert torch.allclose(guided, x, rtol=0, atol=1e-6)
    blocks = list(pipe.stream(clip, seed=0))
    assert len(blocks) == 1 and blocks[0].frames.shape == (1, 3, 9, HEIGHT, WIDTH)
    assert torch.equal(blocks[0].frames, pipe.generate(clip, seed=0))
