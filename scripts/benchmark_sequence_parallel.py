"""Sequence parallelism (train.sequence_parallel): the per-GPU memory model and its GPU measurements.

  python scripts/benchmark_sequence_parallel.py model --json docs/benchmarks/sequence_parallel_model.json
      # CPU only: the memory model's tables (docs/benchmarks/sequence_parallel.md), with the per-token bytes
      # of one block and of the pose encoder measured from autograd's saved tensors at real widths
  python scripts/benchmark_sequence_parallel.py network --preset wan_1.3b_causal_pose --size 720p
      # one GPU, N = 1: the check of the model (peak memory and time of one forward + backward)
  torchrun --nproc_per_node 4 scripts/benchmark_sequence_parallel.py network --preset wan_14b_i2v_pose_teacher
      # N = 4 GPUs: SP over all of them, FSDP2 over all of them
  torchrun --nproc_per_node 4 scripts/benchmark_sequence_parallel.py dmd --size 720p --json sp4.json
      # one real-size DMD iteration (scripts/benchmark_train.py) with train.sequence_parallel=4

Random weights everywhere; timings after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.dist import destroy, init_distributed, parallel_layout  # noqa: E402
from wan.configs import build_model, get_config  # noqa: E402
from wan.modules.model import CrossContext, WanAttentionBlock, rope_angles  # noqa: E402
from wan.modules.pose import encode_pose  # noqa: E402
from wan.modules.sequence_parallel import SequenceParallel  # noqa: E402

log = logging.getLogger("benchmark_sequence_parallel")

SIZES = {"480p": (480, 832), "720p": (720, 1280)}  # pixels (H, W); 81 frames -> 21 latent frames
FRAMES, LATENT_FRAMES, TEXT_LEN, CLIP_TOKENS = 81, 21, 512, 257
STUDENT, CRITIC, TEACHER = "wan_1.3b_causal_pose", "wan_1.3b_pose_critic", "wan_14b_i2v_pose_teacher"
GiB = 2**30


def tokens(size: str) -> tuple[int, int]:
    """(tokens per latent frame, tokens per clip) of an 81-frame clip: (H/16)(W/16) and 21 times that."""
    h, w = SIZES[size]
    per_frame = (h // 16) * (w // 16)
    return per_frame, LATENT_FRAMES * per_frame


# ----------------------------------------------------------------------------- measured on CPU: saved bytes


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs (params in `exclude` left
    out); the graph is kept alive until counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(storages.values())
    del out
    return total


def block_bytes_per_token(preset: str) -> float:
    """Saved bytes per token of one transformer block at the preset's width (bf16 weights, fp32 residual), the
    slope between two token counts (the context's K/V is the intercept). Under SP a rank saves this for each of
    its own tokens: the all-to-all moves heads, not bytes per token."""
    cfg = get_config(preset)
    dim, heads = cfg["dim"], cfg["num_heads"]
    torch.manual_seed(0)
    block = WanAttentionBlock(dim, cfg["ffn_dim"], heads, image_input=cfg["model_type"] == "i2v").to(torch.bfloat16)
    ctx = torch.randn(1, TEXT_LEN, dim, dtype=torch.bfloat16)
    ctx_img = torch.randn(1, CLIP_TOKENS, dim, dtype=torch.bfloat16) if cfg["model_type"] == "i2v" else None
    counts = {}
    for n in (128, 256):
        x = torch.randn(1, n, dim, requires_grad=True)
        e0 = torch.randn(1, 1, 6, dim)
        rope = rope_angles(dim // heads, 0, (1, 1, n), "cpu")

        def run(x=x, e0=e0, rope=rope):
            return block(x, e0, CrossContext(ctx, ctx_img), rope, lambda q, k, v, i: _sdpa(q, k, v), 0)

        counts[n] = saved_bytes(run, [*block.parameters(), x])
    return (counts[256] - counts[128]) / 128


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from wan.modules.attention import attention

    return attention(q, k, v)


def pose_encoder_bytes(preset: str, size: str) -> float:
    """Saved bytes of the pose encoder (dwpose_embedding, pose_proj folded in) for an 81-frame clip, measured at
    128x128 pixels and scaled by the area (every layer's activations scale with the pixels). It runs whole on
    every rank: sequence parallelism does not split it."""
    cfg = get_config(preset)
    # the pose path depends on dim and pose_dim only: a two-block network of the preset's width is enough
    model = build_model("tiny", dim=cfg["dim"], pose_dim=cfg["pose_dim"], num_heads=cfg["num_heads"], ffn_dim=64)
    small = torch.rand(1, 3, FRAMES, 128, 128) * 255
    nbytes = saved_bytes(lambda: encode_pose(model, small, None)[0], list(model.parameters()))
    h, w = SIZES[size]
    return nbytes * h * w / 128**2


# ----------------------------------------------------------------------------- the model


def params(preset: str) -> tuple[int, int]:
    """(parameters, parameters of one block) of a preset (meta device: no memory)."""
    model = build_model(preset, device="meta")
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.blocks[0].parameters())


def memory_model(calibration: dict) -> list[dict]:
    """Per-GPU GiB for each (role, size, N) with FSDP2 over the N GPUs and SP over the same N (dp = 1).

    weights: trainable roles 16 B/param (fp32 master + fp32 grad + AdamW m, v) / N, frozen 2 B/param (bf16) / N,
    plus two gathered bf16 blocks (the one computing and the prefetched one).
    activations, trainable (activation checkpointing): each block's fp32 input (4 * dim bytes per token) for every
    layer, plus one block's saved set during its recompute (block bytes per token), all per local token (L / N);
    plus the pose encoder's saved activations, which SP does not split.
    activations, frozen (no gradient): the live set of one block, estimated as the saved set of a trainable block
    (an upper bound: a forward without gradient frees most of it as it goes).
    """
    rows = []
    for role, preset, trainable in (("student 1.3B (trainable)", STUDENT, True),
                                    ("teacher 14B (frozen)", TEACHER, False)):  # fmt: skip
        cfg = get_config(preset)
        total, per_block = params(preset)
        block_b = calibration["block_bytes_per_token"][preset]
        for size in SIZES:
            _, length = tokens(size)
            pose_b = calibration["pose_encoder_bytes"][preset][size] if trainable else 0.0
            for n in (1, 2, 4, 8):
                heads_ok = cfg["num_heads"] % n == 0
                local = length / n
                weights = (16 if trainable else 2) * total / n + 2 * 2 * per_block
                if trainable:
                    acts = cfg["num_layers"] * local * cfg["dim"] * 4 + block_b * local
                else:
                    acts = block_b * local
                rows.append({
                    "role": role, "size": size, "N": n, "tokens": length, "tokens_per_gpu": int(local),
                    "weights_GiB": weights / GiB, "activations_GiB": acts / GiB, "pose_encoder_GiB": pose_b / GiB,
                    "total_GiB": (weights + acts + pose_b) / GiB, "heads_divisible": heads_ok,
                })  # fmt: skip
    return rows


def model_table(rows: list[dict]) -> str:
    lines = ["| role | size | tokens | N | tokens / GPU | weights | activations | pose encoder (not split) | total |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        note = "" if r["heads_divisible"] else " (heads: N must divide 12)"
        lines.append(f"| {r['role']} | {r['size']} | {r['tokens']} | {r['N']}{note} | {r['tokens_per_gpu']} | "
                     f"{r['weights_GiB']:.1f} GiB | {r['activations_GiB']:.1f} GiB | {r['pose_encoder_GiB']:.1f} GiB | "
                     f"{r['total_GiB']:.1f} GiB |")  # fmt: skip
    return "\n".join(lines)


def run_model(args: argparse.Namespace) -> None:
    calibration = {
        "block_bytes_per_token": {p: block_bytes_per_token(p) for p in (STUDENT, TEACHER)},
        "pose_encoder_bytes": {p: {s: pose_encoder_bytes(p, s) for s in SIZES} for p in (STUDENT,)},
        "params": {p: params(p)[0] for p in (STUDENT, CRITIC, TEACHER)},
    }
    rows = memory_model(calibration)
    log.info("calibration: %s", json.dumps(calibration, indent=1))
    log.info("\n%s", model_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"calibration": calibration, "rows": rows}, indent=2))


# ----------------------------------------------------------------------------- GPU measurements


def run_network(args: argparse.Namespace) -> None:
    """One network at real size: forward + backward (trainable) or forward (frozen), SP and FSDP2 over all ranks."""
    info = init_distributed()
    layout = parallel_layout(info, info.world_size)
    cfg = get_config(args.preset)
    trainable = not args.frozen
    model = build_model(args.preset, device=info.device, dtype=torch.float32 if trainable else torch.bfloat16)
    model.requires_grad_(trainable)
    model.gradient_checkpointing = trainable
    if layout.sp_group is not None:
        model.sequence_parallel = SequenceParallel(layout.sp_group)
    if info.world_size > 1 or trainable:
        from trainer.roles import shard_fsdp2
        from utils.dist import init_single_process_group

        init_single_process_group(info.device)
        shard_fsdp2(model, bf16=trainable)
    h, w = SIZES[args.size]
    lat = (LATENT_FRAMES, h // 8, w // 8)
    gen = torch.Generator(device=info.device).manual_seed(0)  # the same inputs on every rank

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device=info.device, dtype=dtype)

    x = randn(1, cfg["out_dim"], *lat)
    y = randn(1, cfg["in_dim"] - cfg["out_dim"], *lat)
    context, clip = randn(1, TEXT_LEN, cfg["text_dim"]), randn(1, CLIP_TOKENS, cfg["clip_dim"])
    pose_tokens = randn(1, tokens(args.size)[1], cfg["dim"], dtype=torch.bfloat16)  # the encoder is not timed
    t = torch.full((1,), 500.0, device=info.device)
    rows = []
    for step in range(args.repeats + 1):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.set_grad_enabled(trainable):
            out = model(x, t, context, clip, y, pose_tokens)
            if trainable:
                out.float().square().mean().backward()
        torch.cuda.synchronize()
        if step:
            rows.append({"seconds": time.perf_counter() - start, "peak_GiB": torch.cuda.max_memory_allocated() / GiB})
        del out
        model.zero_grad(set_to_none=True)
    result = {"device": torch.cuda.get_device_name(), "gpus": info.world_size, "N": layout.sp_size,
              "preset": args.preset, "size": args.size, "tokens": tokens(args.size)[1],
              "pass": "forward + backward" if trainable else "forward", "runs": rows}  # fmt: skip
    if info.is_main:
        log.info("%s", json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    destroy()


def run_dmd(args: argparse.Namespace) -> None:
    """One real-size DMD iteration with train.sequence_parallel = every rank (dp = 1) unless --sp says."""
    from scripts.benchmark_train import benchmark, table

    info = init_distributed()
    sp = args.sp or info.world_size
    h, w = SIZES[args.size]
    random_weights = [f"roles.{r}.{k}=null" for r in ("generator", "critic", "teacher")
                      for k in ("weights", "pose_weights_path")]  # fmt: skip
    overrides = [f"train.sequence_parallel={sp}", f"data.latent_size=[{h // 8},{w // 8}]", "objective.gen_every=2",
                 *random_weights, *args.overrides]  # fmt: skip
    shape = f"{h}x{w}, 21 latent frames, sp {sp}, batch 1 per sp group, bf16, activation checkpointing"
    trainer, results = benchmark("dmd", "wan_1.3b_causal_pose", args.iterations, overrides, shape)
    if trainer.dist.is_main:
        log.info("\n%s", table(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    destroy()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="the memory model (CPU)")
    m.add_argument("--json", type=Path)
    n = sub.add_parser("network", help="one network's pass at real size (GPU; torchrun for N > 1)")
    n.add_argument("--preset", default=STUDENT)
    n.add_argument("--frozen", action="store_true", help="forward only, bf16 weights (the teacher's real score)")
    n.add_argument("--size", choices=sorted(SIZES), default="720p")
    n.add_argument("--repeats", type=int, default=2)
    n.add_argument("--json", type=Path)
    d = sub.add_parser("dmd", help="one real-size DMD iteration (GPU; torchrun)")
    d.add_argument("--size", choices=sorted(SIZES), default="720p")
    d.add_argument("--sp", type=int, default=None, help="sequence-parallel ranks (default: all)")
    d.add_argument("--iterations", type=int, default=2)
    d.add_argument("--json", type=Path)
    d.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args()
    {"model": run_model, "network": run_network, "dmd": run_dmd}[args.what](args)


if __name__ == "__main__":
    main()
