"""Streaming pose-conditioned generation with the causal student: reference image + pose frames + prompt ->
video frames, block by block.

Per clip, once: the reference is VAE-encoded (fp32) into `y` (mask + latents of [reference, zeros...]), CLIP
sees the reference, the prompt goes through the (cached) text encoder, and `model.encode_pose` turns the whole
pose clip into pose tokens and the reference-pose map (added to `y`). Per block of latent frames
(pipeline.rollout.stream_latents): a few denoising steps through the KV cache (re-noising the x0 prediction
between steps), one clean pass at t = 0 that writes the block's K/V for the blocks after it, and the block's
latents go straight to the streaming VAE.

`StreamingPosePipeline.prepare_stream` takes the pose as an iterator instead (a file read lazily, a queue fed
live): pose tokens and `y` are then made block by block (pipeline/streaming.py), so with a local attention window
a clip of any length streams with memory that does not grow with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.conditions import VAE_STRIDE, Conditions, image_condition  # noqa: F401 (image_condition: re-export)
from pipeline.rollout import DEFAULT_STEPS, stream_latents
from pipeline.streaming import ImageConditionStream, PoseTokenStream, StreamConditions
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel
from wan.modules.pose import pose_latent_frames, ref_pose_map

if TYPE_CHECKING:  # the VAE wrapper pulls in diffusers; the latent-only path does not need it
    from utils.encoders.wan_wrapper import WanVAE

# Wan2.1's default negative prompt (the unconditional branch of CFG).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

TextEncoderFn = Callable[[Sequence[str]], torch.Tensor]  # prompts -> [B, text_len, text_dim]
ImageEncoderFn = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, H, W] in [-1, 1] -> [B, 257, clip_dim]


@dataclass
class PreparedClip:
    """Everything sampling needs for one clip: the conditional branch, the unconditional one (CFG only), and
    the clip's size in video frames and latent pixels."""

    cond: Conditions
    uncond: Conditions | None
    num_frames: int
    latent_size: tuple[int, int]

    @property
    def latent_frames(self) -> int:
        return pose_latent_frames(self.num_frames)


@dataclass
class StreamClip:
    """A clip whose pose arrives as it plays (StreamingPosePipeline.prepare_stream): conditions made block by
    block; it ends with its pose stream or after max_latent_frames."""

    cond: StreamConditions
    uncond: StreamConditions | None
    latent_size: tuple[int, int]
    max_latent_frames: int | None = None

    @property
    def pose(self) -> PoseTokenStream | None:
        return self.cond.pose


@dataclass
class VideoBlock:
    """One block as it leaves the pipeline: latent frames [latent_start, latent_start + n) and the video frames
    decoded from them, frames [B, 3, m, H, W] in [-1, 1] starting at video frame `frame_start`
    (m = 4n, or 4n - 3 for the block holding latent frame 0)."""

    latent_start: int
    latents: torch.Tensor
    frame_start: int
    frames: torch.Tensor


def check_clip_inputs(ref_image: torch.Tensor, pose_frames: torch.Tensor, num_frames: int) -> None:
    """Shapes of a clip's inputs, with errors that say what to change."""
    if ref_image.dim() != 4 or ref_image.shape[1] != 3:
        raise ValueError(f"the reference image must be [B, 3, H, W] in [-1, 1]; got shape {tuple(ref_image.shape)}")
    height, width = ref_image.shape[-2:]
    if height % 16 or width % 16:
        raise ValueError(
            f"the reference image is {height}x{width} (HxW); height and width must be multiples of 16 "
            f"(VAE stride 8 x patch 2): resize or crop it, e.g. to {height // 16 * 16}x{width // 16 * 16}"
        )
    if pose_frames.dim() != 5 or pose_frames.shape[1] != 3:
        raise ValueError(f"pose frames must be [B, 3, F, H, W] in 0..255; got shape {tuple(pose_frames.shape)}")
    if tuple(pose_frames.shape[-2:]) != (height, width):
        raise ValueError(
            f"the pose frames are {pose_frames.shape[-2]}x{pose_frames.shape[-1]} (HxW) but the reference image is "
            f"{height}x{width}: give pose frames at the reference's size (keypoints are drawn at any size)"
        )
    pose_latent_frames(num_frames)
    if pose_frames.shape[2] < num_frames:
        have = pose_frames.shape[2]
        raise ValueError(
            f"the pose clip has {have} frames but {num_frames} video frames were asked for: give a longer pose "
            f"clip or ask for at most {(have - 1) // 4 * 4 + 1} frames (1 + 4k)"
        )


class PosePipeline:
    """Reference image + pose frames + prompt -> video, for any network with the pose-conditioned i2v inputs.

    `prepare` computes the clip's conditioning once; `stream` yields VideoBlocks as soon as each block's frames
    are decoded (the streaming VAE keeps its causal cache across blocks); `generate` returns the whole video
    from one VAE decode of all latents (the reference the streamed frames must equal). Subclasses say how the
    latents are sampled (`latent_blocks`). CFG (guidance_scale != 1) adds an unconditional branch
    (Conditions.unconditional: the negative prompt, the same CLIP features and `y`, no pose tokens).
    """

    def __init__(
        self,
        model: WanModel,
        vae: WanVAE,
        text_encoder: TextEncoderFn,
        image_encoder: ImageEncoderFn | None,
        guidance_scale: float = 1.0,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
    ):
        if model.model_type == "i2v" and image_encoder is None:
            raise ValueError("an i2v model needs an image encoder (CLIP) for the reference image")
        self.model, self.vae = model, vae
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def prepare(
        self,
        ref_image: torch.Tensor,
        pose_frames: torch.Tensor,
        prompt: str | Sequence[str],
        num_frames: int | None = None,
        ref_pose: torch.Tensor | None = None,
    ) -> PreparedClip:
        """The clip's conditioning, computed once.

        ref_image [B, 3, H, W] in [-1, 1]; pose_frames [B, 3, F_pose, H, W] in 0..255 (the first num_frames are
        used; default: the longest 1 + 4k prefix); ref_pose [B, 3, H, W] in 0..255 or None (pose-only input: the
        reference-pose map stays zero); prompt: one string or one per batch element.
        """
        device = self.device
        if num_frames is None:
            num_frames = (pose_frames.shape[2] - 1) // VAE_STRIDE[0] * VAE_STRIDE[0] + 1
        check_clip_inputs(ref_image, pose_frames, num_frames)
        batch, (height, width) = ref_image.shape[0], ref_image.shape[-2:]
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        ref_image = ref_image.to(device)
        context = self.text_encoder(prompts).to(device)  # [B, text_len, text_dim]
        clip_fea = y = None
        if self.model.model_type == "i2v":
            clip_fea = self.image_encoder(ref_image)  # [B, 257, clip_dim]
            y = image_condition(self.vae, ref_image, num_frames, self.model.in_dim - self.model.out_dim)
        pose_tokens = None
        if self.model.pose_dim is not None:
            pose = pose_frames[:, :, :num_frames].to(device)
            pose_tokens, ref_map = self.model.encode_pose(pose, None if ref_pose is None else ref_pose.to(device))
            if ref_map is not None and y is not None:
                y = y + ref_map.float()  # [B, C_y, F_lat, h, w] + [B, C_y, 1, h, w]
        cond = Conditions(context, clip_fea, y, pose_tokens)
        uncond = None
        if self.guidance_scale != 1.0:
            uncond = cond.unconditional(self.text_encoder([self.negative_prompt] * batch).to(device))
        latent_size = (height // VAE_STRIDE[1], width // VAE_STRIDE[2])
        return PreparedClip(cond, uncond, num_frames, latent_size)

    def latent_blocks(self, clip: PreparedClip, generator: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
        """(latent start frame, clean latents [B, 16, n, h, w]) in order, covering the clip."""
        raise NotImplementedError

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def stream(self, clip: PreparedClip, seed: int = 0) -> Iterator[VideoBlock]:
        """Yield each block's decoded frames as soon as they exist; deterministic for a seed."""
        decoder = self.vae.streaming_decoder()
        frame_start = 0
        for latent_start, latents in self.latent_blocks(clip, self._generator(seed)):
            frames = decoder.decode(latents)  # [B, 3, m, H, W]
            yield VideoBlock(latent_start, latents, frame_start, frames)
            frame_start += frames.shape[2]

    @torch.no_grad()
    def generate(self, clip: PreparedClip, seed: int = 0) -> torch.Tensor:
        """The whole video [B, 3, F, H, W] in [-1, 1] from one decode of all latents (same seed, same video as
        the concatenated stream)."""
        latents = torch.cat([x for _, x in self.latent_blocks(clip, self._generator(seed))], dim=2)
        return self.vae.decode(latents)


class StreamingPosePipeline(PosePipeline):
    """The causal student: blocks of model.num_frame_per_block latent frames through the KV cache, `steps`
    denoising steps each plus a clean context pass. Any number of frames streams through a fixed-size cache
    when the model has a local attention window (local_attn_size)."""

    def __init__(
        self,
        model: CausalWanModel,
        vae: WanVAE,
        text_encoder: TextEncoderFn,
        image_encoder: ImageEncoderFn | None,
        steps: Sequence[float] = DEFAULT_STEPS,
        guidance_scale: float = 1.0,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
    ):
        super().__init__(model, vae, text_encoder, image_encoder, guidance_scale, negative_prompt)
        self.steps = tuple(float(t) for t in steps)

    @torch.no_grad()
    def prepare_stream(
        self,
        ref_image: torch.Tensor,
        pose_frames: Iterable[np.ndarray],
        prompt: str,
        ref_pose: torch.Tensor | None = None,
        max_frames: int | None = None,
        precompute_y: bool = True,
    ) -> StreamClip:
        """A clip whose pose frames come from an iterator, read only as far as each block needs (4 frames past
        the block: pose_lookahead). ref_image [1, 3, H, W] in [-1, 1]; pose_frames yields uint8 RGB frames
        [H, W, 3] (or [n, H, W, 3]) at the reference's size; ref_pose [1, 3, H, W] in 0..255 or None; the
        video ends with the pose stream (its last 1 + 4k frames) or after max_frames video frames.
        precompute_y: encode `y` up front (until it repeats, ~29 latent frames, or the clip's length: steady block
        times) rather than as the blocks need it (a lower first-frame latency, slower first blocks).

        An unbounded stream (max_frames None) needs a local attention window (local_attn_size), so that the KV
        cache does not grow; with global attention the cache holds max_frames.
        """
        if self.model.pose_dim is None:
            raise ValueError("prepare_stream needs a pose model (pose_dim): the pose stream is what ends the clip")
        if self.model.local_attn_size <= 0 and max_frames is None:
            raise ValueError(
                "an unbounded stream needs a local attention window: build the model with local_attn_size (e.g. "
                "18) and sink_size (e.g. 3), or give max_frames"
            )
        max_latent = None if max_frames is None else pose_latent_frames(max_frames)
        check_clip_inputs(ref_image, torch.zeros(1, 3, 1, *ref_image.shape[-2:]), 1)
        if ref_image.shape[0] != 1:
            raise ValueError(f"a stream is one clip: ref_image must be [1, 3, H, W]; got {tuple(ref_image.shape)}")
        device = self.device
        height, width = ref_image.shape[-2:]
        ref_image = ref_image.to(device)
        context = self.text_encoder([prompt]).to(device)
        ref_map = None if ref_pose is None else ref_pose_map(self.model, ref_pose.to(device), (height, width))
        clip_fea = y = None
        if self.model.model_type == "i2v":
            clip_fea = self.image_encoder(ref_image)
            y = ImageConditionStream(self.vae, ref_image, self.model.in_dim - self.model.out_dim, ref_map)
            if precompute_y:
                y.precompute(max_latent)
        pose = PoseTokenStream(self.model, pose_frames, (height, width), device, max_frames)
        cond = StreamConditions(context, clip_fea, y, pose, max_latent)
        uncond = None
        if self.guidance_scale != 1.0:
            uncond = cond.unconditional(self.text_encoder([self.negative_prompt]).to(device))
        return StreamClip(cond, uncond, (height // VAE_STRIDE[1], width // VAE_STRIDE[2]), max_latent)

    def latent_blocks(
        self, clip: PreparedClip | StreamClip, generator: torch.Generator
    ) -> Iterator[tuple[int, torch.Tensor]]:
        frames = clip.max_latent_frames if isinstance(clip, StreamClip) else clip.latent_frames
        return stream_latents(
            self.model, clip.cond, frames, clip.latent_size, self.steps, generator=generator,
            dtype=self.dtype, uncond=clip.uncond, guidance_scale=self.guidance_scale,
        )  # fmt: skip
