"""Real-size network benchmark on a GPU: the causal pose 1.3B student with random weights at 480x832 and
21 latent frames. Times the pose encoder, the KV-cached streaming forward (blocks x (denoising steps + one
clean pass)), and the block-causal training forward (flex attention) with and without backward; checks that
the cached path equals the full forward and never synchronises the host. Prints a markdown table.

    python scripts/benchmark_network.py --json docs/benchmarks/network.json
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

from utils.config import DTYPES  # noqa: E402
from wan.configs import build_model  # noqa: E402
from wan.modules.pose import pose_tokens_for_frames  # noqa: E402

log = logging.getLogger("benchmark_network")


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Seconds per call (CUDA events), after the caller's warm-up."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats, out


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan_1.3b_causal_pose")
    p.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per block (+1 clean context pass)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--skip-backward", action="store_true", help="skip the training forward+backward phase")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    dev, dtype = torch.device("cuda"), DTYPES[args.dtype]
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = build_model(args.preset, device=dev, dtype=dtype).eval().requires_grad_(False)
    with torch.no_grad():  # random weights everywhere: the official init zeroes the head and pose_proj
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        if hasattr(model, "pose_proj"):
            torch.nn.init.normal_(model.pose_proj.weight, std=0.002)
    build_s = time.perf_counter() - t0
    n = model.num_frame_per_block
    F_, H, W = args.frames, args.height // 8, args.width // 8
    tpf = (H // 2) * (W // 2)
    x = torch.randn(1, 16, F_, H, W, device=dev, dtype=dtype)
    y = torch.randn(1, model.in_dim - 16, F_, H, W, device=dev, dtype=dtype)
    context = torch.randn(1, 512, model.text_dim, device=dev, dtype=dtype)
    clip = torch.randn(1, 257, model.clip_dim, device=dev, dtype=dtype)
    pose = torch.rand(1, 3, 4 * F_ - 3, args.height, args.width, device=dev) * 255
    ref = torch.rand(1, 3, args.height, args.width, device=dev) * 255
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "preset": args.preset,
        "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
        "shape": f"{args.height}x{args.width}, {F_} latent frames, {tpf} tokens/frame, blocks of {n}",
        "dtype": args.dtype,
        "build_s": build_s,
    }

    # -- pose encoder, once per clip
    with torch.no_grad():
        model.encode_pose(pose, ref)
        torch.cuda.reset_peak_memory_stats()
        results["encode_pose_s"], (tokens, ref_map) = timed(lambda: model.encode_pose(pose, ref))
        results["encode_pose_peak_GiB"] = peak_gib()
    y = y + ref_map.to(dtype)
    t = torch.full((1, F_), 500.0, device=dev)

    # -- streaming: blocks x (steps + clean pass) through the KV cache
    def stream(cache, passes: int) -> list[float]:
        per_block = []
        for s in range(0, F_, n):
            sl = slice(s, s + n)
            blk = (
                x[:, :, sl],
                t[:, sl],
                context,
                clip,
                y[:, :, sl],
                pose_tokens_for_frames(tokens, s, x[:, :, sl].shape[2], tpf),
            )
            sec, _ = timed(lambda b=blk, s=s: [model(*b, kv_cache=cache, current_start_frame=s) for _ in range(passes)])
            per_block.append(sec)
        return per_block

    with torch.no_grad():
        cache = model.new_kv_cache(1, F_, dtype, dev, latent_size=(H, W))
        stream(cache, 1)  # warm-up
        cache.reset()
        torch.cuda.reset_peak_memory_stats()
        per_block = stream(cache, args.steps + 1)
        results["stream_block_s"] = per_block
        results["stream_forward_s_mean"] = sum(per_block) / len(per_block) / (args.steps + 1)
        results["stream_diffusion_total_s"] = sum(per_block)
        results["stream_peak_GiB"] = peak_gib()
        results["kv_cache_GiB"] = sum(b.numel() * b.element_size() for b in cache.k + cache.v) / 2**30

        # no host sync inside the cached forward
        cache.reset()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(
                x[:, :, :n],
                t[:, :n],
                context,
                clip,
                y[:, :, :n],
                tokens[:, : n * tpf],
                kv_cache=cache,
                current_start_frame=0,
            )
            results["cached_forward_host_syncs"] = "none (torch.cuda.set_sync_debug_mode('error') passed)"
        except RuntimeError as err:
            results["cached_forward_host_syncs"] = f"SYNC: {err}"
        finally:
            torch.cuda.set_sync_debug_mode(0)

        # -- training forward (block-causal, flex attention), no grad
        model(x, t, context, clip, y, tokens)  # compile + warm-up
        torch.cuda.reset_peak_memory_stats()
        results["train_forward_nograd_s"], full = timed(lambda: model(x, t, context, clip, y, tokens))
        results["train_forward_nograd_peak_GiB"] = peak_gib()
        cache.reset()
        streamed = torch.cat(
            [model(x[:, :, s : s + n], t[:, s : s + n], context, clip, y[:, :, s : s + n],
                   pose_tokens_for_frames(tokens, s, n, tpf), kv_cache=cache, current_start_frame=s)
             for s in range(0, F_, n)], dim=2,
        )  # fmt: skip
        results["cached_vs_full_rel_err"] = ((streamed.float() - full.float()).norm() / full.float().norm()).item()
    del cache

    # -- training forward + backward with activation checkpointing
    if not args.skip_backward:
        model.requires_grad_(True).train()
        model.gradient_checkpointing = True

        def step():
            out = model(x, t, context, clip, y, tokens)
            out.float().square().mean().backward()
            return out

        step()
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        results["train_fwd_bwd_ckpt_s"], _ = timed(step)
        results["train_fwd_bwd_ckpt_peak_GiB"] = peak_gib()

    lines = ["| metric | value |", "|---|---|"]
    for k, v in results.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = ", ".join(f"{e:.3f}" for e in v)
        lines.append(f"| {k} | {v} |")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
