"""Whole-clip forward of diffusers' AutoencoderKLWan (Wan2.1 layout), equal to its chunked encode/decode.

diffusers encodes a clip chunk by chunk (1 frame, then 4 at a time) and decodes it one latent frame at a time,
carrying the last frames of every causal conv in a feature cache. That loop is exact but launches every kernel
1 + (F - 1) / 4 times on tiny tensors, so training a small VAE is bound by kernel launches, not by the GPU.

The cache only reproduces a causal convolution over the whole clip, so the same network can run on all frames at
once. The one place where the chunks matter is the temporal resampling, and it has a closed form:

- downsample3d (spatial first, then time): frame 0 passes through; the rest are a stride-2, kernel-3, unpadded
  conv over frames 0.. (windows start at 0, 2, 4, ...), as the cache of the last frame gives chunk by chunk.
- upsample3d (time first, then spatial): frame 0 passes through (the "Rep" first chunk); frames 1.. go through
  the time conv with causal zero padding (the zeros the "Rep" marker inserts), and each output frame's two channel
  halves become two frames.

Everything else (residual blocks, RMS norms over channels, per-frame attention) works per frame or is a causal
conv, which diffusers' modules already run on the whole clip when given no cache. tests/test_wan_vae_parallel.py
checks equality with the chunked path in float64, values and gradients.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanAttentionBlock,
    WanResample,
    WanResidualBlock,
)


def _check(vae: AutoencoderKLWan) -> None:
    if vae.config.is_residual or vae.config.patch_size is not None:
        raise NotImplementedError(
            "the whole-clip VAE forward covers the Wan2.1 layout only (is_residual=False, patch_size=None); "
            "use vae.encode / vae.decode for Wan2.2 VAEs"
        )


def _resample(m: WanResample, x: torch.Tensor) -> torch.Tensor:
    """A WanResample over a whole clip x [B, C, T, H, W] (see the module docstring for the temporal part)."""
    b, c, t, h, w = x.shape
    if m.mode == "upsample3d" and t > 1:
        y = m.time_conv(x[:, :, 1:])  # [B, 2C, T-1, H, W]: causal zero padding
        y = y.reshape(b, 2, c, t - 1, h, w)
        y = torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, 2 * (t - 1), h, w)
        x = torch.cat([x[:, :, :1], y], 2)
    t = x.shape[2]
    x = m.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    x = x.view(b, t, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)
    if m.mode == "downsample3d" and t > 1:
        x = torch.cat([x[:, :, :1], m.time_conv(x)], 2)  # stride 2 over frames 0..: (T - 1) / 2 frames
    return x


def _layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, WanResample):
        return _resample(layer, x)
    if isinstance(layer, (WanResidualBlock, WanAttentionBlock)):
        return layer(x)
    raise TypeError(f"unexpected VAE layer {type(layer).__name__}")


def _check_frames(num_frames: int, what: str) -> None:
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"{what} has {num_frames} frames: the Wan VAE takes 1 + 4k frames")


def encode_moments(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """video [B, 3, 1 + 4k, H, W] in [-1, 1] -> quant_conv output [B, 2 z, 1 + k, H/8, W/8] (mean, logvar),
    equal to `vae.encode(video).latent_dist.parameters`."""
    _check(vae)
    _check_frames(video.shape[2], "video")
    enc = vae.encoder
    x = enc.conv_in(video)
    for layer in enc.down_blocks:
        x = _layer(layer, x)
    x = enc.mid_block(x)
    x = enc.conv_out(enc.nonlinearity(enc.norm_out(x)))
    return vae.quant_conv(x)


def decode(vae: AutoencoderKLWan, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """latents z [B, z, T, h, w] -> video [B, 3, 1 + 4 (T - 1), 8 h, 8 w], equal to `vae.decode(z).sample`
    (clamped to [-1, 1] as diffusers does unless clamp=False)."""
    _check(vae)
    dec = vae.decoder
    x = dec.conv_in(vae.post_quant_conv(z))
    x = dec.mid_block(x)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = resnet(x)
        if block.upsamplers is not None:
            x = _resample(block.upsamplers[0], x)
    x = dec.conv_out(dec.nonlinearity(dec.norm_out(x)))
    return x.clamp(-1.0, 1.0) if clamp else x
