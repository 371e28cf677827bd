"""Pose input for inference and data: a folder of pose images, a pose video, or a keypoints JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.pose.align import align_pose
from utils.pose.draw import draw_pose_frames
from utils.pose.keypoints import PoseSequence, load_keypoints
from utils.video_io import read_frames, resize_frames


def load_pose_frames(
    source: str | Path, height: int, width: int, align_to: PoseSequence | None = None
) -> torch.Tensor:
    """Pose frames at height x width -> float32 [3, F, H, W] in 0..255 (the pose-frame contract).

    source: a .json keypoints file (drawn at height x width, after aligning to `align_to` when given),
    an image folder or a video of already drawn pose frames (bilinear-resized; alignment needs
    keypoints, so `align_to` is an error there).
    """
    source = Path(source)
    if source.suffix.lower() == ".json":
        pose = load_keypoints(source)
        if align_to is not None:
            pose = align_pose(pose, align_to)
        frames = draw_pose_frames(pose, height, width)
    else:
        if align_to is not None:
            raise ValueError(
                f"cannot align {source} to a reference pose: alignment needs keypoints; "
                "pass a keypoints JSON (scripts/extract_pose.py writes one)"
            )
        frames = resize_frames(read_frames(source), height, width)
    return (
        torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    )  # [F,H,W,3] -> [3,F,H,W]
