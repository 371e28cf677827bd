"""The keypoint format every pose tool in the repo shares: OpenPose-18 + 2 toes, two 21-point hands.

Coordinates are normalised to the source frame (x / width, y / height), so a sequence can be drawn at
any size; scores in [0, 1], and a keypoint with score < VISIBILITY_THRESHOLD is invisible (never drawn,
never used by alignment or metrics). Layout facts follow UniAnimate's DWPose conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.atomic_io import atomic_write_text

VISIBILITY_THRESHOLD = 0.3
KEYPOINTS_FORMAT = "poseforcing-keypoints-v1"

# OpenPose-18 order, then the two toe points UniAnimate adds (index 18 left toe, 19 right toe).
BODY_NAMES = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
    "left_toe",
    "right_toe",
)
NUM_BODY = len(BODY_NAMES)
NUM_HAND = 21
# hands[:, 0] is the left hand (attached to joint 7), hands[:, 1] the right hand (joint 4).

# COCO-WholeBody (133 points) -> OpenPose-18: body index i takes COCO index COCO_TO_OPENPOSE[i]; the neck
# (index 1, None here) is the mean of the shoulders (COCO 5, 6), visible only if both are.
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# Toe = mean of big toe and small toe: left (COCO 17, 18), right (COCO 20, 21).
COCO_TOES = ((17, 18), (20, 21))
COCO_LEFT_HAND = slice(91, 112)
COCO_RIGHT_HAND = slice(112, 133)


@dataclass
class PoseSequence:
    """Keypoints of one person over F frames.

    body [F, 20, 2] and hands [F, 2, 21, 2] are float32 normalised (x / width, y / height);
    body_score [F, 20] and hand_score [F, 2, 21] are float32 in [0, 1]; width/height is the size of
    the frames the coordinates were measured on (needed to measure lengths in pixels).
    """

    body: np.ndarray
    body_score: np.ndarray
    hands: np.ndarray
    hand_score: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        self.body = np.asarray(self.body, dtype=np.float32)
        self.body_score = np.asarray(self.body_score, dtype=np.float32)
        self.hands = np.asarray(self.hands, dtype=np.float32)
        self.hand_score = np.asarray(self.hand_score, dtype=np.float32)
        f = self.body.shape[0]
        expected = {
            "body": (f, NUM_BODY, 2),
            "body_score": (f, NUM_BODY),
            "hands": (f, 2, NUM_HAND, 2),
            "hand_score": (f, 2, NUM_HAND),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"PoseSequence.{name} has shape {getattr(self, name).shape}, expected {shape}"
                )

    def __len__(self) -> int:
        return self.body.shape[0]

    def select(self, frames: slice | list[int] | np.ndarray) -> PoseSequence:
        """The sub-sequence at the given frame indices (a slice or an index list)."""
        return PoseSequence(
            self.body[frames],
            self.body_score[frames],
            self.hands[frames],
            self.hand_score[frames],
            self.width,
            self.height,
        )

    @property
    def body_visible(self) -> np.ndarray:
        """[F, 20] bool."""
        return self.body_score >= VISIBILITY_THRESHOLD

    @property
    def hand_visible(self) -> np.ndarray:
        """[F, 2, 21] bool."""
        return self.hand_score >= VISIBILITY_THRESHOLD

    def body_pixels(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """Body keypoints in pixels of a width x height frame (default: the source size), [F, 20, 2]."""
        size = np.array([width or self.width, height or self.height], dtype=np.float32)
        return self.body * size


def coco_wholebody_to_openpose(
    keypoints: np.ndarray, scores: np.ndarray, width: int, height: int
) -> PoseSequence:
    """COCO-WholeBody detections of one person per frame -> PoseSequence.

    keypoints [F, 133, 2] in pixels, scores [F, 133]. The neck is the mean of the shoulders with score
    1 if both shoulders are visible, else 0 (UniAnimate's rule); each toe is the mean of the big and
    small toe with score min of the two when both are visible, else 0. Face points are dropped.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (133, 2) or scores.shape != keypoints.shape[:2]:
        raise ValueError(
            f"expected keypoints [F, 133, 2] and scores [F, 133], got {keypoints.shape} and {scores.shape}"
        )
    f = keypoints.shape[0]
    visible = scores >= VISIBILITY_THRESHOLD
    body = np.zeros((f, NUM_BODY, 2))
    body_score = np.zeros((f, NUM_BODY))
    for i, j in enumerate(COCO_TO_OPENPOSE):
        if j is not None:
            body[:, i], body_score[:, i] = keypoints[:, j], scores[:, j]
    both_shoulders = visible[:, 5] & visible[:, 6]
    body[:, 1] = keypoints[:, [5, 6]].mean(axis=1)
    body_score[:, 1] = both_shoulders.astype(np.float64)
    for i, (a, b) in zip((18, 19), COCO_TOES, strict=True):
        both = visible[:, a] & visible[:, b]
        body[:, i] = keypoints[:, [a, b]].mean(axis=1)
        body_score[:, i] = np.where(both, np.minimum(scores[:, a], scores[:, b]), 0.0)
    hands = np.stack([keypoints[:, COCO_LEFT_HAND], keypoints[:, COCO_RIGHT_HAND]], axis=1)  # [F, 2, 21, 2]
    hand_score = np.stack([scores[:, COCO_LEFT_HAND], scores[:, COCO_RIGHT_HAND]], axis=1)
    size = np.array([width, height], dtype=np.float64)
    return PoseSequence(body / size, body_score, hands / size, hand_score, width, height)


def save_keypoints(path: str | Path, pose: PoseSequence, fps: float | None = None) -> None:
    """Write a keypoints JSON atomically: {format, width, height, fps, body [F][20][3], hands [F][2][21][3]}.

    Each keypoint is [x, y, score] with x, y normalised; values rounded to 1e-5.
    """
    body = np.concatenate([pose.body, pose.body_score[..., None]], axis=-1).round(5)
    hands = np.concatenate([pose.hands, pose.hand_score[..., None]], axis=-1).round(5)
    data = {
        "format": KEYPOINTS_FORMAT,
        "width": int(pose.width),
        "height": int(pose.height),
        "fps": fps,
        "body": body.tolist(),
        "hands": hands.tolist(),
    }
    atomic_write_text(json.dumps(data, separators=(",", ":")), path)


def load_keypoints(path: str | Path) -> PoseSequence:
    """Read a keypoints JSON written by save_keypoints (or scripts/extract_pose.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keypoints file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"keypoints file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != KEYPOINTS_FORMAT:
        raise ValueError(
            f"keypoints file {path} is not in the '{KEYPOINTS_FORMAT}' format "
            "(write it with utils.pose.save_keypoints or scripts/extract_pose.py)"
        )
    body = np.asarray(data["body"], dtype=np.float32).reshape(-1, NUM_BODY, 3)
    hands = np.asarray(data["hands"], dtype=np.float32).reshape(-1, 2, NUM_HAND, 3)
    return PoseSequence(
        body[..., :2], body[..., 2], hands[..., :2], hands[..., 2], int(data["width"]), int(data["height"])
    )
