"""Causal Wan: block-causal attention over latent frames, for training (one full-sequence forward with a
block mask) and for streaming inference (one block at a time through a KV cache).

Frames are grouped in blocks of `num_frame_per_block`; a query sees every key up to the end of its block,
optionally only the last `local_attn_size` frames plus the first `sink_size` frames. The incremental cached
forward equals the full forward on the same inputs.
"""

from __future__ import annotations

import torch

from wan.modules.attention import BlockCausalSpec, attention, block_causal_attention
from wan.modules.model import CrossContext, CrossKV, WanModel, rope_angles


class KVCache:
    """Self-attention K/V (post-RoPE) of every layer, plus the cross-attention K/V of the clip's conditioning.

    Buffers are [B, capacity_frames * tokens_per_frame, H, D], allocated once (at creation when the latent
    size is given, else at the first forward). Positions are Python ints: frame f lives in slot f when
    f < sink, else in slot sink + (f - sink) % window (a ring, so any number of frames streams through a
    local window). RoPE is applied before caching, so the order of slots never matters.
    One cache serves one clip and one conditioning branch; call `reset()` to reuse it for another clip.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        frames_per_block: int,
        capacity_frames: int,
        sink_frames: int,
        local: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        tokens_per_frame: int | None = None,
    ):
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.frames_per_block = frames_per_block
        self.capacity_frames, self.sink_frames, self.local = capacity_frames, sink_frames, local
        self.dtype, self.device = dtype, torch.device(device)
        self.tokens_per_frame: int | None = None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cross: list[CrossKV | None] = [None] * num_layers
        if tokens_per_frame is not None:
            self._allocate(tokens_per_frame)

    def _allocate(self, tokens_per_frame: int) -> None:
        shape = (self.batch_size, self.capacity_frames * tokens_per_frame, self.num_heads, self.head_dim)
        self.tokens_per_frame = tokens_per_frame
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def reset(self) -> None:
        """Forget the clip's conditioning; the self-attention slots are overwritten as the next clip streams."""
        self.cross = [None] * self.num_layers

    def slot(self, frame: int) -> int:
        if frame < self.sink_frames or not self.local:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % (self.capacity_frames - self.sink_frames)

    def check_block(self, batch: int, start_frame: int, num_frames: int, tokens_per_frame: int) -> None:
        """Validate a cached call (Python ints only, no device sync) and allocate on first use."""
        if self.tokens_per_frame is None:
            self._allocate(tokens_per_frame)
        if tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"the KV cache was sized for {self.tokens_per_frame} tokens per latent frame; this block has "
                f"{tokens_per_frame}: make a new cache for another resolution"
            )
        if batch != self.batch_size:
            raise ValueError(f"the KV cache holds batch {self.batch_size}; this block has batch {batch}")
        if start_frame % self.frames_per_block or not 0 < num_frames <= self.frames_per_block:
            raise ValueError(
                f"a cached call processes one block: start_frame={start_frame} must be a multiple of "
                f"num_frame_per_block={self.frames_per_block} and it takes 1..{self.frames_per_block} frames "
                f"(got {num_frames})"
            )
        if not self.local and start_frame + num_frames > self.capacity_frames:
            raise ValueError(
                f"the KV cache holds max_frames={self.capacity_frames} latent frames; frame "
                f"{start_frame + num_frames - 1} was asked for: create it with a larger max_frames or use a "
                "local attention window (local_attn_size)"
            )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_frame: int) -> torch.Tensor:
        """Self-attention of one block's q/k/v [B, n*T, H, D] to the cached context and itself.

        Without gradient: write the block's K/V into its slots, attend to the filled prefix of the buffer.
        With gradient (training rollouts): attend to the other slots read detached plus the block's own K/V
        (so no gradient leaks into cached context), then store a detached copy.
        """
        tpf = self.tokens_per_frame
        num_frames = k.shape[1] // tpf
        end_frame = start_frame + num_frames
        lo = self.slot(start_frame) * tpf
        hi = lo + num_frames * tpf
        filled = min(end_frame, self.capacity_frames) * tpf
        k_buf, v_buf = self.k[layer], self.v[layer]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or q.requires_grad):
            keys = torch.cat([k_buf[:, :lo], k_buf[:, hi:filled], k], dim=1)
            values = torch.cat([v_buf[:, :lo], v_buf[:, hi:filled], v], dim=1)
            out = attention(q, keys, values)
            k_buf[:, lo:hi] = k.detach()
            v_buf[:, lo:hi] = v.detach()
            return out
        k_buf[:, lo:hi] = k
        v_buf[:, lo:hi] = v
        return attention(q, k_buf[:, :filled], v_buf[:, :filled])


class CausalWanModel(WanModel):
    """Wan with block-causal attention. Extra config: num_frame_per_block, local_attn_size (frames, -1 = all),
    sink_size (frames kept at the start when a local window is set).

    forward(..., kv_cache=None, current_start_frame=0): without a cache, the block-causal full-sequence
    forward; with `new_kv_cache(...)`, one block of frames starting at current_start_frame.
    """

    def __init__(self, num_frame_per_block: int = 3, local_attn_size: int = -1, sink_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        n = num_frame_per_block
        if n < 1:
            raise ValueError(f"num_frame_per_block={n} must be >= 1")
        if local_attn_size != -1 and (local_attn_size < n or local_attn_size % n):
            raise ValueError(
                f"local_attn_size={local_attn_size} must be -1 (global) or a positive multiple of "
                f"num_frame_per_block={n} (the window holds whole blocks)"
            )
        if sink_size and (local_attn_size == -1 or sink_size % n or sink_size < 0):
            raise ValueError(
                f"sink_size={sink_size} needs a local window (local_attn_size > 0) and must be a multiple of "
                f"num_frame_per_block={n}"
            )
        self.num_frame_per_block, self.local_attn_size, self.sink_size = n, local_attn_size, sink_size

    def new_kv_cache(
        self,
        batch_size: int,
        max_frames: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
        latent_size: tuple[int, int] | None = None,
    ) -> KVCache:
        """A cache for one clip: max_frames latent frames (global attention) or the window + sink (local; then
        max_frames may be None). latent_size (H, W) allocates now; otherwise at the first forward."""
        local = self.local_attn_size > 0
        if local:
            capacity = self.sink_size + self.local_attn_size
        elif max_frames is None or max_frames < 1:
            raise ValueError("max_frames is needed for a global-attention cache (or set local_attn_size)")
        else:
            capacity = max_frames
        tokens_per_frame = None
        if latent_size is not None:
            ph, pw = self.patch_size[1:]
            tokens_per_frame = (latent_size[0] // ph) * (latent_size[1] // pw)
        return KVCache(
            self.num_layers, batch_size, self.num_heads, self.head_dim, self.num_frame_per_block,
            capacity, self.sink_size, local, dtype, device, tokens_per_frame,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        add_condition: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        current_start_frame: int = 0,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, F, H, W], t [B] or [B, F], context [B, L, text_dim], guidance w [B] (CFG-distilled models only)
        -> flow [B, out_dim, F, H, W].

        With kv_cache: x, t, y and add_condition hold only this block's frames (slice the clip's pose tokens
        with wan.modules.pose.pose_tokens_for_frames). Under sequence parallelism the full forward is split over
        the group; a cached call without gradient runs whole on every rank, one with gradient is an error.
        """
        sp = self.sequence_parallel
        if sp is not None and kv_cache is not None:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "sequence parallelism splits the full-sequence forward (training, teacher sampling), not the "
                    "KV-cache path with gradient (Self-Forcing rollouts, teacher forcing): set "
                    "train.sequence_parallel=1 for this stage"
                )
            sp = None  # cached sampling without gradient runs whole on every rank of the group (the same result)
        tokens, grid = self.embed_video(x, y, add_condition, sp)
        frames, h, w = grid
        e, e0 = self.time_embedding_per_frame(t, frames, guidance)
        rope = rope_angles(self.head_dim, current_start_frame, grid, x.device)

        if kv_cache is None:
            spec = BlockCausalSpec(frames, h * w, self.num_frame_per_block, self.local_attn_size, self.sink_size)
            if sp is not None:
                context, clip_fea = sp.sum_grad(context), sp.sum_grad(clip_fea)
                spec = sp.block_causal_spec(spec)
            cross = CrossContext(*self.embed_context(context, clip_fea))

            def attend(q, k, v, layer):
                return block_causal_attention(q, k, v, spec)

            if sp is not None:
                rope, attend = sp.shard_rope(rope, frames), sp.attention(attend)
        else:
            kv_cache.check_block(x.shape[0], current_start_frame, frames, h * w)
            cross = self._cached_cross(kv_cache, context, clip_fea)

            def attend(q, k, v, layer):
                return kv_cache.attend(layer, q, k, v, current_start_frame)

        tokens = self.run_blocks(tokens, e0, cross, rope, attend)
        return self.unpatchify(self.output(tokens, e, grid, sp), grid)

    def _cached_cross(self, cache: KVCache, context: torch.Tensor, clip_fea: torch.Tensor | None) -> CrossContext:
        """Cross-attention K/V computed once per clip into the cache. Under autograd they are recomputed each
        call and not stored, so the generator's cross-attention weights get their gradient (a cache filled
        under no_grad would cut it)."""
        if torch.is_grad_enabled():
            return CrossContext(*self.embed_context(context, clip_fea))
        if cache.cross[-1] is not None:
            return CrossContext(None, None, store=cache.cross)
        return CrossContext(*self.embed_context(context, clip_fea), store=cache.cross)
