"""The whole-clip VAE forward equals diffusers' chunked AutoencoderKLWan encode/decode (values and gradients)."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from utils.encoders.wan_vae_parallel import decode, encode_moments


def _vae(temperal_downsample=(False, True, True), dim_mult=(1, 2, 2, 2), seed=0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=list(dim_mult),
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=list(temperal_downsample),
    ).double()
    with torch.no_grad():  # move norms' gammas off 1 so every parameter matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.mark.parametrize("frames", [1, 5, 13])
@pytest.mark.parametrize("temperal_downsample", [(False, True, True), (True, True, False)])
def test_encode_decode_equal_chunked(frames, temperal_downsample):
    vae = _vae(temperal_downsample)
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, 32, 48, dtype=torch.float64) * 2 - 1
    ref = vae.encode(video).latent_dist.parameters
    got = encode_moments(vae, video)
    assert got.shape == ref.shape == (2, 8, 1 + (frames - 1) // 4, 4, 6)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    z = torch.randn(2, 4, ref.shape[2], 4, 6, dtype=torch.float64)
    ref_video = vae.decode(z).sample
    got_video = decode(vae, z)
    assert got_video.shape == ref_video.shape == (2, 3, frames, 32, 48)
    torch.testing.assert_close(got_video, ref_video, rtol=0, atol=1e-12)
    assert ref_video.abs().max() > 0.05  # the comparison is not between two near-zero outputs


def test_gradients_equal_chunked():
    vae = _vae(dim_mult=(1, 2, 3, 4))
    torch.manual_seed(2)
    video = torch.rand(1, 3, 9, 32, 32, dtype=torch.float64) * 2 - 1

    def grads(enc, dec):
        vae.zero_grad()
        mean = enc(video)[:, :4]
        loss = (dec(mean) - video).pow(2).mean() + 0.1 * mean.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}

    ref_loss, ref = grads(lambda v: vae.encode(v).latent_dist.parameters, lambda z: vae.decode(z).sample)
    got_loss, got = grads(lambda v: encode_moments(vae, v), lambda z: decode(vae, z))
    torch.testing.assert_close(got_loss, ref_loss, rtol=0, atol=1e-12)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    assert sum(g.abs().sum() for g in ref.values()) > 0


def test_unclamped_decode_and_bad_input():
    vae = _vae()
    z = 40 * torch.randn(1, 4, 2, 2, 2, dtype=torch.float64)
    assert decode(vae, z).abs().max() <= 1.0
    assert decode(vae, z, clamp=False).abs().max() > 1.0
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_moments(vae, torch.zeros(1, 3, 4, 16, 16, dtype=torch.float64))
    wan22 = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True)
    with pytest.raises(NotImplementedError, match="Wan2.1 layout"):
        decode(wan22, torch.zeros(1, 4, 1, 2, 2))
