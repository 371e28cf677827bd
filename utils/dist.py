"""Process-group setup for torchrun and the few collectives the trainer needs (no-ops in one process)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30), device_id=dev if use_cuda else None
        )
    return DistInfo(rank, world, local_rank, dev)


@dataclass(frozen=True)
class ParallelLayout:
    """The ranks as a (dp, sp) grid: sp ranks in a row hold the same samples and split each one's tokens
    (sequence parallelism); dp rows see different samples. Global rank = dp_rank * sp_size + sp_rank, so a
    sequence-parallel group is a run of neighbouring ranks (one node's NVLink). FSDP2 shards over all ranks."""

    dp_rank: int
    dp_size: int
    sp_rank: int = 0
    sp_size: int = 1
    sp_group: Any = None  # the sequence-parallel ProcessGroup; None when sp_size is 1


def parallel_layout(info: DistInfo, sequence_parallel: int) -> ParallelLayout:
    """Split the world into data-parallel x sequence-parallel ranks (a 2-D device mesh, dims "dp" and "sp").
    sequence_parallel 1 makes no group: every rank is its own data-parallel row."""
    if sequence_parallel == 1:
        return ParallelLayout(info.rank, info.world_size)
    if sequence_parallel < 1 or info.world_size % sequence_parallel:
        raise ValueError(
            f"train.sequence_parallel={sequence_parallel} must divide the {info.world_size} ranks "
            f"(torchrun --nproc_per_node x nodes): use a divisor of {info.world_size}, or 1 to turn it off"
        )
    if not is_distributed():
        raise ValueError(
            f"train.sequence_parallel={sequence_parallel} splits one sample over several processes: launch with "
            f"torchrun --nproc_per_node {sequence_parallel} (or a multiple)"
        )
    from torch.distributed.device_mesh import init_device_mesh

    dp = info.world_size // sequence_parallel
    mesh = init_device_mesh(info.device.type, (dp, sequence_parallel), mesh_dim_names=("dp", "sp"))
    return ParallelLayout(
        mesh["dp"].get_local_rank(), dp, mesh["sp"].get_local_rank(), sequence_parallel, mesh["sp"].get_group()
    )


def init_single_process_group(device: torch.device) -> None:
    """A process group of one (FSDP2 in a single process, e.g. bf16 training on one GPU without torchrun)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of scalar tensors (one collective for the whole dict)."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def average_gradients(params) -> None:
    """Data parallelism without wrappers: average .grad over ranks (used where FSDP2 is not)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
