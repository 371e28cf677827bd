"""A procedural "synthetic pose world": dancing articulated figures with exact keypoints, for toy training.

Each sample is a figure (OpenPose-18 + toes skeleton with random proportions, limb widths and clothes)
doing a rhythmic motion (walk, wave, dance, jumping jacks, squat, idle, or a cross-fade of two) in
front of a textured wall and floor, filmed by a camera that pans and zooms. It yields the RGB video,
the pose frames drawn by utils.pose (the drawing real inference uses), the keypoints and a reference
frame with its pose (UniAnimate's convention: a random frame of the clip).

The figure wears motion-capture markers: every visible body keypoint is painted, on top of everything,
as a small square in a colour reserved for that joint (no appearance colour comes near it: appearance
channels stay in APPEARANCE_RANGE, marker channels are 0, 128 or 255 with at least one at 0 or 255).
detect_markers() recovers the keypoints from the RGB video to within a pixel (mean 0.38 px: the
rounding to the marker's pixel); a keypoint is lost only when two round to the same pixel. Pixel
centres are at integer coordinates; keypoint k of a frame is at pixel (body[k, 0] * width, body[k, 1] *
height).
"""

from __future__ import annotations

import colorsys
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from utils.pose.draw import draw_pose_frames
from utils.pose.keypoints import NUM_BODY, NUM_HAND, PoseSequence

APPEARANCE_RANGE = (64, 200)
MOTIONS = ("walk", "wave", "dance", "jumping_jacks", "squat", "idle")
SIDES = ("L", "R")  # person's left (+x in the body frame) and right


def _marker_palette() -> np.ndarray:
    levels = (0, 128, 255)
    colors = [
        c
        for c in itertools.product(levels, repeat=3)
        if any(v in (0, 255) for v in c) and c not in ((0, 0, 0), (255, 255, 255))
    ]
    # 24 candidates; drop the four closest to grey-ish mixes so the 20 kept are the most saturated.
    colors.sort(key=lambda c: -(max(c) - min(c)))
    return np.array(colors[:NUM_BODY], dtype=np.uint8)


MARKER_COLORS = _marker_palette()  # [20, 3]: marker colour of body joint k
COLOR_PACK = np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # RGB uint8 -> one int per colour: rgb @ COLOR_PACK
MARKER_CODES = MARKER_COLORS.astype(np.int32) @ COLOR_PACK  # [20]: the packed marker colours


@dataclass
class WorldConfig:
    """Every size and range of the world; configs/toy/world.yaml overrides these."""

    height: int = 128
    width: int = 128
    num_frames: int = 81
    fps: float = 16.0
    motion_weights: dict = field(
        default_factory=lambda: {
            "walk": 1.0,
            "wave": 1.0,
            "dance": 2.0,
            "jumping_jacks": 1.0,
            "squat": 1.0,
            "idle": 0.5,
        }
    )
    mix_probability: float = 0.3  # cross-fade from one motion to another inside the clip
    tempo_bpm: tuple = (70.0, 140.0)
    figure_height: tuple = (0.55, 0.8)  # figure height / frame height at zoom 1
    zoom: tuple = (0.8, 1.25)  # camera zoom, sampled log-uniformly at the clip start and end
    static_zoom_probability: float = 0.4
    pan: float = 0.15  # camera drift over a clip, in figure heights
    track_probability: float = 0.6  # the camera follows a walking figure
    max_yaw_deg: float = 40.0  # facing direction for non-walking motions (walk: 45..90 degrees)
    camera_pitch: float = 0.2  # how much nearer points are drawn lower (sin of the look-down angle)
    marker_radius: int = 1  # markers are (2r+1)^2 squares
    supersample: int = 2  # render at s x the size and average s x s blocks (anti-aliased edges); 1 = hard edges
    hands: bool = True


def load_world_config(path: str | Path | None = None, **overrides) -> WorldConfig:
    """WorldConfig from defaults <- YAML file <- keyword overrides; unknown keys are an error."""
    cfg = OmegaConf.structured(WorldConfig)
    if path is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    cfg = OmegaConf.merge(cfg, overrides)
    config = WorldConfig(**OmegaConf.to_container(cfg))
    if (config.num_frames - 1) % 4 or config.num_frames < 1:
        raise ValueError(f"num_frames must be 1 + 4k (the VAE's temporal layout), got {config.num_frames}")
    if config.supersample < 1:
        raise ValueError(f"supersample must be >= 1 (1 = no anti-aliasing), got {config.supersample}")
    return config


@dataclass
class SyntheticSample:
    """One clip. video, pose [F, H, W, 3] uint8 RGB; ref_image, ref_pose [H, W, 3] uint8 (pose and
    ref_pose are None when generated with draw_pose=False)."""

    video: np.ndarray
    pose: np.ndarray | None
    keypoints: PoseSequence
    ref_index: int
    ref_image: np.ndarray
    ref_pose: np.ndarray | None
    prompt: str
    meta: dict


# ----------------------------------------------------------------------------------------------------
# Figure: proportions (in figure heights) and appearance.


@dataclass
class Figure:
    """One figure: bone lengths and part radii in figure heights, colours, clothes."""

    torso: float
    neck: float
    head: float  # head radius
    shoulder: float  # half width
    hip: float
    upper_arm: float
    forearm: float
    hand: float
    thigh: float
    shin: float
    foot: float
    ankle: float  # ankle height above the sole
    widths: dict  # radius per part
    colors: dict  # RGB per part
    pattern: str  # shirt pattern: plain, hstripes, vstripes
    stripes: int
    long_sleeves: bool
    shorts: bool


def _color(rng: np.random.Generator, sat: tuple = (0.2, 0.9), val: tuple = (0.35, 1.0)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val))
    lo, hi = APPEARANCE_RANGE
    return np.rint(lo + (hi - lo) * np.array(rgb)).astype(np.uint8)


def _sample_figure(rng: np.random.Generator) -> Figure:
    s = lambda v: v * rng.uniform(0.9, 1.1)
    build = rng.uniform(0.8, 1.3)
    skin_tone = rng.uniform(0.25, 0.95)
    skin = np.rint(np.array([200, 170, 140]) * skin_tone + np.array([64, 64, 64]) * (1 - skin_tone)).astype(
        np.uint8
    )
    colors = {
        "skin": skin,
        "shirt": _color(rng),
        "shirt2": _color(rng),
        "trousers": _color(rng),
        "shoes": _color(rng, val=(0.2, 0.5)),
        "hair": _color(rng, sat=(0.1, 0.6), val=(0.1, 0.6)),
    }
    widths = {
        "upper_arm": 0.034 * build,
        "forearm": 0.028 * build,
        "thigh": 0.05 * build,
        "shin": 0.04 * build,
        "neck": 0.025 * build,
        "hand": 0.028,
        "foot": 0.024,
        "torso_depth": 0.07 * build,
    }
    return Figure(
        torso=s(0.30),
        neck=s(0.07),
        head=s(0.065),
        shoulder=s(0.1) * (0.85 + 0.15 * build),
        hip=s(0.06) * build,
        upper_arm=s(0.16),
        forearm=s(0.14),
        hand=s(0.08),
        thigh=s(0.23),
        shin=s(0.23),
        foot=s(0.08),
        ankle=0.04,
        widths=widths,
        colors=colors,
        pattern=str(rng.choice(["plain", "hstripes", "vstripes"])),
        stripes=int(rng.integers(3, 7)),
        long_sleeves=bool(rng.uniform() < 0.5),
        shorts=bool(rng.uniform() < 0.3),
    )


# ----------------------------------------------------------------------------------------------------
# Motions: each returns angle channels (radians) as arrays [F] over time t [F] in seconds.


def _rest(num: int) -> dict:
    """The standing pose. Per side (L/R): ab_* abduction (away from the body) and fl_* flexion (forward) of
    the upper arm (u), forearm (f), thigh (t) and shin (s), each limb's absolute angle; out = toe-out,
    open = hand openness. Body: lean sideways/forward, shoulder and hip twist, head turn, yaw (facing),
    root_x (walking offset) and air (jump height), in figure heights."""
    ch = {
        k: np.zeros(num)
        for k in ("lean_s", "lean_f", "twist_sh", "twist_hip", "head_turn", "yaw", "root_x", "air")
    }
    for s in SIDES:
        ch.update(
            {
                f"{s}_ab_u": np.full(num, 0.12),
                f"{s}_fl_u": np.zeros(num),
                f"{s}_ab_f": np.full(num, 0.08),
                f"{s}_fl_f": np.full(num, 0.25),
                f"{s}_ab_t": np.full(num, 0.04),
                f"{s}_fl_t": np.zeros(num),
                f"{s}_ab_s": np.full(num, 0.02),
                f"{s}_fl_s": np.zeros(num),
                f"{s}_out": np.full(num, 0.35),
                f"{s}_open": np.full(num, 0.6),
            }
        )
    return ch


def _walk(t: np.ndarray, beat: float, rng: np.random.Generator) -> dict:
    ch = _rest(t.size)
    w = np.pi * beat * t + rng.uniform(0, 2 * np.pi)  # one gait cycle per two beats
    a_leg, a_arm = rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.6)
    for s, sign in (("L", 1.0), ("R", -1.0)):
        swing = sign * np.sin(w)
        ch[f"{s}_fl_t"] = a_leg * swing
        ch[f"{s}_fl_s"] = ch[f"{s}_fl_t"] - rng.uniform(0.4, 0.7) * np.clip(np.sin(w * sign + 0.8), 0, None)
        ch[f"{s}_fl_u"] = -a_arm * swing
        ch[f"{s}_fl_f"] = ch[f"{s}_fl_u"] + 0.35
    ch["twist_sh"] = 0.12 * np.sin(w)
    ch["twist_hip"] = -0.1 * np.sin(w)
    direction = rng.choice([-1.0, 1.0])
    ch["yaw"] = np.full(t.size, direction * np.deg2rad(rng.uniform(45, 90)))
    ch["root_x"] = direction * np.sin(abs(ch["yaw"][0])) * rng.uniform(0.15, 0.35) * t
    return ch


def _wave(t: np.ndarray, beat: float, rng: np.random.Generator) -> dict:
    ch = _rest(t.size)
    s = str(rng.choice(SIDES))
    ch[f"{s}_ab_u"] = np.full(t.size, rng.uniform(1.9, 2.5))
    ch[f"{s}_ab_f"] = ch[f"{s}_ab_u"] + 0.5 + rng.uniform(0.3, 0.5) * np.sin(4 * np.pi * beat * t)
    ch[f"{s}_fl_f"] = np.full(t.size, 0.1)
    ch[f"{s}_open"] = np.ones(t.size)
    ch["lean_s"] = 0.05 * np.sin(np.pi * beat * t)
    ch["head_turn"] = 0.25 * np.sin(0.5 * np.pi * beat * t + rng.uniform(0, 6))
    return ch


def _dance(t: np.ndarray, beat: float, rng: np.random.Generator) -> dict:
    ch = _rest(t.size)
    moves = rng.choice(
        ["arms_alternate", "arms_pump", "sway", "bounce", "twist", "steps", "turn"],
        size=int(rng.integers(2, 5)),
        replace=False,
    )
    omega = lambda: 2 * np.pi * beat * rng.choice([0.5, 1.0, 2.0])
    phase = lambda: rng.uniform(0, 2 * np.pi)
    for move in moves:
        w, p = omega(), phase()
        if move == "arms_alternate":
            base, amp = rng.uniform(1.0, 1.6), rng.uniform(0.6, 1.2)
            for s, off in (("L", 0.0), ("R", np.pi)):
                ch[f"{s}_ab_u"] = base + amp * np.sin(w * t + p + off)
                ch[f"{s}_ab_f"] = ch[f"{s}_ab_u"] + rng.uniform(0.0, 0.8)
        elif move == "arms_pump":
            amp = rng.uniform(0.8, 1.6)
            for s in SIDES:
                ch[f"{s}_fl_u"] = amp * (1 + np.sin(w * t + p)) / 2
                ch[f"{s}_fl_f"] = ch[f"{s}_fl_u"] + rng.uniform(0.3, 1.2)
                ch[f"{s}_open"] = 0.5 + 0.5 * np.sin(w * t + p)
        elif move == "sway":
            ch["root_x"] = ch["root_x"] + rng.uniform(0.03, 0.08) * np.sin(w * t / 2 + p)
            ch["lean_s"] = rng.uniform(0.06, 0.15) * np.sin(w * t / 2 + p)
        elif move == "bounce":
            knee = rng.uniform(0.2, 0.5) * (1 + np.sin(w * t + p)) / 2
            for s in SIDES:
                ch[f"{s}_fl_t"] = ch[f"{s}_fl_t"] + knee
                ch[f"{s}_fl_s"] = ch[f"{s}_fl_s"] - knee
        elif move == "twist":
            ch["twist_sh"] = rng.uniform(0.2, 0.5) * np.sin(w * t / 2 + p)
            ch["head_turn"] = 0.5 * ch["twist_sh"]
        elif move == "steps":
            step = (1 + np.sin(w * t / 2 + p)) / 2
            ch["L_ab_t"] = ch["L_ab_t"] + rng.uniform(0.15, 0.35) * step
            ch["R_ab_t"] = ch["R_ab_t"] + rng.uniform(0.15, 0.35) * (1 - step)
            ch["L_ab_s"], ch["R_ab_s"] = ch["L_ab_t"] - 0.05, ch["R_ab_t"] - 0.05
        elif move == "turn":
            ch["yaw"] = np.deg2rad(rng.uniform(20, 60)) * np.sin(w * t / 4 + p)
    return ch


def _jumping_jacks(t: np.ndarray, beat: float, rng: np.random.Generator) -> dict:
    ch = _rest(t.size)
    c = (1 - np.cos(2 * np.pi * beat * t + rng.uniform(0, 2 * np.pi))) / 2  # 0 closed .. 1 open
    for s in SIDES:
        ch[f"{s}_ab_u"] = 0.15 + rng.uniform(2.3, 2.8) * c
        ch[f"{s}_ab_f"] = ch[f"{s}_ab_u"] + 0.1
        ch[f"{s}_fl_f"] = np.full(t.size, 0.05)
        ch[f"{s}_ab_t"] = 0.04 + rng.uniform(0.2, 0.35) * c
        ch[f"{s}_ab_s"] = ch[f"{s}_ab_t"]
        ch[f"{s}_open"] = c
    ch["air"] = rng.uniform(0.02, 0.06) * np.abs(np.sin(2 * np.pi * beat * t))
    return ch


def _squat(t: np.ndarray, beat: float, rng: np.random.Generator) -> dict:
    ch = _rest(t.size)
    c = (1 - np.cos(np.pi * beat * t + rng.uniform(0, 2 * np.pi))) / 2
    depth = rng.uniform(0.8, 1.4)
    for s in SIDES:
        ch[f"{s}_fl_t"] = depth * c
        ch[f"{s}_fl_s"] = -0.3 * c
        ch[f"{s}_fl_u"] = rng.uniform(1.1, 1.6) * c
        ch[f"{s}_fl_f"] = ch[f"{s}_fl_u"] + 0.1
        ch[f"{s}_ab_t"] = ch[f"{s}_ab_t"] + 0.12 * c
    ch["lean_f"] = 0.35 * c
    return ch


def _idle(t: np.ndarray, beat: float, rng: np.random.Generator) -> dict:
    ch = _rest(t.size)
    w = np.pi * beat * t / 2
    ch["lean_s"] = 0.04 * np.sin(w + rng.uniform(0, 6))
    ch["root_x"] = 0.02 * np.sin(w)
    ch["head_turn"] = rng.uniform(0.2, 0.6) * np.sin(w / 2 + rng.uniform(0, 6))
    for s, off in (("L", 0.0), ("R", 1.0)):
        ch[f"{s}_fl_u"] = 0.1 * np.sin(w + off)
        ch[f"{s}_ab_u"] = 0.12 + 0.05 * np.sin(w * 1.3 + off)
    return ch


_MOTION_FNS = {
    "walk": _walk,
    "wave": _wave,
    "dance": _dance,
    "jumping_jacks": _jumping_jacks,
    "squat": _squat,
    "idle": _idle,
}


def _sample_motion(
    cfg: WorldConfig, t: np.ndarray, rng: np.random.Generator
) -> tuple[dict, list[str], float]:
    names = [m for m in MOTIONS if cfg.motion_weights.get(m, 0) > 0]
    if not names or set(cfg.motion_weights) - set(MOTIONS):
        raise ValueError(f"motion_weights must weight some of {MOTIONS}, got {dict(cfg.motion_weights)}")
    p = np.array([cfg.motion_weights[m] for m in names], dtype=np.float64)
    beat = rng.uniform(*cfg.tempo_bpm) / 60.0
    first = str(rng.choice(names, p=p / p.sum()))
    ch = _MOTION_FNS[first](t, beat, rng)
    chosen = [first]
    if first != "walk":
        ch["yaw"] = ch["yaw"] + np.deg2rad(rng.uniform(-cfg.max_yaw_deg, cfg.max_yaw_deg))
    if t.size > 1 and rng.uniform() < cfg.mix_probability:
        second = str(rng.choice(names, p=p / p.sum()))
        other = _MOTION_FNS[second](t, beat, rng)
        if second != "walk":
            other["yaw"] = other["yaw"] + np.deg2rad(rng.uniform(-cfg.max_yaw_deg, cfg.max_yaw_deg))
        other["root_x"] = other["root_x"] - other["root_x"][0] + ch["root_x"]  # no jump in position
        centre, width = rng.uniform(0.3, 0.7) * t[-1], max(rng.uniform(0.1, 0.3) * t[-1], 1e-3)
        a = np.clip((t - centre) / width + 0.5, 0, 1)
        a = a * a * (3 - 2 * a)  # smoothstep
        ch = {k: (1 - a) * v + a * other[k] for k, v in ch.items()}
        chosen.append(second)
    return ch, chosen, beat


# ----------------------------------------------------------------------------------------------------
# Kinematics: body frame x = person's left, y = down, z = forward; figure heights as units.


def _dir(ab: np.ndarray, fl: np.ndarray, side: float) -> np.ndarray:
    """Unit limb direction [F, 3]: hanging down, abducted by `ab` toward `side` x, flexed `fl` forward."""
    return np.stack([side * np.sin(ab), np.cos(ab) * np.cos(fl), np.cos(ab) * np.sin(fl)], axis=-1)


def _yaw(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate [F, ..., 3] about the vertical axis by angle [F] (positive turns the person's left away)."""
    c, s = np.cos(angle), np.sin(angle)
    c, s = c.reshape(-1, *([1] * (v.ndim - 2))), s.reshape(-1, *([1] * (v.ndim - 2)))
    return np.stack([v[..., 0] * c + v[..., 2] * s, v[..., 1], -v[..., 0] * s + v[..., 2] * c], axis=-1)


def _skeleton(fig: Figure, ch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Joint positions [F, 20, 3] relative to the pelvis, and forearm directions [F, 2, 3] (left, right)."""
    f = ch["yaw"].size
    j = np.zeros((f, NUM_BODY, 3))
    up = -_dir(ch["lean_s"], -ch["lean_f"], 1.0)
    neck = fig.torso * up
    j[:, 1] = neck
    across = lambda half, twist: _yaw(np.broadcast_to([half, 0.0, 0.0], (f, 3)), twist)
    hand_axis = np.zeros((f, 2, 3))
    for s, sign, (sh, el, wr, hp, kn, an, toe, hand_i) in (
        ("R", -1.0, (2, 3, 4, 8, 9, 10, 19, 1)),
        ("L", 1.0, (5, 6, 7, 11, 12, 13, 18, 0)),
    ):
        j[:, sh] = neck + sign * across(fig.shoulder, ch["twist_sh"])
        j[:, el] = j[:, sh] + fig.upper_arm * _yaw(
            _dir(ch[f"{s}_ab_u"], ch[f"{s}_fl_u"], sign), ch["twist_sh"]
        )
        hand_axis[:, hand_i] = _yaw(_dir(ch[f"{s}_ab_f"], ch[f"{s}_fl_f"], sign), ch["twist_sh"])
        j[:, wr] = j[:, el] + fig.forearm * hand_axis[:, hand_i]
        j[:, hp] = sign * across(fig.hip, ch["twist_hip"])
        j[:, kn] = j[:, hp] + fig.thigh * _yaw(_dir(ch[f"{s}_ab_t"], ch[f"{s}_fl_t"], sign), ch["twist_hip"])
        j[:, an] = j[:, kn] + fig.shin * _yaw(_dir(ch[f"{s}_ab_s"], ch[f"{s}_fl_s"], sign), ch["twist_hip"])
        foot = np.stack([sign * np.sin(ch[f"{s}_out"]), np.full(f, 0.3), np.cos(ch[f"{s}_out"])], -1)
        j[:, toe] = j[:, an] + fig.foot * _yaw(
            foot / np.linalg.norm(foot, axis=-1, keepdims=True), ch["twist_hip"]
        )
    head = neck + (fig.neck + fig.head) * up
    turn = ch["twist_sh"] + ch["head_turn"]
    face = lambda x, y, z: head + _yaw(np.broadcast_to([x, y, z], (f, 3)), turn)
    r = fig.head
    j[:, 0] = face(0.0, 0.1 * r, 1.0 * r)
    j[:, 14], j[:, 15] = face(-0.38 * r, -0.3 * r, 0.85 * r), face(0.38 * r, -0.3 * r, 0.85 * r)
    j[:, 16], j[:, 17] = face(-0.95 * r, -0.1 * r, -0.1 * r), face(0.95 * r, -0.1 * r, -0.1 * r)
    return j, hand_axis


def _hands(
    wrist: np.ndarray, axis: np.ndarray, size: np.ndarray, openness: np.ndarray, thumb_side: np.ndarray
) -> np.ndarray:
    """21 hand keypoints [F, 21, 2] in pixels: wrist [F, 2], hand axis [F, 2] (unit, image plane), hand
    length in pixels [F], openness [F] in 0..1 (closing shortens the fingers), thumb side +1/-1 [F]."""
    perp = np.stack([-axis[:, 1], axis[:, 0]], -1) * thumb_side[:, None]
    spread = np.deg2rad([-55.0, -22.0, -5.0, 10.0, 25.0])  # thumb .. little finger
    lengths = np.array(
        [
            [0.25, 0.22, 0.2, 0.18],
            [0.45, 0.22, 0.15, 0.12],
            [0.45, 0.25, 0.17, 0.13],
            [0.43, 0.22, 0.16, 0.12],
            [0.4, 0.17, 0.12, 0.1],
        ]
    )  # wrist->knuckle, then phalanges
    points = [wrist]
    for finger in range(5):
        ang = spread[finger] * (0.4 + 0.6 * openness)  # [F]
        d = axis * np.cos(ang)[:, None] + perp * np.sin(ang)[:, None]
        p = wrist
        for seg in range(4):
            shrink = 1.0 if seg == 0 else 1.0 - 0.6 * (1.0 - openness)
            p = p + d * (lengths[finger, seg] * size * shrink)[:, None]
            points.append(p)
    return np.stack(points, axis=1)


# ----------------------------------------------------------------------------------------------------
# Rendering: tapered capsules with a z-buffer, vectorised over frames on per-part patches.


def _capsule(a: np.ndarray, b: np.ndarray, ra: np.ndarray, rb: np.ndarray, h: int, w: int):
    """Pixels of the tapered capsule a->b (pixels [F, 2], radii [F]) on a patch per frame.

    Returns ys [F, P], xs [F, Q], mask [F, P, Q] and t [F, P, Q] (position along a->b, for patterns).
    """
    r = np.maximum(ra, rb)
    lo = np.floor(np.minimum(a, b) - r[:, None] - 1).astype(np.int64)
    hi = np.ceil(np.maximum(a, b) + r[:, None] + 1).astype(np.int64)
    lo, hi = np.clip(lo, 0, [w - 1, h - 1]), np.clip(hi, 0, [w - 1, h - 1])
    q, p = (hi - lo).max(0) + 1
    xs = lo[:, :1] + np.arange(q)  # [F, Q]
    ys = lo[:, 1:] + np.arange(p)  # [F, P]
    px = xs[:, None, :] - a[:, 0, None, None]  # [F, 1, Q]
    py = ys[:, :, None] - a[:, 1, None, None]  # [F, P, 1]
    d = b - a
    dd = np.maximum((d * d).sum(-1), 1e-9)[:, None, None]
    t = np.clip((px * d[:, 0, None, None] + py * d[:, 1, None, None]) / dd, 0, 1)  # [F, P, Q]
    ex, ey = px - t * d[:, 0, None, None], py - t * d[:, 1, None, None]
    rad = ra[:, None, None] + (rb - ra)[:, None, None] * t
    mask = (
        (ex * ex + ey * ey <= rad * rad)
        & (xs[:, None, :] <= hi[:, :1, None])
        & (ys[:, :, None] <= hi[:, 1:, None])
    )
    return ys, xs, mask, t


def _composite(canvas, zbuf, ys, xs, mask, depth, color) -> None:
    """Write colour (RGB [3], or [F, P, Q, 3]) where mask and nearer than the z-buffer (depth [F])."""
    fi, pi, qi = np.nonzero(mask)
    y, x = ys[fi, pi], xs[fi, qi]
    front = depth[fi] >= zbuf[fi, y, x]
    fi, pi, qi, y, x = fi[front], pi[front], qi[front], y[front], x[front]
    zbuf[fi, y, x] = depth[fi]
    canvas[fi, y, x] = color if np.ndim(color) == 1 else color[fi, pi, qi]


def _background(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, zoom: np.ndarray):
    """Wall (v < 0) and floor (v >= 0) colours [F, H, W, 3] from world coordinates u [F, 1, W], v [F, H, 1].

    Returns the frames, the wall kind and the (wall, floor) colours (for the prompt)."""
    c1, c2, floor = _color(rng), _color(rng), _color(rng, val=(0.4, 0.9))
    kind = str(rng.choice(["plain", "stripes", "checker", "gradient"]))
    period = rng.uniform(0.1, 0.3)
    if kind == "stripes":
        wall = np.where((np.floor(u / period) % 2 == 0)[..., None], c1, c2)
    elif kind == "checker":
        wall = np.where(((np.floor(u / period) + np.floor(v / period)) % 2 == 0)[..., None], c1, c2)
    elif kind == "gradient":
        a = np.clip(-v / 1.5, 0, 1)[..., None]
        wall = np.rint((1 - a) * c1 + a * c2)
    else:
        wall = c1[None, None, None]
    tile = rng.uniform(0.2, 0.4)
    lines = (np.abs((u / tile) - np.rint(u / tile)) * tile < 0.008 / zoom[:, None, None])[..., None]
    ground = np.where(lines, np.rint(floor * 0.8 + 64 * 0.2), floor)
    frames = np.where((v < 0)[..., None], wall, ground)
    return (
        np.broadcast_to(frames, (u.shape[0], v.shape[1], u.shape[2], 3)).astype(np.uint8),
        kind,
        (c1, floor),
    )


_COLOR_NAMES = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")


def _color_name(rgb: np.ndarray) -> str:
    lo, hi = APPEARANCE_RANGE
    h, s, v = colorsys.rgb_to_hsv(*((rgb.astype(float) - lo) / (hi - lo)))
    if s < 0.25:
        return "white" if v > 0.8 else "grey" if v > 0.4 else "black"
    return _COLOR_NAMES[int(np.searchsorted([0.04, 0.11, 0.19, 0.45, 0.54, 0.72, 0.86, 0.96], h)) % 8]


@dataclass
class _Camera:
    """Per-frame camera: zoom [F], pixels per world unit [F], centre (cx, cy) [F] in world units."""

    zoom: np.ndarray
    scale: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    tracking: bool


def _sample_camera(
    cfg: WorldConfig, rng: np.random.Generator, t: np.ndarray, root_x: np.ndarray, walking: bool
) -> _Camera:
    """Zoom ramps between two log-uniform values; the camera follows a walking figure or stays put
    (then the figure walks across), plus a slow drift and a random framing offset."""
    zoom0, zoom1 = np.exp(rng.uniform(*np.log(cfg.zoom), size=2))
    if rng.uniform() < cfg.static_zoom_probability:
        zoom1 = zoom0
    ramp = t / max(t[-1], 1e-9)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep 0 -> 1 over the clip
    zoom = zoom0 * (zoom1 / zoom0) ** ramp
    scale = rng.uniform(*cfg.figure_height) * cfg.height * zoom
    tracking = walking and rng.uniform() < cfg.track_probability
    drift = rng.uniform(-cfg.pan, cfg.pan, size=2)
    cx = (root_x if tracking else np.full(t.size, root_x[0])) + drift[0] * ramp + rng.uniform(-0.08, 0.08)
    cy = -0.5 + drift[1] * ramp + rng.uniform(-0.08, 0.08)
    return _Camera(zoom, scale, cx, cy, tracking)


def _project(cfg: WorldConfig, cam: _Camera, p: np.ndarray) -> np.ndarray:
    """World points [F, N, 3] -> pixels [F, N, 2]; nearer points (z > 0) land lower: the camera looks down."""
    x = (p[..., 0] - cam.cx[:, None]) * cam.scale[:, None] + (cfg.width - 1) / 2
    y = (p[..., 1] + cfg.camera_pitch * p[..., 2] - cam.cy[:, None]) * cam.scale[:, None] + (
        cfg.height - 1
    ) / 2
    return np.stack([x, y], -1)


def _render_figure(
    video: np.ndarray, fig: Figure, px: np.ndarray, depth: np.ndarray, hands: np.ndarray, scale: np.ndarray
) -> None:
    """Paint the figure into video [F, H, W, 3]: capsules per part, nearest part wins (z-buffer)."""
    f, h, w, _ = video.shape
    zbuf = np.full((f, h, w), -np.inf)
    col = fig.colors
    sleeve = col["shirt"] if fig.long_sleeves else col["skin"]
    leg_low = col["skin"] if fig.shorts else col["trousers"]
    rad = lambda k: fig.widths[k] * scale  # [F] pixels

    limbs = [
        (9, 10, "shin", leg_low),
        (12, 13, "shin", leg_low),
        (8, 9, "thigh", col["trousers"]),
        (11, 12, "thigh", col["trousers"]),
        (10, 19, "foot", col["shoes"]),
        (13, 18, "foot", col["shoes"]),
        (2, 3, "upper_arm", col["shirt"]),
        (5, 6, "upper_arm", col["shirt"]),
        (3, 4, "forearm", sleeve),
        (6, 7, "forearm", sleeve),
    ]
    for a, b, width, color in limbs:
        ys, xs, mask, _ = _capsule(px[:, a], px[:, b], rad(width), rad(width), h, w)
        _composite(video, zbuf, ys, xs, mask, depth[:, [a, b]].mean(1), color)
    for hand, wrist in ((0, 7), (1, 4)):  # a mitten over the palm
        centre = hands[:, hand, [0, 9]].mean(1)
        ys, xs, mask, _ = _capsule(centre, centre, rad("hand"), rad("hand"), h, w)
        _composite(video, zbuf, ys, xs, mask, depth[:, wrist] + 1e-3, col["skin"])

    # Torso: a tapered capsule from the hips' centre to the neck, the shirt pattern along or across it.
    hips, neck = (px[:, 8] + px[:, 11]) / 2, px[:, 1]
    r_top = np.maximum(np.abs(px[:, 5, 0] - px[:, 2, 0]) / 2, rad("torso_depth"))
    r_bottom = np.maximum(np.abs(px[:, 11, 0] - px[:, 8, 0]) / 2 + rad("thigh") / 2, rad("torso_depth"))
    ys, xs, mask, along = _capsule(hips, neck, r_bottom, r_top, h, w)
    if fig.pattern == "hstripes":
        stripe = np.floor(along * fig.stripes) % 2 == 0
    elif fig.pattern == "vstripes":
        normal = np.stack([hips[:, 1] - neck[:, 1], neck[:, 0] - hips[:, 0]], -1)
        normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-6)
        across = (xs[:, None, :] - hips[:, 0, None, None]) * normal[:, 0, None, None] + (
            ys[:, :, None] - hips[:, 1, None, None]
        ) * normal[:, 1, None, None]  # [F, P, Q]
        stripe = np.floor(across / np.maximum(2 * r_top / fig.stripes, 1.0)[:, None, None]) % 2 == 0
    else:
        stripe = np.ones_like(mask)
    torso = np.where(stripe[..., None], col["shirt"], col["shirt2"]).astype(np.uint8)  # [F, P, Q, 3]
    _composite(video, zbuf, ys, xs, mask, depth[:, [1, 8, 11]].mean(1) - 1e-3, torso)

    head = (px[:, 16] + px[:, 17]) / 2
    head_r = fig.head * scale
    ys, xs, mask, _ = _capsule(neck, (neck + head) / 2, rad("neck"), rad("neck"), h, w)
    _composite(video, zbuf, ys, xs, mask, depth[:, 1] + 1e-3, col["skin"])
    ys, xs, mask, _ = _capsule(head, head, head_r, head_r, h, w)
    hair = (ys[:, :, None] - head[:, 1, None, None]) < -0.25 * head_r[:, None, None]  # [F, P, 1]
    face = np.where(hair[..., None], col["hair"], col["skin"]).astype(np.uint8)
    _composite(video, zbuf, ys, xs, mask, depth[:, 0] + 2e-3, np.broadcast_to(face, mask.shape + (3,)))


def _draw_markers(video: np.ndarray, px: np.ndarray, score: np.ndarray, radius: int) -> None:
    """A (2r+1)^2 square of MARKER_COLORS[k] at every visible keypoint k: all squares first, then all
    centre pixels on top, so a marker is lost only when two keypoints round to the same pixel."""
    f, h, w, _ = video.shape
    centres = np.floor(px + 0.5).astype(np.int64)  # [F, 20, 2]
    square = np.array([(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)])
    for offsets in (square, np.zeros((1, 2), dtype=np.int64)):
        for k in range(NUM_BODY):
            fr = np.nonzero(score[:, k] > 0)[0]
            yy = centres[fr, k, 1, None] + offsets[None, :, 0]  # [N, S]
            xx = centres[fr, k, 0, None] + offsets[None, :, 1]
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            video[np.broadcast_to(fr[:, None], yy.shape)[ok], yy[ok], xx[ok]] = MARKER_COLORS[k]


def pixel_regions(video: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks [F, H, W] that split a rendered world video [F, H, W, 3] uint8 into 'marker' (pixels of a
    joint-marker colour), 'edge' (a colour change within the 3x3 neighbourhood; markers excluded) and 'flat'
    (the rest). They tell where a model's error sits, e.g. a VAE's reconstruction error."""
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 [F, H, W, 3], got {video.dtype} {tuple(video.shape)}")
    code = video.astype(np.int32) @ COLOR_PACK
    marker = np.isin(code, MARKER_CODES)
    h, w = code.shape[1:]
    padded = np.pad(code, ((0, 0), (1, 1), (1, 1)), mode="edge")
    edge = np.zeros_like(marker)
    for dy in range(3):
        for dx in range(3):
            edge |= padded[:, dy : dy + h, dx : dx + w] != code
    edge &= ~marker
    return {"marker": marker, "edge": edge, "flat": ~(marker | edge)}


_VERBS = {
    "walk": "walking",
    "wave": "waving",
    "dance": "dancing",
    "jumping_jacks": "doing jumping jacks",
    "squat": "doing squats",
    "idle": "standing",
}
_WALLS = {"plain": "", "stripes": "striped ", "checker": "checkered ", "gradient": "shaded "}


def _prompt(fig: Figure, motions: list[str], wall_kind: str, wall_color: np.ndarray) -> str:
    """A caption from the clothes, the motions and the wall."""
    col = fig.colors
    shirt = f"{_color_name(col['shirt'])} {'striped ' if fig.pattern != 'plain' else ''}shirt"
    legs = f"{_color_name(col['trousers'])} {'shorts' if fig.shorts else 'trousers'}"
    action = " then ".join(dict.fromkeys(_VERBS[m] for m in motions))
    wall = f"{_WALLS[wall_kind]}{_color_name(wall_color)} wall"
    return f"a figure in a {shirt} and {legs} {action} in front of a {wall}"


def prompt_vocabulary() -> list[str]:
    """Every word a world caption can contain (_prompt's template, colours, verbs, walls), sorted: the vocabulary
    of the world's text encoder (assets/world_encoders)."""
    words = set("a figure in shirt and striped shorts trousers then front of wall".split())
    words |= {*_COLOR_NAMES, "white", "grey", "black"}
    for phrase in (*_VERBS.values(), *_WALLS.values()):
        words |= set(phrase.split())
    return sorted(words)


def generate_sample(config: WorldConfig, seed: int, draw_pose: bool = True) -> SyntheticSample:
    """One deterministic clip of the synthetic world (same config and seed -> identical arrays).

    draw_pose=False skips drawing the pose frames (most of the time) when only the video is needed.
    """
    cfg = config
    rng = np.random.default_rng(seed)
    f, h, w = cfg.num_frames, cfg.height, cfg.width
    t = np.arange(f) / cfg.fps
    fig = _sample_figure(rng)
    ch, motions, beat = _sample_motion(cfg, t, rng)

    # Joints in world units (y down, ground at 0): the lowest sole touches the ground unless jumping.
    # A walk filmed by a still camera starts off-centre so that the figure crosses the frame.
    joints, forearm = _skeleton(fig, ch)
    feet = joints[:, [10, 13, 18, 19], 1].max(1)
    walking = "walk" in motions
    cam = _sample_camera(cfg, rng, t, ch["root_x"], walking)
    start = -np.sign(ch["root_x"][-1]) * rng.uniform(0.2, 0.4) if walking and not cam.tracking else 0.0
    root = np.stack([ch["root_x"] + start, -(feet + fig.ankle) - ch["air"], np.zeros(f)], -1)  # [F, 3]
    world = _yaw(joints, ch["yaw"]) + root[:, None]  # [F, 20, 3], z toward the camera
    px = _project(cfg, cam, world)  # [F, 20, 2]
    depth = world[..., 2]

    # Visible: inside the frame, and not the far eye/ear of a head turned away.
    head_yaw = np.rad2deg(ch["yaw"] + ch["twist_sh"] + ch["head_turn"])
    score = ((px > -0.5) & (px < np.array([w, h]) - 0.5)).all(-1).astype(np.float32)
    for joint, sign, limit in ((17, 1, 50), (15, 1, 70), (16, -1, 50), (14, -1, 70)):
        score[sign * head_yaw > limit, joint] = 0

    # Hands: 21 points from each wrist along the projected forearm direction.
    hand_dir = _project(cfg, cam, _yaw(forearm, ch["yaw"]) + world[:, [7, 4]]) - px[:, [7, 4]]  # [F, 2, 2]
    hand_dir /= np.maximum(np.linalg.norm(hand_dir, axis=-1, keepdims=True), 1e-6)
    hands = np.zeros((f, 2, NUM_HAND, 2))
    for hand, (wrist, s, side) in enumerate(((7, "L", 1.0), (4, "R", -1.0))):
        thumb = -side * np.where(np.cos(ch["yaw"]) >= 0, 1.0, -1.0)  # palms face the camera at yaw 0
        hands[:, hand] = _hands(
            px[:, wrist], hand_dir[:, hand], fig.hand * cam.scale, np.clip(ch[f"{s}_open"], 0, 1), thumb
        )
    hand_score = ((hands > -0.5) & (hands < np.array([w, h]) - 0.5)).all(-1) & (score[:, [7, 4], None] > 0)
    hand_score &= cfg.hands

    # RGB: the wall and floor seen by the camera, a contact shadow and the figure, rendered at `ss` times the
    # size and box-filtered down (pixel i of the output covers samples ss*i .. ss*i + ss - 1, whose centres
    # average to ss*i + (ss - 1)/2), then the markers on top at the output size, in their exact colours.
    ss = cfg.supersample
    hs, ws, scale = h * ss, w * ss, cam.scale * ss
    u = (np.arange(ws) - (ws - 1) / 2)[None, None, :] / scale[:, None, None] + cam.cx[:, None, None]
    v = (np.arange(hs) - (hs - 1) / 2)[None, :, None] / scale[:, None, None] + cam.cy[:, None, None]
    video, wall_kind, (wall_color, _) = _background(rng, u, v, cam.zoom)  # u [F, 1, W], v [F, H, 1]
    pelvis_x = world[:, [8, 11], 0].mean(1)
    shadow = ((u - pelvis_x[:, None, None]) / 0.2) ** 2 + (v / 0.04) ** 2 <= 1  # [F, H, W]
    video[shadow] = np.rint(video[shadow] * 0.75 + 64 * 0.25).astype(np.uint8)
    _render_figure(video, fig, px * ss + (ss - 1) / 2, depth, hands * ss + (ss - 1) / 2, scale)
    if ss > 1:
        total = np.full((f, h, w, 3), ss * ss // 2, dtype=np.uint32)  # rounds the mean to nearest
        for dy in range(ss):
            for dx in range(ss):
                total += video[:, dy::ss, dx::ss]
        video = (total // (ss * ss)).astype(np.uint8)
    _draw_markers(video, px, score, cfg.marker_radius)

    size = np.array([w, h], dtype=np.float64)
    keypoints = PoseSequence(px / size, score, hands / size, hand_score.astype(np.float32), w, h)
    pose = draw_pose_frames(keypoints, h, w) if draw_pose else None
    ref_index = int(rng.integers(f))
    meta = {
        "seed": int(seed),
        "motions": motions,
        "bpm": float(beat * 60),
        "zoom": [float(cam.zoom[0]), float(cam.zoom[-1])],
        "tracking": bool(cam.tracking),
        "background": wall_kind,
    }
    return SyntheticSample(
        video,
        pose,
        keypoints,
        ref_index,
        video[ref_index],
        None if pose is None else pose[ref_index],
        _prompt(fig, motions, wall_kind, wall_color),
        meta,
    )


def _group_median(values: np.ndarray, groups: np.ndarray, count: np.ndarray) -> np.ndarray:
    """For each element, the (upper) median of the values of its group; count [G] = group sizes."""
    first = np.cumsum(count) - count
    present = count > 0
    median = np.zeros(count.size, dtype=values.dtype)
    median[present] = values[np.lexsort((values, groups))][first[present] + count[present] // 2]
    return median[groups]


def detect_markers(frames: np.ndarray, tolerance: int = 0, marker_radius: int = 1) -> PoseSequence:
    """Body keypoints from the joint markers of synthetic-world frames uint8 [F, H, W, 3].

    A pixel belongs to marker k when every channel is within `tolerance` of MARKER_COLORS[k] (0 for the
    exact renderer; about 40 for generated frames, half the gap between marker and appearance colours).
    A marker is a (2r+1)^2 square that later markers may partly cover, so the keypoint is the mean of the
    square centres that contain every pixel of marker k and whose other pixels are covered by other
    markers or lie outside the frame; when no centre fits (blurred generated frames) it is the centroid.
    Matches farther than 2r from their frame's median match are ignored.
    Hands are not marked: their scores are 0.
    """
    f, h, w, _ = frames.shape
    m = marker_radius
    pix = frames.astype(np.int16)
    near = np.stack(
        [(np.abs(pix - c.astype(np.int16)) <= tolerance).all(-1) for c in MARKER_COLORS]
    )  # [20,F,H,W]
    any_marker = np.pad(
        near.any(0), ((0, 0), (m, m), (m, m)), constant_values=True
    )  # outside counts as covered
    offsets = np.arange(-m, m + 1)
    body = np.zeros((f, NUM_BODY, 2))
    score = np.zeros((f, NUM_BODY), dtype=np.float32)
    for k in range(NUM_BODY):
        fr, yy, xx = np.nonzero(near[k])
        if fr.size == 0:
            continue
        # Drop stray matches (compression can push a lone pixel near a marker colour): the per-frame median
        # lies inside the true square, so its pixels are within 2r of it.
        count = np.bincount(fr, minlength=f)
        dist = np.maximum(
            np.abs(xx - _group_median(xx, fr, count)), np.abs(yy - _group_median(yy, fr, count))
        )
        keep = dist <= 2 * m
        fr, yy, xx = fr[keep], yy[keep], xx[keep]
        count = np.bincount(fr, minlength=f)
        found = np.nonzero(count)[0]
        centroid = np.stack([np.bincount(fr, xx, f), np.bincount(fr, yy, f)], -1)[found] / count[found, None]
        lo = np.stack([np.full(f, w), np.full(f, h)], -1)
        hi = np.full((f, 2), -1)
        np.minimum.at(lo, fr, np.stack([xx, yy], -1))
        np.maximum.at(hi, fr, np.stack([xx, yy], -1))
        lo, hi = lo[found], hi[found]
        # Candidate centres c with hi - m <= c <= lo + m: [N, C, 2] for the (2m+1)^2 offsets from hi - m.
        cand = (hi - m)[:, None] + np.stack(np.meshgrid(offsets + m, offsets + m, indexing="xy"), -1).reshape(
            1, -1, 2
        )
        fits = (cand <= (lo + m)[:, None]).all(-1)  # [N, C]
        sq = np.stack(np.meshgrid(offsets, offsets, indexing="xy"), -1).reshape(-1, 2)  # [S, 2]
        px = cand[:, :, None] + sq  # [N, C, S, 2]
        inside = ((px >= 0) & (px < np.array([w, h]))).all(-1)
        pxc, pyc = np.clip(px[..., 0], 0, w - 1), np.clip(px[..., 1], 0, h - 1)
        own = near[k][found[:, None, None], pyc, pxc] & inside
        covered = any_marker[found[:, None, None], pyc + m, pxc + m] | ~inside
        fits &= (own | covered).all(-1)
        n_fit = fits.sum(1)
        fitted = (cand * fits[..., None]).sum(1) / np.maximum(n_fit, 1)[:, None]
        body[found, k] = np.where((n_fit > 0)[:, None], fitted, centroid)
        score[found, k] = 1.0
    return PoseSequence(
        body / np.array([w, h]), score, np.zeros((f, 2, NUM_HAND, 2)), np.zeros((f, 2, NUM_HAND)), w, h
    )
