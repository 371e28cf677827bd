"""DWPose keypoints from RGB frames through rtmlib + onnxruntime, from local onnx files.

The same two models UniAnimate uses: YOLOX-L (640x640) finds people, keep class 0 with score > 0.3 and
take the top detection; DWPose-L (288x384 SimCC) gives 133 COCO-WholeBody keypoints for it, converted
to OpenPose-18 + toes. Frames go to the models in BGR, as the reference reads them with OpenCV.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.pose.keypoints import PoseSequence, coco_wholebody_to_openpose

logger = logging.getLogger(__name__)

DET_INPUT_SIZE = (640, 640)
POSE_INPUT_SIZE = (288, 384)  # rtmlib order (width, height)
DET_SCORE_THRESHOLD = 0.3
PERSON_CLASS = 0
ONNX_SOURCE = "the DWPose release (Hugging Face repo yzd-v/DWPose)"


class DWPoseUnavailable(RuntimeError):
    """rtmlib/onnxruntime or an onnx file is missing; the message says which and how to get it."""


def _require(det_onnx: Path, pose_onnx: Path) -> None:
    for module, pip_name in (("onnxruntime", "onnxruntime"), ("rtmlib", "rtmlib")):
        try:
            __import__(module)
        except ImportError as e:
            raise DWPoseUnavailable(
                f"DWPose extraction needs the '{pip_name}' package: "
                f"pip install rtmlib onnxruntime (or pip install -e '.[pose]')"
            ) from e
    for path, flag in ((det_onnx, "--det-onnx"), (pose_onnx, "--pose-onnx")):
        if not path.is_file():
            raise DWPoseUnavailable(
                f"DWPose model {path} not found: download {path.name} from {ONNX_SOURCE} "
                f"and pass its path with {flag}"
            )


class DWPoseDetector:
    """Callable: uint8 RGB frames [F, H, W, 3] -> PoseSequence of the top person per frame."""

    def __init__(self, det_onnx: str | Path, pose_onnx: str | Path, device: str = "cpu") -> None:
        det_onnx, pose_onnx = Path(det_onnx), Path(pose_onnx)
        _require(det_onnx, pose_onnx)
        from rtmlib import YOLOX, RTMPose

        self.det = YOLOX(
            str(det_onnx),
            model_input_size=DET_INPUT_SIZE,
            det_mode="multiclass",
            score_thr=DET_SCORE_THRESHOLD,
            backend="onnxruntime",
            device=device,
        )
        self.pose = RTMPose(
            str(pose_onnx),
            model_input_size=POSE_INPUT_SIZE,
            to_openpose=False,
            backend="onnxruntime",
            device=device,
        )

    def detect_frame(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One RGB frame -> COCO-WholeBody keypoints [133, 2] (pixels) and scores [133] (zeros if nobody)."""
        bgr = np.ascontiguousarray(frame[..., ::-1])
        boxes, classes = self.det(bgr)
        people = np.asarray(boxes)[np.asarray(classes) == PERSON_CLASS] if len(boxes) else np.zeros((0, 4))
        if len(people) == 0:
            return np.zeros((133, 2)), np.zeros(133)
        keypoints, scores = self.pose(bgr, bboxes=[people[0]])  # detections come sorted by score
        return keypoints[0], scores[0]

    def __call__(self, frames: np.ndarray) -> PoseSequence:
        results = [self.detect_frame(f) for f in tqdm(frames, desc="dwpose", unit="frame", leave=False)]
        keypoints = np.stack([k for k, _ in results])  # [F, 133, 2]
        scores = np.stack([s for _, s in results])
        return coco_wholebody_to_openpose(keypoints, scores, frames.shape[2], frames.shape[1])
