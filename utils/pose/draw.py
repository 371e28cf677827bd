"""Draw pose frames the way UniAnimate draws DWPose skeletons, in numpy, vectorised over frames.

The pose encoder was trained on these pictures, so the drawing follows the reference pixel rules:
19 body+foot limbs as filled ellipses (OpenCV ellipse2Poly polygon, semi-axes (length/2, 4), integer
centre and angle) in 20 fixed colours, the canvas scaled by 0.6 (truncating), then joint discs of
radius 4 (OpenCV's integer circle), then for each hand 20 edges of thickness 2 in HSV-rainbow colours
and radius-4 dots. Face points are not drawn.

Colour order: the reference writes its canvas with cv2.imwrite (BGR) and the model reads it with PIL
(RGB), so the colour lists below are in the canvas order and the RGB frames we return are the
channel-reversed canvas: exactly the tensors UniAnimate's pose encoder saw in training.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator

import numpy as np

from utils.pose.keypoints import NUM_BODY, PoseSequence

# Limbs as (joint a, joint b); the ellipse angle is atan2(y_a - y_b, x_a - x_b), so the order matters.
LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
    (13, 18),
    (10, 19),
)
# Canvas-order colours: limb i and joint i use colour i.
BODY_COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
    (170, 255, 255),
    (255, 255, 0),
)
HAND_EDGES = (
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
)
# HSV rainbow hue i/20, saturation and value 1, scaled to 0..255 and rounded half-to-even like OpenCV.
HAND_EDGE_COLORS = tuple(
    tuple(int(c) for c in np.rint(np.array(colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) * 255))
    for i in range(len(HAND_EDGES))
)
HAND_DOT_COLOR = (0, 0, 255)
STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_DOT_RADIUS = 4
LIMB_ALPHA = 0.6


def circle_offsets(radius: int) -> np.ndarray:
    """Pixel offsets [N, 2] (dy, dx) of OpenCV's filled integer circle (midpoint algorithm, LINE_8)."""
    half_width = np.full(2 * radius + 1, -1)  # half span per row offset -radius..radius
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1
    while dx >= dy:
        for row, half in ((dy, dx), (dx, dy)):
            for r in (radius - row, radius + row):
                half_width[r] = max(half_width[r], half)
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2
    return np.array(
        [
            (r - radius, x)
            for r in range(2 * radius + 1)
            for x in range(-half_width[r], half_width[r] + 1)
            if half_width[r] >= 0
        ]
    )


_DEG = np.arange(361)
_COS_TABLE = np.cos(np.deg2rad(_DEG)).astype(np.float32).astype(np.float64)
_SIN_TABLE = np.sin(np.deg2rad(_DEG)).astype(np.float32).astype(np.float64)


def ellipse_polygons(center: np.ndarray, axes: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """OpenCV ellipse2Poly(center, axes, angle, 0, 360, delta=1) for N ellipses at once.

    center [N, 2] int (x, y), axes [N, 2] int (a, b), angle [N] int degrees -> vertices [N, 361, 2] int
    (consecutive duplicates kept: they do not change the filled shape).
    """
    angle = np.mod(angle, 360)
    alpha, beta = _COS_TABLE[angle][:, None], _SIN_TABLE[angle][:, None]  # [N, 1]
    x = axes[:, :1] * _COS_TABLE[None]  # [N, 361]
    y = axes[:, 1:] * _SIN_TABLE[None]
    px = center[:, :1] + x * alpha - y * beta
    py = center[:, 1:] + x * beta + y * alpha
    return np.stack([np.rint(px), np.rint(py)], axis=-1).astype(np.int64)


def _line_pixels(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected Bresenham pixels (OpenCV LineIterator, left to right) of N integer segments.

    p0, p1 [N, 2] int -> xs, ys [N, S] int with S = longest major extent + 1; short segments repeat
    their last pixel. Step k along the major axis moves the minor axis floor((2 k minor + major - 1) /
    (2 major)) pixels: the closed form of OpenCV's error-term recurrence (checked exhaustively).
    """
    swap = (p1[:, 0] < p0[:, 0])[:, None]
    a, b = np.where(swap, p1, p0), np.where(swap, p0, p1)  # a is the left end
    d = b - a
    steep = (np.abs(d[:, 1]) > d[:, 0])[:, None]
    major = np.where(steep[:, 0], np.abs(d[:, 1]), d[:, 0])[:, None]
    minor = np.where(steep[:, 0], d[:, 0], np.abs(d[:, 1]))[:, None]
    k = np.minimum(np.arange(int(major.max()) + 1)[None], major)  # [N, S]
    m = (2 * minor * k + np.maximum(major - 1, 0)) // np.maximum(2 * major, 1)
    sign_y = np.where(d[:, 1:] < 0, -1, 1)
    xs = a[:, :1] + np.where(steep, m, k)
    ys = a[:, 1:] + sign_y * np.where(steep, k, m)
    return xs, ys


def _fixed_line_pixels(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of OpenCV's Line2 (16.16 fixed-point endpoints) for N segments -> xs, ys [N, S].

    Steps one pixel along the major axis from the rounded lower end, the minor coordinate advancing by
    the fixed-point slope; the rounded far end is always set. Short segments repeat their last pixel.
    """
    d = p1 - p0
    steep = np.abs(d[:, 1]) >= np.abs(d[:, 0])
    ax = np.where(steep, 1, 0)  # major axis index
    swap = np.take_along_axis(d, ax[:, None], 1)[:, 0] < 0
    a, b = np.where(swap[:, None], p1, p0), np.where(swap[:, None], p0, p1)
    major = lambda p: np.take_along_axis(p, ax[:, None], 1)[:, 0]
    minor = lambda p: np.take_along_axis(p, 1 - ax[:, None], 1)[:, 0]
    d_major, d_minor = major(b) - major(a), minor(b) - minor(a)
    step = np.sign(d_minor) * ((np.abs(d_minor) << 16) // (d_major | 1))  # C division truncates
    count = d_major >> 16
    k = np.arange(int(count.max()) + 1)
    kk = np.minimum(k[None], count[:, None])  # [N, S]
    m_major = ((major(a)[:, None] + 32768) >> 16) + kk
    m_minor = (minor(a)[:, None] + 32768 + kk * step[:, None]) >> 16
    end = (b + 32768) >> 16  # [N, 2]
    xs = np.concatenate([np.where(steep[:, None], m_minor, m_major), end[:, :1]], 1)
    ys = np.concatenate([np.where(steep[:, None], m_major, m_minor), end[:, 1:]], 1)
    return xs, ys


def _scan_pixels(vx: np.ndarray, vrow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Span ends of OpenCV's fillConvexPoly scan conversion for N closed polygons.

    vx [N, V] vertex x in 16.16 fixed point, vrow [N, V] vertex row (int) -> xs, ys [N, V*L]: for every
    edge and every row it is active on (upper vertex row .. lower row - 1), the rounded x that OpenCV's
    incremental edge walk reaches (slope rounded to fixed point, x rounded half up). Rows outside an
    edge's range get ys = -1.
    """
    x0, x1 = vx, np.roll(vx, -1, axis=1)
    r0, r1 = vrow, np.roll(vrow, -1, axis=1)
    down = r1 > r0
    xs, xe = np.where(down, x0, x1), np.where(down, x1, x0)  # upper vertex -> lower vertex
    ys, dy = np.minimum(r0, r1), np.abs(r1 - r0)
    num = (xe - xs) * 2 + dy
    den = np.maximum(2 * dy, 1)
    slope = np.sign(num) * (np.abs(num) // den)  # C integer division truncates toward zero
    steps = np.arange(max(int(dy.max()), 1))
    x = xs[..., None] + steps * slope[..., None]  # [N, V, L]
    cols = (x + 32768) >> 16
    rows = np.where(steps < dy[..., None], ys[..., None] + steps, -1)
    return cols.reshape(len(vx), -1), rows.reshape(len(vx), -1)


def _polygon_pixels(vx: np.ndarray, vy: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outline (integer corners [N, V, 2], Bresenham, closed) and scan-span pixels of N convex polygons."""
    n, v, _ = corners.shape
    lx, ly = _line_pixels(corners.reshape(-1, 2), np.roll(corners, -1, axis=1).reshape(-1, 2))  # [N*V, S]
    sx, sy = _scan_pixels(vx, vy)
    return np.concatenate([lx.reshape(n, -1), sx], 1), np.concatenate([ly.reshape(n, -1), sy], 1)


def _fill_rows(canvas: np.ndarray, frame: np.ndarray, xs: np.ndarray, ys: np.ndarray, color: tuple) -> None:
    """Fill, per (frame, row), the span between the leftmost and rightmost of the given pixels.

    canvas [F, H, W, 3] uint8; frame [N] frame index of each shape; xs, ys [N, P] pixels of each shape
    (rows outside 0..H-1 are ignored). A convex shape is fully given by its outline and scan pixels.
    """
    f, h, w, _ = canvas.shape
    inside = (ys >= 0) & (ys < h)
    rows = (frame[:, None] * h + ys)[inside]  # index into the [F*H] rows
    cols = xs[inside]
    lo = np.full(f * h, np.iinfo(np.int64).max)
    hi = np.full(f * h, np.iinfo(np.int64).min)
    np.minimum.at(lo, rows, cols)
    np.maximum.at(hi, rows, cols)
    touched = np.nonzero(hi >= lo)[0]
    lo, hi = np.clip(lo[touched], 0, w), np.clip(hi[touched], -1, w - 1)
    grid = np.arange(w)
    rr, cc = np.nonzero((grid[None] >= lo[:, None]) & (grid[None] <= hi[:, None]))  # [R, W] mask
    canvas.reshape(f * h, w, 3)[touched[rr], cc] = color


def _stamp(
    canvas: np.ndarray, frame: np.ndarray, centers: np.ndarray, offsets: np.ndarray, color: tuple
) -> None:
    """Paint the pixel pattern `offsets` [P, 2] (dy, dx) at integer centres [N, 2] (x, y) of frames [N]."""
    f, h, w, _ = canvas.shape
    ys = centers[:, 1:] + offsets[None, :, 0]  # [N, P]
    xs = centers[:, :1] + offsets[None, :, 1]
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    fr = np.broadcast_to(frame[:, None], ys.shape)
    canvas[fr[inside], ys[inside], xs[inside]] = color


def _thick_segment_pixels(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the body of OpenCV's thickness-2 line: the quad p0 + n, p0 - n, p1 - n, p1 + n, |n| = 1.

    p0, p1 [N, 2] int -> xs, ys [N, P]; the round caps are stamped separately.
    """
    d = (p1 - p0).astype(np.float64)
    length = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)[:, None]
    n = np.rint(np.stack([d[:, 1], -d[:, 0]], axis=1) / length * 65536).astype(np.int64)  # 16.16 normal
    quad = np.stack([p0 * 65536 + n, p0 * 65536 - n, p1 * 65536 - n, p1 * 65536 + n], axis=1)  # [N, 4, 2]
    lx, ly = _fixed_line_pixels(quad.reshape(-1, 2), np.roll(quad, -1, axis=1).reshape(-1, 2))  # [N*4, S]
    sx, sy = _scan_pixels(quad[..., 0], (quad[..., 1] + 32768) >> 16)
    n_seg = len(p0)
    return np.concatenate([lx.reshape(n_seg, -1), sx], 1), np.concatenate([ly.reshape(n_seg, -1), sy], 1)


def draw_pose_frames(pose: PoseSequence, height: int, width: int) -> np.ndarray:
    """Draw every frame of `pose` on a black height x width canvas -> RGB uint8 [F, H, W, 3]."""
    f = len(pose)
    canvas = np.zeros((f, height, width, 3), dtype=np.uint8)  # canvas (BGR-as-written) order
    size = np.array([width, height], dtype=np.float64)
    body = pose.body.astype(np.float64) * size  # [F, 20, 2] pixels
    visible = pose.body_visible

    for (a, b), color in zip(LIMBS, BODY_COLORS, strict=False):
        frames = np.nonzero(visible[:, a] & visible[:, b])[0]
        if frames.size == 0:
            continue
        pa, pb = body[frames, a], body[frames, b]  # [N, 2]
        center = np.trunc((pa + pb) / 2).astype(np.int64)
        length = np.hypot(*(pa - pb).T)
        angle = np.trunc(np.degrees(np.arctan2(pa[:, 1] - pb[:, 1], pa[:, 0] - pb[:, 0]))).astype(np.int64)
        axes = np.stack([np.trunc(length / 2), np.full(frames.size, STICK_WIDTH)], axis=1).astype(np.int64)
        poly = ellipse_polygons(center, axes, angle)  # [N, 361, 2]
        xs, ys = _polygon_pixels(poly[..., 0] << 16, poly[..., 1], poly)
        _fill_rows(canvas, frames, xs, ys, color)
    canvas = (canvas * LIMB_ALPHA).astype(np.uint8)

    joint = circle_offsets(JOINT_RADIUS)
    for j in range(NUM_BODY):
        frames = np.nonzero(visible[:, j])[0]
        if frames.size:
            _stamp(canvas, frames, np.trunc(body[frames, j]).astype(np.int64), joint, BODY_COLORS[j])

    hands = np.trunc(pose.hands.astype(np.float64) * size).astype(np.int64)  # [F, 2, 21, 2]
    # The reference also skips hand points on pixel row/column 0 (its "x > eps and y > eps" test).
    hand_ok = pose.hand_visible & (hands[..., 0] > 0) & (hands[..., 1] > 0)
    cap, dot = circle_offsets(1), circle_offsets(HAND_DOT_RADIUS)
    for hand in range(2):
        for (a, b), color in zip(HAND_EDGES, HAND_EDGE_COLORS, strict=True):
            frames = np.nonzero(hand_ok[:, hand, a] & hand_ok[:, hand, b])[0]
            if frames.size == 0:
                continue
            p0, p1 = hands[frames, hand, a], hands[frames, hand, b]
            xs, ys = _thick_segment_pixels(p0, p1)
            _fill_rows(canvas, frames, xs, ys, color)
            _stamp(canvas, frames, p0, cap, color)
            _stamp(canvas, frames, p1, cap, color)
        for k in range(hands.shape[2]):
            frames = np.nonzero(hand_ok[:, hand, k])[0]
            if frames.size:
                _stamp(canvas, frames, hands[frames, hand, k], dot, HAND_DOT_COLOR)
    return np.ascontiguousarray(canvas[..., ::-1])


def iter_pose_frames(pose: PoseSequence, height: int, width: int, chunk: int = 16) -> Iterator[np.ndarray]:
    """draw_pose_frames one chunk of frames at a time: uint8 [H, W, 3] frames, memory that does not grow with F."""
    for start in range(0, len(pose), chunk):
        yield from draw_pose_frames(pose.select(slice(start, start + chunk)), height, width)
