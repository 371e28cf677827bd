"""Teacher sampling: the bidirectional I2V-14B pose teacher (Wan2.1-I2V-14B + the merged UniAnimate-DiT LoRA and
its pose encoders) denoises the whole clip at once with UniPC on the official grid and classifier-free guidance;
pose tokens go only into the conditional branch."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.causal_diffusion_inference import (
    WAN_NEGATIVE_PROMPT,
    Conditions,
    ImageEncoderFn,
    PosePipeline,
    PreparedClip,
    TextEncoderFn,
    guided_flow,
)
from utils.scheduler import solve_flow_ode
from utils.wan_wrapper import WanVAE
from wan.modules.model import WanModel

# UniAnimate-DiT's sampling: 50 steps, shift 5 (720P weights), guidance 1.5.
TEACHER_STEPS = 50
TEACHER_SHIFT = 5.0
TEACHER_GUIDANCE = 1.5


@torch.no_grad()
def sample_latents(
    model: WanModel,
    cond: Conditions,
    latent_shape: tuple[int, int, int, int, int],
    num_steps: int = TEACHER_STEPS,
    shift: float = TEACHER_SHIFT,
    guidance_scale: float = TEACHER_GUIDANCE,
    uncond: Conditions | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Clean latents [B, 16, F, H, W] of shape `latent_shape` from noise, `num_steps` UniPC steps.

    Each step: flow_c = model(x, t, cond incl. pose tokens); with guidance_scale != 1 also flow_u =
    model(x, t, uncond without pose tokens) and flow = u + w (c - u). Deterministic for a seeded generator.
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional branch (uncond)")

    def flow_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flow = model(x, t, cond.context, cond.clip_fea, cond.y, cond.pose_tokens).float()
        if guidance_scale == 1.0:
            return flow
        return guided_flow(flow, model(x, t, uncond.context, uncond.clip_fea, uncond.y, None), guidance_scale)

    x = torch.randn(latent_shape, generator=generator, device=cond.context.device, dtype=torch.float32)
    return solve_flow_ode(flow_fn, x, num_steps, shift, "unipc", progress=progress, desc="teacher steps")[1]


class TeacherPosePipeline(PosePipeline):
    """The teacher behind the same interface as the student: `stream` yields the whole clip as one block."""

    def __init__(
        self,
        model: WanModel,
        vae: WanVAE,
        text_encoder: TextEncoderFn,
        image_encoder: ImageEncoderFn | None,
        num_steps: int = TEACHER_STEPS,
        shift: float = TEACHER_SHIFT,
        guidance_scale: float = TEACHER_GUIDANCE,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        progress: bool = False,
    ):
        super().__init__(model, vae, text_encoder, image_encoder, guidance_scale, negative_prompt)
        self.num_steps, self.shift, self.progress = num_steps, shift, progress

    def latent_blocks(self, clip: PreparedClip, generator: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
        shape = (clip.cond.context.shape[0], self.model.out_dim, clip.latent_frames, *clip.latent_size)
        yield 0, sample_latents(
            self.model, clip.cond, shape, self.num_steps, self.shift, self.guidance_scale, clip.uncond,
            generator, self.progress,
        )  # fmt: skip
