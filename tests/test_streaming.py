"""Live, unbounded streaming (issue 18) on tiny models: streamed pose tokens equal the whole-clip encoding (several
chunk and block sizes, the clip's start and end), each latent frame's tokens come out exactly `lookahead` frames
after its last pose frame, the streamed `y` equals image_condition, a streamed clip equals the whole-clip one
(CFG, a partial last block, a local window), and a long stream does not grow memory."""

from __future__ import annotations

import collections
import gc
import itertools
import tracemalloc

import numpy as np
import psutil
import pytest
import torch
from _tiny_encoders import TINY_VAE_CONFIG, vae_official_state_dict
from conftest import randomize, rel_err
from test_pipeline import HEIGHT, PROMPT, WIDTH, clip_inputs, fake_image_encoder, fake_text_encoder
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.causal_diffusion_inference import StreamingPosePipeline, image_condition
from pipeline.streaming import ImageConditionStream, PoseStreamError, PoseTokenStream
from utils.video_io import VideoWriter, read_video
from wan.configs import build_model
from wan.modules.pose import StreamingPoseEncoder, pose_lookahead, pose_receptive_field

TOKENS_PER_FRAME = (HEIGHT // 16) * (WIDTH // 16)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from utils.encoders.wan_wrapper import WanVAE

    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(vae_official_state_dict(TINY_VAE_CONFIG), path)
    return WanVAE(path, device="cpu", dtype=torch.float32, config=TINY_VAE_CONFIG)


@pytest.fixture(scope="module")
def windowed():
    """The tiny student with a local window of 2 blocks and a sink of 1 (cache: 9 latent frames)."""
    return randomize(build_model("tiny", local_attn_size=6, sink_size=3), std=0.05).eval()


def to_frames(pose: torch.Tensor) -> list[np.ndarray]:
    """[1, 3, F, H, W] in 0..255 -> F uint8 frames [H, W, 3] (what a stream yields)."""
    return list(pose[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy())


def test_receptive_field_and_lookahead_come_from_the_convs(windowed):
    assert pose_receptive_field(windowed) == (7, 7, 4)  # REFERENCE §3: +-7 padded frames, stride 4
    assert pose_lookahead(windowed) == 4


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 45])
def test_streaming_encoder_equals_the_whole_clip(windowed, chunk):
    pose = torch.rand(1, 3, 45, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(chunk)) * 255
    with torch.no_grad():
        whole, _ = windowed.encode_pose(pose)  # [1, 12 * T, dim]
        enc = StreamingPoseEncoder(windowed)
        parts = [enc.push(pose[:, :, i : i + chunk]) for i in range(0, 45, chunk)] + [enc.finish()]
    assert rel_err(torch.cat(parts, dim=1), whole) <= 1e-5


def test_each_latent_frame_comes_out_lookahead_frames_after_its_last_pose_frame(windowed):
    """Latent frame j covers pose frames up to 4j; its tokens appear when frame 4j + 4 is pushed (not before), and
    the last ones at finish()."""
    pose = torch.rand(1, 3, 21, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1)) * 255
    enc = StreamingPoseEncoder(windowed)
    emitted_after = []  # latent frame -> index of the pose frame whose push released it
    with torch.no_grad():
        for i in range(21):
            out = enc.push(pose[:, :, i : i + 1])
            emitted_after += [i] * (out.shape[1] // TOKENS_PER_FRAME)
        emitted_after += ["finish"] * (enc.finish().shape[1] // TOKENS_PER_FRAME)
    lookahead = pose_lookahead(windowed)
    assert emitted_after == [4 * j + lookahead for j in range(5)] + ["finish"]  # 21 frames -> 6 latent frames


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_pose_token_stream_blocks_equal_slices_of_the_whole_clip(windowed, block):
    """Block boundaries anywhere, the clip's start and end, chunks of the source of mixed sizes, and a stream that
    ends inside a group (its last frames are dropped: the video covers 1 + 4k frames)."""
    pose = torch.rand(1, 3, 47, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(block)) * 255
    frames = to_frames(pose)
    with torch.no_grad():
        whole, _ = windowed.encode_pose(torch.from_numpy(np.stack(frames[:45])).permute(3, 0, 1, 2)[None].float())
        chunks = [frames[0], np.stack(frames[1:3]), *frames[3:10], np.stack(frames[10:30]), *frames[30:]]
        stream = PoseTokenStream(windowed, chunks, (HEIGHT, WIDTH), "cpu")
        parts = []
        while (tokens := stream.take(block)) is not None:
            parts.append(tokens)
    sizes = [p.shape[1] // TOKENS_PER_FRAME for p in parts]
    assert sum(sizes) == 12 and all(s == block for s in sizes[:-1])
    assert stream.frames_read == 47 and stream.frames_used == 45
    for i, part in enumerate(parts):
        start = i * block * TOKENS_PER_FRAME
        assert rel_err(part, whole[:, start : start + part.shape[1]]) <= 1e-5


def test_pose_stream_names_a_frame_of_the_wrong_size(windowed):
    frames = [np.zeros((HEIGHT, WIDTH, 3), np.uint8)] * 5 + [np.zeros((HEIGHT, WIDTH + 16, 3), np.uint8)]
    stream = PoseTokenStream(windowed, frames, (HEIGHT, WIDTH), "cpu")
    with pytest.raises(PoseStreamError, match=r"pose frame 5 is 32x64 \(HxW\) but the reference image is 32x48"):
        stream.take(3)


def test_streamed_y_equals_image_condition_and_stops_encoding(vae):
    ref = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_map = torch.randn(1, 20, 1, HEIGHT // 8, WIDTH // 8)
    sizes = (1, 2, 3, 3, 4, 20, 7)  # 40 latent frames, 157 video frames
    with torch.no_grad():
        whole = image_condition(vae, ref, 4 * sum(sizes) - 3, 20) + ref_map
        lazy = ImageConditionStream(vae, ref, 20, ref_map)
        got = torch.cat([lazy.take(n) for n in sizes], dim=2)
        eager = ImageConditionStream(vae, ref, 20, ref_map)
        eager.precompute()
        encoded = eager.encoded
        got_eager = torch.cat([eager.take(n) for n in sizes], dim=2)
    assert rel_err(got, whole) <= 1e-5 and torch.equal(got_eager, got)
    assert lazy.constant is not None and lazy.encoded < sum(sizes)  # the cache repeated: later frames cost nothing
    assert eager.encoded == encoded  # precompute() encoded every frame it needed


@pytest.mark.parametrize("guidance, latent_frames", [(1.0, 9), (2.0, 7)])
def test_a_streamed_clip_equals_the_whole_clip(vae, windowed, guidance, latent_frames):
    """The same latents and frames whether the pose comes as a tensor or as an iterator of frames (local window,
    CFG, a last block of one latent frame)."""
    num_frames = 4 * latent_frames - 3
    ref, pose, ref_pose = clip_inputs(num_frames)
    pose = pose.round()
    pipe = StreamingPosePipeline(windowed, vae, fake_text_encoder(), fake_image_encoder(), guidance_scale=guidance)
    whole = pipe.prepare(ref, pose, PROMPT, num_frames, ref_pose)
    streamed = pipe.prepare_stream(ref, iter(to_frames(pose)), PROMPT, ref_pose)
    a = list(pipe.stream(whole, seed=5))
    b = list(pipe.stream(streamed, seed=5))
    assert [x.latent_start for x in a] == [x.latent_start for x in b]
    for x, y in zip(a, b, strict=True):
        assert rel_err(y.latents, x.latents) <= 1e-5 and rel_err(y.frames, x.frames) <= 1e-5
    assert sum(x.frames.shape[2] for x in b) == num_frames


def test_an_unbounded_stream_needs_a_local_window(vae):
    pipe = StreamingPosePipeline(randomize(build_model("tiny")).eval(), vae, fake_text_encoder(), fake_image_encoder())
    ref, _, _ = clip_inputs(1)
    with pytest.raises(ValueError, match="local attention window"):
        pipe.prepare_stream(ref, iter([]), PROMPT)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage that Python objects still reach (a leak of tensors in our code shows here)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_a_long_stream_does_not_grow_memory(vae, windowed, tmp_path):
    """481 frames streamed into an mp4 (121 latent frames, 41 blocks, 13x the KV cache): the tensors alive after
    block 40 are those alive after block 10 (to the KB), Python/numpy allocations
    (tracemalloc) and the process's RSS do not grow with the length."""
    ref, pose, ref_pose = clip_inputs(13)
    loop = itertools.cycle(to_frames(pose.round()))  # an endless pose source of bounded memory
    pipe = StreamingPosePipeline(windowed, vae, fake_text_encoder(), fake_image_encoder(), steps=[1000.0, 500.0])
    num_frames = 481
    clip = pipe.prepare_stream(ref, loop, PROMPT, ref_pose, max_frames=num_frames)
    process = psutil.Process()
    rss, traced, tensors = [], [], {}
    tracemalloc.start()
    try:
        with VideoWriter(tmp_path / "long.mp4", fps=16) as writer:
            for i, block in enumerate(pipe.stream(clip, seed=0)):
                writer.write(((block.frames[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy())
                rss.append(process.memory_info().rss)
                traced.append(tracemalloc.get_traced_memory()[0])
                if i in (10, 39):
                    del block
                    tensors[i] = live_tensor_bytes()
        written = writer.frames
    finally:
        tracemalloc.stop()
    assert written == num_frames and len(rss) == 41
    assert abs(tensors[39] - tensors[10]) <= 1024, tensors  # keeping even one block's latents (4.6 KB) would fail
    mb = 2**20
    assert max(traced[10:]) - max(traced[:10]) < 0.1 * mb, traced[::5]
    assert max(rss[10:]) - max(rss[:10]) < 32 * mb, [round(r / mb, 1) for r in rss[::5]]


class OpRecorder(TorchDispatchMode):
    """Every tensor op run under it, with its input shapes (the work of a stretch of code, machine-independent)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        self.ops[(str(func), tuple(tuple(a.shape) for a in leaves if isinstance(a, torch.Tensor)))] += 1
        return func(*args, **(kwargs or {}))


def test_every_block_after_the_window_fills_runs_the_same_ops(vae, windowed):
    """Time per frame is flat by construction: once the KV cache's window is full (block 3 here: 9 latent frames)
    every block runs the same tensor ops on the same shapes (pose encoder, y, transformer, cache, VAE decode), so
    nothing in a block's work grows with its position in the stream (wall times on a shared CPU are too noisy)."""
    ref, pose, ref_pose = clip_inputs(13)
    pipe = StreamingPosePipeline(windowed, vae, fake_text_encoder(), fake_image_encoder(), steps=[1000.0, 500.0])
    loop = itertools.cycle(to_frames(pose.round()))
    clip = pipe.prepare_stream(ref, loop, PROMPT, ref_pose, max_frames=4 * 3 * 20 + 1)
    blocks, ops = pipe.stream(clip, seed=0), {}
    for i in range(16):
        if i in (5, 15):
            with OpRecorder() as recorder:
                next(blocks)
            ops[i] = recorder.ops
        else:
            next(blocks)
    assert sum(ops[5].values()) > 500 and ops[5] == ops[15]


def test_inference_streams_a_clip_longer_than_the_training_window(tmp_path, caplog):
    """inference.py on 93 frames (24 latent frames, more than the 21 the tiny preset attends to): it switches to the
    local window + sink, writes every frame and the side-by-side preview, and leaves no temp file."""
    import inference

    out, side = tmp_path / "long.mp4", tmp_path / "side.mp4"
    with caplog.at_level("INFO"):
        inference.main(["--config", str(inference.TINY_CONFIG), "--out", str(out), "--preview", str(side),
                        "synthetic.num_frames=93", "synthetic.height=32", "synthetic.width=32",
                        "denoising_steps=[1000.0,500.0]"])  # fmt: skip
    assert "streaming through a local window of 18 + a sink of 3" in caplog.text
    assert read_video(out).shape == (93, 32, 32, 3) and read_video(side).shape == (93, 32, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "side.mp4"]
