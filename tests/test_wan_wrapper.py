"""utils/encoders/wan_wrapper.py and utils/encoders/text_cache.py on tiny models: official-layout checkpoints written
here load strictly and equal the library models loaded directly and the official forwards; the streaming VAE decoder
equals one-shot decoding (to one float32 ulp, decoding in float64: the chunks change post_quant_conv's shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_encoders import (
    TINY_VAE_CONFIG,
    bicubic_resize_reference,
    clip_official_state_dict,
    make_tokenizer,
    official_clip_visual,
    official_t5_forward,
    t5_official_state_dict,
    tiny_clip_config,
    tiny_umt5_config,
    vae_official_state_dict,
)
from conftest import randomize
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionModel, UMT5EncoderModel

import utils.encoders.text_cache as text_cache
from utils.encoders.text_cache import CachedTextEncoder
from utils.encoders.wan_wrapper import (
    ImageEncoder,
    StreamingVAEDecoder,
    TextEncoder,
    WanVAE,
    clean_prompt,
    preprocess_clip_image,
)
from utils.errors import CheckpointKeyError

TEXT_LEN = 16
PROMPTS = ["a person is dancing in the rain", "  cat &amp;amp;   dog\n on stage "]
# REFERENCE section 2, typed again here: the wrapper's constants must agree with them.
MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_assets(tmp_path_factory):
    """(official checkpoint path, tokenizer folder, reference HF model, official state dict)."""
    root = tmp_path_factory.mktemp("t5")
    cfg = tiny_umt5_config()
    hf = randomize(UMT5EncoderModel(cfg), std=0.3).eval()
    official = t5_official_state_dict(hf.state_dict(), cfg.num_layers)
    torch.save(official, root / "models_t5_umt5-xxl-enc-bf16.pth")
    return root / "models_t5_umt5-xxl-enc-bf16.pth", make_tokenizer(root / "tokenizer"), hf, official


def _text_encoder(t5_assets, **kwargs) -> TextEncoder:
    path, tokenizer, hf, _ = t5_assets
    return TextEncoder(
        path, tokenizer, device="cpu", dtype=torch.float32, text_len=TEXT_LEN, config=hf.config, **kwargs
    )


def test_clean_prompt():
    assert clean_prompt("  cat &amp;amp;   dog\n on stage ") == "cat & dog on stage"
    assert clean_prompt("caf\u00c3\u00a9 &lt;b&gt;") == "café <b>"  # ftfy repairs mojibake


def test_text_encoder_matches_umt5_and_official_forward(t5_assets):
    _, _, hf, official = t5_assets
    encoder = _text_encoder(t5_assets)
    context, lengths = encoder.encode(PROMPTS)
    assert context.shape == (2, TEXT_LEN, hf.config.d_model)

    ids, mask = encoder.tokenize(PROMPTS)
    assert lengths.tolist() == mask.sum(1).tolist() == [8, 6]  # words + </s>, after cleaning
    with torch.no_grad():
        direct = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = official_t5_forward(official, ids, mask, hf.config)
    for b, length in enumerate(lengths.tolist()):
        assert (context[b, :length] - direct[b, :length]).abs().max() <= 1e-6
        assert (context[b, :length] - reference[b, :length]).abs().max() <= 1e-5
        assert context[b, length:].abs().max() == 0  # zero past the prompt, as the official padding
    assert torch.equal(encoder(PROMPTS), context)


def test_text_encoder_truncates_to_text_len(t5_assets):
    encoder = _text_encoder(t5_assets)
    context, lengths = encoder.encode([" ".join(["dog"] * 40)])
    assert context.shape[1] == TEXT_LEN and lengths.tolist() == [TEXT_LEN]


def test_text_encoder_hf_folder(t5_assets, tmp_path):
    _, tokenizer, hf, _ = t5_assets
    hf.save_pretrained(tmp_path / "text_encoder")  # a diffusers pipeline folder layout
    from_folder = TextEncoder(tmp_path, tokenizer, device="cpu", dtype=torch.float32, text_len=TEXT_LEN)
    assert torch.equal(from_folder(PROMPTS), _text_encoder(t5_assets)(PROMPTS))


@pytest.mark.parametrize("damage", ["missing", "misnamed"])
def test_text_encoder_bad_checkpoint_names_keys(t5_assets, tmp_path, damage):
    path, tokenizer, hf, official = t5_assets
    broken = dict(official)
    value = broken.pop("blocks.1.ffn.fc1.weight")
    if damage == "misnamed":
        broken["blocks.1.ffn.fc_1.weight"] = value
    torch.save(broken, tmp_path / "t5.pth")
    with pytest.raises(CheckpointKeyError) as err:
        TextEncoder(tmp_path / "t5.pth", tokenizer, device="cpu", dtype=torch.float32, config=hf.config)
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in str(err.value)
    if damage == "misnamed":
        assert "blocks.1.ffn.fc_1.weight" in str(err.value)


def test_missing_files_name_the_asset(t5_assets, tmp_path):
    _, tokenizer, _, _ = t5_assets
    cases = [
        (lambda: TextEncoder(tmp_path / "t5.pth", tokenizer, device="cpu", dtype=torch.float32), "UMT5"),
        (lambda: TextEncoder(t5_assets[0], tmp_path / "tok", device="cpu", dtype=torch.float32), "tokenizer"),
        (lambda: ImageEncoder(tmp_path / "clip.pth", device="cpu", dtype=torch.float32), "CLIP"),
        (lambda: WanVAE(tmp_path / "vae.pth", device="cpu", dtype=torch.float32), "VAE"),
    ]
    for build, asset in cases:
        with pytest.raises(FileNotFoundError) as err:
            build()
        assert asset in str(err.value) and str(tmp_path) in str(err.value)
        assert "download_models.py" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Prompt cache
# ---------------------------------------------------------------------------------------------------------


def test_prompt_cache_skips_the_encoder_for_seen_prompts(t5_assets, tmp_path, monkeypatch):
    path, tokenizer, hf, _ = t5_assets
    built = []

    class CountingEncoder(TextEncoder):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(text_cache, "TextEncoder", CountingEncoder)

    def cache(text_len=TEXT_LEN):
        return CachedTextEncoder(
            tmp_path / "cache",
            path,
            tokenizer,
            device="cpu",
            dtype=torch.float32,
            text_len=text_len,
            config=hf.config,
        )

    first = cache()(PROMPTS + PROMPTS[:1])  # a repeated prompt is encoded once
    assert len(built) == 1 and len(list((tmp_path / "cache").iterdir())) == 2  # no temp files left
    # The cache encodes the distinct prompts as one batch: the same batch through the encoder is the same ops.
    expected = _text_encoder(t5_assets)(PROMPTS)[[0, 1, 0]]
    assert torch.equal(first, expected)

    again = cache()
    assert torch.equal(again([PROMPTS[1], PROMPTS[0]]), expected[[1, 0]])  # the stored tensors, read back
    assert again.encoder is None and len(built) == 1  # served from disk, T5 never built
    assert torch.equal(again(["cat &amp; dog  on stage"]), expected[1:2])
    assert len(built) == 1  # same cleaned prompt, same entry

    again(["a dog"])
    assert len(built) == 2 and len(list((tmp_path / "cache").iterdir())) == 3
    cache(text_len=TEXT_LEN + 4)(PROMPTS[:1])  # text_len is part of the key
    assert len(built) == 3


# ---------------------------------------------------------------------------------------------------------
# CLIP image encoder
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    cfg = tiny_clip_config()
    hf = randomize(CLIPVisionModel(cfg), std=0.2).eval()
    official = clip_official_state_dict(hf.state_dict(), cfg.num_hidden_layers)
    path = root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(official, path)
    return path, hf, official


def test_clip_preprocessing_is_the_official_one():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 40, 52, generator=gen) * 2 - 1
    got = preprocess_clip_image(image, 28)
    resized = bicubic_resize_reference(image.double().numpy(), 28, 28)  # squash: no crop, no aspect kept
    mean = np.array([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    std = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
    expected = ((resized + 1) / 2 - mean) / std
    assert got.shape == (2, 3, 28, 28)
    assert np.abs(got.double().numpy() - expected).max() <= 5e-5  # fp32 resize, then / std ~ 0.26


def test_image_encoder_matches_clip_and_official_forward(clip_assets):
    path, hf, official = clip_assets
    encoder = ImageEncoder(path, device="cpu", dtype=torch.float32, config=hf.config)
    image = torch.rand(2, 3, 36, 44, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = encoder(image)
    cfg = hf.config
    assert features.shape == (2, 1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)
    pixels = preprocess_clip_image(image, cfg.image_size)
    with torch.no_grad():
        direct = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        reference = official_clip_visual(official, pixels, cfg)
    assert (features - direct).abs().max() <= 1e-6
    assert (features - reference).abs().max() <= 1e-5


def test_image_encoder_hf_folder_and_bad_keys(clip_assets, tmp_path):
    path, hf, official = clip_assets
    hf.save_pretrained(tmp_path / "image_encoder")
    image = torch.rand(1, 3, 28, 28) * 2 - 1
    from_folder = ImageEncoder(tmp_path, device="cpu", dtype=torch.float32)
    assert torch.equal(
        from_folder(image), ImageEncoder(path, device="cpu", dtype=torch.float32, config=hf.config)(image)
    )

    broken = dict(official)
    broken["visual.transformer.2.mlp.00.weight"] = broken.pop("visual.transformer.2.mlp.0.weight")
    torch.save(broken, tmp_path / "clip.pth")
    with pytest.raises(CheckpointKeyError) as err:
        ImageEncoder(tmp_path / "clip.pth", device="cpu", dtype=torch.float32, config=hf.config)
    assert "visual.transformer.2.mlp.00.weight" in str(err.value)
    assert "encoder.layers.2.mlp.fc1.weight" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_assets(tmp_path_factory):
    """(official checkpoint, diffusers model loaded from it by from_single_file with a local config)."""
    root = tmp_path_factory.mktemp("vae")
    path = root / "Wan2.1_VAE.pth"
    torch.save(vae_official_state_dict(TINY_VAE_CONFIG), path)
    AutoencoderKLWan.from_config(TINY_VAE_CONFIG).save_config(root / "config")  # offline: a local config dir
    reference = AutoencoderKLWan.from_single_file(
        str(path), config=str(root / "config"), local_files_only=True, torch_dtype=torch.float32
    )
    return path, reference


@pytest.fixture(scope="module")
def vae(vae_assets):
    return WanVAE(vae_assets[0], device="cpu", dtype=torch.float32, config=TINY_VAE_CONFIG)


def test_vae_official_file_equals_from_single_file(vae, vae_assets):
    _, reference = vae_assets
    ours, theirs = vae.vae.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_vae_encode_decode_shapes_range_and_normalisation(vae, vae_assets):
    _, reference = vae_assets
    video = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 3, 2, 3) and latents.dtype == torch.float32
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mean
    mean, std = torch.tensor(MEAN).view(1, 16, 1, 1, 1), torch.tensor(STD).view(1, 16, 1, 1, 1)
    assert (latents - (mu - mean) / std).abs().max() <= 1e-5

    frames = vae.decode(latents)
    assert frames.shape == video.shape and frames.dtype == torch.float32
    assert frames.min() >= -1 and frames.max() <= 1
    with torch.no_grad():
        direct = reference.decode(latents * std + mean).sample
    assert (frames - direct).abs().max() <= 1e-6


def test_vae_diffusers_folder_and_bad_keys(vae, vae_assets, tmp_path):
    path, reference = vae_assets
    reference.save_pretrained(tmp_path / "vae")
    from_folder = WanVAE(tmp_path, device="cpu", dtype=torch.float32)
    latents = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(from_folder.decode(latents), vae.decode(latents))

    broken = vae_official_state_dict(TINY_VAE_CONFIG)
    del broken["decoder.upsamples.4.shortcut.weight"]
    broken["decoder.head.2.weigth"] = broken.pop("decoder.head.2.weight")
    torch.save(broken, tmp_path / "vae.pth")
    with pytest.raises(CheckpointKeyError) as err:
        WanVAE(tmp_path / "vae.pth", device="cpu", dtype=torch.float32, config=TINY_VAE_CONFIG)
    message = str(err.value)
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in message  # missing, diffusers name
    assert "decoder.head.2.weigth" in message and "decoder.conv_out.weight" in message


def _stream(vae: WanVAE, latents: torch.Tensor, chunk_sizes: list[int]) -> list[torch.Tensor]:
    decoder = vae.streaming_decoder()
    with torch.no_grad():
        return [decoder.decode(chunk) for chunk in latents.split(chunk_sizes, dim=2)]


@pytest.fixture(scope="module")
def vae64(vae_assets):
    return WanVAE(vae_assets[0], device="cpu", dtype=torch.float64, config=TINY_VAE_CONFIG)


@pytest.mark.parametrize("chunk_sizes", [[3] * 7, [1, 4, 4, 4, 4, 4], [2, 1, 5, 13]])
def test_streaming_decode_equals_one_shot(vae64, chunk_sizes):
    """The decoder runs one latent at a time either way, but post_quant_conv sees the chunk (or the whole clip),
    and float32 kernels of other lengths may round differently (2.5e-6 on values ~0.16 on some CPUs). So decode
    in float64, where reordering costs ~1e-16: the only float32 step is decode()'s final cast, so the two agree
    to one float32 ulp (eps bounds it for values in [-1, 1]); a wrong cache frame would differ by ~0.1."""
    latents = torch.randn(1, 16, 21, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae64.decode(latents)
    assert full.shape[2] == 81
    chunks = _stream(vae64, latents, chunk_sizes)
    first, *rest = chunk_sizes
    assert [c.shape[2] for c in chunks] == [1 + 4 * (first - 1)] + [4 * n for n in rest]
    torch.testing.assert_close(torch.cat(chunks, dim=2), full, rtol=0, atol=torch.finfo(torch.float32).eps)
    assert (full.abs() < 1).float().mean() > 0.9  # the comparison is not between clamped constants


def test_streaming_decode_in_float32_is_close(vae):
    """The production dtype: per-chunk float32 rounding stays at the 1e-5 level of these unit-scale frames."""
    latents = torch.randn(1, 16, 21, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae.decode(latents)
    torch.testing.assert_close(torch.cat(_stream(vae, latents, [2, 1, 5, 13]), dim=2), full, rtol=0, atol=1e-4)


def test_streaming_decoder_reset_and_version_pin(vae, monkeypatch):
    latents = torch.randn(1, 16, 4, 2, 2)
    decoder = vae.streaming_decoder()
    with torch.no_grad():
        first = decoder.decode(latents)
        decoder.reset()
        assert torch.equal(decoder.decode(latents), first)
    monkeypatch.setattr("diffusers.__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="0.42.1"):
        StreamingVAEDecoder(vae)
