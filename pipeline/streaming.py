"""Conditions of an unbounded stream: pose tokens from pose frames as they arrive (wan.modules.pose's streaming
encoder) and the i2v input `y` frame by frame (a streaming VAE encode of [reference, zeros...] that stops once
its causal cache is constant), so a clip of any length is sampled with memory that does not grow with it.
`StreamConditions` is what pipeline.rollout.block_rollout takes in place of whole-clip Conditions."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from pipeline.conditions import VAE_STRIDE, Conditions
from wan.modules.pose import StreamingPoseEncoder, pose_lookahead

log = logging.getLogger(__name__)

# Latent frames of y encoded before giving up on finding its constant tail (then it is encoded for every frame).
Y_SEARCH_FRAMES = 64


class PoseStreamError(ValueError):
    """A pose frame of a stream that cannot be used (size, type, range): the message names the frame and the fix."""


def as_frame_chunk(item: object, size: tuple[int, int], index: int) -> np.ndarray:
    """One item of a pose-frame stream -> uint8 [n, H, W, 3]: a frame [H, W, 3] or frames [n, H, W, 3], uint8
    RGB (the utils.video_io format) at the clip's size (H, W)."""
    frames = np.asarray(item)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise PoseStreamError(f"pose frame {index}: expected uint8 RGB [H, W, 3] or [n, H, W, 3], got "
                              f"{frames.dtype} {tuple(frames.shape)}")  # fmt: skip
    if tuple(frames.shape[1:3]) != tuple(size):
        raise PoseStreamError(
            f"pose frame {index} is {frames.shape[1]}x{frames.shape[2]} (HxW) but the reference image is "
            f"{size[0]}x{size[1]}: send pose frames at the reference's size"
        )
    return frames


class PoseTokenStream:
    """Pose tokens per latent frame from an iterator of pose frames, pulled only as far as a block needs.

    Frames are fed to the encoder in the VAE's groups (the first frame alone, then 4 at a time), so a stream that
    ends inside a group drops its last 1-3 frames (the video covers 1 + 4k frames). The tokens of latent frames
    [s, s + n) are ready once pose frames up to 4(s + n - 1) + lookahead are read (lookahead = 4 frames), or the
    stream ended. Memory: the encoder's few frames of state plus the tokens not yet taken.
    """

    def __init__(
        self,
        model: nn.Module,
        frames: Iterable[np.ndarray],
        size: tuple[int, int],
        device: torch.device | str,
        max_frames: int | None = None,
    ):
        self.encoder = StreamingPoseEncoder(model)
        self.lookahead = pose_lookahead(model)
        self.source: Iterator[np.ndarray] = iter(frames)
        self.size, self.device, self.max_frames = tuple(size), torch.device(device), max_frames
        self.pending: list[np.ndarray] = []  # frames read but not yet fed (an incomplete group)
        self.tokens: list[torch.Tensor] = []  # [B, m*T, dim] chunks not yet taken
        self.ready_frames = 0  # latent frames in self.tokens
        self.frames_read = 0  # pose frames read from the source
        self.frames_used = 0  # pose frames fed to the encoder
        self.ended = False
        self.tokens_per_frame: int | None = None

    def _group(self) -> int:
        return 1 if self.frames_used == 0 else VAE_STRIDE[0]

    def _read_one(self) -> bool:
        """Read the next source item; False once the stream (or max_frames) ended."""
        if self.max_frames is not None and self.frames_read >= self.max_frames:
            return False
        try:
            item = next(self.source)
        except StopIteration:
            return False
        chunk = as_frame_chunk(item, self.size, self.frames_read)
        if self.max_frames is not None:
            chunk = chunk[: self.max_frames - self.frames_read]
        self.pending.extend(chunk)
        self.frames_read += len(chunk)
        return True

    def _feed(self, frames: list[np.ndarray]) -> None:
        x = torch.from_numpy(np.stack(frames)).to(self.device)  # [n, H, W, 3] uint8
        x = x.permute(3, 0, 1, 2)[None].float()  # [1, 3, n, H, W] in 0..255
        self._keep(self.encoder.push(x))
        self.frames_used += len(frames)

    def _keep(self, tokens: torch.Tensor) -> None:
        if tokens.shape[1]:
            per_frame = self._tokens_per_frame()
            self.tokens.append(tokens)
            self.ready_frames += tokens.shape[1] // per_frame

    def _tokens_per_frame(self) -> int:
        if self.tokens_per_frame is None:
            h, w = self.size
            self.tokens_per_frame = (h // 16) * (w // 16)
        return self.tokens_per_frame

    def _end(self) -> None:
        if self.pending:
            log.info("the pose stream ended after %d frames: the last %d do not fill a group of %d (the video "
                     "covers 1 + 4k frames) and are dropped", self.frames_read, len(self.pending),
                     self._group())  # fmt: skip
            self.pending = []
        if self.frames_used:
            self._keep(self.encoder.finish())
        self.ended = True

    def fill(self, latent_frames: int) -> None:
        """Read until `latent_frames` latent frames of tokens are ready, or the stream ended."""
        while self.ready_frames < latent_frames and not self.ended:
            while len(self.pending) >= self._group():
                group = self._group()
                self._feed(self.pending[:group])
                self.pending = self.pending[group:]
            if self.ready_frames >= latent_frames:
                break
            if not self._read_one():
                self._end()

    def take(self, latent_frames: int) -> torch.Tensor | None:
        """The tokens [1, m*T, dim] of the next m <= latent_frames latent frames (m < latent_frames only at the
        stream's end), or None when the stream has no more."""
        self.fill(latent_frames)
        if self.ready_frames == 0:
            return None
        tokens = torch.cat(self.tokens, dim=1) if len(self.tokens) > 1 else self.tokens[0]
        m = min(latent_frames, self.ready_frames)
        cut = m * self._tokens_per_frame()
        rest = tokens[:, cut:]
        self.tokens = [rest] if rest.shape[1] else []
        self.ready_frames -= m
        return tokens[:, :cut]


def _same_state(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.equal(x, y)):
            return False
        if not isinstance(x, torch.Tensor) and x != y:
            return False
    return True


def _snapshot(state: list) -> list:
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in state]


class ImageConditionStream:
    """The i2v input `y` (pipeline.conditions.image_condition: the mask, then the latents of [reference,
    zeros...]) of any number of latent frames, made frame by frame by a streaming VAE encode of the zero frames.
    The encode stops once the encoder's causal cache repeats: every later latent is then the same (bit for bit;
    ~29 latent frames in for Wan2.1's encoder layout). `precompute()` does that search up front (the cost of a
    ~113-frame encode, once per clip) so blocks then cost nothing; frames equal image_condition's (fp32).

    ref_map [B, C_y, 1, h, w] (the reference-pose map) is added to every frame when given. Memory: the frames
    computed ahead (at most Y_SEARCH_FRAMES) and the encoder's cache.
    """

    def __init__(self, vae: nn.Module, ref_image: torch.Tensor, y_channels: int, ref_map: torch.Tensor | None = None):
        self.encoder = vae.streaming_encoder()
        self.ref_image = ref_image.float()  # [B, 3, H, W] in [-1, 1]
        self.y_channels, self.ref_map = y_channels, ref_map
        self.encoded = 0  # latent frames the encoder has made
        self.next_frame = 0  # the next latent frame take() returns
        self.ahead: deque[torch.Tensor] = deque()  # latents [B, 16, 1, h, w] of frames next_frame, next_frame + 1, ...
        self.constant: torch.Tensor | None = None  # the repeating latent once found
        self.previous_state: list | None = None

    def _encode_next(self) -> torch.Tensor:
        """Latent frame `encoded` of the video [reference, zeros...]: [B, 16, 1, h, w]."""
        b, _, h, w = self.ref_image.shape
        if self.encoded == 0:
            latent = self.encoder.encode(self.ref_image[:, :, None])
        else:
            latent = self.encoder.encode(self.ref_image.new_zeros(b, 3, VAE_STRIDE[0], h, w))
        self.encoded += 1
        searching = self.encoded <= Y_SEARCH_FRAMES
        state = self.encoder.state()
        if searching and self.previous_state is not None and _same_state(self.previous_state, state):
            self.constant, self.previous_state = latent, None
            log.debug("y is constant from latent frame %d on", self.encoded - 1)
        elif searching:
            self.previous_state = _snapshot(state) if self.encoded > 1 else None
        elif self.previous_state is not None:
            log.warning("the VAE's causal cache did not repeat within %d latent frames: y is encoded for every "
                        "frame", Y_SEARCH_FRAMES)  # fmt: skip
            self.previous_state = None
        return latent

    def precompute(self, max_frames: int | None = None) -> None:
        """Encode ahead until the latents repeat (or Y_SEARCH_FRAMES frames, or max_frames: a clip's length),
        keeping the frames for take()."""
        limit = Y_SEARCH_FRAMES if max_frames is None else min(max_frames, Y_SEARCH_FRAMES)
        while self.constant is None and self.encoded < limit:
            self.ahead.append(self._encode_next())

    def _latent(self) -> torch.Tensor:
        if self.ahead:
            latent = self.ahead.popleft()
        elif self.constant is not None:
            latent = self.constant
        else:
            latent = self._encode_next()
        self.next_frame += 1
        return latent

    def take(self, latent_frames: int) -> torch.Tensor:
        """y of the next latent_frames frames: [B, C_y, n, h, w] fp32."""
        frames = []
        for _ in range(latent_frames):
            first = self.next_frame == 0
            latent = self._latent()  # [B, 16, 1, h, w]
            mask_channels = self.y_channels - latent.shape[1]
            if mask_channels != VAE_STRIDE[0]:
                raise ValueError(
                    f"the model takes {self.y_channels} y channels; the VAE gives {latent.shape[1]} latent channels, "
                    f"leaving {mask_channels} for the mask where Wan's I2V layout has {VAE_STRIDE[0]}"
                )
            mask = latent.new_full((latent.shape[0], mask_channels, 1, *latent.shape[3:]), float(first))
            frames.append(torch.cat([mask, latent], dim=1))
        y = torch.cat(frames, dim=2)
        return y if self.ref_map is None else y + self.ref_map.float()


class _BlockMemo:
    """The latest block's per-frame conditions, shared by the conditional and unconditional branches."""

    def __init__(self, y: ImageConditionStream | None, pose: PoseTokenStream | None):
        self.y, self.pose = y, pose
        self.start: int | None = None
        self.value: tuple[torch.Tensor | None, torch.Tensor | None, int] | None = None
        self.next_start = 0

    def get(self, start: int, frames: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int] | None:
        """(y, pose tokens, frames) of the block at `start`; None once the pose stream ended."""
        if start == self.start:
            return self.value
        if start != self.next_start:
            raise ValueError(f"a stream's blocks come in order: block {start} was asked for after {self.start}")
        pose = None
        if self.pose is not None:
            pose = self.pose.take(frames)
            if pose is None:
                self.start, self.value = start, None
                return None
            frames = pose.shape[1] // self.pose.tokens_per_frame
        y = None if self.y is None else self.y.take(frames)
        self.start, self.value, self.next_start = start, (y, pose, frames), start + frames
        return self.value


class StreamConditions:
    """Conditions of a clip whose per-frame parts (y, pose tokens) are made block by block as the rollout asks for
    them (block_rollout with num_frames=None). context [B, L, text_dim] and clip_fea stay whole. The stream ends
    when the pose stream does (or after max_latent_frames); without pose, max_latent_frames is needed."""

    def __init__(
        self,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None,
        y: ImageConditionStream | None,
        pose: PoseTokenStream | None,
        max_latent_frames: int | None = None,
        *,
        _memo: _BlockMemo | None = None,
        _use_pose: bool = True,
    ):
        if pose is None and max_latent_frames is None and _memo is None:
            raise ValueError("a stream without pose frames never ends: give max_latent_frames")
        self.context, self.clip_fea = context, clip_fea
        self.max_latent_frames = max_latent_frames
        self.memo = _memo or _BlockMemo(y, pose)
        self.use_pose = _use_pose

    @property
    def pose(self) -> PoseTokenStream | None:
        return self.memo.pose

    def unconditional(self, negative_context: torch.Tensor) -> StreamConditions:
        """CFG's unconditional branch, as Conditions.unconditional: the negative prompt, no pose tokens, the
        same y; it shares this stream's blocks (ask this branch first for each block)."""
        return StreamConditions(negative_context, self.clip_fea, None, None, self.max_latent_frames,
                                _memo=self.memo, _use_pose=False)  # fmt: skip

    def block(self, start: int, frames: int, tokens_per_frame: int) -> Conditions | None:
        """The conditions of latent frames [start, start + m), m <= frames (less only at the end), or None after
        the stream's end."""
        if self.max_latent_frames is not None:
            frames = min(frames, self.max_latent_frames - start)
            if frames <= 0:
                return None
        got = self.memo.get(start, frames)
        if got is None:
            return None
        y, pose, _ = got
        if pose is not None and pose.shape[1] % tokens_per_frame:
            raise ValueError(f"pose tokens [{tuple(pose.shape)}] do not fit {tokens_per_frame} tokens per frame")
        return Conditions(self.context, self.clip_fea, y, pose if self.use_pose else None)
