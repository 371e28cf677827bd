"""The Wan2.1 diffusion transformer (bidirectional) and the block code the causal model shares.

Numerics follow the official model: fp32 residual stream, modulation, time embedding and head; float64
timestep sinusoid and RoPE; matmuls in the parameters' dtype (bf16 in practice). State-dict keys are the
official ones, plus `dwpose_embedding.*`, `randomref_embedding_pose.*` and `pose_proj.*` for pose models and
`guidance_embedding.*` for CFG-distilled ones (guidance_embed: the CFG scale w as an input).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from wan.modules import pose as pose_mod
from wan.modules.attention import attention
from wan.modules.sequence_parallel import SequenceParallel

# attend(q, k, v, layer_index) -> out, all [B, L, H, D]: how a block's self-attention sees its keys.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [L, 1, D/2] float64


# ----------------------------------------------------------------------------- numerics helpers


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] timesteps (raw 0..1000) -> [N, dim] float64 as `cat[cos, sin]`, frequencies 10000^(-i/half)."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, h, w): 128 -> (22, 21, 21)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_angles(head_dim: int, start_frame: int, grid: tuple[int, int, int], device, theta: float = 10000.0) -> Rope:
    """cos/sin [F*h*w, 1, head_dim/2] float64 for tokens ordered (f, h, w), time offset by start_frame.

    Computed from positions directly, so there is no 1024-frame table cap.
    """
    f, h, w = grid
    pos = (
        torch.arange(start_frame, start_frame + f, dtype=torch.float64, device=device),
        torch.arange(h, dtype=torch.float64, device=device),
        torch.arange(w, dtype=torch.float64, device=device),
    )
    per_axis = []
    for p, pairs in zip(pos, rope_axis_dims(head_dim), strict=True):
        axis_dim = 2 * pairs
        inv = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        per_axis.append(torch.outer(p, inv))  # [n, pairs]
    ang = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(f, h, w, -1),
            per_axis[1][None, :, None, :].expand(f, h, w, -1),
            per_axis[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)  # [L, 1, D/2]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] in float64; returns float32 like the official rope_apply."""
    cos, sin = rope
    xd = x.to(torch.float64).unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    even, odd = xd[..., 0], xd[..., 1]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).float()


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run a linear layer in its parameters' dtype (bf16 matmuls, fp32 residual stream outside)."""
    return layer(x.to(layer.weight.dtype))


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, F*T, dim] with per-frame shift/scale [B, F, dim] -> x*(1+scale)+shift, fp32."""
    frames = shift.shape[1]
    xf = x.float().unflatten(1, (frames, -1))  # [B, F, T, dim]
    return (xf * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y [B, F*T, dim] times a per-frame gate [B, F, dim], fp32."""
    frames = gate.shape[1]
    return (y.float().unflatten(1, (frames, -1)) * gate[:, :, None]).flatten(1, 2)


# ----------------------------------------------------------------------------- layers


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the parameter dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope, attend: Attend, layer: int) -> torch.Tensor:
        dtype = self.q.weight.dtype
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(_linear(self.q, x)).unflatten(-1, heads)  # [B, L, dim] -> [B, L, H, D]
        k = self.norm_k(_linear(self.k, x)).unflatten(-1, heads)
        v = _linear(self.v, x).unflatten(-1, heads)
        q, k = apply_rope(q, rope).to(dtype), apply_rope(k, rope).to(dtype)
        out = attend(q, k, v.to(dtype), layer)  # [B, L, H, D]
        return _linear(self.o, out.flatten(2))


CrossKV = tuple[torch.Tensor, ...]  # (k, v) or (k, v, k_img, v_img), each [B, L_ctx, H, D]


class CrossContext:
    """The embedded text/CLIP tokens a block cross-attends to, and an optional per-layer store of their K/V
    (the KV cache's, filled once per clip). Each block projects its K/V inside its own forward, so sharded
    (FSDP2) blocks project with their gathered weights."""

    def __init__(self, ctx: torch.Tensor | None, ctx_img: torch.Tensor | None, store: list | None = None):
        self.ctx, self.ctx_img, self.store = ctx, ctx_img, store

    def kv(self, block: WanAttentionBlock, layer: int) -> CrossKV:
        if self.store is not None and self.store[layer] is not None:
            return self.store[layer]
        kv = block.cross_attn.project_context(self.ctx, self.ctx_img)
        if self.store is not None:
            self.store[layer] = kv
        return kv


class WanCrossAttention(nn.Module):
    """Cross-attention to the text tokens; i2v models add a second attention to the CLIP tokens."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, image_input: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.image_input = image_input
        if image_input:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def project_context(self, context: torch.Tensor, context_img: torch.Tensor | None) -> CrossKV:
        """Keys/values of the (embedded) text [B, Lt, dim] and CLIP tokens [B, Li, dim]; cacheable per clip."""
        heads = (self.num_heads, self.head_dim)
        kv = [self.norm_k(_linear(self.k, context)).unflatten(-1, heads), _linear(self.v, context).unflatten(-1, heads)]
        if self.image_input:
            kv += [
                self.norm_k_img(_linear(self.k_img, context_img)).unflatten(-1, heads),
                _linear(self.v_img, context_img).unflatten(-1, heads),
            ]
        return tuple(kv)

    def forward(self, x: torch.Tensor, kv: CrossKV) -> torch.Tensor:
        q = self.norm_q(_linear(self.q, x)).unflatten(-1, (self.num_heads, self.head_dim))
        out = attention(q, kv[0], kv[1])
        if self.image_input:
            out = out + attention(q, kv[2], kv[3])
        return _linear(self.o, out.flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        image_input: bool = False,
    ):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps, image_input)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, cross: CrossContext, rope: Rope, attend: Attend, layer: int
    ) -> torch.Tensor:
        """x [B, F*T, dim] fp32, e [B, F, 6, dim] fp32 (per-frame modulation) -> [B, F*T, dim] fp32."""
        cross_kv = cross.kv(self, layer)
        mod = (self.modulation.float()[:, None] + e).unbind(2)  # 6 x [B, F, dim]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
        y = self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, attend, layer)
        x = x + gated(y, gate_msa)
        x = x + self.cross_attn(self.norm3(x), cross_kv).float()
        ffn_in = modulate(self.norm2(x), shift_ffn, scale_ffn)
        y = self.ffn[2](self.ffn[1](_linear(self.ffn[0], ffn_in)))
        return x + gated(y, gate_ffn)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, F*T, dim], e [B, F, dim] (the time embedding, not its projection) -> [B, F*T, prod(p)*C], fp32."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return _linear_fp32(self.head, modulate(self.norm(x), shift, scale))


class MLPProj(nn.Module):
    """CLIP features [B, Li, clip_dim] -> context tokens [B, Li, dim] (keys img_emb.proj.{0,1,3,4})."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        dtype = fc1.weight.dtype
        h = F.layer_norm(x.float(), norm_in.normalized_shape, norm_in.weight.float(), norm_in.bias.float(), norm_in.eps)
        h = _linear(fc2, act(_linear(fc1, h)))
        h = F.layer_norm(
            h.float(), norm_out.normalized_shape, norm_out.weight.float(), norm_out.bias.float(), norm_out.eps
        )
        return h.to(dtype)


# ----------------------------------------------------------------------------- the model


class WanModel(nn.Module):
    """Bidirectional Wan2.1 DiT (t2v or i2v), optionally with UniAnimate pose conditioning.

    forward(x, t, context, clip_fea=None, y=None, add_condition=None) -> flow prediction [B, out_dim, F, H, W]
    """

    def __init__(
        self,
        model_type: str = "t2v",
        patch_size: tuple[int, int, int] = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 16,
        dim: int = 1536,
        ffn_dim: int = 8960,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 12,
        num_layers: int = 30,
        eps: float = 1e-6,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        pose_dim: int | None = None,
        clip_dim: int = 1280,
        guidance_embed: bool = False,
        pose_loader: Callable[[WanModel], None] | None = None,
    ):
        super().__init__()
        if model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type={model_type!r}: expected 't2v' or 'i2v'")
        if model_type == "i2v" and in_dim <= out_dim:
            raise ValueError(
                f"an i2v model takes y channels beyond the noise: in_dim={in_dim} must exceed out_dim={out_dim}"
            )
        self.model_type = model_type
        self.patch_size = tuple(patch_size)
        self.text_len, self.in_dim, self.dim, self.ffn_dim = text_len, in_dim, dim, ffn_dim
        self.freq_dim, self.text_dim, self.out_dim = freq_dim, text_dim, out_dim
        self.num_heads, self.num_layers, self.eps = num_heads, num_layers, eps
        self.qk_norm, self.cross_attn_norm = qk_norm, cross_attn_norm
        self.pose_dim, self.clip_dim, self.guidance_embed = pose_dim, clip_dim, guidance_embed
        self.head_dim = dim // num_heads
        if self.head_dim % 2 or min(rope_axis_dims(self.head_dim)) < 1:
            raise ValueError(f"head_dim={self.head_dim} is too small or odd for 3-axis RoPE (needs an even value >= 6)")
        self.gradient_checkpointing = False
        # Ulysses sequence parallelism (wan/modules/sequence_parallel.py): None runs the whole sequence here.
        self.sequence_parallel: SequenceParallel | None = None

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        if guidance_embed:  # CFG distillation: sinusoid(w * 1000) -> MLP, added to the time embedding
            self.guidance_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        image_input = model_type == "i2v"
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, image_input)
            for _ in range(num_layers)
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        if image_input:
            self.img_emb = MLPProj(clip_dim, dim)

        if pose_dim is not None:
            self.dwpose_embedding = pose_mod.build_dwpose_embedding(pose_dim)
            if image_input:
                self.randomref_embedding_pose = pose_mod.build_randomref_embedding_pose(in_dim - out_dim)
            if pose_dim != dim:
                self.pose_proj = nn.Linear(pose_dim, dim)
        # Fills the pose encoders at the first encode_pose (build_model's pose_weights_path); the network reads no
        # files itself.
        self.pose_loader = pose_loader
        # The pose encoders' compute dtype when it differs from their parameters' (None: their own dtype). FSDP2's
        # bf16 training keeps them as fp32 replicated parameters outside the sharded blocks, where they would run
        # in fp32; trainer.roles sets bf16 here so they compute as the blocks do (autocast, fp32 gradients).
        self.pose_compute_dtype: torch.dtype | None = None
        self.init_weights()

    # -- init

    def init_weights(self) -> None:
        """The official init (xavier linears, small-normal embeddings, zero head) plus a zero pose_proj and a zero
        last guidance-embedding layer (a guided model starts as exactly its base)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        embeddings = [self.text_embedding, self.time_embedding]
        if self.guidance_embed:
            embeddings.append(self.guidance_embedding)
        for seq in embeddings:
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.guidance_embed:
            nn.init.zeros_(self.guidance_embedding[2].weight)
            nn.init.zeros_(self.guidance_embedding[2].bias)
        if hasattr(self, "pose_proj"):
            nn.init.zeros_(self.pose_proj.weight)
            nn.init.zeros_(self.pose_proj.bias)

    # -- conditioning

    def encode_pose(
        self, pose_frames: torch.Tensor, ref_pose: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pose tokens for the whole clip, and the reference-pose map to add to `y` (None without a ref pose).

        pose_frames [B, 3, F_pose, H, W] in 0..255 with F_pose = 1 + 4k; ref_pose [B, 3, H, W] in 0..255.
        Returns tokens [B, F_lat*h*w, dim] (F_lat = k + 1, h = H/16, w = W/16) and map [B, y_ch, 1, H/8, W/8].
        Calls `pose_loader` (if any) once, before the first encoding; computes under autocast in
        `pose_compute_dtype` when that is set (bf16 training of fp32 pose encoders).
        """
        if self.pose_dim is None:
            raise RuntimeError("this model has no pose encoders: build it with pose_dim set (e.g. 5120)")
        if self.pose_loader is not None:
            self.pose_loader(self)
            self.pose_loader = None
        dtype = self.pose_compute_dtype
        if dtype is None or dtype == self.dwpose_embedding[0].weight.dtype:
            return pose_mod.encode_pose(self, pose_frames, ref_pose)
        with torch.autocast(pose_frames.device.type, dtype=dtype):
            return pose_mod.encode_pose(self, pose_frames, ref_pose)

    def embed_context(
        self, context: torch.Tensor, clip_fea: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text [B, L<=text_len, text_dim] -> [B, text_len, dim] (zero-padded like the official model);
        CLIP [B, Li, clip_dim] -> [B, Li, dim] for i2v."""
        if context.shape[1] > self.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; the model takes at most text_len={self.text_len}")
        if context.shape[1] < self.text_len:
            context = F.pad(context, (0, 0, 0, self.text_len - context.shape[1]))
        ctx = _linear(self.text_embedding[2], self.text_embedding[1](_linear(self.text_embedding[0], context)))
        ctx_img = None
        if self.model_type == "i2v":
            if clip_fea is None:
                raise ValueError(
                    "an i2v model needs clip_fea [B, 257, clip_dim] (CLIP features of the reference image)"
                )
            ctx_img = self.img_emb(clip_fea)
        return ctx, ctx_img

    def time_embedding_per_frame(
        self, t: torch.Tensor, num_frames: int, guidance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, F], guidance w [B] or None -> (e [B, F, dim], e0 [B, F, 6, dim]) in fp32.

        A guided model (guidance_embed) adds MLP(sinusoid(w * 1000)) to the time embedding of every frame (its last
        layer starts at zero, so an untrained guided model equals its base); without w nothing is added."""
        if t.dim() == 1:
            t = t[:, None].expand(-1, num_frames)
        if t.shape[1] != num_frames:
            raise ValueError(f"t has {t.shape[1]} per-frame timesteps but x has {num_frames} latent frames")
        sinusoid = sinusoidal_embedding_1d(self.freq_dim, t.flatten()).float()
        h = _linear_fp32(self.time_embedding[2], self.time_embedding[1](_linear_fp32(self.time_embedding[0], sinusoid)))
        h = h.unflatten(0, t.shape)  # [B, F, dim]
        if guidance is not None:
            h = h + self.embed_guidance(guidance, t.shape[0])[:, None]
        e0 = _linear_fp32(self.time_projection[1], self.time_projection[0](h))
        return h, e0.unflatten(-1, (6, self.dim))

    def embed_guidance(self, guidance: torch.Tensor, batch: int) -> torch.Tensor:
        """CFG scale w [B] -> [B, dim] fp32: Linear-SiLU-Linear on the float64 sinusoid of w * 1000."""
        if not self.guidance_embed:
            raise ValueError("guidance (the CFG scale as an input) needs a CFG-distilled model: build it with "
                             "guidance_embed=True (roles.<role>.guidance_embed=true)")  # fmt: skip
        if guidance.shape != (batch,):
            raise ValueError(f"guidance must be one CFG scale per sample, shape [{batch}]; got {tuple(guidance.shape)}")
        sinusoid = sinusoidal_embedding_1d(self.freq_dim, guidance * 1000).float()
        g = self.guidance_embedding
        return _linear_fp32(g[2], g[1](_linear_fp32(g[0], sinusoid)))

    def embed_video(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        add_condition: torch.Tensor | None,
        sp: SequenceParallel | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] (+ y for i2v) -> tokens [B, F*h*w, dim] fp32 with pose tokens added; grid (F, h, w).

        With sp, only this rank's tokens [B, F*h*w/N, dim] are embedded (the patch embedding is per token)."""
        if self.model_type == "i2v":
            if y is None:
                raise ValueError(
                    f"an i2v model needs y [B, {self.in_dim - self.out_dim}, F, H, W] (mask + reference latent)"
                )
            if y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y has shape {tuple(y.shape)} but x has {tuple(x.shape)}: frames and size must match")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != self.in_dim:
            raise ValueError(f"the model takes in_dim={self.in_dim} channels (noise + y); got {x.shape[1]}")
        pt, ph, pw = self.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch size {self.patch_size}")
        weight = self.patch_embedding.weight
        if sp is None:
            tokens = self.patch_embedding(x.to(weight.dtype))  # [B, dim, F, h, w]
            grid = tuple(tokens.shape[2:])
            tokens = tokens.flatten(2).transpose(1, 2).float()  # [B, F*h*w, dim]
        else:
            grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
            sp.check(self.num_heads, grid)
            patches = sp.shard(self.patchify(x), grid[0])  # [B, F*h*w/N, C*pt*ph*pw]
            tokens = F.linear(patches.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias).float()
        if add_condition is not None:
            pose_mod.check_pose_alignment(add_condition, grid)
            if sp is not None:
                add_condition = sp.shard(add_condition, grid[0])
            tokens = tokens + add_condition.float()
        return tokens, grid

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> patches [B, F*h*w, C*pt*ph*pw] in the patch embedding's weight order (C, pt, ph, pw)."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F*h*w, pt*ph*pw*C] (C fastest) -> [B, C, F*pt, h*ph, w*pw]."""
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw)

    # -- forward

    def run_blocks(
        self, x: torch.Tensor, e0: torch.Tensor, cross: CrossContext, rope: Rope, attend: Attend
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, cross, rope, attend, i, use_reentrant=False)
            else:
                x = block(x, e0, cross, rope, attend, i)
        return x

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        add_condition: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, F, H, W] noisy latents, t [B] or [B, F], context [B, L, text_dim], guidance w [B] (CFG-distilled
        models only) -> flow [B, out_dim, F, H, W].

        Under sequence parallelism every rank of the group passes the same inputs and gets the whole output."""
        sp = self.sequence_parallel
        tokens, grid = self.embed_video(x, y, add_condition, sp)
        e, e0 = self.time_embedding_per_frame(t, grid[0], guidance)
        if sp is not None:
            context, clip_fea = sp.sum_grad(context), sp.sum_grad(clip_fea)
        ctx, ctx_img = self.embed_context(context, clip_fea)
        rope = rope_angles(self.head_dim, 0, grid, x.device)

        def full_attention(q, k, v, layer):
            return attention(q, k, v)

        attend = full_attention
        if sp is not None:
            rope, attend = sp.shard_rope(rope, grid[0]), sp.attention(full_attention)
        tokens = self.run_blocks(tokens, e0, CrossContext(ctx, ctx_img), rope, attend)
        return self.unpatchify(self.output(tokens, e, grid, sp), grid)

    def output(
        self, tokens: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int], sp: SequenceParallel | None
    ) -> torch.Tensor:
        """The head on the (local) tokens [B, F*h*w(/N), dim] -> [B, F*h*w, prod(patch)*out_dim], gathered under sp."""
        out = self.head(tokens, e)
        return out if sp is None else sp.gather(out, grid[0])
