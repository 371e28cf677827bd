"""The causal generator's own samples for distribution-matching training, with gradient only where the method
wants it: a full-sequence backward simulation (the DMD/SiD stages) and the Self-Forcing rollout through the KV
cache (the self_forcing stage), both the few-step denoiser of pipeline/rollout.py stopped at one exit step per
iteration; earlier steps run without gradient. Without gradient at the last step, the rollout is the inference
stream itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.conditions import Conditions
from pipeline.rollout import NoiseFn, block_rollout, denoise, few_step
from wan.modules.causal_model import CausalWanModel


def backward_simulation(
    generator: CausalWanModel,
    cond: Conditions,
    shape: tuple[int, ...],
    steps: Sequence[float],
    exit_index: int,
    draw_noise: NoiseFn,
) -> torch.Tensor:
    """Denoise the whole clip jointly (block-causal forward, one t for all frames) from noise through
    steps[:exit_index] without gradient, then return the x0 prediction of step `exit_index` with gradient.

    cond: conditions(generator, batch); shape [B, C, F, H, W] -> x0 [B, C, F, H, W].
    """
    return denoise(lambda x, t: generator(x, t, **cond).float(), shape, steps, draw_noise, exit_index)


def self_forcing_rollout(
    generator: CausalWanModel,
    cond: Conditions,
    shape: tuple[int, ...],
    steps: Sequence[float],
    exit_index: int,
    draw_noise: NoiseFn,
    cache_dtype: torch.dtype,
    context_t: float = 0.0,
) -> torch.Tensor:
    """Generate the clip block by block through the KV cache exactly as inference streams it (block_rollout with
    the few_step policy): each block runs steps[:exit_index] without gradient and its exit step with gradient
    (its x0 is the block's sample), then a no-grad pass at t = context_t writes its clean K/V for the blocks
    after it. The cache is read detached, so no gradient crosses blocks through it.

    cond: conditions(generator, batch) for the whole clip; shape [B, C, F, H, W] -> x0 [B, C, F, H, W].
    """
    _, _, num_frames, height, width = shape
    policy = few_step(steps, draw_noise, exit_index)
    blocks = block_rollout(
        generator, cond, num_frames, (height, width), policy, context_t=context_t, cache_dtype=cache_dtype
    )
    return torch.cat([x0 for _, x0 in blocks], dim=2)  # [B, C, F, H, W]
