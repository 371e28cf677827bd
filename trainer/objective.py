"""The contract between the trainer and a training method: an Objective turns a batch into losses per role
and says which roles' optimizers step this iteration. The trainer knows nothing about critics or teachers.

Batches are dicts of tensors (the dataset's collate output, already on the device):
  context     [B, L, text_dim]     text embeddings of the prompt (zero past the prompt)
  neg_context [B, L, text_dim]     the negative prompt's embeddings (CFG's unconditional branch), optional
  clip_fea    [B, 257, clip_dim]   CLIP features of the reference image (i2v)
  y           [B, C_y, F, H, W]    mask + reference-image latent (i2v), without the ref-pose map
  pose        [B, 3, 4F-3, 8H, 8W] drawn pose frames in 0..255 (float)
  ref_pose    [B, 3, 8H, 8W]       the reference image's pose in 0..255, optional (pose-only input)
  latents     [B, 16, F, H, W]     clean video latents (data stages), optional
  ode_latents [B, S, 16, F, H, W]  teacher ODE states at the student's timesteps, the last one clean (ODE stages)
  ode_t       [B, S]               the exact t of each ODE state
Each network computes its own pose tokens from `pose` (teacher and student widths differ): see
pipeline.conditions.conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn


class TrainContext:
    """What an objective may use besides its networks, including ALL its randomness.

    Draw every random number through this object, never through torch's global RNG: per-sample draws
    (`randn`, `rand`) come from a stream keyed by (seed, iteration, global sample id), and shared draws
    (`shared_randint`: the exit step, anything all ranks must agree on) from a stream
    keyed by (seed, iteration). So a resumed run, or a run on N GPUs with the same global batch, draws exactly
    the numbers a straight single-process run draws.

    emas: the trainer's EMA of each role that has one (roles.<role>.ema_decay), e.g. the EMA target of step
    distillation's consistency mode (`emas["generator"].swapped_in(model)`); read-only to objectives.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0, rank: int = 0, world_size: int = 1,
                 emas: dict[str, Any] | None = None):  # fmt: skip
        self.device, self.dtype, self.seed = device, dtype, seed
        self.rank, self.world_size = rank, world_size
        self.emas = dict(emas or {})
        self.begin_step(0, [0])

    def begin_step(self, iteration: int, sample_ids: list[int]) -> None:
        """Called by the trainer before each micro-step with the global ids of the local batch's samples."""
        self.iteration, self.sample_ids = iteration, list(sample_ids)
        self._calls = 0
        self._shared = torch.Generator().manual_seed(_mix(self.seed, iteration, -1))

    def _per_sample(self, shape: tuple[int, ...], draw) -> torch.Tensor:
        if shape[0] != len(self.sample_ids):
            raise ValueError(f"per-sample draws need shape[0] == local batch {len(self.sample_ids)}; got {shape}")
        self._calls += 1
        rows = []
        for sid in self.sample_ids:
            gen = torch.Generator().manual_seed(_mix(self.seed, self.iteration, sid, self._calls))
            rows.append(draw(shape[1:], gen))
        return torch.stack(rows).to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal [B, ...] in float32, row i from sample i's own stream."""
        return self._per_sample(tuple(shape), lambda s, g: torch.randn(s, generator=g))

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) [B, ...] in float32, row i from sample i's own stream."""
        return self._per_sample(tuple(shape), lambda s, g: torch.rand(s, generator=g))

    def shared_randint(self, low: int, high: int) -> int:
        """One integer in [low, high), the same on every rank."""
        return int(torch.randint(low, high, (), generator=self._shared))


def _mix(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (stable across processes, unlike hash())."""
    acc = 0x9E3779B97F4A7C15
    for v in values:
        acc = (acc ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        acc ^= acc >> 31
    return acc & 0x7FFFFFFFFFFFFFFF


@dataclass
class StepOutput:
    # role -> scalar loss (only the roles due this iteration); the trainer backpropagates each into its own role's
    # parameters only, so a loss may run through another role's network for its input gradient alone
    losses: dict[str, torch.Tensor]
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)  # scalars to log


class Objective:
    """Base class. Subclasses set the class attributes and implement `train_step`.

    name: the `stage:` key that selects it; required_roles: networks it needs; trainable_roles: those with
    optimizers; defaults: its `objective:` config section (every key it reads, with defaults; unknown keys in
    a config are an error); sequence_parallel: whether train.sequence_parallel may split its networks.
    """

    name: ClassVar[str]
    required_roles: ClassVar[tuple[str, ...]] = ("generator",)
    trainable_roles: ClassVar[tuple[str, ...]] = ("generator",)
    defaults: ClassVar[dict[str, Any]] = {}
    # False: the method runs a network through its KV cache with gradient, which train.sequence_parallel cannot
    # split (sequence parallelism covers the full-sequence forward only)
    sequence_parallel: ClassVar[bool] = True

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext):
        self.cfg, self.roles, self.ctx = cfg, roles, ctx

    @classmethod
    def prepare_role(cls, name: str, module: nn.Module, cfg: Any = None) -> nn.Module:
        """Hook between building a role's network and making its optimizer (e.g. heads on a discriminator)."""
        return module

    def due(self, iteration: int) -> tuple[str, ...]:
        """Roles whose optimizer steps at this iteration (default: every trainable role, every iteration)."""
        return self.trainable_roles

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        raise NotImplementedError


def objective_defaults(registry: dict[str, type[Objective]]) -> dict[str, dict]:
    """{stage name: that objective's `defaults`}: the `objective:` config schema of every stage."""
    return {name: dict(cls.defaults) for name, cls in registry.items()}
