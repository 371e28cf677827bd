"""Flat memory and time per frame of unbounded streaming: the causal pose student with random weights streams N
frames (e.g. 81, 481, 2001) through a local attention window + sink, the pose read from an endless iterator
(StreamingPosePipeline.prepare_stream: streamed pose tokens and y), the frames written to an mp4 as they are
decoded (utils.video_io.VideoWriter), as inference.py does. Each length runs in a fresh process, so its peak is
its own: the peak RSS while streaming (CPU; sampled after every block after glibc's malloc_trim, so neither the
start-up transients of building the networks nor heap pages the allocator keeps after freeing them count; the
process's lifetime peak, ru_maxrss, is in the JSON too) or the peak CUDA memory allocated (GPU),
and seconds per frame over the first and the last
81 frames (the median block time, after warm-up blocks: robust to a shared machine) to show that time per frame
stays flat, also in CPU seconds of the process (steady where other jobs share the cores). Prints a markdown table,
writes JSON (with every block's time).

    # CPU, tiny (the numbers in docs/benchmarks/streaming.md):
    python scripts/benchmark_streaming.py --device cpu --preset tiny --height 64 --width 96 --vae-base-dim 8 \\
        --no-clip --frames 81 481 2001 --json docs/benchmarks/streaming_cpu_tiny.json
    # one GPU, real size (1.3B student, Wan2.1 VAE and CLIP ViT-H/14 with random weights, 480x832):
    python scripts/benchmark_streaming.py --frames 81 481 2001 --json docs/benchmarks/streaming_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python scripts/benchmark_streaming.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.causal_diffusion_inference import StreamingPosePipeline  # noqa: E402
from scripts.benchmark_inference import random_encoders  # noqa: E402
from utils.config import DTYPES  # noqa: E402
from utils.encoders.wan_wrapper import WAN21_VAE_CONFIG  # noqa: E402
from utils.video_io import VideoWriter  # noqa: E402
from wan.configs import build_model  # noqa: E402

log = logging.getLogger("benchmark_streaming")


def rss_bytes(trim: bool = False) -> int:
    """This process's resident memory now (Linux /proc). trim: first hand glibc's free heap pages back to the system
    (malloc_trim), so the number is the memory in use, not what the allocator kept after earlier peaks."""
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
WINDOW_FRAMES = 81  # frames per timing window (first / last)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan_1.3b_causal_pose", help="causal pose preset (wan/configs.py)")
    p.add_argument("--frames", type=int, nargs="+", default=[81, 481, 2001], help="clip lengths, 1 + 4k each")
    p.add_argument("--height", type=int, default=480, help="video height, multiple of 16")
    p.add_argument("--width", type=int, default=832, help="video width, multiple of 16")
    p.add_argument("--local-attn-size", type=int, default=18, help="attention window in latent frames")
    p.add_argument("--sink-size", type=int, default=3, help="latent frames kept at the start (attention sink)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="network (and CLIP) dtype")
    p.add_argument("--vae-dtype", choices=DTYPES, default="bf16", help="VAE decode dtype (encode is always fp32)")
    p.add_argument("--vae-base-dim", type=int, default=WAN21_VAE_CONFIG["base_dim"], help="VAE width (96 = real)")
    p.add_argument("--no-clip", action="store_true", help="random CLIP features instead of the ViT-H/14")
    p.add_argument("--warmup-blocks", type=int, default=2, help="blocks left out of the first timing window")
    p.add_argument("--seed", type=int, default=0, help="noise and input seed")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--single", type=int, help=argparse.SUPPRESS)  # internal: measure one length in this process
    return p


def measure(args: argparse.Namespace, num_frames: int) -> dict:
    """Stream num_frames frames into an mp4 in this process; its peak memory and time per frame."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    model = build_model(args.preset, device=device, dtype=dtype, local_attn_size=args.local_attn_size,
                        sink_size=args.sink_size).eval().requires_grad_(False)  # fmt: skip
    with torch.no_grad():  # the official init zeroes the head and pose_proj: give every path a signal
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        torch.nn.init.normal_(model.pose_proj.weight, std=0.002)
    with tempfile.TemporaryDirectory(prefix="benchmark-streaming-") as folder:
        vae, image_encoder = random_encoders(args, model, Path(folder), device, dtype)
        context = torch.randn(1, model.text_len, model.text_dim, device=device, dtype=dtype)
        pipe = StreamingPosePipeline(model, vae, lambda prompts: context.expand(len(prompts), -1, -1), image_encoder)
        rng = np.random.default_rng(args.seed)
        loop = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(33)]
        ref = torch.rand(1, 3, args.height, args.width, device=device) * 2 - 1
        ref_pose = torch.rand(1, 3, args.height, args.width, device=device) * 255
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        clip = pipe.prepare_stream(ref, itertools.cycle(loop), "a person is dancing", ref_pose, max_frames=num_frames)
        prepare_s = time.perf_counter() - start
        done, cpu, counts, rss = [], [], [], []
        t0, c0 = time.perf_counter(), time.process_time()
        with VideoWriter(Path(folder) / "video.mp4", fps=16) as writer:
            for block in pipe.stream(clip, args.seed):
                frames = ((block.frames[0].float() + 1) * 127.5).round().clamp(0, 255).byte()
                writer.write(frames.permute(1, 2, 3, 0).cpu().numpy())  # waits for the block: it is done
                done.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)  # CPU seconds of this process: steady on a shared machine
                counts.append(frames.shape[1])
                rss.append(rss_bytes(trim=True))
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KB
    ends = np.cumsum(counts)
    block_s = np.diff(np.array([0.0, *done]))
    block_cpu_s = np.diff(np.array([0.0, *cpu]))
    first = args.warmup_blocks
    window = max(1, -(-WINDOW_FRAMES // (4 * model.num_frame_per_block)))  # blocks in ~81 frames

    def per_frame(blocks: slice, times: np.ndarray = block_s) -> float:  # median s/frame over full blocks
        full = [b for b, n in zip(times[blocks], np.array(counts)[blocks], strict=True) if n == max(counts)]
        return float(np.median(full)) / max(counts) if full else math.nan

    head, tail = slice(first, first + window), slice(max(first, len(done) - window), len(done))

    row = {
        "frames": int(ends[-1]), "blocks": len(done), "prepare_s": prepare_s, "total_s": done[-1],
        "s_per_frame_first": per_frame(head), "s_per_frame_last": per_frame(tail),
        "cpu_s_per_frame_first": per_frame(head, block_cpu_s), "cpu_s_per_frame_last": per_frame(tail, block_cpu_s),
        "fps": float(ends[-1]) / done[-1], "first_block_s": done[0], "peak_rss_mb": peak_rss / 2**20,
        "stream_rss_mb": max(rss) / 2**20,
        "rss_growth_after_block_10_mb": (max(rss[10:] or rss) - rss[min(9, len(rss) - 1)]) / 2**20,
        "kv_cache_frames": args.local_attn_size + args.sink_size, "block_s": [round(float(b), 4) for b in block_s],
    }  # fmt: skip
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    mem = "peak_cuda_mb" if "peak_cuda_mb" in rows[0] else "stream_rss_mb"
    base = rows[0][mem]
    lines = [f"| frames | blocks | {mem} | vs. first row | s/frame, first 81 | s/frame, last 81 | CPU s/frame, "
             "first 81 | CPU s/frame, last 81 | FPS | first block s |", "|---" * 10 + "|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['frames']} | {r['blocks']} | {r[mem]:.1f} | {100 * (r[mem] / base - 1):+.1f}% | "
                     f"{r['s_per_frame_first']:.4f} | {r['s_per_frame_last']:.4f} | {r['cpu_s_per_frame_first']:.4f} | "
                     f"{r['cpu_s_per_frame_last']:.4f} | {r['fps']:.2f} | {r['first_block_s']:.3f} |")  # fmt: skip
    head = (f"{args.preset} at {args.height}x{args.width} on {args.device}, window {args.local_attn_size} + sink "
            f"{args.sink_size} latent frames, {args.dtype}, VAE base {args.vae_base_dim}")  # fmt: skip
    return head + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run on a GPU, or pass --device cpu with a tiny preset")
    for n in args.frames:
        if n < 1 or (n - 1) % 4:
            raise SystemExit(f"error: --frames {n} is not 1 + 4k (e.g. 81, 481, 2001)")
    if args.single is not None:
        print(json.dumps(measure(args, args.single)))
        return
    rows = []
    own = [a for a in (sys.argv[1:] if argv is None else argv)]
    for n in args.frames:  # a fresh process per length: each peak is its own
        res = subprocess.run([sys.executable, __file__, *own, "--single", str(n)], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"error: the {n}-frame run failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        log.info("%d frames: %s", n, rows[-1])
    log.info("%s", table(rows, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json", "single")},
                                         "rows": rows}, indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
