"""Ulysses sequence parallelism: one sample's tokens are split over the N ranks of a group, self-attention runs
after an all-to-all that trades sequence shards for head shards (and back), everything else (modulation,
cross-attention, FFN, head) runs on the rank's own tokens. FSDP2 shards the weights; this splits activations.

Layout: each latent frame's T = h*w tokens are cut into N equal runs and rank r holds run r of every frame:
local tokens [B, F*T/N, dim] in (frame, token) order, so the per-frame modulation works unchanged. After the
all-to-all a rank holds every token of H/N heads in (rank, frame, token) order: full attention does not care
about the order (RoPE is applied before, with global positions) and the block-causal mask is built for that
order (attention.BlockCausalSpec.shards).

Gradients: every input of the network's forward (x, y, pose tokens, text, CLIP) receives its full gradient on
every rank, while a parameter's gradient is the rank's share from its own tokens: summed over the group it is
the one-rank gradient. The trainer therefore sums parameter gradients over the sp ranks and averages them over
the data-parallel ranks (trainer.trainer.Trainer._reduce_gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from wan.modules.attention import BlockCausalSpec


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """x [B, ...] from every rank of the group -> [size, B, ...] (rank order)."""
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name before torch 2.13
    gather(out, x.contiguous(), group=group)
    return out.unflatten(0, (size, x.shape[0]))


def split_tokens(x: torch.Tensor, frames: int, size: int, rank: int) -> torch.Tensor:
    """[B, F*T, K] in (frame, token) order -> rank's shard [B, F*T/size, K] (run `rank` of each frame's T)."""
    b, length, k = x.shape
    return x.reshape(b, frames, size, length // (frames * size), k)[:, :, rank].reshape(b, -1, k)


def join_tokens(parts: torch.Tensor, frames: int) -> torch.Tensor:
    """Every rank's shard [N, B, F*T/N, K] -> [B, F*T, K] in (frame, token) order (inverse of split_tokens)."""
    n, b, local, k = parts.shape
    parts = parts.reshape(n, b, frames, local // frames, k).permute(1, 2, 0, 3, 4)  # [B, F, N, T/N, K]
    return parts.reshape(b, frames * n * (local // frames), k)


class _Shard(torch.autograd.Function):
    """Replicated [B, F*T, K] -> the local shard; backward assembles the full gradient on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, frames: int) -> torch.Tensor:
        ctx.sp, ctx.frames = sp, frames
        return split_tokens(x, frames, sp.size, sp.rank)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sp = ctx.sp
        return join_tokens(_all_gather(grad, sp.group, sp.size), ctx.frames), None, None


class _Gather(torch.autograd.Function):
    """The local shard -> replicated [B, F*T, K]; backward keeps the local part of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, frames: int) -> torch.Tensor:
        ctx.sp, ctx.frames = sp, frames
        return join_tokens(_all_gather(x, sp.group, sp.size), frames)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sp = ctx.sp
        return split_tokens(grad, ctx.frames, sp.size, sp.rank), None, None


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a replicated input used by local tokens)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.sp.group)
        return grad, None


def _seq_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[B, L/N, H, D] (all heads of my tokens) -> [B, L, H/N, D] (my heads of every rank's tokens, rank order)."""
    n = sp.size
    b, local, h, d = x.shape
    send = x.reshape(b, local, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # [N, B, L/N, H/N, D]: to rank j
    recv = torch.empty_like(send)  # recv[j]: rank j's tokens, my heads
    dist.all_to_all_single(recv, send, group=sp.group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, n * local, h // n, d)


def _heads_to_seq(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[B, L, H/N, D] -> [B, L/N, H, D]: the inverse of _seq_to_heads."""
    n = sp.size
    b, length, hn, d = x.shape
    send = x.reshape(b, n, length // n, hn, d).transpose(0, 1).contiguous()  # [N, B, L/N, H/N, D]: rank j's tokens
    recv = torch.empty_like(send)  # recv[j]: head group j of my tokens
    dist.all_to_all_single(recv, send, group=sp.group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, length // n, n * hn, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return _seq_to_heads(x, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_seq(grad, ctx.sp), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return _heads_to_seq(x, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_to_heads(grad, ctx.sp), None


class SequenceParallel:
    """One sequence-parallel group (N ranks that hold the same sample). Set on a network with
    `model.sequence_parallel = SequenceParallel(group)`; None (the default) is the one-rank code path."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    def check(self, num_heads: int, grid: tuple[int, int, int]) -> None:
        """Raise when the heads or a frame's tokens cannot be split evenly over the group."""
        n = self.size
        if num_heads % n:
            raise ValueError(
                f"sequence parallelism over train.sequence_parallel={n} ranks splits the attention heads evenly, "
                f"but the model has num_heads={num_heads}, which {n} does not divide: choose a "
                f"train.sequence_parallel that divides {num_heads}"
            )
        _, h, w = grid
        if (h * w) % n:
            raise ValueError(
                f"sequence parallelism over train.sequence_parallel={n} ranks splits each latent frame's "
                f"h*w = {h}*{w} = {h * w} tokens evenly, and {n} does not divide {h * w}: choose a latent size whose "
                f"h*w is a multiple of {n} (480x832 gives 1560 and 720x1280 gives 3600 tokens per frame, multiples "
                "of 2, 4 and 8) or a train.sequence_parallel that divides it"
            )

    def shard(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Replicated tokens [B, F*T, K] -> this rank's [B, F*T/N, K]; the gradient flows back whole."""
        return _Shard.apply(x, self, frames)

    def gather(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """This rank's tokens [B, F*T/N, K] -> every token [B, F*T, K] on every rank."""
        return _Gather.apply(x, self, frames)

    def shard_rope(self, rope: tuple[torch.Tensor, torch.Tensor], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [F*T, 1, D/2] -> the local tokens' [F*T/N, 1, D/2] (each token keeps its global position)."""
        return tuple(split_tokens(r[None, :, 0], frames, self.size, self.rank)[0, :, None] for r in rope)

    def sum_grad(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A replicated input read by the local tokens only: its gradient is summed over the group (when it has
        one), so that it is whole on every rank like the other inputs'."""
        if x is None or not (x.requires_grad and torch.is_grad_enabled()):
            return x
        return _SumGrad.apply(x, self)

    def attention(self, attend):
        """Wrap attend(q, k, v, layer) on whole sequences into one on local tokens q/k/v [B, F*T/N, H, D]:
        all-to-all to [B, F*T, H/N, D] (rank-major token order), attend, all-to-all back."""

        def parallel_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
            q, k, v = (_SeqToHeads.apply(x, self) for x in (q, k, v))
            return _HeadsToSeq.apply(attend(q, k, v, layer), self)

        return parallel_attend

    def block_causal_spec(self, spec: BlockCausalSpec) -> BlockCausalSpec:
        """The block-causal mask of the gathered (rank-major) token order."""
        return BlockCausalSpec(spec.num_frames, spec.tokens_per_frame, spec.frames_per_block, spec.window,
                               spec.sink, shards=self.size)  # fmt: skip
