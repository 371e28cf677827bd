"""utils/video_io: round trips, atomic writes, and one-line errors that name the file."""

from __future__ import annotations

import os

import numpy as np
import pytest

import utils.video_io as vio


def smooth_clip(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([(x * 4 + t * 3) % 256, (y * 6) % 256, np.full_like(x, 128)], -1).astype(np.uint8)


def test_lossless_mp4_roundtrip_is_exact(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    vio.write_video(tmp_path / "a.mp4", frames, fps=16, mode="lossless")
    assert np.array_equal(vio.read_video(tmp_path / "a.mp4"), frames)
    assert vio.probe_fps(tmp_path / "a.mp4") == pytest.approx(16)
    # decord cannot decode some small sizes: the ffmpeg fallback must still read them exactly.
    odd = np.random.default_rng(1).integers(0, 256, (5, 64, 48, 3), dtype=np.uint8)
    vio.write_video(tmp_path / "b.mp4", odd, fps=8, mode="lossless")
    assert np.array_equal(vio.read_video(tmp_path / "b.mp4"), odd)


def test_lossy_mp4_is_close(tmp_path):
    frames = smooth_clip()
    vio.write_video(tmp_path / "a.mp4", frames, fps=16)
    back = vio.read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 3
    with pytest.raises(ValueError, match="even height and width"):
        vio.write_video(tmp_path / "odd.mp4", frames[:, :31], fps=16)


def test_failed_write_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "a.mp4"
    vio.write_video(target, smooth_clip(), fps=16, mode="lossless")
    before = target.read_bytes()

    def broken_writer(path, *args, **kwargs):
        open(path, "wb").write(b"half a video")
        raise OSError("disk full")
        yield  # pragma: no cover - makes this a generator like imageio_ffmpeg.write_frames

    import imageio_ffmpeg  # video_io imports it lazily, at call time: patch the module itself

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        vio.write_video(target, smooth_clip(), fps=16)
    with pytest.raises(OSError, match="disk full"):
        vio.write_video(tmp_path / "new.mp4", smooth_clip(), fps=16)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no temp files, no half-written new.mp4


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        vio.write_video(tmp_path / "a.mp4", smooth_clip(), fps=16)
        vio.write_image_folder(tmp_path / "f", smooth_clip(frames=2))
    finally:
        os.umask(umask)
    assert (tmp_path / "a.mp4").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o755


def test_unreadable_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(vio.VideoReadError) as err:
        vio.read_video(bad)
    assert "broken.mp4" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        vio.read_video(tmp_path / "nothere.mp4")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(vio.VideoReadError, match="bad.png"):
        vio.read_image(tmp_path / "bad.png")


def test_image_folders(tmp_path):
    frames = smooth_clip(frames=12)
    vio.write_image_folder(tmp_path / "f", frames)
    assert np.array_equal(vio.read_image_folder(tmp_path / "f"), frames)
    assert np.array_equal(vio.read_frames(tmp_path / "f"), frames)
    vio.write_image_folder(tmp_path / "f", frames[:3])  # replaces the folder
    assert len(vio.list_images(tmp_path / "f")) == 3

    natural = tmp_path / "natural"
    natural.mkdir()
    for i in (10, 2, 1):
        vio.write_image(natural / f"frame{i}.png", np.full((4, 4, 3), i, np.uint8))
    assert [p.name for p in vio.list_images(natural)] == ["frame1.png", "frame2.png", "frame10.png"]
    vio.write_image(natural / "frame11.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(vio.VideoReadError, match="frame11.png"):
        vio.read_image_folder(natural)
    (tmp_path / "empty").mkdir()
    with pytest.raises(vio.VideoReadError, match="no images"):
        vio.read_image_folder(tmp_path / "empty")


def test_resize_frames():
    frames = smooth_clip()
    assert vio.resize_frames(frames, 32, 48) is frames
    small = vio.resize_frames(frames, 16, 24)
    assert small.shape == (9, 16, 24, 3) and small.dtype == np.uint8
