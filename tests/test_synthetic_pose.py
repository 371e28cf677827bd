"""The synthetic pose world: determinism, layout, speed, the exact marker detector, and the toy VAE
smoke run."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from scripts import train_toy_vae
from utils.metrics import psnr
from utils.pose import draw_pose_frames
from utils.safetensors_io import load_file
from utils.world.synthetic_pose import (
    APPEARANCE_RANGE,
    MARKER_COLORS,
    detect_markers,
    generate_sample,
    load_world_config,
    pixel_regions,
)


@pytest.fixture(scope="module")
def world():
    return load_world_config()


@pytest.fixture(scope="module")
def samples(world):
    return [generate_sample(world, seed) for seed in range(3)]


def test_deterministic_and_varied(world, samples):
    again = generate_sample(world, 0)
    assert np.array_equal(again.video, samples[0].video) and np.array_equal(again.pose, samples[0].pose)
    assert np.array_equal(again.keypoints.body, samples[0].keypoints.body) and again.prompt == samples[0].prompt
    assert not np.array_equal(samples[0].video, samples[1].video)


def test_sample_layout(world, samples):
    s = samples[0]
    f, h, w = world.num_frames, world.height, world.width
    assert s.video.shape == s.pose.shape == (f, h, w, 3) and s.video.dtype == s.pose.dtype == np.uint8
    assert len(s.keypoints) == f and (s.keypoints.width, s.keypoints.height) == (w, h)
    assert np.array_equal(s.pose, draw_pose_frames(s.keypoints, h, w))  # the inference drawing code
    assert np.array_equal(s.ref_image, s.video[s.ref_index]) and np.array_equal(s.ref_pose, s.pose[s.ref_index])
    assert s.prompt.startswith("a figure in a") and s.meta["motions"]
    assert s.keypoints.body_visible.mean() > 0.8 and s.keypoints.hand_visible.any()


@pytest.mark.parametrize("frames", [1, 5, 17])
def test_any_1_plus_4k_length(frames):
    cfg = load_world_config(num_frames=frames, height=64, width=96)
    s = generate_sample(cfg, 7)
    assert s.video.shape == (frames, 64, 96, 3) and s.pose.shape == (frames, 64, 96, 3)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        load_world_config(num_frames=10)
    with pytest.raises(Exception, match="bogus"):
        load_world_config(bogus=1)


def test_supersampling_is_a_box_filter_of_the_larger_render():
    """supersample=2 at 64x64 equals the 128x128 hard-edged render of the same seed averaged over 2x2 blocks (the
    same camera, figure and background), away from the markers, which are drawn afterwards at the output size;
    the keypoints do not depend on it."""
    small = generate_sample(load_world_config(num_frames=5, height=64, width=64, supersample=2), 11, draw_pose=False)
    large = generate_sample(load_world_config(num_frames=5, height=128, width=128, supersample=1), 11, draw_pose=False)
    hard = generate_sample(load_world_config(num_frames=5, height=64, width=64, supersample=1), 11, draw_pose=False)
    np.testing.assert_array_equal(small.keypoints.body, hard.keypoints.body)
    blocks = large.video.reshape(5, 64, 2, 64, 2, 3).astype(np.int64)
    expected = (blocks.sum((2, 4)) + 2) // 4
    near = pixel_regions(small.video)["marker"] | pixel_regions(hard.video)["marker"]
    near |= pixel_regions(large.video)["marker"].reshape(5, 64, 2, 64, 2).any((2, 4))
    for axis in (1, 2):  # a marker's anti-aliased neighbours: one more pixel around
        near |= np.roll(near, 1, axis) | np.roll(near, -1, axis)
    assert near.mean() < 0.2
    np.testing.assert_array_equal(small.video[~near], expected[~near])
    assert (small.video != hard.video).any(-1).mean() > 0.05  # anti-aliasing changed the edges


def test_generation_is_fast(world):
    generate_sample(world, 100)
    times = []
    for seed in range(101, 104):
        start = time.perf_counter()
        generate_sample(world, seed)
        times.append(time.perf_counter() - start)
    # Measured ~0.2 s per 81-frame 128x128 clip on one shared core; the bound leaves room for a busy CI box.
    assert min(times) < 1.0


def test_marker_colours_are_reserved():
    lo, hi = APPEARANCE_RANGE
    assert len({tuple(c) for c in MARKER_COLORS}) == 20
    # Every marker has a channel at 0 or 255, more than 40 away from any appearance colour channel.
    assert all(((c == 0) | (c == 255)).any() for c in MARKER_COLORS)
    assert lo - 0 > 40 and 255 - hi > 40


def test_detector_recovers_keypoints_within_a_pixel(samples):
    errors, missed, visible = [], 0, 0
    for s in samples:
        det = detect_markers(s.video)
        truth = s.keypoints.body_visible
        assert not (det.body_visible & ~truth).any()  # never reports an invisible keypoint
        both = truth & det.body_visible
        errors.append(np.linalg.norm(det.body_pixels() - s.keypoints.body_pixels(), axis=-1)[both])
        missed += (truth & ~det.body_visible).sum()
        visible += truth.sum()
    err = np.concatenate(errors)
    # Rounding to the marker's pixel alone gives a mean of ~0.38 px; markers lost only where two keypoints
    # round to the same pixel (measured 0.5% over 20 clips).
    assert err.max() <= 1.1 and err.mean() < 0.45
    assert missed / visible < 0.02


def test_detector_tolerates_small_colour_noise(samples):
    s = samples[1]
    noise = np.random.default_rng(0).integers(-8, 9, s.video.shape)
    noisy = np.clip(s.video.astype(int) + noise, 0, 255).astype(np.uint8)
    det = detect_markers(noisy, tolerance=40)
    both = s.keypoints.body_visible & det.body_visible
    err = np.linalg.norm(det.body_pixels() - s.keypoints.body_pixels(), axis=-1)[both]
    assert not (det.body_visible & ~s.keypoints.body_visible).any()
    assert err.max() <= 1.1 and both.sum() >= 0.98 * s.keypoints.body_visible.sum()


def test_out_of_frame_keypoints_are_invisible_and_unmarked():
    cfg = load_world_config(num_frames=9, zoom=(2.5, 2.5), static_zoom_probability=1.0)
    s = generate_sample(cfg, 3)
    px = s.keypoints.body_pixels()
    outside = ((px < -0.5) | (px > np.array([cfg.width, cfg.height]) - 0.5)).any(-1)
    assert outside.any() and (s.keypoints.body_score[outside] == 0).all()
    assert not (detect_markers(s.video).body_visible & ~s.keypoints.body_visible).any()


def test_train_toy_vae_smoke(tmp_path):
    assert train_toy_vae.main(["--out", str(tmp_path), "--smoke"]) == 0
    stats = json.loads((tmp_path / "latent_stats.json").read_text())
    assert len(stats["latents_mean"]) == len(stats["latents_std"]) == 16
    assert all(s > 0 for s in stats["latents_std"])
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["latents_mean"] == stats["latents_mean"]
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size <= 10_000_000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["heldout_psnr"]) and metrics["steps"] == 2
    regions = metrics["heldout_regions"]
    assert set(regions) == {"marker", "edge", "flat"}
    assert abs(sum(r["pixels"] for r in regions.values()) - 1) < 1e-9
    assert abs(sum(r["share_of_error"] for r in regions.values()) - 1) < 1e-9


def test_toy_vae_export_loads_through_the_wan_wrapper(tmp_path):
    """The export is what utils.encoders.wan_wrapper.WanVAE (the real VAE's wrapper) loads: its normalised latents of
    the held-out clip have mean 0 and std 1 per channel (the stats were measured on it), and decoding them gives the
    PSNR the training script reported (fp16 export: the weights it scored are the weights in the file)."""
    from utils.encoders.wan_wrapper import WanVAE

    assert train_toy_vae.main(["--out", str(tmp_path), "--smoke", "steps=3"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    wrapper = WanVAE(tmp_path / "vae", device="cpu", dtype=torch.float32)
    cfg = train_toy_vae.load_config(train_toy_vae.ROOT / "configs/toy/vae.yaml", [], smoke=True)
    world = load_world_config(num_frames=cfg.eval_frames, height=cfg.height, width=cfg.width)
    clip = train_toy_vae.WorldClips(world, 1, train_toy_vae.HELD_OUT_SEED)[0][None]
    with torch.no_grad():
        latents = wrapper.encode(clip)  # [1, 16, f, h, w]
        recon = wrapper.decode(latents)
    flat = latents[0].flatten(1).double()
    torch.testing.assert_close(flat.mean(1), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(flat.std(1), torch.ones(16, dtype=torch.float64), rtol=1e-4, atol=0)
    score = psnr(train_toy_vae.to_uint8(recon[0]), train_toy_vae.to_uint8(clip[0]))
    assert abs(score - metrics["heldout_psnr"]) < 1e-3


TOY_VAE = train_toy_vae.ROOT / "assets" / "toy_vae"


def test_committed_toy_vae_reconstructs_held_out_clips_through_the_wan_wrapper():
    """The trained weights in assets/toy_vae (docs/results/toy_vae.md): at most 10 MB, loaded by the real VAE's
    wrapper; on a held-out 81-frame clip its normalised latents are near mean 0 / std 1 (the stats were measured on
    32 such clips), the decoded clip scores >= 30 dB, and the exact detector still finds the joints on it."""
    from utils.encoders.wan_wrapper import WanVAE

    files = list(TOY_VAE.iterdir())
    assert sum(f.stat().st_size for f in files) <= 10e6
    wrapper = WanVAE(TOY_VAE, device="cpu", dtype=torch.float32)
    sample = generate_sample(load_world_config(num_frames=81), train_toy_vae.HELD_OUT_SEED + 1, draw_pose=False)
    clip = torch.from_numpy(sample.video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = wrapper.encode(clip)
        recon = train_toy_vae.to_uint8(wrapper.decode(latents)[0])
    assert latents.shape == (1, 16, 21, 16, 16)
    flat = latents[0].flatten(1).double()
    assert abs(flat.mean().item()) < 0.15 and flat.mean(1).abs().max() < 1.0  # one clip: 0.002, max 0.54
    assert 0.75 < flat.std().item() < 1.25  # 0.90
    assert psnr(recon, sample.video) >= 30.0  # 32.51 dB
    found, truth = detect_markers(recon, tolerance=40), sample.keypoints
    both = found.body_visible & truth.body_visible
    assert both.sum() >= 0.9 * truth.body_visible.sum()  # 97.2% found
    err = np.linalg.norm(found.body_pixels() - truth.body_pixels(), axis=-1)[both]
    assert np.mean(err <= 2) >= 0.95  # 99.7% within 2 px


def test_train_toy_vae_resumes_from_its_state(tmp_path):
    """A run stopped after step 1 (max_minutes=0) and rerun ends with the same weights as a straight 2-step run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_toy_vae.main(["--out", str(straight), "--smoke"]) == 0
    assert train_toy_vae.main(["--out", str(resumed), "--smoke", "max_minutes=0"]) == 0
    assert torch.load(resumed / "train_state.pt", weights_only=True)["step"] == 1
    assert not (resumed / "vae").exists()
    assert train_toy_vae.main(["--out", str(resumed), "--smoke"]) == 0
    a = torch.load(straight / "train_state.pt", weights_only=True)["vae"]
    b = torch.load(resumed / "train_state.pt", weights_only=True)["vae"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_toy_vae_ranks_share_each_global_batch_exactly():
    """Rank r of N reads items [r*b, (r+1)*b) of every global batch: together the ranks read what one process reads."""
    world = load_world_config(num_frames=5, height=64, width=64)
    gb, first, steps = 6, 4, 3
    one = train_toy_vae.WorldClips(world, steps * gb, 0, 32, train_toy_vae._RankShare(first, gb, 0, 1))
    ranks = [
        train_toy_vae.WorldClips(world, steps * 2, 0, 32, train_toy_vae._RankShare(first, gb, r, 3)) for r in range(3)
    ]
    for step in range(steps):
        for r in range(3):
            for j in range(2):
                assert (
                    one.index(step * gb + r * 2 + j) == ranks[r].index(step * 2 + j) == (first + step) * gb + r * 2 + j
                )
    a, b = one[gb + 3], ranks[1][2 + 1]  # the same clip number: the same crop of the same clip
    assert a.shape == (3, 5, 32, 32) and torch.equal(a, b)
    full = train_toy_vae.WorldClips(world, 1, (first + 1) * gb + 3)[0]  # the crop is a window of the whole frame
    hits = [(y, x) for y in range(33) for x in range(33) if torch.equal(full[:, :, y : y + 32, x : x + 32], a)]
    assert len(hits) >= 1


def test_toy_vae_crops_per_clip_are_windows_of_one_clip(tmp_path):
    world = load_world_config(num_frames=5, height=64, width=64)
    single = train_toy_vae.WorldClips(world, 2, 0, 32)
    many = train_toy_vae.WorldClips(world, 2, 0, 32, crops=3)
    full = train_toy_vae.WorldClips(world, 2, 0)[1]
    windows = many[1]
    assert windows.shape == (3, 3, 5, 32, 32) and torch.equal(windows[0], single[1])  # the first is crops=1's window
    for w in windows:
        assert any(torch.equal(full[:, :, y : y + 32, x : x + 32], w) for y in range(33) for x in range(33))
    # training with 2 windows per clip: batch 2 = one clip per step
    out = tmp_path / "k2"
    assert train_toy_vae.main(["--out", str(out), "--smoke", "batch_size=2", "crop=32", "crops_per_clip=2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
    assert train_toy_vae.main(["--out", str(tmp_path / "bad"), "--smoke", "batch_size=3", "crops_per_clip=2"]) == 1


def test_train_toy_vae_init_from_an_export(tmp_path):
    assert train_toy_vae.main(["--out", str(tmp_path / "a"), "--smoke", "export_dtype=fp32"]) == 0
    exported = tmp_path / "a" / "vae"
    # steps=0: no training, so the new export must equal the one it started from
    assert (
        train_toy_vae.main(
            ["--out", str(tmp_path / "b"), "--smoke", f"init_from={exported}", "steps=0", "export_dtype=fp32"]
        )
        == 0
    )
    a = load_file(exported / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wrong = ["--out", str(tmp_path / "c"), "--smoke", f"init_from={exported}", "vae.base_dim=8"]
    assert train_toy_vae.main(wrong) == 1  # another architecture: a clear error, not a partial load
    assert train_toy_vae.main(["--out", str(tmp_path / "d"), "--smoke", f"init_from={tmp_path}"]) == 1


def test_toy_vae_marker_weighting():
    clip = train_toy_vae.WorldClips(load_world_config(num_frames=5), 1, 3)[0][None]  # [1, 3, F, H, W]
    mask = train_toy_vae.marker_mask(clip)
    regions = pixel_regions(train_toy_vae.to_uint8(clip[0]))
    assert mask.shape == (1, 1, 5, 128, 128) and mask.sum() > 50
    assert np.array_equal(mask[0, 0].numpy(), regions["marker"])
    err = torch.rand(1, 3, 5, 128, 128, dtype=torch.float64)
    w = 1.0 + 9.0 * mask.double()
    m, n = mask.expand_as(err), (~mask).expand_as(err)
    expected = (10 * err[m].sum() + err[n].sum()) / (10 * m.sum() + n.sum())
    torch.testing.assert_close(train_toy_vae.weighted_mean(err, w), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(train_toy_vae.weighted_mean(err, torch.ones_like(w)), err.mean(), rtol=1e-12, atol=0)


def test_toy_vae_grows_res_blocks_as_identity(tmp_path):
    """init_from a 1-res-block export into a 2-res-block VAE: the grown network computes the same encode and
    decode (float64, exactly: the new blocks add a zero residual), and it has more parameters to train."""
    base = ["vae.base_dim=8"]
    small_cfg = train_toy_vae.load_config(train_toy_vae.ROOT / "configs/toy/vae.yaml", base, smoke=True)
    torch.manual_seed(0)
    small = train_toy_vae.build_vae(small_cfg)
    with torch.no_grad():  # non-trivial weights everywhere (the logvar init zeroes part of quant_conv)
        for p in small.parameters():
            p.add_(0.05 * torch.randn_like(p))
    small.save_pretrained(tmp_path / "small")
    big_cfg = train_toy_vae.load_config(
        train_toy_vae.ROOT / "configs/toy/vae.yaml", base + ["vae.num_res_blocks=2"], smoke=True
    )
    big = train_toy_vae.build_vae(big_cfg)
    train_toy_vae.init_weights(big, tmp_path / "small")
    assert sum(p.numel() for p in big.parameters()) > 1.3 * sum(p.numel() for p in small.parameters())
    small, big = small.double(), big.double()
    video = torch.rand(1, 3, 5, 32, 32, dtype=torch.float64) * 2 - 1
    moments = train_toy_vae.encode_moments(small, video)
    assert torch.equal(train_toy_vae.encode_moments(big, video), moments)
    z = moments[:, : small_cfg.vae.z_dim]
    assert torch.equal(train_toy_vae.decode(big, z), train_toy_vae.decode(small, z))
    big.float().save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="does not fit"):  # shrinking is not supported
        train_toy_vae.init_weights(train_toy_vae.build_vae(small_cfg), tmp_path / "big")


@pytest.mark.slow
def test_toy_vae_compiled_loss_matches_eager(tmp_path):
    """compile=default: the compiled training forward gives the eager loss and gradients (the posterior noise is
    made negligible, as inductor draws its own random numbers)."""
    cfg = train_toy_vae.load_config(
        train_toy_vae.ROOT / "configs/toy/vae.yaml", ["vae.base_dim=8", "vae.init_logvar=-40"], smoke=True
    )
    torch.manual_seed(0)
    vae = train_toy_vae.build_vae(cfg)
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    results = []
    for fn in (train_toy_vae.vae_loss, torch.compile(train_toy_vae.vae_loss, dynamic=False)):
        vae.zero_grad()
        loss, parts = fn(vae, video, 1e-6, None, 0.5, 1.0, 3.0)
        loss.backward()
        results.append((loss.detach(), parts["mse"], [p.grad.clone() for p in vae.parameters()]))
    (l_eager, mse_eager, g_eager), (l_comp, mse_comp, g_comp) = results
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mse_comp, mse_eager, rtol=1e-4, atol=1e-7)
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert train_toy_vae.main(["--out", str(tmp_path), "--smoke", "compile=fast"]) == 1


def test_train_toy_vae_export_on_stop_and_bad_crop(tmp_path):
    assert train_toy_vae.main(["--out", str(tmp_path), "--smoke", "max_minutes=0", "export_on_stop=true"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["complete"] is False
    assert (tmp_path / "vae" / "config.json").exists()
    assert train_toy_vae.main(["--out", str(tmp_path / "bad"), "--smoke", "crop=60"]) == 1


def test_toy_vae_init_logvar_and_unclamped_loss():
    cfg = train_toy_vae.load_config(train_toy_vae.ROOT / "configs/toy/vae.yaml", ["vae.base_dim=8"], smoke=True)
    vae = train_toy_vae.build_vae(cfg)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    logvar = train_toy_vae.encode_moments(vae, video)[:, cfg.vae.z_dim :]
    torch.testing.assert_close(logvar, torch.full_like(logvar, cfg.vae.init_logvar))
    # the training loss sees the unclamped decode: pixels that overshoot [-1, 1] still get a gradient
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(5.0)  # every output far above 1
    loss, _ = train_toy_vae.vae_loss(vae, torch.ones_like(video), cfg.kl_weight)
    loss.backward()
    assert loss.item() > 3.0 and vae.decoder.conv_out.bias.grad.abs().min() > 0.5


def test_toy_vae_fp16_export_halves_the_file(tmp_path):
    assert train_toy_vae.main(["--out", str(tmp_path / "a"), "--smoke", "export_dtype=fp32"]) == 0
    assert train_toy_vae.main(["--out", str(tmp_path / "b"), "--smoke", "export_dtype=fp16"]) == 0
    sizes = [(tmp_path / d / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size for d in "ab"]
    assert 0.45 < sizes[1] / sizes[0] < 0.55
    psnrs = [json.loads((tmp_path / d / "metrics.json").read_text())["heldout_psnr"] for d in "ab"]
    assert abs(psnrs[0] - psnrs[1]) < 0.1  # the same 2 smoke steps, scored after rounding to fp16
    assert train_toy_vae.main(["--out", str(tmp_path / "c"), "--smoke", "export_dtype=int8"]) == 1


def test_pixel_regions_split_markers_edges_and_flat():
    video = np.full((2, 10, 12, 3), 90, dtype=np.uint8)
    video[:, 2:5, 2:5] = (200, 10, 10)  # a 3x3 patch of another colour
    video[1, 7, 9] = MARKER_COLORS[3]  # one marker pixel in frame 1
    r = pixel_regions(video)
    assert r["marker"].sum() == 1 and r["marker"][1, 7, 9]
    # the patch and its 1-pixel ring see a colour change within 3x3: a 5x5 block
    expected_edge = np.zeros((10, 12), bool)
    expected_edge[1:6, 1:6] = True
    expected_edge[3, 3] = False  # the patch's centre pixel sees only the patch colour
    assert (r["edge"][0] == expected_edge).all()
    ring = np.zeros((10, 12), bool)
    ring[6:9, 8:11] = True
    ring[7, 9] = False  # the marker pixel itself
    assert (r["edge"][1] == (expected_edge | ring)).all()
    assert (r["flat"] == ~(r["marker"] | r["edge"])).all()
    with pytest.raises(ValueError, match="uint8"):
        pixel_regions(video.astype(np.float32))
