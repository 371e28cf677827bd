"""Attention backends behind one call: SDPA (default, CPU and GPU), flex_attention for the block-causal
training mask on CUDA, and FlashAttention-3 when its package is installed (never required).

Layout everywhere in this module: q, k, v [B, L, H, D] (the Wan layout); SDPA wants [B, H, L, D].
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_BACKENDS = ("auto", "sdpa", "flash3")
_backend = os.environ.get("POSEFORCING_ATTN", "auto")


def set_backend(name: str) -> None:
    """Pick the dense attention backend: 'auto' (FlashAttention-3 if installed, else SDPA), 'sdpa', 'flash3'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {_BACKENDS}")
    if name == "flash3" and _flash3() is None:
        raise ImportError("attention backend 'flash3' needs the flash_attn_interface package (FlashAttention-3)")
    _backend = name


@functools.cache
def _flash3():
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


@functools.cache
def _cuda_sdpa_priority() -> list:
    # cuDNN is the fastest at this job's shapes on Hopper (530 vs 308 TFLOP/s for flash); see REFERENCE §6.
    from torch.nn.attention import SDPBackend

    order = ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
    return [getattr(SDPBackend, name) for name in order if hasattr(SDPBackend, name)]


def _sdpa_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    try:
        return sdpa_kernel(_cuda_sdpa_priority(), set_priority=True)
    except TypeError:  # torch without set_priority: any of the listed backends, torch's order
        return sdpa_kernel(_cuda_sdpa_priority())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention. q [B, Lq, H, D], k/v [B, Lk, H, D], optional bool mask [Lq, Lk] (True = attend)
    -> [B, Lq, H, D]."""
    if mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _backend != "sdpa":
        fa3 = _flash3()
        if fa3 is not None:
            out = fa3(q, k, v)
            return out[0] if isinstance(out, tuple) else out
    with _sdpa_context(q.device):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )  # [B, H, Lq, D]
    return out.transpose(1, 2)


@dataclass(frozen=True)
class BlockCausalSpec:
    """Which key frames a query frame may see in the block-causal training forward.

    A query in block b (frames [b*n, (b+1)*n)) sees key frames f < end(b) where end(b) is the block's end,
    further restricted to f >= end(b) - window or f < sink when a local window is set (window = -1: none).
    Tokens are in (frame, token) order; with shards = N (sequence parallelism after its all-to-all) they are in
    (shard, frame, token) order instead, each shard holding tokens_per_frame / N tokens of every frame.
    """

    num_frames: int
    tokens_per_frame: int
    frames_per_block: int
    window: int = -1
    sink: int = 0
    shards: int = 1

    def frame_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [F, F] (query frame, key frame) -> may attend."""
        frames = torch.arange(self.num_frames, device=device)
        block_end = ((frames // self.frames_per_block) + 1) * self.frames_per_block
        block_end = block_end.clamp(max=self.num_frames)  # [F] end of each query frame's block
        q_end, k_frame = block_end[:, None], frames[None, :]
        allowed = k_frame < q_end
        if self.window > 0:
            allowed &= (k_frame >= q_end - self.window) | (k_frame < self.sink)
        return allowed

    def token_frames(self, index: torch.Tensor) -> torch.Tensor:
        """The latent frame of each token index (any shape of int tensor)."""
        if self.shards == 1:
            return index // self.tokens_per_frame
        per_shard = self.tokens_per_frame // self.shards  # each shard: every frame's run of per_shard tokens
        return (index % (self.num_frames * per_shard)) // per_shard

    def token_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [L, L] with L = num_frames * tokens_per_frame."""
        t = self.tokens_per_frame
        if self.shards == 1:
            return self.frame_mask(device).repeat_interleave(t, 0).repeat_interleave(t, 1)
        frames = self.token_frames(torch.arange(self.num_frames * t, device=device))  # [L]
        return self.frame_mask(device)[frames[:, None], frames[None, :]]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


FLEX_BLOCK = 128  # flex_attention's tile; sequences are padded to a multiple of it


@functools.lru_cache(maxsize=8)
def _flex_block_mask(spec: BlockCausalSpec, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    frames, t = spec.num_frames, spec.tokens_per_frame
    padded_mask = torch.zeros(frames + 1, frames + 1, dtype=torch.bool, device=device)
    padded_mask[:frames, :frames] = spec.frame_mask(device)  # [F+1, F+1]: the extra frame is padding
    padded_len = -(-frames * t // FLEX_BLOCK) * FLEX_BLOCK

    if spec.shards == 1:

        def frame_of(idx):
            return (idx // t).clamp(max=frames)

    else:

        def frame_of(idx):  # (shard, frame, token) order; indices past the sequence are padding
            return torch.where(idx < frames * t, spec.token_frames(idx), frames)

    def mask_mod(b, h, q_idx, kv_idx):
        return padded_mask[frame_of(q_idx), frame_of(kv_idx)]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=padded_len, KV_LEN=padded_len, device=device)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: BlockCausalSpec) -> torch.Tensor:
    """Block-causal self-attention over the whole sequence. q/k/v [B, L, H, D] -> [B, L, H, D].

    CUDA uses flex_attention with a block mask (no [L, L] tensor); elsewhere a masked SDPA computes the same.
    """
    if not q.is_cuda:
        return attention(q, k, v, mask=spec.token_mask(q.device))
    length = q.shape[1]
    block_mask = _flex_block_mask(spec, q.device)
    pad = -length % FLEX_BLOCK
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for x in (q, k, v))  # [B, H, L_pad, D]
    out = _compiled_flex()(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2)[:, :length]
