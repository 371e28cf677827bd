"""Teacher sampling: the bidirectional I2V-14B pose teacher (Wan2.1-I2V-14B + the merged UniAnimate-DiT LoRA and
its pose encoders) denoises the whole clip at once with UniPC on the official grid and classifier-free guidance
(pipeline.rollout.sample_latents); pose tokens go only into the conditional branch. Distilled teachers sample with
their own schedule (solver euler: half-step distilled; few_step: consistency distilled) and a CFG-distilled one in
one forward per step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.causal_diffusion_inference import (
    WAN_NEGATIVE_PROMPT,
    ImageEncoderFn,
    PosePipeline,
    PreparedClip,
    TextEncoderFn,
)
from pipeline.rollout import TEACHER_GUIDANCE, TEACHER_SHIFT, TEACHER_STEPS, sample_latents
from utils.encoders.wan_wrapper import WanVAE
from wan.modules.model import WanModel


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
        solver: str = "unipc",
    ):
        super().__init__(model, vae, text_encoder, image_encoder, guidance_scale, negative_prompt)
        self.num_steps, self.shift, self.progress, self.solver = num_steps, shift, progress, solver

    def latent_blocks(self, clip: PreparedClip, generator: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
        shape = (clip.cond.context.shape[0], self.model.out_dim, clip.latent_frames, *clip.latent_size)
        yield 0, sample_latents(
            self.model, clip.cond, shape, self.num_steps, self.shift, self.guidance_scale, clip.uncond,
            generator, self.progress, self.solver,
        )  # fmt: skip
