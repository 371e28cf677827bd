"""Test helpers for the encoder/VAE wrappers: tiny configs, a tokenizer made on the spot, checkpoints written
in the official Wan key layouts, and small functional versions of the official forwards.

The official layouts and forwards are written here from the facts of the official Wan modules (t5.py, clip.py,
vae.py), independently of the key maps in utils/encoders/wan_wrapper.py, so a wrong map cannot agree with them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, UMT5Config

from utils.encoders.tiny_assets import TINY_VAE_CONFIG, WORDS, make_tokenizer, tiny_clip_config, tiny_umt5_config  # noqa: F401

# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------


def t5_official_state_dict(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF UMT5EncoderModel weights -> official Wan T5Encoder names (umt5: a relative bias in every block)."""
    out = {
        "token_embedding.weight": hf["shared.weight"],
        "norm.weight": hf["encoder.final_layer_norm.weight"],
    }
    for i in range(num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        out[f"blocks.{i}.norm1.weight"] = hf[attn + "layer_norm.weight"]
        for n in "qkvo":
            out[f"blocks.{i}.attn.{n}.weight"] = hf[attn + f"SelfAttention.{n}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = hf[attn + "SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm2.weight"] = hf[ffn + "layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = hf[ffn + "DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = hf[ffn + "DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = hf[ffn + "DenseReluDense.wo.weight"]
    return {k: v.clone() for k, v in out.items()}


def _t5_buckets(length: int, num_buckets: int, max_dist: int) -> torch.Tensor:
    """Bidirectional T5 relative-position buckets [L, L] of (key - query)."""
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = (
        max_exact + (torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact) * (half - max_exact)).long()
    )
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def official_t5_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, cfg: UMT5Config):
    """The official Wan T5Encoder forward on official-layout weights: [B, L] ids -> [B, L, D]."""

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))

    b, length = ids.shape
    n, c = cfg.num_heads, cfg.d_kv
    buckets = _t5_buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    x = sd["token_embedding.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]  # [1, N, L, L]
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{name}.weight"]).view(b, length, n, c) for name in "qkv")
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d) in T5
        logits = logits.masked_fill(mask.view(b, 1, 1, length) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("bnij,bjnc->binc", logits.softmax(-1), v).reshape(b, length, n * c)
        x = x + F.linear(attn, sd[p + "attn.o.weight"])
        h = rms(x, sd[p + "norm2.weight"])
        gated = F.linear(h, sd[p + "ffn.fc1.weight"]) * gelu_tanh(F.linear(h, sd[p + "ffn.gate.0.weight"]))
        x = x + F.linear(gated, sd[p + "ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


# ---------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------


def clip_official_state_dict(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF CLIPVisionModel weights -> the official XLMRobertaCLIP file layout (visual + a token text tower)."""
    dim = hf["embeddings.class_embedding"].shape[0]
    out = {
        "visual.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": hf["embeddings.class_embedding"].view(1, 1, dim),
        "visual.pos_embedding": hf["embeddings.position_embedding.weight"][None],
        "visual.pre_norm.weight": hf["pre_layrnorm.weight"],
        "visual.pre_norm.bias": hf["pre_layrnorm.bias"],
        "visual.post_norm.weight": hf["post_layernorm.weight"],
        "visual.post_norm.bias": hf["post_layernorm.bias"],
        "visual.head": torch.randn(dim, 8),
        "textual.token_embedding.weight": torch.randn(10, 8),
        "textual.head.0.weight": torch.randn(8, 8),
        "log_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"norm1.{kind}"] = hf[src + f"layer_norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = hf[src + f"layer_norm2.{kind}"]
            out[dst + f"attn.to_qkv.{kind}"] = torch.cat([hf[src + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[dst + f"attn.proj.{kind}"] = hf[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"mlp.0.{kind}"] = hf[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.2.{kind}"] = hf[src + f"mlp.fc2.{kind}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def official_clip_visual(sd: dict[str, torch.Tensor], pixels: torch.Tensor, cfg: CLIPVisionConfig) -> torch.Tensor:
    """The official VisionTransformer forward with use_31_block (all blocks but the last), official layout."""
    b, dim, heads = pixels.shape[0], cfg.hidden_size, cfg.num_attention_heads
    x = F.conv2d(pixels, sd["visual.patch_embedding.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    x = F.layer_norm(x, (dim,), sd["visual.pre_norm.weight"], sd["visual.pre_norm.bias"], cfg.layer_norm_eps)
    for i in range(cfg.num_hidden_layers - 1):
        p = f"visual.transformer.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.layer_norm_eps)
        qkv = F.linear(h, sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(b, -1, 3, heads, dim // heads).unbind(2)  # each [B, L, N, d]
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(attn.transpose(1, 2).reshape(b, -1, dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], cfg.layer_norm_eps)
        h = F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))  # exact GELU
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


def bicubic_resize_reference(image: np.ndarray, out_h: int, out_w: int, a: float = -0.75) -> np.ndarray:
    """Separable cubic-convolution resize (half-pixel centres, edge clamp, no antialias) of [..., H, W]."""

    def kernel(t):
        t = np.abs(t)
        return np.where(
            t <= 1,
            (a + 2) * t**3 - (a + 3) * t**2 + 1,
            np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0),
        )

    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = (o + 0.5) * n_in / n_out - 0.5
            base = math.floor(src)
            for tap in range(base - 1, base + 3):
                m[o, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
        return m

    return matrix(image.shape[-2], out_h) @ image @ matrix(image.shape[-1], out_w).T


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


def vae_official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official WanVAE_ state dict (Encoder3d, conv1, conv2, Decoder3d) for a config."""
    shapes: dict[str, tuple[int, ...]] = {}
    z, mult, nrb = cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"]

    def conv(name, c_out, c_in, kernel):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, *kernel), (c_out,)

    def residual(name, c_in, c_out):
        shapes[f"{name}.residual.0.gamma"] = (c_in, 1, 1, 1)
        conv(f"{name}.residual.2", c_out, c_in, (3, 3, 3))
        shapes[f"{name}.residual.3.gamma"] = (c_out, 1, 1, 1)
        conv(f"{name}.residual.6", c_out, c_out, (3, 3, 3))
        if c_in != c_out:
            conv(f"{name}.shortcut", c_out, c_in, (1, 1, 1))

    def middle(name, c):
        residual(f"{name}.0", c, c)
        shapes[f"{name}.1.norm.gamma"] = (c, 1, 1)
        conv(f"{name}.1.to_qkv", 3 * c, c, (1, 1))
        conv(f"{name}.1.proj", c, c, (1, 1))
        residual(f"{name}.2", c, c)

    dims = [cfg["base_dim"] * u for u in [1, *mult]]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    idx = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(nrb):
            residual(f"encoder.downsamples.{idx}", c_in, c_out)
            c_in, idx = c_out, idx + 1
        if i != len(mult) - 1:
            conv(f"encoder.downsamples.{idx}.resample.1", c_out, c_out, (3, 3))
            if cfg["temperal_downsample"][i]:
                conv(f"encoder.downsamples.{idx}.time_conv", c_out, c_out, (3, 1, 1))
            idx += 1
    middle("encoder.middle", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z, dims[-1], (3, 3, 3))
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))

    dims = [cfg["base_dim"] * u for u in [mult[-1], *mult[::-1]]]
    temporal_up = cfg["temperal_downsample"][::-1]
    conv("decoder.conv1", dims[0], z, (3, 3, 3))
    middle("decoder.middle", dims[0])
    idx = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        c_in = c_in // 2 if i > 0 else c_in  # the previous upsample halved the channels
        for _ in range(nrb + 1):
            residual(f"decoder.upsamples.{idx}", c_in, c_out)
            c_in, idx = c_out, idx + 1
        if i != len(mult) - 1:
            conv(f"decoder.upsamples.{idx}.resample.1", c_out // 2, c_out, (3, 3))
            if temporal_up[i]:
                conv(f"decoder.upsamples.{idx}.time_conv", 2 * c_out, c_out, (3, 1, 1))
            idx += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return shapes


def vae_official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official-layout VAE weights: norm gains near 1, small conv weights (outputs stay unclamped)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in vae_official_shapes(cfg).items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("gamma"):
            out[key] = 1 + 0.1 * noise
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[key] = noise * (0.5 / math.sqrt(fan_in) if len(shape) > 1 else 0.02)
    return out
