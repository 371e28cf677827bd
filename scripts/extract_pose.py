"""Video -> DWPose keypoints JSON + drawn pose frames (mp4 or png folder), optionally aligned to a reference.

    python scripts/extract_pose.py --video dance.mp4 --out poses/dance \
        --det-onnx ckpt/yolox_l.onnx --pose-onnx ckpt/dw-ll_ucoco_384.onnx [--reference ref.png]

Writes OUT/keypoints.json (the driving video's keypoints, utils.pose format) and OUT/pose.mp4 (lossless)
or OUT/pose/ (png). With --reference it also writes OUT/ref_keypoints.json and OUT/ref_pose.png, and
the pose frames are the driving pose aligned to the reference (UniAnimate's rule), drawn at the
reference image's size unless --height/--width say otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/extract_pose.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.pose import DWPoseDetector, DWPoseUnavailable, align_pose, draw_pose_frames, save_keypoints  # noqa: E402
from utils.video_io import (  # noqa: E402
    VideoReadError,
    probe_fps,
    read_image,
    read_video,
    write_image,
    write_image_folder,
    write_video,
)

logger = logging.getLogger("extract_pose")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, type=Path, help="driving video (any format ffmpeg reads)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--det-onnx", required=True, type=Path, help="YOLOX-L person detector, yolox_l.onnx")
    p.add_argument(
        "--pose-onnx", required=True, type=Path, help="DWPose-L whole-body model, dw-ll_ucoco_384.onnx"
    )
    p.add_argument("--reference", type=Path, help="reference image: align the drawn pose to its person")
    p.add_argument("--format", choices=("mp4", "png"), default="mp4", help="pose frames as mp4 or png folder")
    p.add_argument("--height", type=int, help="drawing height (default: the reference's, else the video's)")
    p.add_argument("--width", type=int, help="drawing width (default: the reference's, else the video's)")
    p.add_argument("--device", default="cpu", help="onnxruntime device: cpu or cuda")
    return p


def run(args: argparse.Namespace) -> int:
    detector = DWPoseDetector(args.det_onnx, args.pose_onnx, device=args.device)
    frames = read_video(args.video)
    fps = probe_fps(args.video)
    logger.info(
        "%s: %d frames %dx%d at %.2f fps", args.video, len(frames), frames.shape[2], frames.shape[1], fps
    )
    driving = detector(frames)
    save_keypoints(args.out / "keypoints.json", driving, fps=fps)
    if args.reference is None:
        drawn, canvas = driving, frames.shape[1:3]
    else:
        ref_image = read_image(args.reference)
        reference = detector(ref_image[None])
        save_keypoints(args.out / "ref_keypoints.json", reference)
        drawn, canvas = align_pose(driving, reference), ref_image.shape[:2]
    height, width = args.height or canvas[0], args.width or canvas[1]
    if args.reference is not None:
        write_image(args.out / "ref_pose.png", draw_pose_frames(reference, height, width)[0])
    pose_frames = draw_pose_frames(drawn, height, width)
    if args.format == "mp4":
        write_video(args.out / "pose.mp4", pose_frames, fps, mode="lossless")
    else:
        write_image_folder(args.out / "pose", pose_frames)
    visible = driving.body_visible.mean()
    logger.info(
        "wrote %s: %d pose frames %dx%d, %.0f%% of body keypoints visible",
        args.out,
        len(pose_frames),
        width,
        height,
        100 * visible,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DWPoseUnavailable, FileNotFoundError, VideoReadError) as e:
        logger.error("error: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
