"""The sampling core that training and inference share: classifier-free guidance (`guided_flow`, `cfg_flow`; a
CFG-distilled model takes w as an input and guides in one forward), the few-step denoiser (`denoise`), and
`block_rollout`, the one loop that makes a clip block by block through a causal model's KV cache. Streaming
inference (`stream_latents`), the Self-Forcing rollout, causal ODE trajectories and teacher forcing are per-block
policies of it; `sample_latents` is the teacher's whole-clip sampler (UniPC, Euler, or few-step)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pipeline.conditions import Conditions
from utils.scheduler import SOLVERS, add_noise, flow_to_x0, solve_flow_ode, unipc_grid, warp_timesteps
from wan.modules.causal_model import CausalWanModel, KVCache
from wan.modules.model import WanModel

# Self-Forcing's 4-step list [1000, 750, 500, 250] on the shift-5 grid.
DEFAULT_STEPS = tuple(warp_timesteps([1000, 750, 500, 250], shift=5.0))
# UniAnimate-DiT's teacher sampling: 50 UniPC steps, shift 5 (720P weights), guidance 1.5.
TEACHER_STEPS = 50
TEACHER_SHIFT = 5.0
TEACHER_GUIDANCE = 1.5

NoiseFn = Callable[..., torch.Tensor]  # noise(*shape) -> standard normal float32 of that shape
FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # flow(x [B, C, F, H, W], t [B, F]) -> fp32 flow
# The teacher's whole-clip samplers: the ODE solvers, and `few_step` (denoise on the same grid: x0, then re-noise),
# how a consistency-distilled network samples.
SAMPLERS = (*SOLVERS, "few_step")


def guided_flow(cond_flow: torch.Tensor, uncond_flow: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, the convention everywhere in the repo: u + w (c - u), in fp32.

    scale: one w, or one per sample [B] (flows [B, C, F, H, W])."""
    uncond_flow = uncond_flow.float()
    if isinstance(scale, torch.Tensor):
        scale = scale.float().view(-1, *([1] * (uncond_flow.dim() - 1)))  # [B] -> [B, 1, 1, 1, 1]
    return uncond_flow + scale * (cond_flow.float() - uncond_flow)


def is_guided(model: torch.nn.Module) -> bool:
    """A CFG-distilled network (guidance_embed): w is an input and one forward gives the guided flow."""
    return bool(getattr(model, "guidance_embed", False))


def guidance_input(
    model: torch.nn.Module, scale: float | torch.Tensor, batch: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """{"guidance": w [B]} for a CFG-distilled network's forward, {} for any other (it takes no w)."""
    if not is_guided(model):
        return {}
    if isinstance(scale, torch.Tensor):
        return {"guidance": scale.to(device=device, dtype=torch.float32)}
    return {"guidance": torch.full((batch,), float(scale), device=device)}


def cfg_flow(
    model: WanModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditions,
    uncond: Conditions | None,
    guidance: float,
    caches: tuple[KVCache, KVCache | None] | None = None,
    start: int = 0,
    batched: bool = True,
) -> torch.Tensor:
    """The network's flow at (x, t) in fp32, guided (guided_flow) unless guidance is 1, when only the
    conditional branch runs. A CFG-distilled network (is_guided) runs the conditional branch alone with w as its
    input, at every w (1 included), and needs no uncond. caches: (cond, uncond) KV caches of a causal model's
    cached call at frame `start`, one per branch; each branch (over)writes these frames' K/V in its own. Without
    caches both branches run as one forward of batch 2B (`batched`; stack_branches), which equals two forwards up
    to float rounding."""

    def branch(c: Conditions, cache: KVCache | None) -> torch.Tensor:
        cached = {} if cache is None else {"kv_cache": cache, "current_start_frame": start}
        return model(x, t, **c, **cached, **guidance_input(model, guidance, x.shape[0], x.device))

    if guidance == 1.0 or is_guided(model):
        return branch(cond, None if caches is None else caches[0]).float()
    if uncond is None:
        raise ValueError(f"guidance={guidance} needs the unconditional branch (e.g. a batch with neg_context)")
    if batched and caches is None:
        flow, uncond_flow = model(torch.cat([x, x]), torch.cat([t, t]), **stack_branches(cond, uncond)).chunk(2)
        return guided_flow(flow, uncond_flow, guidance)
    flow = branch(cond, None if caches is None else caches[0])
    return guided_flow(flow, branch(uncond, None if caches is None else caches[1]), guidance)


def stack_branches(cond: Conditions, uncond: Conditions) -> Conditions:
    """CFG's two branches as one batch [cond; uncond] along dim 0. The unconditional branch has no pose tokens:
    zeros there (added after patch embedding, adding zero changes nothing); prompts of different lengths are
    zero-padded to the longer one, as the network pads every prompt to text_len."""

    def pair(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None and b is None:
            return None
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if a.dim() == 3 and a.shape[1] != b.shape[1]:  # [B, L, C] token sequences of different lengths
            length = max(a.shape[1], b.shape[1])
            a, b = (torch.nn.functional.pad(v, (0, 0, 0, length - v.shape[1])) for v in (a, b))
        return torch.cat([a, b])

    return Conditions(
        context=pair(cond.context, uncond.context),
        clip_fea=pair(cond.clip_fea, uncond.clip_fea),
        y=pair(cond.y, uncond.y),
        pose_tokens=pair(cond.pose_tokens, uncond.pose_tokens),
    )


def check_exit(steps: Sequence[float], exit_index: int) -> None:
    if not 0 <= exit_index < len(steps):
        raise ValueError(f"exit_index={exit_index} is outside the {len(steps)} denoising steps {list(steps)}")


def denoise(
    flow: FlowFn,
    shape: tuple[int, ...],
    steps: Sequence[float],
    noise: NoiseFn,
    exit_index: int | None = None,
    grad_steps: int = 1,
) -> torch.Tensor:
    """Few-step sampling (CausVid / Self-Forcing): from noise(*shape), each step predicts x0 and re-noises it
    with fresh noise to the next t; returns the x0 of step `exit_index` (default: the last).

    The last `grad_steps` steps up to the exit run in autograd's current mode (and the re-noising between them, so
    the gradient flows back through all of them: DRaFT-K), the steps before without gradient; with the default 1
    only the exit step's x0 carries gradient in training. shape [B, C, F, H, W]; flow gets t [B, F].
    """
    exit_index = len(steps) - 1 if exit_index is None else exit_index
    check_exit(steps, exit_index)
    if not 1 <= grad_steps <= exit_index + 1:
        raise ValueError(f"grad_steps={grad_steps} must be in [1, {exit_index + 1}] (the steps up to the exit)")
    batch, frames = shape[0], shape[2]
    grad = torch.is_grad_enabled()
    first_grad = exit_index + 1 - grad_steps
    x = noise(*shape)
    for i in range(exit_index + 1):
        t = torch.full((batch, frames), float(steps[i]), device=x.device)
        with torch.set_grad_enabled(grad and i >= first_grad):
            x0 = flow_to_x0(flow(x, t), x, t)
            if i < exit_index:
                x = add_noise(x0, noise(*shape), torch.full_like(t, float(steps[i + 1])))
    return x0


@dataclass(frozen=True)
class Block:
    """One block of a rollout: latent frames [start, start + shape[2]) of a clip, shape [B, C, n, H, W];
    flow(x, t) is the (guided) network flow of these frames through the rollout's KV caches."""

    start: int
    shape: tuple[int, int, int, int, int]
    flow: FlowFn

    @property
    def frames(self) -> slice:
        """These frames in a whole-clip tensor's frame axis."""
        return slice(self.start, self.start + self.shape[2])


# A per-block policy: block -> (what the rollout yields for it, the clean latents its context pass writes).
BlockPolicy = Callable[[Block], tuple[torch.Tensor, torch.Tensor]]


def few_step(steps: Sequence[float], noise: NoiseFn, exit_index: int | None = None, grad_steps: int = 1) -> BlockPolicy:
    """The sampling policy: each block is `denoise`d from fresh noise (gradient through its last `grad_steps`
    steps), and its x0 is also its clean context."""

    def sample(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = denoise(block.flow, block.shape, steps, noise, exit_index, grad_steps)
        return x0, x0

    return sample


def block_rollout(
    model: CausalWanModel,
    cond: Conditions,
    num_frames: int | None,
    latent_size: tuple[int, int],
    policy: BlockPolicy,
    *,
    uncond: Conditions | None = None,
    guidance: float = 1.0,
    context_t: float = 0.0,
    cache_dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Make a clip of num_frames latent frames block by block; yield (start frame, the policy's output) as each
    block finishes.

    Per block of model.num_frame_per_block frames: `policy(block)` makes it, calling block.flow, which sees the
    KV cache of the blocks before; once it is yielded, a no-grad pass of its clean latents at t = context_t
    writes its own K/V for the blocks after it (none after the last). With guidance != 1 every flow is guided and
    the unconditional branch keeps a cache of its own. Under autograd the cache is read detached (CausalWanModel),
    so no gradient crosses blocks through it. With a local attention window any num_frames streams through a
    fixed-size cache. A CFG-distilled model keeps one branch and gets w in every pass, the context pass too.

    `cond` (and `uncond`) may be streams (pipeline.streaming.StreamConditions) whose block() returns each block's
    conditions, possibly fewer frames for the last one, and None after it: the rollout then ends with the stream,
    num_frames (if given) being the most it makes. num_frames=None (no end but the stream's) needs a local
    attention window.
    """
    two_branches = guidance != 1.0 and not is_guided(model)
    if two_branches and uncond is None:
        raise ValueError(f"guidance={guidance} needs the unconditional branch (uncond)")
    batch, device = cond.context.shape[0], cond.context.device
    height, width = latent_size
    n = model.num_frame_per_block
    tokens_per_frame = (height // model.patch_size[1]) * (width // model.patch_size[2])
    branches = [cond, uncond] if two_branches else [cond]
    w = guidance_input(model, guidance, batch, device)
    caches = [model.new_kv_cache(batch, num_frames, cache_dtype, device, latent_size=latent_size) for _ in branches]
    pair = (caches[0], caches[1] if len(caches) > 1 else None)
    start = 0
    while num_frames is None or start < num_frames:
        frames = n if num_frames is None else min(n, num_frames - start)
        block_branches = [c.block(start, frames, tokens_per_frame) for c in branches]
        if block_branches[0] is None:  # a stream that ended
            return
        frames = block_frames(block_branches[0], tokens_per_frame, frames)  # a stream's last block may be shorter
        c_blk, u_blk = block_branches[0], block_branches[1] if len(block_branches) > 1 else None

        def flow(x: torch.Tensor, t: torch.Tensor, c=c_blk, u=u_blk, s=start) -> torch.Tensor:
            return cfg_flow(model, x, t, c, u, guidance, pair, s)

        out, clean = policy(Block(start, (batch, model.out_dim, frames, height, width), flow))
        yield start, out
        if num_frames is None or start + frames < num_frames:
            with torch.no_grad():
                t_ctx = torch.full((batch, frames), float(context_t), device=device)
                for branch, cache in zip(block_branches, caches, strict=True):
                    model(clean, t_ctx, **branch, kv_cache=cache, current_start_frame=start, **w)
        start += frames


def block_frames(cond: Conditions, tokens_per_frame: int, default: int) -> int:
    """The latent frames one block's conditions cover (from y, else the pose tokens, else `default`)."""
    if cond.y is not None:
        return cond.y.shape[2]
    if cond.pose_tokens is not None:
        return cond.pose_tokens.shape[1] // tokens_per_frame
    return default


@torch.no_grad()
def stream_latents(
    model: CausalWanModel,
    cond: Conditions,
    num_frames: int | None,
    latent_size: tuple[int, int],
    steps: Sequence[float] = DEFAULT_STEPS,
    context_t: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    uncond: Conditions | None = None,
    guidance_scale: float = 1.0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The student's streaming sampler: yield (start_frame, clean latents [B, 16, n, H, W]) for each block as
    soon as it exists (block_rollout with the few_step policy; the K/V cached in `dtype`).

    num_frames and latent_size are in latent frames and latent pixels (num_frames None: until a streamed `cond`
    ends, see block_rollout). Deterministic for a seeded `generator`.
    With `uncond` and guidance_scale != 1 each step is guided (u + w (c - u)).
    """
    device = cond.context.device

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    yield from block_rollout(
        model, cond, num_frames, latent_size, few_step(steps, noise), uncond=uncond, guidance=guidance_scale,
        context_t=context_t, cache_dtype=dtype,
    )  # fmt: skip


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
    solver: str = "unipc",
) -> torch.Tensor:
    """The teacher's sampler: clean latents [B, 16, F, H, W] of shape `latent_shape` from noise, the whole clip
    at once, `num_steps` steps on the official grid, each step's flow from cfg_flow (pose tokens only in
    the conditional branch when uncond comes from Conditions.unconditional). Deterministic for a seeded
    generator.

    solver: unipc (the official sampler), euler (the schedule step distillation's half mode distils), few_step
    (denoise on the grid's timesteps: how a consistency-distilled network samples)."""
    if solver not in SAMPLERS:
        raise ValueError(f"solver={solver!r}: expected one of {SAMPLERS}")
    device = cond.context.device

    def flow_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg_flow(model, x, t, cond, uncond, guidance_scale)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    if solver == "few_step":
        return denoise(flow_fn, latent_shape, unipc_grid(num_steps, shift)[1].tolist(), noise)
    x = noise(*latent_shape)
    return solve_flow_ode(flow_fn, x, num_steps, shift, solver, progress=progress, desc="teacher steps")[1]
