"""utils/pose: drawing (pixel-exact against an OpenCV rendering of UniAnimate's rules when cv2 is installed),
the COCO-WholeBody -> OpenPose conversion, keypoint JSON, alignment, the pose loader and DWPose errors."""

from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import extract_pose
from utils.pose import (
    DWPoseDetector,
    DWPoseUnavailable,
    PoseSequence,
    align_pose,
    coco_wholebody_to_openpose,
    draw_pose_frames,
    load_keypoints,
    load_pose_frames,
    save_keypoints,
)
from utils.pose.draw import BODY_COLORS, HAND_DOT_COLOR, HAND_EDGES, LIMBS, circle_offsets
from utils.video_io import write_image_folder, write_video


def random_pose(rng: np.random.Generator, frames: int, width: int, height: int, hands: bool) -> PoseSequence:
    body = rng.uniform(0.05, 0.95, (frames, 20, 2))
    body_score = (rng.uniform(size=(frames, 20)) > 0.15).astype(np.float32)
    wrists = rng.uniform(0.2, 0.8, (frames, 2, 1, 2))
    hand = wrists + rng.normal(0, 0.04, (frames, 2, 21, 2))
    hand_score = (rng.uniform(size=(frames, 2, 21)) > 0.2) * float(hands)
    return PoseSequence(body, body_score, hand, hand_score, width, height)


def single_limb_pose(width: int, height: int) -> PoseSequence:
    """Only the neck (1) and right shoulder (2) visible: limb 0 and joints 1, 2."""
    body = np.zeros((1, 20, 2))
    body[0, 1], body[0, 2] = (0.3, 0.5), (0.7, 0.5)
    score = np.zeros((1, 20))
    score[0, [1, 2]] = 1.0
    return PoseSequence(body, score, np.zeros((1, 2, 21, 2)), np.zeros((1, 2, 21)), width, height)


def test_circle_offsets_follow_opencv_integer_circle():
    half_widths = {}
    for dy, dx in circle_offsets(4):
        half_widths[dy] = max(half_widths.get(dy, 0), dx)
    # OpenCV's filled radius-4 circle: row half-widths from the top row to the bottom row.
    assert [half_widths[dy] for dy in range(-4, 5)] == [0, 2, 3, 3, 4, 3, 3, 2, 0]
    assert len(circle_offsets(1)) == 5  # a plus sign


def test_limb_colour_blend_and_rgb_order():
    frame = draw_pose_frames(single_limb_pose(64, 32), 32, 64)[0]
    # Limb 0 is (255, 0, 0) in canvas order, x0.6 -> 153, and the canvas is written as BGR: RGB (0, 0, 153).
    assert tuple(frame[16, 32]) == (0, 0, 153)
    # Joint discs are drawn after the blend, at full colour, channel-reversed.
    assert tuple(frame[16, int(0.3 * 64)]) == tuple(reversed(BODY_COLORS[1]))
    assert tuple(frame[16, int(0.7 * 64)]) == tuple(reversed(BODY_COLORS[2]))
    assert frame[0, 0].sum() == 0


def test_invisible_keypoints_are_not_drawn():
    pose = single_limb_pose(64, 32)
    pose.body_score[:] = np.where(pose.body_score > 0, 0.29, 0)
    assert draw_pose_frames(pose, 32, 64).max() == 0
    pose.body_score[:] = np.where(pose.body_score > 0, 0.3, 0)
    assert draw_pose_frames(pose, 32, 64).max() > 0


def test_hand_dots_and_edges():
    pose = single_limb_pose(64, 64)
    pose.body_score[:] = 0
    pose.hands[0, 1, :, 0] = np.linspace(0.2, 0.8, 21)
    pose.hands[0, 1, :, 1] = 0.5
    pose.hand_score[0, 1] = 1.0
    frame = draw_pose_frames(pose, 64, 64)[0]
    x = int(pose.hands[0, 1, 20, 0] * 64)
    assert tuple(frame[32, x]) == tuple(reversed(HAND_DOT_COLOR))  # dots are red in RGB
    assert frame.any(-1).sum() > 40


def opencv_reference(pose: PoseSequence, height: int, width: int) -> np.ndarray:
    """UniAnimate's drawing written with OpenCV from the published facts (draw_body_and_foot + hands)."""
    cv2 = pytest.importorskip("cv2")
    out = []
    for t in range(len(pose)):
        canvas = np.zeros((height, width, 3), np.uint8)
        body, vis = pose.body[t].astype(np.float64), pose.body_visible[t]
        for (a, b), color in zip(LIMBS, BODY_COLORS, strict=False):
            if vis[a] and vis[b]:
                xs, ys = body[[a, b], 0] * width, body[[a, b], 1] * height
                length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
                angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
                poly = cv2.ellipse2Poly(
                    (int(xs.mean()), int(ys.mean())), (int(length / 2), 4), int(angle), 0, 360, 1
                )
                cv2.fillConvexPoly(canvas, poly, color)
        canvas = (canvas * 0.6).astype(np.uint8)
        for j in range(20):
            if vis[j]:
                cv2.circle(canvas, (int(body[j, 0] * width), int(body[j, 1] * height)), 4, BODY_COLORS[j], -1)
        for h in range(2):
            peaks = pose.hands[t, h].astype(np.float64).copy()
            peaks[~pose.hand_visible[t, h]] = -1
            pix = [(int(x * width), int(y * height)) for x, y in peaks]
            for ie, (a, b) in enumerate(HAND_EDGES):
                if min(*pix[a], *pix[b]) > 0.01:
                    color = np.array(colorsys.hsv_to_rgb(ie / len(HAND_EDGES), 1.0, 1.0)) * 255
                    cv2.line(canvas, pix[a], pix[b], color, thickness=2)
            for x, y in pix:
                if x > 0.01 and y > 0.01:
                    cv2.circle(canvas, (x, y), 4, HAND_DOT_COLOR, -1)
        out.append(canvas[..., ::-1])
    return np.stack(out)


@pytest.mark.parametrize("height,width,hands", [(128, 128, True), (192, 128, False), (96, 160, True)])
def test_drawing_matches_opencv_reference(height, width, hands):
    pose = random_pose(np.random.default_rng(height + width), 12, width, height, hands)
    ours, ref = draw_pose_frames(pose, height, width), opencv_reference(pose, height, width)
    differing = (ours != ref).any(-1).sum()
    assert differing <= 2, f"{differing} pixels differ from OpenCV"


def test_coco_wholebody_to_openpose():
    f, w, h = 2, 200, 100
    kpts = (
        np.stack([np.arange(133), 2 * np.arange(133)], -1)[None].repeat(f, 0).astype(np.float64)
    )  # [F,133,2]
    scores = np.full((f, 133), 0.9)
    scores[1, 6] = 0.2  # frame 1: right shoulder invisible -> no neck
    scores[1, 21] = 0.1  # frame 1: a right small toe invisible -> no right toe
    pose = coco_wholebody_to_openpose(kpts, scores, w, h)
    px = pose.body_pixels()
    expected = {
        0: 0,
        2: 6,
        3: 8,
        4: 10,
        5: 5,
        6: 7,
        7: 9,
        8: 12,
        9: 14,
        10: 16,
        11: 11,
        12: 13,
        13: 15,
        14: 2,
        15: 1,
        16: 4,
        17: 3,
    }
    for op, coco in expected.items():
        np.testing.assert_allclose(px[0, op], [coco, 2 * coco], atol=1e-3)
    np.testing.assert_allclose(px[0, 1], [5.5, 11.0], atol=1e-3)  # neck = mean of shoulders 5, 6
    np.testing.assert_allclose(px[0, 18], [17.5, 35.0], atol=1e-3)  # left toe = mean of 17, 18
    np.testing.assert_allclose(px[0, 19], [20.5, 41.0], atol=1e-3)  # right toe = mean of 20, 21
    assert pose.body_score[0, 1] == 1.0 and pose.body_score[1, 1] == 0.0
    assert pose.body_score[0, 19] == pytest.approx(0.9) and pose.body_score[1, 19] == 0.0
    assert pose.body_score[1, 2] == pytest.approx(0.2)
    np.testing.assert_allclose(pose.hands[0, 0, :, 0] * w, np.arange(91, 112), atol=1e-3)  # left hand
    np.testing.assert_allclose(pose.hands[0, 1, :, 0] * w, np.arange(112, 133), atol=1e-3)  # right hand
    np.testing.assert_allclose(pose.body[0, 15], [1 / w, 2 / h], atol=1e-6)  # normalised by width, height


def test_keypoints_json_roundtrip(tmp_path):
    pose = random_pose(np.random.default_rng(0), 3, 64, 48, hands=True)
    save_keypoints(tmp_path / "k.json", pose, fps=16)
    back = load_keypoints(tmp_path / "k.json")
    assert (back.width, back.height, len(back)) == (64, 48, 3)
    np.testing.assert_allclose(back.body, pose.body, atol=1e-5)
    np.testing.assert_allclose(back.hand_score, pose.hand_score, atol=1e-5)
    (tmp_path / "bad.json").write_text('{"body": []}')
    with pytest.raises(ValueError, match="bad.json"):
        load_keypoints(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_keypoints(tmp_path / "missing.json")


def reference_body() -> PoseSequence:
    """A frontal T-ish pose (normalised), all joints visible, one frame, 100x200 canvas."""
    pts = {
        0: (50, 40),
        1: (50, 60),
        2: (35, 60),
        3: (25, 80),
        4: (20, 100),
        5: (65, 60),
        6: (75, 80),
        7: (80, 100),
        8: (42, 120),
        9: (40, 150),
        10: (40, 180),
        11: (58, 120),
        12: (60, 150),
        13: (60, 180),
        14: (46, 36),
        15: (54, 36),
        16: (42, 40),
        17: (58, 40),
        18: (62, 190),
        19: (38, 190),
    }
    body = np.array([pts[k] for k in range(20)], dtype=np.float64) / [100, 200]
    hands = np.zeros((1, 2, 21, 2))
    hands[0, 0] = body[7] + 0.01
    hands[0, 1] = body[4] + 0.01
    return PoseSequence(body[None], np.ones((1, 20)), hands, np.ones((1, 2, 21)), 100, 200)


def test_alignment_undoes_scale_and_translation_and_keeps_motion():
    ref = reference_body()
    scale, shift, motion = np.array([1.5, 0.8]), np.array([0.1, -0.05]), np.array([0.02, 0.01])
    drv0 = ref.body[0] * scale + shift
    body = np.stack([drv0, drv0 + motion])
    hands = np.stack([ref.hands[0] * scale + shift, ref.hands[0] * scale + shift + motion])
    driving = PoseSequence(body, np.ones((2, 20)), hands, np.ones((2, 2, 21)), 320, 240)
    out = align_pose(driving, ref)
    assert (out.width, out.height) == (100, 200)
    np.testing.assert_allclose(out.body[0], ref.body[0], atol=1e-6)
    np.testing.assert_allclose(out.hands[0], ref.hands[0], atol=1e-6)
    np.testing.assert_allclose(out.body[1], ref.body[0] + motion / scale, atol=1e-6)


def test_alignment_rescales_bones():
    ref = reference_body()
    body = ref.body.copy()
    body[0, 4] = body[0, 3] + 1.5 * (body[0, 4] - body[0, 3])  # driving right forearm 1.5x longer
    hands = ref.hands.copy()
    hands[0, 1] += body[0, 4] - ref.body[0, 4]
    out = align_pose(PoseSequence(body, ref.body_score, hands, ref.hand_score, 100, 200), ref)
    np.testing.assert_allclose(out.body[0], ref.body[0], atol=1e-6)
    np.testing.assert_allclose(out.hands[0, 1], ref.hands[0, 1], atol=1e-6)  # the hand follows the wrist


def test_alignment_skips_invisible_joints():
    ref = reference_body()
    body, score = ref.body.copy(), ref.body_score.copy()
    body[0, 3], score[0, 3] = (-1, -1), 0.0  # driving right elbow invisible, at the reference code's -1
    body[0, 4] = ref.body[0, 4] + 0.05  # wrist off: its bones can't be measured without the elbow
    out = align_pose(PoseSequence(body, score, ref.hands, ref.hand_score, 100, 200), ref)
    assert np.isfinite(out.body).all()
    visible = [k for k in range(20) if k not in (3, 4)]
    np.testing.assert_allclose(out.body[0, visible], ref.body[0, visible], atol=1e-6)
    np.testing.assert_allclose(out.body[0, 4], ref.body[0, 4] + 0.05, atol=1e-6)  # untouched by skipped bones
    # A side view (zero shoulder width) in the first driving frame: the torso-height scale stands in.
    side = ref.body * 2
    side[0, [2, 5], 0] = side[0, 1, 0]
    out2 = align_pose(PoseSequence(side, ref.body_score, ref.hands * 2, ref.hand_score, 100, 200), ref)
    keep = [0, 1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    np.testing.assert_allclose(out2.body[0, keep], ref.body[0, keep], atol=1e-6)


def test_load_pose_frames_from_json_folder_and_video(tmp_path):
    pose = random_pose(np.random.default_rng(3), 5, 64, 48, hands=True)
    save_keypoints(tmp_path / "k.json", pose)
    drawn = draw_pose_frames(pose, 48, 64)  # [F, H, W, 3]
    expected = torch.from_numpy(drawn).permute(3, 0, 1, 2).float()
    from_json = load_pose_frames(tmp_path / "k.json", 48, 64)
    assert from_json.shape == (3, 5, 48, 64) and from_json.dtype == torch.float32
    assert torch.equal(from_json, expected)
    write_image_folder(tmp_path / "frames", drawn)
    assert torch.equal(load_pose_frames(tmp_path / "frames", 48, 64), expected)
    write_video(tmp_path / "pose.mp4", drawn, fps=16, mode="lossless")
    assert torch.equal(load_pose_frames(tmp_path / "pose.mp4", 48, 64), expected)
    assert load_pose_frames(tmp_path / "frames", 24, 32).shape == (3, 5, 24, 32)
    aligned = load_pose_frames(tmp_path / "k.json", 48, 64, align_to=pose.select(slice(0, 1)))
    assert aligned.shape == (3, 5, 48, 64) and 0 <= aligned.min() and aligned.max() <= 255
    with pytest.raises(ValueError, match="alignment needs keypoints"):
        load_pose_frames(tmp_path / "frames", 48, 64, align_to=pose)


def test_dwpose_missing_files_say_what_and_how(tmp_path, caplog):
    with pytest.raises(DWPoseUnavailable) as err:
        DWPoseDetector(tmp_path / "yolox_l.onnx", tmp_path / "dw-ll_ucoco_384.onnx")
    message = str(err.value)
    assert "\n" not in message
    assert ("rtmlib" in message and "pip install" in message) or (
        "yolox_l.onnx" in message and "--det-onnx" in message
    )
    write_video(tmp_path / "v.mp4", np.zeros((1, 16, 16, 3), np.uint8), fps=8)
    args = [
        "--video",
        str(tmp_path / "v.mp4"),
        "--out",
        str(tmp_path / "out"),
        "--det-onnx",
        str(tmp_path / "yolox_l.onnx"),
        "--pose-onnx",
        str(tmp_path / "dw-ll_ucoco_384.onnx"),
    ]
    assert extract_pose.main(args) == 1
    assert not (tmp_path / "out").exists()


def test_extract_pose_cli_with_a_stand_in_detector(tmp_path, monkeypatch):
    """The CLI's flow (keypoints, reference alignment, drawing, outputs) without the onnx models."""
    driving = random_pose(np.random.default_rng(4), 5, 48, 32, hands=True)
    reference = reference_body()

    class StandIn:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, frames):
            return reference if len(frames) == 1 else driving

    monkeypatch.setattr(extract_pose, "DWPoseDetector", StandIn)
    write_video(tmp_path / "v.mp4", np.zeros((5, 32, 48, 3), np.uint8), fps=12, mode="lossless")
    write_image_folder(tmp_path / "ref", np.zeros((1, 200, 100, 3), np.uint8))
    out = tmp_path / "out"
    common = ["--video", str(tmp_path / "v.mp4"), "--det-onnx", "d.onnx", "--pose-onnx", "p.onnx"]
    assert extract_pose.main([*common, "--out", str(out), "--format", "png"]) == 0
    np.testing.assert_allclose(load_keypoints(out / "keypoints.json").body, driving.body, atol=1e-5)
    assert len(list((out / "pose").iterdir())) == 5
    ref_path = str(tmp_path / "ref" / "00000.png")
    assert extract_pose.main([*common, "--out", str(out), "--reference", ref_path, "--height", "64"]) == 0
    frames = load_pose_frames(out / "pose.mp4", 64, 100)
    expected = draw_pose_frames(align_pose(driving, reference), 64, 100)
    assert torch.equal(frames, torch.from_numpy(expected).permute(3, 0, 1, 2).float())
    assert (out / "ref_pose.png").is_file() and (out / "ref_keypoints.json").is_file()


DET, POSE = os.environ.get("DWPOSE_DET_ONNX"), os.environ.get("DWPOSE_POSE_ONNX")


@pytest.mark.skipif(
    not (DET and POSE and Path(DET).is_file() and Path(POSE).is_file()),
    reason="set DWPOSE_DET_ONNX and DWPOSE_POSE_ONNX to yolox_l.onnx and dw-ll_ucoco_384.onnx",
)
def test_extract_pose_runs_on_a_drawn_person(tmp_path):
    pytest.importorskip("rtmlib")
    from utils.world.synthetic_pose import generate_sample, load_world_config

    sample = generate_sample(load_world_config(num_frames=5, height=256, width=256), seed=0)
    write_video(tmp_path / "v.mp4", sample.video, fps=16, mode="lossless")
    args = [
        "--video",
        str(tmp_path / "v.mp4"),
        "--out",
        str(tmp_path / "out"),
        "--det-onnx",
        DET,
        "--pose-onnx",
        POSE,
    ]
    assert extract_pose.main(args) == 0
    pose = load_keypoints(tmp_path / "out" / "keypoints.json")
    assert len(pose) == 5 and (tmp_path / "out" / "pose.mp4").is_file()
