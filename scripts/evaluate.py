"""Evaluate generated clips against their conditions: pose fidelity, appearance, temporal stability.

    python scripts/evaluate.py --generated GEN_DIR --conditions DATASET_DIR --out OUT_DIR
        [--detector markers|dwpose] [--det-onnx yolox_l.onnx --pose-onnx dw-ll_ucoco_384.onnx]

CONDITIONS is a dataset folder (utils/data.py format): each sample's keypoints.json is the driving pose
and its video.mp4 the ground truth (skip with --no-ground-truth, e.g. when another person was animated).
GENERATED holds one clip per sample id: ID.mp4 or an image folder ID/. Pose is detected in the generated
frames with the synthetic world's marker detector (default) or DWPose. Writes OUT/metrics.json (per clip
and mean) and OUT/metrics.md (a table). Metric definitions: utils/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/evaluate.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.data import read_index  # noqa: E402
from utils.metrics import Detector, evaluate_clip  # noqa: E402
from utils.pose import DWPoseDetector, DWPoseUnavailable, load_keypoints  # noqa: E402
from utils.video_io import VideoReadError, read_frames, read_video, resize_frames  # noqa: E402
from utils.world.synthetic_pose import detect_markers  # noqa: E402

logger = logging.getLogger("evaluate")
COLUMNS = ("kpt_l2", "pck@0.05", "detection_rate", "jitter", "jitter_driving", "psnr", "ssim", "flicker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", required=True, type=Path, help="folder of generated clips (ID.mp4 or ID/)")
    p.add_argument("--conditions", required=True, type=Path, help="dataset folder with index.jsonl")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and metrics.md")
    p.add_argument(
        "--detector",
        choices=("markers", "dwpose"),
        default="markers",
        help="pose detector for generated frames: synthetic-world markers or DWPose",
    )
    p.add_argument(
        "--marker-tolerance",
        type=int,
        default=40,
        help="per-channel colour tolerance of the marker detector (0: exact renders only)",
    )
    p.add_argument("--det-onnx", type=Path, help="dwpose: yolox_l.onnx")
    p.add_argument("--pose-onnx", type=Path, help="dwpose: dw-ll_ucoco_384.onnx")
    p.add_argument("--device", default="cpu", help="dwpose: onnxruntime device, cpu or cuda")
    p.add_argument("--no-ground-truth", action="store_true", help="skip PSNR, SSIM and flicker")
    return p


def make_detector(args: argparse.Namespace) -> Detector:
    if args.detector == "markers":
        return partial(detect_markers, tolerance=args.marker_tolerance)
    if args.det_onnx is None or args.pose_onnx is None:
        raise DWPoseUnavailable(
            "--detector dwpose needs --det-onnx yolox_l.onnx and --pose-onnx dw-ll_ucoco_384.onnx"
        )
    return DWPoseDetector(args.det_onnx, args.pose_onnx, device=args.device)


def find_clip(folder: Path, sample_id: str) -> Path | None:
    for candidate in (folder / f"{sample_id}.mp4", folder / sample_id):
        if candidate.exists():
            return candidate
    return None


def _mean(values: list[float]) -> float:
    """Mean over the clips where the metric is defined (NaN if none)."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def markdown_table(clips: dict[str, dict], mean: dict) -> str:
    cols = [c for c in COLUMNS if c in mean]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
    lines = ["| clip | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {cid} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |" for cid, m in clips.items()]
    lines.append("| **mean** | " + " | ".join(fmt(mean[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    detector = make_detector(args)
    entries = read_index(args.conditions)
    clips: dict[str, dict] = {}
    missing = []
    for e in tqdm(entries, desc="clips", unit="clip"):
        path = find_clip(args.generated, e["id"])
        if path is None:
            missing.append(e["id"])
            continue
        generated = read_frames(path)
        driving = load_keypoints(args.conditions / e["keypoints"])
        truth = None if args.no_ground_truth else read_video(args.conditions / e["video"])
        n = min(len(generated), len(driving))
        if n != len(generated) or n != len(driving):
            logger.warning(
                "%s: %d generated frames, %d driving frames: comparing the first %d",
                e["id"],
                len(generated),
                len(driving),
                n,
            )
        if truth is not None:
            truth = resize_frames(truth[:n], generated.shape[1], generated.shape[2])
        clips[e["id"]] = evaluate_clip(generated[:n], driving.select(slice(0, n)), detector, truth)
    if missing:
        logger.warning(
            "no generated clip for %d of %d samples (e.g. %s)", len(missing), len(entries), missing[:3]
        )
    if not clips:
        raise FileNotFoundError(
            f"no generated clip in {args.generated} matches a sample id of {args.conditions} "
            f"(expected ID.mp4 or ID/ for ids like {entries[0]['id']})"
        )
    keys = [k for k in COLUMNS if k in next(iter(clips.values()))]
    mean = {k: _mean([m[k] for m in clips.values()]) for k in keys}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "generated": str(args.generated),
        "conditions": str(args.conditions),
        "detector": args.detector,
        "num_clips": len(clips),
        "missing": missing,
        "mean": mean,
        "clips": clips,
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2))
    (args.out / "metrics.md").write_text(markdown_table(clips, mean))
    logger.info("%d clips: %s", len(clips), ", ".join(f"{k} {v:.4g}" for k, v in mean.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DWPoseUnavailable, FileNotFoundError, VideoReadError, ValueError) as e:
        logger.error("error: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
