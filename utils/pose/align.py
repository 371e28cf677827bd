"""Fit a driving pose sequence to the body proportions and position of a reference pose (UniAnimate's rule).

From the first driving frame: a global x scale (shoulder width) and y scale (torso height) applied to
every coordinate, then each bone (root to leaves) rescaled to the reference bone length, moving the
joints below it; finally one translation puts the first frame's neck on the reference neck. The same
scales, bone ratios and translation apply to every frame, so the motion is kept. Unlike the reference
code, invisible joints are skipped: a scale or bone whose joints are invisible (in the reference or the
first driving frame) stays 1, and a frame moves a bone only where both its joints are visible.
"""

from __future__ import annotations

import numpy as np

from utils.pose.keypoints import PoseSequence

# (parent, child, joints that move with the child, hand that moves with it: 0 left, 1 right, None),
# in the reference's order (parents before children).
BONES = (
    (1, 0, (0, 14, 15, 16, 17), None),
    (1, 2, (2, 3, 4), 1),
    (1, 5, (5, 6, 7), 0),
    (2, 3, (3, 4), 1),
    (3, 4, (4,), 1),
    (5, 6, (6, 7), 0),
    (6, 7, (7,), 0),
    (0, 14, (14, 16), None),
    (0, 15, (15, 17), None),
    (14, 16, (16,), None),
    (15, 17, (17,), None),
    (8, 9, (9, 10, 19), None),
    (9, 10, (10, 19), None),
    (11, 12, (12, 13, 18), None),
    (12, 13, (13, 18), None),
)
NECK, R_SHOULDER, L_SHOULDER, R_HIP, L_HIP = 1, 2, 5, 8, 11
_EPS = 1e-6


def _global_scales(drv: np.ndarray, drv_vis: np.ndarray, ref: np.ndarray, ref_vis: np.ndarray) -> np.ndarray:
    """(x, y) scale from shoulder width and torso height; drv/ref [20, 2] normalised, vis [20] bool."""
    scales = [None, None]
    if drv_vis[[R_SHOULDER, L_SHOULDER]].all() and ref_vis[[R_SHOULDER, L_SHOULDER]].all():
        d = abs(drv[L_SHOULDER, 0] - drv[R_SHOULDER, 0])
        if d > _EPS:
            scales[0] = abs(ref[L_SHOULDER, 0] - ref[R_SHOULDER, 0]) / d
    torso = [R_SHOULDER, L_SHOULDER, R_HIP, L_HIP]
    if drv_vis[torso].all() and ref_vis[torso].all():
        height = lambda p: (p[R_HIP, 1] + p[L_HIP, 1] - p[R_SHOULDER, 1] - p[L_SHOULDER, 1]) / 2
        if abs(height(drv)) > _EPS:
            scales[1] = abs(height(ref) / height(drv))
    if scales[0] is None:
        scales[0] = scales[1]
    if scales[1] is None:
        scales[1] = scales[0]
    return np.array([1.0, 1.0] if scales[0] is None else scales, dtype=np.float64)


def align_pose(driving: PoseSequence, reference: PoseSequence) -> PoseSequence:
    """Driving keypoints moved onto the reference body; returns a sequence normalised like `reference`.

    driving: F frames (any source size); reference: its first frame is used. Bone lengths are measured
    in reference pixels (the aligned pose is drawn on the reference canvas). Scores are unchanged.
    """
    ref = reference.body[0].astype(np.float64)
    ref_vis = reference.body_visible[0]
    vis = driving.body_visible  # [F, 20]
    body = driving.body.astype(np.float64).copy()  # [F, 20, 2]
    hands = driving.hands.astype(np.float64).copy()  # [F, 2, 21, 2]
    pixels = np.array([reference.width, reference.height], dtype=np.float64)

    scale = _global_scales(body[0], vis[0], ref, ref_vis)
    body *= scale
    hands *= scale

    for parent, child, moved, hand in BONES:
        ok0 = vis[0, parent] and vis[0, child] and ref_vis[parent] and ref_vis[child]
        drv_len = np.linalg.norm((body[0, child] - body[0, parent]) * pixels)
        if not ok0 or drv_len < _EPS:
            continue
        ratio = np.linalg.norm((ref[child] - ref[parent]) * pixels) / drv_len
        offset = (body[:, child] - body[:, parent]) * (ratio - 1.0)  # [F, 2]
        offset *= (vis[:, parent] & vis[:, child])[:, None]
        body[:, list(moved)] += offset[:, None]
        if hand is not None:
            hands[:, hand] += offset[:, None]

    common = vis[0] & ref_vis
    if common[NECK]:
        shift = ref[NECK] - body[0, NECK]
    elif common.any():
        shift = ref[common].mean(0) - body[0, common].mean(0)
    else:
        shift = np.zeros(2)
    return PoseSequence(
        body + shift, driving.body_score, hands + shift, driving.hand_score, reference.width, reference.height
    )
