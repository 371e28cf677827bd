"""inference.py end to end on the tiny config (random weights; the no-argument default, the world teacher, is
tests/test_inference_world.py): a synthetic clip and real input files write playable mp4s of the right length and
size (read back with decord); --help documents every flag; bad input is one line that names the flag or file and
the fix, and leaves nothing at --out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from _tiny_encoders import (
    TINY_VAE_CONFIG,
    make_tokenizer,
    tiny_clip_config,
    tiny_umt5_config,
    vae_official_state_dict,
)
from conftest import randomize
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import CLIPVisionModel, UMT5EncoderModel

import inference
from utils.pose import save_keypoints
from utils.safetensors_io import atomic_save_safetensors
from utils.video_io import write_image
from utils.world.synthetic_pose import generate_sample, load_world_config
from wan.checkpoint import POSE_PREFIXES
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "inference" / "tiny.yaml")]  # random weights, built in memory
HEIGHT, WIDTH = 64, 96


def read_back(path: Path) -> np.ndarray:
    """All frames of an mp4 through decord, uint8 [F, H, W, 3]."""
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


@pytest.fixture(scope="module")
def sample():
    return generate_sample(load_world_config(height=HEIGHT, width=WIDTH, num_frames=13), seed=4)


@pytest.fixture
def ref_png(tmp_path, sample) -> Path:
    write_image(tmp_path / "ref.png", sample.ref_image)
    return tmp_path / "ref.png"


def pose_folder(folder: Path, frames: np.ndarray) -> Path:
    for i, frame in enumerate(frames):
        write_image(folder / f"pose_{i}.png", frame)
    return folder


def test_help_documents_every_flag(capsys):
    parser = inference.build_parser()
    text = parser.format_help()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    for action in flags:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
        assert all(option in text for option in action.option_strings)
    for required in ("--ref", "--pose", "--driving", "--prompt", "--config", "--seed", "--out", "--num-frames",
                     "--weights", "--preview", "RANDOM weights"):  # fmt: skip
        assert required in text
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--help"])
    assert exit_info.value.code == 0 and "--driving" in capsys.readouterr().out


def test_tiny_demo_runs_from_any_folder(tmp_path):
    """`python inference.py --config configs/inference/tiny.yaml` from any folder: random tiny networks on a
    synthetic clip -> outputs/video.mp4."""
    res = subprocess.run([sys.executable, str(ROOT / "inference.py"), *TINY], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RANDOM weights" in res.stderr and "FPS" in res.stderr and "first block after" in res.stderr
    video = read_back(tmp_path / "outputs" / "video.mp4")
    assert video.shape == (33, HEIGHT, WIDTH, 3)
    assert video.std() > 1.0  # not a blank clip
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["video.mp4"]  # no temp files left


def test_keypoints_inputs_preview_and_same_seed_same_video(tmp_path, sample, ref_png):
    pose_json, ref_json = tmp_path / "keypoints.json", tmp_path / "ref_keypoints.json"
    save_keypoints(pose_json, sample.keypoints)
    save_keypoints(ref_json, sample.keypoints.select([sample.ref_index]))
    args = [*TINY, "--ref", str(ref_png), "--pose", str(pose_json), "--ref-pose", str(ref_json), "--num-frames", "9",
            "--seed", "3", "--prompt", "a person is dancing"]  # fmt: skip
    inference.main([*args, "--out", str(tmp_path / "a.mp4"), "--preview", str(tmp_path / "side.mp4")])
    inference.main([*args, "--out", str(tmp_path / "b.mp4")])
    a = read_back(tmp_path / "a.mp4")
    assert a.shape == (9, HEIGHT, WIDTH, 3)
    assert np.array_equal(a, read_back(tmp_path / "b.mp4"))
    side = read_back(tmp_path / "side.mp4")
    assert side.shape == (9, HEIGHT, 2 * WIDTH, 3)
    assert np.abs(side[:, :, WIDTH:].astype(int) - a).mean() < 3  # right half: the output (lossy codec)


def test_weight_files_load_through_the_real_loaders(tmp_path, sample, ref_png, caplog):
    """Checkpoint files instead of random_weights: a student checkpoint without pose encoders plus a UniAnimate
    file that has them, and HF/diffusers folders for T5, CLIP and the VAE (the tiny configs)."""
    model = randomize(build_model("tiny"), std=0.05)
    state = model.state_dict()
    student = {k: v for k, v in state.items() if not k.startswith(POSE_PREFIXES)}
    atomic_save_safetensors(student, tmp_path / "student.safetensors")
    torch.save({f"pipe.dit.{k}": v for k, v in state.items() if k.startswith(POSE_PREFIXES)}, tmp_path / "pose.ckpt")
    t5_config = tiny_umt5_config()
    t5_config.d_model = model.text_dim
    UMT5EncoderModel(t5_config).save_pretrained(tmp_path / "t5")
    clip_config = tiny_clip_config()
    clip_config.hidden_size = model.clip_dim
    CLIPVisionModel(clip_config).save_pretrained(tmp_path / "clip")
    vae = AutoencoderKLWan.from_config(TINY_VAE_CONFIG)
    vae.load_state_dict(convert_wan_vae_to_diffusers(vae_official_state_dict(TINY_VAE_CONFIG)))
    vae.save_pretrained(tmp_path / "vae")
    pose_folder(tmp_path / "pose", sample.pose[:5])
    args = ["--config", str(ROOT / "configs/inference/student_1.3b.yaml"), "--preset", "tiny",
            "--weights", str(tmp_path / "student.safetensors"), "--pose-weights", str(tmp_path / "pose.ckpt"),
            "--t5", str(tmp_path / "t5"), "--t5-tokenizer", str(make_tokenizer(tmp_path / "tokenizer")),
            "--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae"), "--text-cache", str(tmp_path / "cache"),
            "--models-dir", str(tmp_path / "models"), "--ref", str(ref_png), "--pose", str(tmp_path / "pose"),
            "--out", str(tmp_path / "out.mp4")]  # fmt: skip
    with caplog.at_level("INFO"):
        inference.main(args)
    assert f"pose weights from {tmp_path / 'pose.ckpt'}" in caplog.text
    assert "no reference pose" in caplog.text  # no --ref-pose and no DWPose models: pose-only input
    assert read_back(tmp_path / "out.mp4").shape == (5, HEIGHT, WIDTH, 3)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the prompt is cached for the next run


def _bad_pose_video(tmp_path: Path, ref: Path) -> list[str]:
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 this is not a video" * 100)
    return ["--ref", str(ref), "--pose", str(tmp_path / "broken.mp4")]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("short_pose", r"--pose .*pose_short has 5 frames but --num-frames is 9: .* at most 5 frames"),
        ("pose_size", r"pose frames are 32x48 \(HxW\) but the reference image is 64x96: give pose frames at the "),
        ("missing_weights", r"--weights .*missing\.safetensors does not exist .*pass the right path with --weights"),
        ("unreadable_video", r"--pose: cannot read video .*broken\.mp4.*; give a folder of pose images, a pose video"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_the_fix(tmp_path, sample, ref_png, case, expected):
    out = tmp_path / "out" / "video.mp4"
    if case == "short_pose":
        args = [*TINY, "--ref", str(ref_png), "--pose", str(pose_folder(tmp_path / "pose_short", sample.pose[:5])),
                "--num-frames", "9"]  # fmt: skip
    elif case == "pose_size":
        small = sample.pose[:9, ::2, ::2]
        args = [*TINY, "--ref", str(ref_png), "--pose", str(pose_folder(tmp_path / "pose_small", small))]
    elif case == "missing_weights":
        args = ["--config", str(ROOT / "configs/inference/student_1.3b.yaml"),
                "--weights", str(tmp_path / "missing.safetensors")]  # fmt: skip
    else:
        args = [*TINY, *_bad_pose_video(tmp_path, ref_png)]
    with pytest.raises(SystemExit) as exit_info:
        inference.main([*args, "--out", str(out)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert re.search(expected, message), message
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
