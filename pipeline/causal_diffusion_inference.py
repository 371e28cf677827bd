"""Streaming generation with the causal student: block by block through the KV cache, a few denoising
steps per block (re-noising the x0 prediction between steps), then one clean pass at t = 0 that writes the
block's K/V for the blocks after it. Latent space only here; encoders and the streaming VAE wrap it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from utils.scheduler import add_noise, flow_to_x0, warp_timesteps
from wan.modules.causal_model import CausalWanModel
from wan.modules.pose import pose_tokens_for_frames

# Self-Forcing's 4-step list [1000, 750, 500, 250] on the shift-5 grid.
DEFAULT_STEPS = tuple(warp_timesteps([1000, 750, 500, 250], shift=5.0))


@dataclass
class Conditions:
    """Per-clip conditioning, whole clip (sliced per block here).

    context [B, L, text_dim]; clip_fea [B, 257, clip_dim] (i2v); y [B, C_y, F, H, W] (i2v: mask + reference
    latent, ref-pose map already added); pose_tokens [B, F*h*w, dim] from model.encode_pose or None.
    """

    context: torch.Tensor
    clip_fea: torch.Tensor | None = None
    y: torch.Tensor | None = None
    pose_tokens: torch.Tensor | None = None


@torch.no_grad()
def stream_latents(
    model: CausalWanModel,
    cond: Conditions,
    num_frames: int,
    latent_size: tuple[int, int],
    steps: Sequence[float] = DEFAULT_STEPS,
    context_t: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start_frame, clean latents [B, 16, n, H, W]) for each block as soon as it exists.

    Deterministic for a seeded `generator`. With a local attention window any num_frames streams through a
    fixed-size cache.
    """
    batch, device = cond.context.shape[0], cond.context.device
    height, width = latent_size
    n = model.num_frame_per_block
    tokens_per_frame = (height // model.patch_size[1]) * (width // model.patch_size[2])
    cache = model.new_kv_cache(batch, num_frames, dtype, device, latent_size=latent_size)
    for start in range(0, num_frames, n):
        frames = min(n, num_frames - start)
        sl = slice(start, start + frames)
        y = None if cond.y is None else cond.y[:, :, sl]
        pose = None
        if cond.pose_tokens is not None:
            pose = pose_tokens_for_frames(cond.pose_tokens, start, frames, tokens_per_frame)
        shape = (batch, model.out_dim, frames, height, width)
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        for i, t in enumerate(steps):
            t_vec = torch.full((batch, frames), float(t), device=device)
            flow = model(x, t_vec, cond.context, cond.clip_fea, y, pose, kv_cache=cache, current_start_frame=start)
            x0 = flow_to_x0(flow.float(), x, t_vec)
            if i + 1 < len(steps):
                noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                x = add_noise(x0, noise, torch.full_like(t_vec, float(steps[i + 1])))
        t_ctx = torch.full((batch, frames), float(context_t), device=device)
        model(x0, t_ctx, cond.context, cond.clip_fea, y, pose, kv_cache=cache, current_start_frame=start)
        yield start, x0
