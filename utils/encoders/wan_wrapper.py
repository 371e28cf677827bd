"""Wan2.1's frozen helpers on library models: UMT5 text encoder, CLIP image encoder, VAE + streaming decoder.

Each loads the official Wan files through a key map (or a HF/diffusers folder), strictly, with the official
numerics and preprocessing.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import diffusers
import ftfy
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from torch import nn
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from utils.errors import CheckpointKeyError
from utils.safetensors_io import load_file

logger = logging.getLogger(__name__)

PathLike = str | Path


# ----------------------------------------------------------------------------------------------------------
# Loading: files, key maps, strict reports
# ----------------------------------------------------------------------------------------------------------


def _require(path: PathLike, asset: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{asset} not found at {path}. download_models.py fetches it (or pass the path of a copy)."
        )
    return path


def _hf_folder(path: Path, subfolder: str) -> Path:
    """A HF/diffusers model folder, or the named component folder of a pipeline folder."""
    if (path / subfolder / "config.json").exists():
        return path / subfolder
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"{path} has no config.json (nor {subfolder}/config.json): not a HF/diffusers folder")


def _report(asset: str, source: Path, missing: Iterable[str], unexpected: Iterable[str], strict: bool) -> None:
    """Fail (strict) or warn on missing/unexpected keys, naming them."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not missing and not unexpected:
        logger.info("%s: loaded %s, all keys matched", asset, source)
        return

    def listing(keys: list[str]) -> str:
        shown = ", ".join(keys[:20])
        return f"{len(keys)} [{shown}{', ...' if len(keys) > 20 else ''}]"

    message = (
        f"{asset}: checkpoint {source} does not match the model. "
        f"Missing keys (model names): {listing(missing)}; "
        f"unexpected keys (checkpoint names): {listing(unexpected)}. Expected the official Wan2.1 file or a "
        f"HF/diffusers folder of the same architecture."
    )
    if strict:
        raise CheckpointKeyError(message)
    logger.warning(message)


def _rename(
    state_dict: dict[str, torch.Tensor], rules: Sequence[tuple[str, str]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename keys by the first (regex, replacement) rule that matches fully; return (renamed, unmatched)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    renamed, unmatched = {}, []
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                renamed[pattern.sub(repl, key)] = value
                break
        else:
            unmatched.append(key)
    return renamed, unmatched


def _from_state_dict(model_cls, config, state_dict, dtype, asset, source, strict, unmapped=()):
    """Build a transformers model from a renamed state dict (meta init, ties, buffers) and report the keys.

    `unmapped` are checkpoint keys that no rename rule matched: reported as unexpected under their own names.
    """
    model, info = model_cls.from_pretrained(
        None, config=config, state_dict=state_dict, torch_dtype=dtype, output_loading_info=True
    )
    _report(asset, source, info["missing_keys"], [*info["unexpected_keys"], *unmapped], strict)
    return model


def _from_folder(model_cls, folder: Path, dtype, asset: str, strict: bool):
    model, info = model_cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, output_loading_info=True)
    _report(asset, folder, info["missing_keys"], info["unexpected_keys"], strict)
    return model


# ----------------------------------------------------------------------------------------------------------
# Text: UMT5-XXL encoder
# ----------------------------------------------------------------------------------------------------------

T5_ASSET = "UMT5-XXL text encoder (models_t5_umt5-xxl-enc-bf16.pth)"
T5_TOKENIZER_ASSET = "UMT5 tokenizer folder (google/umt5-xxl)"

# Official Wan T5Encoder names -> transformers UMT5EncoderModel names (embed_tokens is tied to shared).
_T5_RULES = (
    (r"token_embedding\.weight", "shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
)


def umt5_xxl_config() -> UMT5Config:
    """Encoder of Wan's umt5-xxl: 24 layers, 4096 wide, 64 heads, relative bias per layer, gated tanh-GELU."""
    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
    )


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy, HTML-unescape twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _fingerprint(path: Path) -> str:
    """Path, size and mtime of a file, or of each file under a folder: cheap, and changes with the weights."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def text_encoder_identity(checkpoint: PathLike, tokenizer_path: PathLike, dtype: torch.dtype) -> str:
    """What identifies a TextEncoder's outputs, computed without loading it (for the prompt cache)."""
    checkpoint = _require(checkpoint, T5_ASSET)
    tokenizer_path = _require(tokenizer_path, T5_TOKENIZER_ASSET)
    return f"umt5|{_fingerprint(checkpoint)}|{_fingerprint(tokenizer_path)}|{dtype}"


class TextEncoder(nn.Module):
    """Prompts -> [B, text_len, 4096] UMT5 embeddings, zero past each prompt's length (as official Wan)."""

    def __init__(
        self,
        checkpoint: PathLike,
        tokenizer_path: PathLike,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        text_len: int = 512,
        config: UMT5Config | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        checkpoint = _require(checkpoint, T5_ASSET)
        tokenizer_path = _require(tokenizer_path, T5_TOKENIZER_ASSET)
        self.text_len = text_len
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        if checkpoint.is_dir():
            model = _from_folder(UMT5EncoderModel, _hf_folder(checkpoint, "text_encoder"), dtype, T5_ASSET, strict)
        else:
            renamed, unmatched = _rename(load_file(checkpoint), _T5_RULES)
            model = _from_state_dict(
                UMT5EncoderModel,
                config or umt5_xxl_config(),
                renamed,
                dtype,
                T5_ASSET,
                checkpoint,
                strict,
                unmapped=unmatched,
            )
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, padded/truncated to text_len: (ids [B, text_len], mask [B, text_len])."""
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, text_len, D] zero past the prompt, lengths [B])."""
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, D]
        return hidden * mask[..., None].to(hidden.dtype), mask.sum(dim=1)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)[0]


# ----------------------------------------------------------------------------------------------------------
# Image: open-clip XLM-RoBERTa ViT-H/14, visual tower
# ----------------------------------------------------------------------------------------------------------

CLIP_ASSET = "CLIP ViT-H/14 image encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Official XLMRobertaCLIP `visual.*` names -> transformers CLIPVisionModel names. The fused to_qkv is split
# separately; the text tower, logit scale and the projection head are not part of CLIPVisionModel.
_CLIP_RULES = (
    (r"visual\.patch_embedding\.weight", "embeddings.patch_embedding.weight"),
    (r"visual\.cls_embedding", "embeddings.class_embedding"),
    (r"visual\.pos_embedding", "embeddings.position_embedding.weight"),
    (r"visual\.pre_norm\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"visual\.post_norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"visual\.transformer\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"visual\.transformer\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"visual\.transformer\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"visual\.transformer\.(\d+)\.mlp\.0\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"visual\.transformer\.(\d+)\.mlp\.2\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
)
_CLIP_QKV = re.compile(r"visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)")
_CLIP_UNUSED = re.compile(r"textual\..*|log_scale|visual\.head")


def clip_vit_h14_config() -> CLIPVisionConfig:
    """Wan's CLIP visual tower: ViT-H/14 at 224, pre-norm blocks, exact GELU, LayerNorm eps 1e-5."""
    return CLIPVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
    )


def _clip_official_to_hf(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    used = {k: v for k, v in state_dict.items() if not _CLIP_UNUSED.fullmatch(k)}
    logger.info("%s: ignoring %d text-tower/head keys", CLIP_ASSET, len(state_dict) - len(used))
    qkv = {k: v for k, v in used.items() if _CLIP_QKV.fullmatch(k)}
    renamed, unmatched = _rename({k: v for k, v in used.items() if k not in qkv}, _CLIP_RULES)
    for key, value in qkv.items():
        layer, kind = _CLIP_QKV.fullmatch(key).groups()
        for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):  # [3*D, ...] -> 3 x [D, ...]
            renamed[f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
    # Official [1, 1, D] class token and [1, N, D] positions -> transformers' [D] and [N, D].
    if "embeddings.class_embedding" in renamed:
        renamed["embeddings.class_embedding"] = renamed["embeddings.class_embedding"].flatten()
    if "embeddings.position_embedding.weight" in renamed:
        renamed["embeddings.position_embedding.weight"] = renamed["embeddings.position_embedding.weight"][0]
    return renamed, unmatched


def preprocess_clip_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Official CLIP input: [B, 3, H, W] in [-1, 1] -> bicubic squash to size², [0, 1], CLIP mean/std."""
    x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageEncoder(nn.Module):
    """Reference image [B, 3, H, W] in [-1, 1] -> CLIP features [B, 257, 1280] (penultimate block, as I2V)."""

    def __init__(
        self,
        checkpoint: PathLike,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        config: CLIPVisionConfig | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        checkpoint = _require(checkpoint, CLIP_ASSET)
        if checkpoint.is_dir():
            model = _from_folder(CLIPVisionModel, _hf_folder(checkpoint, "image_encoder"), dtype, CLIP_ASSET, strict)
        else:
            renamed, unmatched = _clip_official_to_hf(load_file(checkpoint))
            model = _from_state_dict(
                CLIPVisionModel,
                config or clip_vit_h14_config(),
                renamed,
                dtype,
                CLIP_ASSET,
                checkpoint,
                strict,
                unmapped=unmatched,
            )
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pixels = preprocess_clip_image(image, self.model.config.image_size).to(self.dtype)  # [B, 3, 224, 224]
        hidden_states = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden_states[-2]  # [B, 1 + (224/14)^2, D]


# ----------------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKLWan with Wan's latent normalisation
# ----------------------------------------------------------------------------------------------------------

VAE_ASSET = "Wan2.1 VAE (Wan2.1_VAE.pth)"
WAN21_VAE_CONFIG = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class WanVAE(nn.Module):
    """Video [B, 3, F, H, W] in [-1, 1] <-> normalised latents [B, 16, 1 + (F-1)/4, H/8, W/8].

    encode always runs in fp32 (bf16 encode hurts I2V and causal rollouts); decode runs in `dtype`.
    """

    def __init__(
        self,
        checkpoint: PathLike,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        config: dict | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        checkpoint = _require(checkpoint, VAE_ASSET)
        if checkpoint.is_dir():
            folder = _hf_folder(checkpoint, "vae")
            vae, info = AutoencoderKLWan.from_pretrained(folder, local_files_only=True, output_loading_info=True)
            _report(VAE_ASSET, folder, info["missing_keys"], info["unexpected_keys"], strict)
        else:
            # diffusers' own official->diffusers converter (what from_single_file uses), then a strict load:
            # from_single_file itself only logs unexpected keys and leaves missing ones uninitialised.
            vae = AutoencoderKLWan.from_config(config or WAN21_VAE_CONFIG)
            converted = convert_wan_vae_to_diffusers(load_file(checkpoint))
            missing, unexpected = vae.load_state_dict(converted, strict=False)
            _report(VAE_ASSET, checkpoint, missing, unexpected, strict)
        # The latent statistics travel with the VAE's config (diffusers' defaults are Wan2.1's); a VAE trained
        # here (e.g. the toy world's, scripts/train_toy_vae.py) stores its own measured ones there.
        mean = list(getattr(vae.config, "latents_mean", None) or LATENT_MEAN)
        std = list(getattr(vae.config, "latents_std", None) or LATENT_STD)
        if not vae.config.z_dim == len(mean) == len(std):
            raise ValueError(
                f"{VAE_ASSET}: z_dim {vae.config.z_dim} but {len(mean)}/{len(std)} latent mean/std channels"
            )
        vae.encoder.float()
        vae.quant_conv.float()
        vae.decoder.to(dtype)
        vae.post_quant_conv.to(dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.dtype = dtype
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, -1, 1, 1, 1), persistent=False)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu.float() - self.mean) / self.std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float() * self.std + self.mean

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised posterior mean [B, 16, 1 + (F-1)/4, H/8, W/8], fp32."""
        mu = self.vae.encode(video.float()).latent_dist.mean
        return self.normalize(mu)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 16, F_lat, h, w] -> video [B, 3, 1 + 4 (F_lat-1), 8h, 8w] in [-1, 1], fp32."""
        return self.vae.decode(self.denormalize(latents).to(self.dtype)).sample.float()

    def streaming_decoder(self) -> StreamingVAEDecoder:
        return StreamingVAEDecoder(self)

    def streaming_encoder(self) -> StreamingVAEEncoder:
        return StreamingVAEEncoder(self)


def _check_diffusers_pin(adapter: str, version: str) -> None:
    if diffusers.__version__ != version:
        raise RuntimeError(
            f"{adapter} uses AutoencoderKLWan internals of diffusers {version}, but diffusers "
            f"{diffusers.__version__} is installed. Install diffusers=={version}, or check the adapter against "
            "the new version (tests/test_wan_wrapper.py, tests/test_streaming.py) and update the pin."
        )


class StreamingVAEEncoder:
    """Encodes a video chunk by chunk (its first frame, then 4 frames per call) with the causal feature cache kept
    across calls: the concatenated latents equal one encode() of the whole video (fp32), with memory that does
    not grow with the video. Drives diffusers' encoder(feat_cache, feat_idx) as its _encode loop does: private
    API, pinned like StreamingVAEDecoder.

    `state()` is the causal cache after the last chunk; two equal states fed the same frames give the same
    latents forever after (pipeline/streaming.py uses it to stop encoding the constant tail of `y`).
    """

    DIFFUSERS_VERSION = "0.42.1"

    def __init__(self, vae: WanVAE) -> None:
        _check_diffusers_pin("StreamingVAEEncoder", self.DIFFUSERS_VERSION)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        if vae.vae.config.patch_size is not None:
            raise ValueError("StreamingVAEEncoder supports the Wan2.1 VAE layout (no patchified input)")
        self.vae = vae
        self._num_cached_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.encoder.modules())
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._feat_cache: list = [None] * self._num_cached_convs
        self.num_frames = 0

    def state(self) -> list:
        """The causal cache (tensors, or None / markers for convs that have not cached yet)."""
        return self._feat_cache

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, n, H, W] in [-1, 1] (n = 1 for a video's first frame, else 4) -> normalised posterior mean
        [B, 16, 1, H/8, W/8], fp32."""
        want = 1 if self.num_frames == 0 else 4
        if frames.dim() != 5 or frames.shape[2] != want:
            raise ValueError(
                f"the streaming VAE encoder takes a video's first frame alone, then 4 frames per call; got "
                f"{tuple(frames.shape)} after {self.num_frames} frames"
            )
        inner = self.vae.vae
        out = inner.encoder(frames.float(), feat_cache=self._feat_cache, feat_idx=[0])
        self.num_frames += want
        mu, _ = inner.quant_conv(out).chunk(2, dim=1)  # the posterior's (mean, logvar)
        return self.vae.normalize(mu)


class StreamingVAEDecoder:
    """Decodes latents chunk by chunk with the causal feature cache kept across calls.

    The concatenated output equals one decode() of all latents (first latent -> 1 frame, then 4 per latent).
    The public decode() clears the cache on every call, so this adapter drives diffusers' post_quant_conv and
    decoder(feat_cache, feat_idx, first_chunk) directly: private API, hence the pinned version.
    """

    DIFFUSERS_VERSION = "0.42.1"

    def __init__(self, vae: WanVAE) -> None:
        _check_diffusers_pin("StreamingVAEDecoder", self.DIFFUSERS_VERSION)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.vae = vae
        self._num_cached_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._feat_cache: list = [None] * self._num_cached_convs
        self.num_latents = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 16, f, h, w] -> [B, 3, 4f (-3 on a video's first chunk), 8h, 8w], [-1, 1], fp32."""
        inner = self.vae.vae
        # post_quant_conv is 1x1x1: it has no temporal state to carry.
        x = inner.post_quant_conv(self.vae.denormalize(latents).to(self.vae.dtype))
        frames = []
        for i in range(x.shape[2]):
            frames.append(
                inner.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self.num_latents == 0,
                )
            )
            self.num_latents += 1
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0).float()
