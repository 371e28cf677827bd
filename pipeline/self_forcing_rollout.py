"""The causal generator's own samples for distribution-matching training, with gradient only where the method
wants it: a full-sequence backward simulation (the DMD/SiD stages) and the Self-Forcing rollout through the KV
cache (the self_forcing stage). Both stop at one exit step per iteration; earlier steps run without gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.conditions import block_conditions
from utils.scheduler import add_noise, flow_to_x0
from wan.modules.causal_model import CausalWanModel

# draw_noise(shape) -> standard normal of that shape (TrainContext.randn: per-sample streams).
DrawNoise = Callable[..., torch.Tensor]


def latent_shape(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """[B, out_dim, F, H, W] of the clip a batch describes: from `y`, else `latents`, else the pose frames."""
    if "y" in batch:
        b, _, f, h, w = batch["y"].shape
    elif "latents" in batch:
        b, _, f, h, w = batch["latents"].shape
    elif "pose" in batch:
        b, _, frames, height, width = batch["pose"].shape  # [B, 3, 4F-3, 8H, 8W]
        f, h, w = (frames + 3) // 4, height // 8, width // 8
    else:
        raise ValueError(f"cannot size the generated clip: the batch has none of y, latents, pose ({sorted(batch)})")
    return b, model.out_dim, f, h, w


def check_exit(steps: Sequence[float], exit_index: int) -> None:
    if not 0 <= exit_index < len(steps):
        raise ValueError(f"exit_index={exit_index} is outside the {len(steps)} denoising steps {list(steps)}")


def backward_simulation(
    generator: CausalWanModel,
    cond: dict,
    shape: tuple[int, ...],
    steps: Sequence[float],
    exit_index: int,
    draw_noise: DrawNoise,
) -> torch.Tensor:
    """Denoise the whole clip jointly (block-causal forward, one t for all frames) from noise through
    steps[:exit_index] without gradient, then return the x0 prediction of step `exit_index` with gradient.

    cond: conditions(generator, batch); shape [B, C, F, H, W] -> x0 [B, C, F, H, W].
    """
    check_exit(steps, exit_index)
    batch = shape[0]
    x = draw_noise(*shape)
    for i in range(exit_index + 1):
        t = torch.full((batch,), float(steps[i]), device=x.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and i == exit_index):
            x0 = flow_to_x0(generator(x, t, **cond).float(), x, t)
        if i < exit_index:
            x = add_noise(x0, draw_noise(*shape), torch.full_like(t, float(steps[i + 1])))
    return x0


def self_forcing_rollout(
    generator: CausalWanModel,
    cond: dict,
    shape: tuple[int, ...],
    steps: Sequence[float],
    exit_index: int,
    draw_noise: DrawNoise,
    cache_dtype: torch.dtype,
    context_t: float = 0.0,
) -> torch.Tensor:
    """Generate the clip block by block through the KV cache, as at inference: each block runs steps[:exit_index]
    without gradient, its exit step with gradient (its x0 prediction is the block's sample), then a no-grad pass
    at t = context_t writes its clean K/V for the blocks after it. The cache is read detached (CausalWanModel's
    cached forward under autograd), so no gradient crosses blocks through it.

    cond: conditions(generator, batch) for the whole clip; shape [B, C, F, H, W] -> x0 [B, C, F, H, W].
    """
    check_exit(steps, exit_index)
    batch, channels, num_frames, height, width = shape
    n = generator.num_frame_per_block
    tokens_per_frame = (height // generator.patch_size[1]) * (width // generator.patch_size[2])
    device = cond["context"].device
    cache = generator.new_kv_cache(batch, num_frames, cache_dtype, device, latent_size=(height, width))
    grad = torch.is_grad_enabled()
    blocks = []
    for start in range(0, num_frames, n):
        frames = min(n, num_frames - start)
        block_cond = block_conditions(cond, start, frames, tokens_per_frame)
        block_shape = (batch, channels, frames, height, width)
        x = draw_noise(*block_shape)
        for i in range(exit_index + 1):
            t = torch.full((batch, frames), float(steps[i]), device=device)
            with torch.set_grad_enabled(grad and i == exit_index):
                flow = generator(x, t, **block_cond, kv_cache=cache, current_start_frame=start)
                x0 = flow_to_x0(flow.float(), x, t)
            if i < exit_index:
                x = add_noise(x0, draw_noise(*block_shape), torch.full_like(t, float(steps[i + 1])))
        blocks.append(x0)
        if start + frames < num_frames:
            with torch.no_grad():
                t_ctx = torch.full((batch, frames), float(context_t), device=device)
                generator(x0.detach(), t_ctx, **block_cond, kv_cache=cache, current_start_frame=start)
    return torch.cat(blocks, dim=2)  # [B, C, F, H, W]
