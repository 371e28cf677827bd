"""ODE pairs for the student's ODE-regression init: teacher trajectories (pose + CFG) captured at the student's
timesteps, the on-disk format, a Dataset that reads it, and the resumable, rank-sharded generation loop.

Format: a folder with `manifest.json` (the generation settings) and one `<index:08d>.safetensors` per sample:
  ode_latents [S, 16, F, H, W]  float32, the states nearest the student's timesteps, then the clean end (S-1 + 1)
  ode_t       [S]               float64, the exact t of every state (the solver grid's, not the student's; last 0)
  context, neg_context, clip_fea, y, pose, ref_pose   the sample's conditioning in the batch layout
                                 (pose frames stored as uint8 when they are whole numbers in 0..255)
Two variants: `teacher_trajectory` (the bidirectional teacher denoises the whole clip) and `causal_trajectory`
(a causal model generates block k from its own cached clean blocks < k, the fix for jumps between blocks).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from pipeline.conditions import cfg_conditions, latent_shape
from pipeline.rollout import DEFAULT_STEPS, Block, block_rollout, cfg_flow
from utils.atomic_io import atomic_write_text
from utils.dist import barrier
from utils.safetensors_io import atomic_save_safetensors, load_file
from utils.scheduler import FlowFn, solve_flow_ode, unipc_grid
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel

log = logging.getLogger(__name__)

FORMAT = "poseforcing-ode-pairs"
MANIFEST = "manifest.json"
COND_KEYS = ("context", "neg_context", "clip_fea", "y", "pose", "ref_pose")
UINT8_KEYS = ("pose", "ref_pose")


@dataclass(frozen=True)
class ODEPairSettings:
    """How the trajectories were made; saved in the manifest, and a resumed run must match it."""

    num_steps: int = 50
    shift: float = 5.0
    guidance: float = 1.5  # CFG u + w (c - u); the UniAnimate teacher samples at 1.5
    solver: str = "unipc"
    student_steps: tuple[float, ...] = field(default_factory=lambda: tuple(DEFAULT_STEPS))
    causal: bool = False
    seed: int = 0


def capture_indices(grid_t: torch.Tensor, targets: Sequence[float]) -> list[int]:
    """For each student timestep, the index of the nearest solver-grid state (grid_t [N], decreasing)."""
    indices = [int((grid_t - float(t)).abs().argmin()) for t in targets]
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(
            f"student timesteps {list(targets)} map to grid states {indices} of a {len(grid_t)}-step teacher grid: "
            "two share a state; use more teacher steps (num_steps)"
        )
    return indices


def integrate(
    flow_fn: FlowFn, x: torch.Tensor, settings: ODEPairSettings
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Solve the flow ODE from x (noise at the grid's first t) to t = 0 on the official shifted grid
    (utils.scheduler.solve_flow_ode; flow_fn: one guided network evaluation).

    Returns (states at the student's timesteps, each [B, C, F, H, W], the clean end, their exact t [S] float64
    including the final 0).
    """
    _, grid_t = unipc_grid(settings.num_steps, settings.shift)
    capture = capture_indices(grid_t, settings.student_steps)
    exact_t = torch.cat([grid_t[capture], torch.zeros(1, dtype=torch.float64)])
    states, x = solve_flow_ode(flow_fn, x, settings.num_steps, settings.shift, settings.solver, capture)
    return states, x, exact_t


@torch.no_grad()
def teacher_trajectory(
    teacher: WanModel, batch: dict[str, torch.Tensor], noise: torch.Tensor, settings: ODEPairSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bidirectional teacher denoises the whole clip with CFG. noise [B, 16, F, H, W] ->
    (ode_latents [B, S, 16, F, H, W], ode_t [S])."""
    cond, uncond = cfg_conditions(teacher, batch, settings.guidance)

    def flow_fn(x, t):
        return cfg_flow(teacher, x, t, cond, uncond, settings.guidance)

    states, clean, exact_t = integrate(flow_fn, noise.float(), settings)
    return torch.stack(states + [clean], dim=1), exact_t


@torch.no_grad()
def causal_trajectory(
    model: CausalWanModel,
    batch: dict[str, torch.Tensor],
    noise: torch.Tensor,
    settings: ODEPairSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal model generates block by block from its own cached clean blocks (pipeline.rollout.block_rollout),
    solving each block's ODE on the same grid from its slice of `noise`; the captured states are assembled into
    whole-clip pairs. Same output as teacher_trajectory."""
    if not isinstance(model, CausalWanModel):
        raise TypeError(f"the causal variant needs a CausalWanModel, got {type(model).__name__}")
    _, _, num_frames, height, width = noise.shape
    cond, uncond = cfg_conditions(model, batch, settings.guidance)
    exact_t = []

    def solve(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        frames = block.shape[2]

        def flow_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return block.flow(x, t[:, None].expand(-1, frames))  # the solver's t [B] -> per frame [B, frames]

        states, clean, block_t = integrate(flow_fn, noise[:, :, block.frames].float(), settings)
        exact_t.append(block_t)
        return torch.stack(states + [clean], dim=1), clean  # [B, S, C, frames, H, W], the block's clean end

    blocks = block_rollout(
        model, cond, num_frames, (height, width), solve, uncond=uncond, guidance=settings.guidance,
        cache_dtype=model.patch_embedding.weight.dtype,  # K/V are cached in the network's compute dtype
    )  # fmt: skip
    per_block = [states for _, states in blocks]
    return torch.cat(per_block, dim=3), exact_t[-1]


# ----------------------------------------------------------------------------- on disk


def _encode(key: str, value: torch.Tensor) -> torch.Tensor:
    """Pose frames as uint8 when lossless (a 4x smaller file), everything else unchanged."""
    if key in UINT8_KEYS and value.is_floating_point():
        rounded = value.round()
        if torch.equal(rounded, value) and value.min() >= 0 and value.max() <= 255:
            return rounded.to(torch.uint8)
    return value


def sample_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"{index:08d}.safetensors"


def write_sample(
    path: str | Path, ode_latents: torch.Tensor, ode_t: torch.Tensor, cond: dict[str, torch.Tensor]
) -> None:
    """One sample (no batch dim): ode_latents [S, 16, F, H, W], ode_t [S], conditioning; written atomically."""
    if ode_latents.dim() != 5 or ode_t.shape != (ode_latents.shape[0],):
        raise ValueError(
            f"ode_latents {tuple(ode_latents.shape)} and ode_t {tuple(ode_t.shape)} must be [S, C, F, H, W] and [S]"
        )
    tensors = {"ode_latents": ode_latents.float().cpu(), "ode_t": ode_t.double().cpu()}
    tensors.update({k: _encode(k, v.cpu()) for k, v in cond.items() if k in COND_KEYS})
    atomic_save_safetensors(tensors, path, {"format": FORMAT})


def is_complete(path: Path) -> bool:
    """A sample file exists and its header reads (atomic writes make a torn file unlikely, but check)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return {"ode_latents", "ode_t"} <= set(f.keys())
    except Exception:  # any unreadable file is regenerated
        return False


class ODEPairDataset(Dataset):
    """Reads a folder written by generate_ode_pairs: each item is a dict in the batch layout (no batch dim),
    ode_t float64, pose frames float in 0..255."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no {MANIFEST}: not an ODE-pair folder; make one with scripts/generate_ode_pairs.py"
            )
        self.settings = json.loads(manifest.read_text())
        self.files = sorted(self.folder.glob("[0-9]*.safetensors"))
        if not self.files:
            raise ValueError(f"{self.folder} holds no samples yet: run scripts/generate_ode_pairs.py to fill it")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = load_file(self.files[index])
        if "ode_latents" not in sample or "ode_t" not in sample:
            raise ValueError(f"{self.files[index]} lacks ode_latents/ode_t: regenerate it (delete it and rerun)")
        for key in UINT8_KEYS:
            if key in sample and sample[key].dtype == torch.uint8:
                sample[key] = sample[key].float()
        return sample


# ----------------------------------------------------------------------------- generation loop


def sample_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The starting noise of sample `index`: a function of (seed, index) only, so reruns and any sharding agree."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def check_manifest(folder: Path, settings: ODEPairSettings, write: bool) -> None:
    """Refuse to mix trajectories made with other settings; `write` (rank 0) creates the manifest."""
    wanted = {"format": FORMAT, **asdict(settings), "student_steps": list(settings.student_steps)}
    path = folder / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
            raise ValueError(
                f"{folder} was generated with other settings {diff} (found, asked): use another output folder"
            )
    elif write:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(wanted, indent=2), path)


def generate_ode_pairs(
    model: WanModel,
    source: Dataset,
    out_dir: str | Path,
    settings: ODEPairSettings,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    writer: bool = True,
) -> list[int]:
    """Write the ODE pairs of the source samples r::world that are not written yet; returns the indices written.

    source items are conditioning dicts in the batch layout without the batch dim (context, clip_fea, y, pose,
    ...), all of one shape when batch_size > 1 (samples solved together, each written on its own). Each sample
    starts from sample_noise(seed, index), so the output does not depend on ranks, resumes or batching (up to
    the float rounding of batched kernels). Under sequence parallelism rank/world_size count the data-parallel
    rows (every rank of an sp group computes the same samples) and only the group's writer (its first rank)
    writes them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected at least 1 sample per teacher call")
    out_dir = Path(out_dir)
    if rank == 0 and writer:
        check_manifest(out_dir, settings, write=True)
    barrier()  # the other ranks check the manifest rank 0 wrote or found
    check_manifest(out_dir, settings, write=False)
    if settings.causal and not isinstance(model, CausalWanModel):
        raise TypeError("settings.causal=True needs a causal model (e.g. the ODE-initialised student)")
    pending = [i for i in range(rank, len(source), world_size) if not is_complete(sample_path(out_dir, i))]
    written = []
    for start in range(0, len(pending), batch_size):
        indices = pending[start : start + batch_size]
        items = [source[i] for i in indices]
        batch = {k: torch.stack([item[k] for item in items]).to(device) for k in COND_KEYS if k in items[0]}
        shape = (1, *latent_shape(model, batch)[1:])
        noise = torch.cat([sample_noise(shape, settings.seed, i) for i in indices]).to(device)
        if settings.causal:
            ode_latents, ode_t = causal_trajectory(model, batch, noise, settings)
        else:
            ode_latents, ode_t = teacher_trajectory(model, batch, noise, settings)
        if writer:
            for j, index in enumerate(indices):
                write_sample(sample_path(out_dir, index), ode_latents[j], ode_t, {k: v[j] for k, v in batch.items()})
            log.info("ODE pairs %d/%d of this rank written (last: %s)", len(written) + len(indices), len(pending),
                     indices[-1])  # fmt: skip
        written.extend(indices)
    return written
