"""utils/metrics and scripts/evaluate.py on constructed cases: perfect scores for identical clips, the
expected keypoint error for a shifted clip, flicker and jitter ordering, PSNR/SSIM against the formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scripts import evaluate
from utils.data import write_index, write_sample
from utils.metrics import (
    body_scale,
    evaluate_clip,
    flicker,
    keypoint_jitter,
    keypoint_metrics,
    pck_per_frame,
    psnr,
    ssim,
    ssim_map,
)
from utils.pose import PoseSequence
from utils.video_io import write_video
from utils.world.synthetic_pose import detect_markers, generate_sample, load_world_config


@pytest.fixture(scope="module")
def sample():
    return generate_sample(load_world_config(num_frames=17), seed=4)


def shifted(pose: PoseSequence, dx_pixels: float) -> PoseSequence:
    body = pose.body.copy()
    body[..., 0] += dx_pixels / pose.width
    return PoseSequence(body, pose.body_score, pose.hands, pose.hand_score, pose.width, pose.height)


def test_body_scale_is_the_larger_bbox_side():
    body = np.zeros((2, 20, 2))
    body[:, 0], body[:, 1], body[:, 2] = (0.1, 0.2), (0.5, 0.3), (0.2, 0.9)
    score = np.zeros((2, 20))
    score[0, :3] = 1
    score[1, 0] = 1  # a single visible keypoint: no scale
    pose = PoseSequence(body, score, np.zeros((2, 2, 21, 2)), np.zeros((2, 2, 21)), 100, 50)
    scale = body_scale(pose, 100, 50)
    assert scale[0] == pytest.approx(max(0.4 * 100, 0.7 * 50)) and math.isnan(scale[1])


def test_keypoint_metrics_of_a_known_shift(sample):
    truth = sample.keypoints
    w, h = truth.width, truth.height
    perfect = keypoint_metrics(truth, truth, w, h)
    assert perfect == {"kpt_l2": 0.0, "pck@0.05": 1.0, "detection_rate": 1.0}
    scale = body_scale(truth, w, h)
    for dx in (2.0, 12.0):
        m = keypoint_metrics(truth, shifted(truth, dx), w, h)
        vis = truth.body_visible
        expected = (dx / np.broadcast_to(scale[:, None], vis.shape))[vis]
        assert m["kpt_l2"] == pytest.approx(expected.mean(), rel=1e-5)
        assert m["pck@0.05"] == pytest.approx((expected <= 0.05).mean())
    assert keypoint_metrics(truth, shifted(truth, 2.0), w, h)["pck@0.05"] == 1.0  # 2 px < 0.05 of ~70 px
    assert keypoint_metrics(truth, shifted(truth, 12.0), w, h)["pck@0.05"] == 0.0


def test_pck_per_frame_counts_each_frame_as_keypoint_metrics_does(sample):
    truth = sample.keypoints
    w, h = truth.width, truth.height
    half = len(truth) // 2
    detected = shifted(truth, 12.0)
    detected.body[:half] = truth.body[:half]  # the first half exact, the second 12 px off (a miss)
    per_frame = pck_per_frame(truth, detected, w, h)
    assert per_frame.shape == (len(truth),)
    np.testing.assert_array_equal(per_frame[:half], 1.0)
    np.testing.assert_array_equal(per_frame[half:], 0.0)
    visible = truth.body_visible.sum(1)  # the clip's PCK is the visible-weighted mean of the frames'
    pooled = float((per_frame * visible).sum() / visible.sum())
    assert keypoint_metrics(truth, detected, w, h)["pck@0.05"] == pytest.approx(pooled)
    m = evaluate_clip(sample.video, truth, detect_markers, per_frame=True)
    assert len(m["pck_per_frame"]) == len(truth) and np.nanmean(m["pck_per_frame"]) > 0.98


def test_identical_clip_scores_perfect(sample):
    m = evaluate_clip(sample.video, sample.keypoints, detect_markers, sample.video)
    assert m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0) and m["flicker"] == 0.0
    assert m["pck@0.05"] > 0.98 and m["kpt_l2"] < 0.01 and m["detection_rate"] > 0.98
    assert m["jitter"] == pytest.approx(m["jitter_driving"], abs=0.01)


def test_shifted_clip_scores_the_shift(sample):
    n = 3
    moved = np.roll(sample.video, n, axis=2)  # every marker moves n px right (none near the border here)
    m = evaluate_clip(moved, sample.keypoints, detect_markers, sample.video)
    truth = sample.keypoints
    scale = body_scale(truth, truth.width, truth.height)
    vis = truth.body_visible
    expected = (n / np.broadcast_to(scale[:, None], vis.shape))[vis].mean()
    # The detector's own rounding (<= 0.5 px per axis) is the only other error.
    assert abs(m["kpt_l2"] - expected) < 0.5 / np.nanmin(scale)
    assert m["psnr"] < 30 and m["ssim"] < 0.95


def test_flicker_and_jitter_rank_a_flickering_clip_worse(sample):
    truth = sample.video
    offset = np.clip(truth.astype(int) + 10, 0, 255).astype(np.uint8)  # a constant change: no flicker
    sign = np.where(np.arange(len(truth)) % 2 == 0, 10, -10)[:, None, None, None]
    flickering = np.clip(truth.astype(int) + sign, 0, 255).astype(np.uint8)
    assert flicker(truth, truth) == 0
    assert flicker(offset, truth) < 1.0
    assert flicker(flickering, truth) > 15 > flicker(offset, truth)

    pose = sample.keypoints
    scale = body_scale(pose, pose.width, pose.height)
    shaky = shifted(pose, 0.0)
    shaky.body[..., 0] += np.where(np.arange(len(pose)) % 2 == 0, 1.5, -1.5)[:, None] / pose.width
    smooth = keypoint_jitter(pose, scale, pose.width, pose.height)
    assert keypoint_jitter(shaky, scale, pose.width, pose.height) > smooth + 4 * 1.5 / np.nanmax(scale) * 0.9


def test_psnr_against_the_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    per_frame = [
        10 * math.log10(255**2 / np.mean((x.astype(float) - y) ** 2)) for x, y in zip(a, b, strict=True)
    ]
    assert psnr(a, b) == pytest.approx(np.mean(per_frame), rel=1e-12)


def naive_ssim(x: np.ndarray, y: np.ndarray, top: int, left: int) -> float:
    """SSIM of one 11x11 window of one channel, from the definition with explicit Gaussian weights."""
    weights = np.array(
        [[math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5**2)) for j in range(11)] for i in range(11)]
    )
    weights /= weights.sum()
    px = x[top : top + 11, left : left + 11].astype(float)
    py = y[top : top + 11, left : left + 11].astype(float)
    mx, my = (weights * px).sum(), (weights * py).sum()
    vx, vy = (weights * (px - mx) ** 2).sum(), (weights * (py - my) ** 2).sum()
    cov = (weights * (px - mx) * (py - my)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_against_the_definition():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 24, 30, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    fast = ssim_map(a, b).numpy()  # [F, 3, H-10, W-10]
    assert fast.shape == (2, 3, 14, 20)
    for f, c, top, left in ((0, 0, 0, 0), (1, 2, 13, 19), (0, 1, 7, 3), (1, 0, 5, 11)):
        assert fast[f, c, top, left] == pytest.approx(
            naive_ssim(a[f, ..., c], b[f, ..., c], top, left), abs=1e-10
        )
    assert ssim(a, a) == pytest.approx(1.0) and ssim(a, b) < 0.99
    assert ssim(a, b, chunk=1) == pytest.approx(fast.mean(), rel=1e-12)


def test_evaluate_script(tmp_path):
    cfg = load_world_config(num_frames=9, height=64, width=64)
    conditions, generated, out = tmp_path / "cond", tmp_path / "gen", tmp_path / "out"
    entries = []
    for i in range(2):
        s = generate_sample(cfg, i)
        entries.append(
            write_sample(
                conditions,
                f"{i:06d}",
                s.video,
                s.pose,
                s.ref_image,
                s.ref_pose,
                s.keypoints,
                s.prompt,
                cfg.fps,
                lossless_video=True,
            )
        )
        write_video(generated / f"{i:06d}.mp4", s.video, cfg.fps, mode="lossless")  # a perfect "generation"
    write_index(conditions, entries)
    assert (
        evaluate.main(["--generated", str(generated), "--conditions", str(conditions), "--out", str(out)])
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_clips"] == 2 and report["mean"]["psnr"] == math.inf
    assert report["mean"]["pck@0.05"] > 0.95 and report["mean"]["flicker"] == 0.0
    table = (out / "metrics.md").read_text()
    assert "| **mean** |" in table and "000001" in table
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert evaluate.main(["--generated", str(empty), "--conditions", str(conditions), "--out", str(out)]) == 1
