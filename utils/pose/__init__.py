"""Pose tools: the keypoint format, DWPose-style drawing, alignment to a reference, loading, extraction."""

from utils.pose.align import align_pose
from utils.pose.draw import draw_pose_frames, iter_pose_frames
from utils.pose.extract import DWPoseDetector, DWPoseUnavailable
from utils.pose.keypoints import (
    BODY_NAMES,
    VISIBILITY_THRESHOLD,
    PoseSequence,
    coco_wholebody_to_openpose,
    load_keypoints,
    save_keypoints,
)
from utils.pose.load import load_pose_frames

__all__ = [
    "BODY_NAMES",
    "VISIBILITY_THRESHOLD",
    "DWPoseDetector",
    "DWPoseUnavailable",
    "PoseSequence",
    "align_pose",
    "coco_wholebody_to_openpose",
    "draw_pose_frames",
    "iter_pose_frames",
    "load_keypoints",
    "load_pose_frames",
    "save_keypoints",
]
