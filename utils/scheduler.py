"""Flow matching in the repo's convention, and the one place that converts flow <-> x0.

t in [0, 1000], sigma = t / 1000, x_t = (1 - sigma) * x0 + sigma * eps, and networks predict the flow
eps - x0. Conversions run in float64 and return the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from tqdm import tqdm

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor | np.ndarray | float, shift: float) -> torch.Tensor | np.ndarray | float:
    """Timestep shift s*sigma / (1 + (s-1)*sigma); s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def warp_timesteps(timesteps: Sequence[float], shift: float) -> list[float]:
    """Student step list on the shifted grid: [1000, 750, 500, 250] with shift 5 -> [1000, 937.5, 833.3, 625].

    Self-Forcing indexes a 1000-step shifted schedule with 1000 - t; that equals 1000 * shift_sigma(t / 1000).
    """
    return [NUM_TRAIN_TIMESTEPS * shift_sigma(float(t) / NUM_TRAIN_TIMESTEPS, shift) for t in timesteps]


def _sigma_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t [B] or [B, F] -> sigma in float64, broadcastable onto x [B, C, F, H, W]."""
    if x.ndim != 5:
        raise ValueError(f"expected a [B, C, F, H, W] tensor, got shape {tuple(x.shape)}")
    sigma = t.to(device=x.device, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    if t.ndim == 1 and t.shape[0] == x.shape[0]:
        return sigma.view(-1, 1, 1, 1, 1)  # [B] -> [B, 1, 1, 1, 1]
    if t.ndim == 2 and t.shape == (x.shape[0], x.shape[2]):
        return sigma[:, None, :, None, None]  # [B, F] -> [B, 1, F, 1, 1]
    raise ValueError(
        f"timesteps must have shape [B] or [B, F] = [{x.shape[0]}] or [{x.shape[0]}, {x.shape[2]}] "
        f"for a latent of shape {tuple(x.shape)}, got {tuple(t.shape)}"
    )


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, x0 and noise [B, C, F, H, W], t [B] or [B, F]."""
    sigma = _sigma_like(t, x0)
    return ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target eps - x0."""
    return (noise.double() - x0.double()).to(x0.dtype)


def flow_to_x0(flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma * flow."""
    sigma = _sigma_like(t, x_t)
    return (x_t.double() - sigma * flow.double()).to(flow.dtype)


def x0_to_flow(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """flow = (x_t - x0) / sigma; undefined at t = 0."""
    sigma = _sigma_like(t, x_t)
    return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)


def flow_to_noise(flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps = x0 + flow = x_t + (1 - sigma) * flow."""
    sigma = _sigma_like(t, x_t)
    return (x_t.double() + (1 - sigma) * flow.double()).to(flow.dtype)


def training_weight(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching loss weight per timestep that Wan training (UniAnimate-DiT, Self-Forcing) applies: a
    bell exp(-2 ((t - 500) / 1000)^2) centred on t = 500, minus its minimum over the 1000-step shifted training
    grid (sigma from 1 to 0.003/1.002), scaled so that it averages 1 over that grid; 0 at the grid's ends.

    t [...] in [0, 1000] -> weight [...] float32, evaluated in float64.
    """
    sigma = torch.linspace(1.0, 0.003 / 1.002, NUM_TRAIN_TIMESTEPS, dtype=torch.float64, device=t.device)
    grid = NUM_TRAIN_TIMESTEPS * shift_sigma(sigma, shift)

    def bell(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-2 * ((x - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)

    floor = bell(grid).min()
    scale = NUM_TRAIN_TIMESTEPS / (bell(grid) - floor).sum()
    return ((bell(t.double()) - floor).clamp(min=0) * scale).float()  # on t's device: no host copy per step


def _official_unipc_base(num_steps: int) -> np.ndarray:
    """The unshifted official grid linspace(0.999, 0, N + 1)[:-1] (float64)."""
    return np.linspace(1 - 1 / NUM_TRAIN_TIMESTEPS, 0.0, num_steps + 1)[:-1]


def unipc_grid(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Official Wan UniPC grid in float64: (sigmas, t = 1000 * sigmas), N values each.

    sigmas = shift_sigma(linspace(0.999, 0, N + 1)[:-1]); the solver ends at sigma = 0, which is not returned.
    """
    sigmas = torch.from_numpy(shift_sigma(_official_unipc_base(num_steps), shift))
    return sigmas, sigmas * NUM_TRAIN_TIMESTEPS


def solver_grid(num_steps: int, shift: float) -> torch.Tensor:
    """The t of every state an N-step solve visits, float64 [N + 1]: unipc_grid's N timesteps, then the clean end 0.

    Every other point of the 2N-step grid is the N-step grid (linspace(0.999, 0, 2N + 1)[::2] equals
    linspace(0.999, 0, N + 1)): step distillation's half mode relies on it."""
    return torch.cat([unipc_grid(num_steps, shift)[1], torch.zeros(1, dtype=torch.float64)])


def euler_step(x: torch.Tensor, flow: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE, x + (sigma_next - sigma) * flow, in float64; x, flow [B, C, F, H, W], t and
    t_next [B] or [B, F]. Returns x's dtype."""
    sigma, sigma_next = _sigma_like(t, x), _sigma_like(t_next, x)
    return (x.double() + (sigma_next - sigma) * flow.double()).to(x.dtype)


def euler_flow(x: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """The flow whose one Euler step from (x, t) lands on x_next at t_next: (x_next - x) / (sigma_next - sigma),
    the inverse of euler_step (float64 math, x's dtype)."""
    sigma, sigma_next = _sigma_like(t, x), _sigma_like(t_next, x)
    return ((x_next.double() - x.double()) / (sigma_next - sigma)).to(x.dtype)


def make_unipc_scheduler(
    num_steps: int, shift: float, device: torch.device | str | None = None
) -> UniPCMultistepScheduler:
    """diffusers UniPC (flow prediction) set to the official grid, for teacher sampling.

    diffusers shifts custom sigmas itself with flow_shift, so it gets the unshifted grid. As in the official
    solver, `timesteps` (what the network sees) are the grid's t truncated to int64, while the solver steps
    with the float32 sigmas followed by a final 0.
    """
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    # set_timesteps does numpy arithmetic on `sigmas`: it needs an array, not the list its signature names.
    scheduler.set_timesteps(sigmas=_official_unipc_base(num_steps), device=device)
    return scheduler


SOLVERS = ("unipc", "euler")
FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # flow_fn(x [B, ...], t [B]) -> flow eps - x0


def solve_flow_ode(
    flow_fn: FlowFn,
    x: torch.Tensor,
    num_steps: int,
    shift: float,
    solver: str = "unipc",
    capture: Sequence[int] = (),
    progress: bool = False,
    desc: str = "ODE steps",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Solve the flow ODE from x (noise at the official grid's first t) to t = 0 in `num_steps` steps.

    Returns (the states before the steps whose indices are in `capture`, in order; the clean end). UniPC:
    diffusers' solver (make_unipc_scheduler), the network sees the grid's t truncated to int as in the official
    sampler. Euler: x' = x + (sigma' - sigma) * flow on the same grid, the network sees the float t.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    batch = x.shape[0]
    states = []
    if solver == "unipc":
        scheduler = make_unipc_scheduler(num_steps, shift, x.device)
    else:
        scheduler, (_, grid_t) = None, unipc_grid(num_steps, shift)
    for i in tqdm(range(num_steps), desc=desc, unit="step", disable=not progress, leave=False):
        if i in capture:
            states.append(x.clone())
        if scheduler is not None:
            net_t = scheduler.timesteps[i]
            flow = flow_fn(x, net_t.float().expand(batch))
            x = scheduler.step(flow.float(), net_t, x).prev_sample
        else:
            t = grid_t[i].float().expand(batch).to(x.device)
            flow = flow_fn(x, t).float()
            t_next = grid_t[i + 1] if i + 1 < num_steps else torch.zeros((), dtype=torch.float64)
            # x0 and eps of the straight path re-noised to the next t: exactly x + (sigma' - sigma) * flow
            x = add_noise(flow_to_x0(flow, x, t), flow_to_noise(flow, x, t), t_next.float().expand(batch).to(x.device))
    return states, x
