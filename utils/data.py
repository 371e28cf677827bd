"""Training data: the on-disk dataset format, a Dataset that reads it, and the synthetic world as a Dataset.

Format. A dataset is a folder with `index.jsonl`, one JSON object per line and sample:

    {"id": "000000", "video": "000000/video.mp4", "pose": "000000/pose.mp4", "ref_image": "000000/ref.png",
     "ref_pose": "000000/ref_pose.png", "keypoints": "000000/keypoints.json", "prompt": "a person ...",
     "num_frames": 81, "height": 128, "width": 128, "fps": 16.0}

Paths are relative to the dataset folder (extra keys are allowed and ignored). Per sample:
- video.mp4: the clip, H.264 yuv444p at crf 12 (lossy: ~41 dB on the 128x128 synthetic world; full
  colour resolution keeps the markers detectable) or lossless RGB.
- pose.mp4: the drawn pose frames, lossless RGB H.264 (libx264rgb, crf 0): read back bit-exact.
- ref.png / ref_pose.png: the reference image and its drawn pose (lossless).
- keypoints.json: the clip's keypoints (utils.pose.save_keypoints format).
All of one sample share num_frames (1 + 4k), height and width.

A sample reads as a dict in the repo's contract: video [3, F, H, W] float in [-1, 1], pose [3, F, H, W]
float in 0..255, ref_image [3, H, W] in [-1, 1], ref_pose [3, H, W] in 0..255, prompt str, id str.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.atomic_io import atomic_write_text
from utils.pose.keypoints import PoseSequence, save_keypoints
from utils.video_io import read_image, read_video, write_image, write_video
from utils.world.synthetic_pose import WorldConfig, generate_sample

logger = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
FILE_KEYS = ("video", "pose", "ref_image", "ref_pose", "keypoints")
INDEX_KEYS = ("id", *FILE_KEYS, "prompt", "num_frames", "height", "width", "fps")
MAKE_HINT = (
    "create one with scripts/make_toy_dataset.py (synthetic) or scripts/preprocess_data.py (real videos)"
)


def to_contract(
    video: np.ndarray,
    pose: np.ndarray,
    ref_image: np.ndarray,
    ref_pose: np.ndarray,
    prompt: str,
    sample_id: str,
) -> dict:
    """uint8 video, pose [F, H, W, 3] and ref_image, ref_pose [H, W, 3] -> the sample dict of tensors."""
    frames = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(3, 0, 1, 2).float()  # -> [3,F,H,W]
    image = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()  # -> [3,H,W]
    return {
        "video": frames(video) / 127.5 - 1.0,
        "pose": frames(pose),
        "ref_image": image(ref_image) / 127.5 - 1.0,
        "ref_pose": image(ref_pose),
        "prompt": prompt,
        "id": sample_id,
    }


def read_index(root: str | Path, problems: list[str] | None = None) -> list[dict]:
    """The entries of root/index.jsonl, checked for the required keys and files.

    problems: when a list is given, a bad line (invalid JSON, a key or a file missing) is appended to it as a
    message naming the file, and left out, instead of raising: a caller can then report every bad sample.
    """
    root = Path(root)
    index = root / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"no {INDEX_NAME} in {root}: not a dataset folder; {MAKE_HINT}")
    entries = []
    for line_no, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(_index_entry(root, index, line_no, line))
        except (ValueError, FileNotFoundError) as e:
            if problems is None:
                raise
            problems.append(str(e))
    if not entries:
        if problems:
            raise ValueError(f"dataset {root}: none of its {len(problems)} samples is usable ({problems[0]}; ...)")
        raise ValueError(f"dataset {root} is empty: {index} lists no samples; {MAKE_HINT}")
    return entries


def _index_entry(root: Path, index: Path, line_no: int, line: str) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}:{line_no} is not valid JSON: {e}") from e
    if not isinstance(entry, dict):
        raise ValueError(f"{index}:{line_no} is not a JSON object; each line needs {list(INDEX_KEYS)}")
    missing = [k for k in INDEX_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{index}:{line_no} lacks {missing}; each line needs {list(INDEX_KEYS)}")
    for key in FILE_KEYS:
        if not (root / entry[key]).is_file():
            raise FileNotFoundError(
                f"sample {entry['id']}: {key} file {root / entry[key]} is missing "
                f"(listed in {index}); re-export the sample or remove its line"
            )
    return entry


class PoseVideoDataset(Dataset):
    """Reads a dataset folder (format in the module docstring); num_frames (1 + 4k) takes a random window."""

    def __init__(self, root: str | Path, num_frames: int | None = None, skip_bad: bool = False) -> None:
        """skip_bad: index lines with missing files are left out and listed in `problems` instead of raising."""
        self.root = Path(root)
        self.problems: list[str] = []
        self.entries = read_index(self.root, self.problems if skip_bad else None)
        if num_frames is not None and (num_frames < 1 or (num_frames - 1) % 4):
            raise ValueError(f"num_frames must be 1 + 4k, got {num_frames}")
        short = [e["id"] for e in self.entries if num_frames and e["num_frames"] < num_frames]
        if short:
            raise ValueError(
                f"samples {short[:5]} of {self.root} have fewer than num_frames={num_frames} frames"
            )
        self.num_frames = num_frames
        logger.info("dataset %s: %d samples", self.root, len(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        video, pose = read_video(self.root / e["video"]), read_video(self.root / e["pose"])
        expected = (e["num_frames"], e["height"], e["width"], 3)
        for name, arr in (("video", video), ("pose", pose)):
            if arr.shape != expected:
                raise ValueError(
                    f"sample {e['id']}: {self.root / e[name]} is {arr.shape}, the index says {expected}"
                )
        if self.num_frames is not None:
            start = int(torch.randint(0, len(video) - self.num_frames + 1, ()))
            video, pose = video[start : start + self.num_frames], pose[start : start + self.num_frames]
        return to_contract(
            video,
            pose,
            read_image(self.root / e["ref_image"]),
            read_image(self.root / e["ref_pose"]),
            e["prompt"],
            e["id"],
        )


def write_sample(
    root: str | Path,
    sample_id: str,
    video: np.ndarray,
    pose: np.ndarray,
    ref_image: np.ndarray,
    ref_pose: np.ndarray,
    keypoints: PoseSequence,
    prompt: str,
    fps: float,
    lossless_video: bool = False,
) -> dict:
    """Write one sample's files under root/sample_id/ and return its index entry."""
    root = Path(root)
    folder = root / sample_id
    write_video(folder / "video.mp4", video, fps, mode="lossless" if lossless_video else "yuv444")
    write_video(folder / "pose.mp4", pose, fps, mode="lossless")
    write_image(folder / "ref.png", ref_image)
    write_image(folder / "ref_pose.png", ref_pose)
    save_keypoints(folder / "keypoints.json", keypoints, fps=fps)
    f, h, w, _ = video.shape
    names = dict(
        zip(FILE_KEYS, ("video.mp4", "pose.mp4", "ref.png", "ref_pose.png", "keypoints.json"), strict=True)
    )
    return {
        "id": sample_id,
        **{k: f"{sample_id}/{v}" for k, v in names.items()},
        "prompt": prompt,
        "num_frames": int(f),
        "height": int(h),
        "width": int(w),
        "fps": float(fps),
    }


def write_index(root: str | Path, entries: list[dict]) -> None:
    """Write root/index.jsonl atomically."""
    atomic_write_text("".join(json.dumps(e) + "\n" for e in entries), Path(root) / INDEX_NAME)


class SyntheticWorldDataset(Dataset):
    """The synthetic world on the fly: item i is generate_sample(config, seed + i), in the contract above."""

    def __init__(self, config: WorldConfig, length: int, seed: int = 0) -> None:
        self.config, self.length, self.seed = config, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        s = generate_sample(self.config, self.seed + i)
        return to_contract(s.video, s.pose, s.ref_image, s.ref_pose, s.prompt, f"synthetic-{self.seed + i}")
