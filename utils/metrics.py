"""Evaluation metrics for pose-driven video: pose fidelity, appearance against ground truth, stability.

Videos are uint8 RGB [F, H, W, 3] (the utils.video_io format). Keypoint metrics compare the driving pose
with the pose a detector finds in the generated frames, in pixels of the generated frames, normalised
by the body scale: the larger side of the bounding box of the driving pose's visible body keypoints in
that frame (frames with fewer than two visible keypoints are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from utils.pose.keypoints import PoseSequence

Detector = Callable[[np.ndarray], PoseSequence]  # uint8 [F, H, W, 3] -> keypoints of each frame
PCK_THRESHOLD = 0.05
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def body_scale(pose: PoseSequence, width: int, height: int) -> np.ndarray:
    """[F] larger side of the visible body keypoints' bounding box in pixels of width x height; NaN
    where fewer than two keypoints are visible."""
    pts = pose.body_pixels(width, height).astype(np.float64)  # [F, 20, 2]
    vis = pose.body_visible
    lo = np.where(vis[..., None], pts, np.inf).min(1)
    hi = np.where(vis[..., None], pts, -np.inf).max(1)
    scale = (hi - lo).max(-1)
    return np.where(vis.sum(1) >= 2, scale, np.nan)


def _keypoint_errors(
    driving: PoseSequence, detected: PoseSequence, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per body keypoint of each frame: error in body scales [F, 20], visible in the driving pose (in a frame with
    a body scale) [F, 20], visible in both [F, 20]."""
    if len(driving) != len(detected):
        raise ValueError(f"driving pose has {len(driving)} frames, detected {len(detected)}")
    scale = body_scale(driving, width, height)  # [F]
    ok_frame = np.isfinite(scale) & (scale > 0)
    err = np.linalg.norm(driving.body_pixels(width, height) - detected.body_pixels(width, height), axis=-1)
    err = err / np.where(ok_frame, scale, 1.0)[:, None]  # [F, 20] in body scales
    ref_vis = driving.body_visible & ok_frame[:, None]
    return err, ref_vis, ref_vis & detected.body_visible


def keypoint_metrics(driving: PoseSequence, detected: PoseSequence, width: int, height: int) -> dict:
    """Pose fidelity of detected vs driving keypoints (same number of frames), in width x height pixels.

    kpt_l2: mean error / body scale over body keypoints visible in both; pck@0.05: fraction of driving-
    visible keypoints detected within 0.05 body scales (undetected ones count as misses);
    detection_rate: fraction of driving-visible keypoints detected at all.
    """
    err, ref_vis, both = _keypoint_errors(driving, detected, width, height)
    n_ref = int(ref_vis.sum())
    return {
        "kpt_l2": float(err[both].mean()) if both.any() else math.nan,
        f"pck@{PCK_THRESHOLD}": float((both & (err <= PCK_THRESHOLD)).sum() / n_ref) if n_ref else math.nan,
        "detection_rate": float(both.sum() / n_ref) if n_ref else math.nan,
    }


def pck_per_frame(driving: PoseSequence, detected: PoseSequence, width: int, height: int) -> np.ndarray:
    """[F] PCK@0.05 of each frame (as keypoint_metrics counts it); NaN in frames without a visible keypoint."""
    err, ref_vis, both = _keypoint_errors(driving, detected, width, height)
    n_ref = ref_vis.sum(1)
    hits = (both & (err <= PCK_THRESHOLD)).sum(1)
    return np.where(n_ref > 0, hits / np.maximum(n_ref, 1), np.nan)


def keypoint_jitter(pose: PoseSequence, scale: np.ndarray, width: int, height: int) -> float:
    """Mean acceleration |p[t+1] - 2 p[t] + p[t-1]| / scale[t] of body keypoint tracks visible in three
    consecutive frames (body scales per frame^2); NaN when no such track exists."""
    p = pose.body_pixels(width, height).astype(np.float64)  # [F, 20, 2]
    vis = pose.body_visible
    if len(pose) < 3:
        return math.nan
    acc = np.linalg.norm(p[2:] - 2 * p[1:-1] + p[:-2], axis=-1) / scale[1:-1, None]  # [F-2, 20]
    ok = vis[2:] & vis[1:-1] & vis[:-2] & np.isfinite(acc)
    return float(acc[ok].mean()) if ok.any() else math.nan


def psnr(generated: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Mean over frames of 10 log10(range^2 / MSE) (inf for identical frames)."""
    mse = np.array(
        [np.mean((g.astype(np.float64) - r) ** 2) for g, r in zip(generated, reference, strict=True)]
    )
    with np.errstate(divide="ignore"):
        return float(np.mean(10 * np.log10(data_range**2 / mse)))


def _gaussian_blur(z: torch.Tensor) -> torch.Tensor:
    """Separable 11-tap Gaussian (sigma 1.5), no padding: [..., H, W] -> [..., H-10, W-10]."""
    x = torch.arange(SSIM_WINDOW, dtype=z.dtype) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = (g / g.sum()).tolist()
    h, w = z.shape[-2:]
    rows = sum(g[i] * z[..., i : i + h - SSIM_WINDOW + 1, :] for i in range(SSIM_WINDOW))
    return sum(g[i] * rows[..., i : i + w - SSIM_WINDOW + 1] for i in range(SSIM_WINDOW))


def ssim_map(generated: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, no padding) per
    channel -> float64 [F, 3, H-10, W-10]."""
    x = torch.from_numpy(np.ascontiguousarray(generated)).to(torch.float64).permute(0, 3, 1, 2)  # [F,3,H,W]
    y = torch.from_numpy(np.ascontiguousarray(reference)).to(torch.float64).permute(0, 3, 1, 2)
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    sxx = _gaussian_blur(x * x) - mx * mx
    syy = _gaussian_blur(y * y) - my * my
    sxy = _gaussian_blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(generated: np.ndarray, reference: np.ndarray, data_range: float = 255.0, chunk: int = 4) -> float:
    """Mean SSIM over frames, channels and window positions (1 for identical clips); `chunk` frames at
    a time to bound memory."""
    maps = [
        ssim_map(generated[i : i + chunk], reference[i : i + chunk], data_range).flatten(1).mean(1)
        for i in range(0, len(generated), chunk)
    ]
    return float(torch.cat(maps).mean())


def flicker(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean |(g[t+1] - g[t]) - (r[t+1] - r[t])| in 0..255 units: change between frames that the ground
    truth does not have (0 for a clip that changes exactly like the reference; NaN for one frame)."""
    if len(generated) < 2:
        return math.nan
    step = lambda v, t: v[t + 1].astype(np.int16) - v[t]
    return float(
        np.mean([np.abs(step(generated, t) - step(reference, t)).mean() for t in range(len(generated) - 1)])
    )


def evaluate_clip(
    generated: np.ndarray,
    driving: PoseSequence,
    detector: Detector,
    ground_truth: np.ndarray | None = None,
    per_frame: bool = False,
) -> dict:
    """All metrics of one generated clip [F, H, W, 3] against its driving pose (and ground-truth video,
    same size and length, when there is one); per_frame adds `pck_per_frame` (a list of F floats)."""
    f, h, w, _ = generated.shape
    if len(driving) != f:
        raise ValueError(f"generated clip has {f} frames but the driving pose has {len(driving)}")
    detected = detector(generated)
    scale = body_scale(driving, w, h)
    out = keypoint_metrics(driving, detected, w, h)
    out["jitter"] = keypoint_jitter(detected, scale, w, h)
    out["jitter_driving"] = keypoint_jitter(driving, scale, w, h)
    if per_frame:
        out["pck_per_frame"] = pck_per_frame(driving, detected, w, h).tolist()
    if ground_truth is not None:
        if ground_truth.shape != generated.shape:
            raise ValueError(
                f"ground truth {ground_truth.shape} and generated {generated.shape} clips differ"
            )
        out.update(
            psnr=psnr(generated, ground_truth),
            ssim=ssim(generated, ground_truth),
            flicker=flicker(generated, ground_truth),
        )
    return out
