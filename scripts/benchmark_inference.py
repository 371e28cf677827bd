"""Real-size inference benchmark: the causal pose 1.3B student with random weights streams 81 frames at 480x832
through StreamingPosePipeline with the real-size Wan2.1 VAE (official config, random weights) and CLIP ViT-H/14
(random weights). The prompt is a cache hit (T5 is not run; a random [1, 512, 4096] embedding stands in).

Times, after warm-up runs: conditioning (reference VAE encode in fp32, CLIP, pose encoder), the streamed generation
end to end (first-block latency, total, FPS; each block waited for as a viewer would), and the same generation
split into diffusion and VAE decode (CUDA events, no host sync in between). Prints a markdown table, writes JSON.

    python scripts/benchmark_inference.py --json docs/benchmarks/inference_h100.json
    python scripts/benchmark_inference.py --compile --json docs/benchmarks/inference_h100_compile.json

A CPU smoke run of the same code: --device cpu --preset tiny --height 64 --width 96 --frames 33 --vae-base-dim 8
--no-clip --warmup 0 --repeats 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python scripts/benchmark_inference.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKLWan  # noqa: E402
from transformers import CLIPVisionModel  # noqa: E402

from pipeline.causal_diffusion_inference import StreamingPosePipeline  # noqa: E402
from pipeline.rollout import DEFAULT_STEPS, stream_latents  # noqa: E402
from utils.config import DTYPES  # noqa: E402
from utils.encoders.wan_wrapper import WAN21_VAE_CONFIG, ImageEncoder, WanVAE, clip_vit_h14_config  # noqa: E402
from wan.configs import build_model  # noqa: E402
from wan.modules import attention  # noqa: E402

log = logging.getLogger("benchmark_inference")


class Clock:
    """Wall time that waits for the device (a block counts as done when its frames exist)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Marks:
    """Timestamps recorded without a host sync: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        pairs = zip(self.marks[:-1], self.marks[1:], strict=True)
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        return [b - a for a, b in pairs]


def random_student(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The preset with random weights on every path (the official init zeroes the head and pose_proj)."""
    overrides = {"local_attn_size": args.local_attn_size} if args.local_attn_size else {}
    model = build_model(args.preset, device=device, dtype=dtype, **overrides).eval().requires_grad_(False)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        if hasattr(model, "pose_proj"):
            torch.nn.init.normal_(model.pose_proj.weight, std=0.002)
    return model


def random_encoders(args, model, folder: Path, device: torch.device, dtype: torch.dtype):
    """Real-size VAE and CLIP with random weights, saved to `folder` and loaded through the repo's wrappers."""
    AutoencoderKLWan.from_config({**WAN21_VAE_CONFIG, "base_dim": args.vae_base_dim}).save_pretrained(folder / "vae")
    vae = WanVAE(folder / "vae", device=device, dtype=DTYPES[args.vae_dtype])
    if args.no_clip or model.model_type != "i2v":
        features = torch.randn(1, 257, model.clip_dim, device=device, dtype=dtype)
        return vae, lambda image: features
    with torch.device(device):
        clip = CLIPVisionModel(clip_vit_h14_config()).to(dtype)
    clip.save_pretrained(folder / "image_encoder")
    del clip
    return vae, ImageEncoder(folder / "image_encoder", device=device, dtype=dtype)


def set_compile_limits(num_layers: int) -> None:
    """Dynamo specialises each layer's block forward (its layer index); allow every layer its graphs."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 8 * num_layers))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64 * num_layers))


def stream_split(pipe: StreamingPosePipeline, clip, seed: int, device: torch.device) -> tuple[list, list]:
    """Per-block (diffusion s, VAE decode s): stream_latents + the streaming decoder, as pipe.stream runs them."""
    decoder = pipe.vae.streaming_decoder()
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks = stream_latents(pipe.model, clip.cond, clip.latent_frames, clip.latent_size, pipe.steps,
                            generator=generator, dtype=pipe.dtype)  # fmt: skip
    marks = Marks(device)
    marks.mark()
    for _, latents in blocks:  # next() enqueues the block's diffusion
        marks.mark()
        decoder.decode(latents)
        marks.mark()
    intervals = marks.intervals()
    return intervals[0::2], intervals[1::2]


def table(results: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = ", ".join(f"{v:.3f}" for v in value)
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan_1.3b_causal_pose", help="causal network preset (wan/configs.py)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 1 + 4k (81 = 21 latent frames)")
    p.add_argument("--height", type=int, default=480, help="video height, multiple of 16")
    p.add_argument("--width", type=int, default=832, help="video width, multiple of 16")
    p.add_argument("--local-attn-size", type=int, help="attention window in latent frames (default: global)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="network (and CLIP) dtype")
    p.add_argument("--vae-dtype", choices=DTYPES, default="bf16", help="VAE decode dtype (encode is always fp32)")
    p.add_argument("--vae-base-dim", type=int, default=WAN21_VAE_CONFIG["base_dim"], help="VAE width (96 = real)")
    p.add_argument("--no-clip", action="store_true", help="random CLIP features instead of the ViT-H/14")
    p.add_argument("--attn", choices=("auto", "sdpa", "flash3"), default="auto",
                   help="dense attention backend (wan/modules/attention.py): auto = FlashAttention-3 if installed, "
                        "else SDPA with cuDNN first")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (with --compile)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark: cuDNN times its conv algorithms per shape (the VAE)")
    p.add_argument("--warmup", type=int, default=2, help="untimed full runs first (cuDNN autotuning, compilation)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --device cpu with a tiny preset for a smoke run")
    attention.set_backend(args.attn)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    model = random_student(args, device, dtype)
    with tempfile.TemporaryDirectory(prefix="benchmark-inference-") as folder:
        vae, image_encoder = random_encoders(args, model, Path(folder), device, dtype)
    context = torch.randn(1, model.text_len, model.text_dim, device=device, dtype=dtype)
    pipe = StreamingPosePipeline(model, vae, lambda prompts: context.expand(len(prompts), -1, -1), image_encoder)
    if args.compile:
        set_compile_limits(model.num_layers)
        for block in model.blocks:
            block.compile(mode=args.compile_mode)
    build_s = time.perf_counter() - start

    gen = torch.Generator(device=device).manual_seed(args.seed)
    ref = torch.rand(1, 3, args.height, args.width, generator=gen, device=device) * 2 - 1
    pose = torch.rand(1, 3, args.frames, args.height, args.width, generator=gen, device=device) * 255
    ref_pose = torch.rand(1, 3, args.height, args.width, generator=gen, device=device) * 255
    clock = Clock(device)

    def prepare():
        return pipe.prepare(ref, pose, "a person is dancing", args.frames, ref_pose)

    def stream(clip) -> list[float]:
        """Seconds from the start until each block's frames exist."""
        t0, done = clock.now(), []
        for _ in pipe.stream(clip, args.seed):
            done.append(clock.now() - t0)
        return done

    start = clock.now()
    for _ in range(args.warmup):
        stream(prepare())
    warmup_s = clock.now() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    conditioning, runs, diffusion, decode = [], [], [], []
    for _ in range(args.repeats):
        t0 = clock.now()
        clip = prepare()
        conditioning.append(clock.now() - t0)
        runs.append(stream(clip))
        per_block_diffusion, per_block_decode = stream_split(pipe, clip, args.seed, device)
        diffusion.append(per_block_diffusion)
        decode.append(per_block_decode)

    def median(values):
        return statistics.median(values)

    total = median([r[-1] for r in runs])
    diffusion_s = median([sum(d) for d in diffusion])
    decode_s = median([sum(d) for d in decode])
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
        "shape": f"{args.height}x{args.width}, {args.frames} frames = {clip.latent_frames} latent frames, "
        f"blocks of {model.num_frame_per_block}, steps {[round(t, 1) for t in DEFAULT_STEPS]} + clean pass",
        "dtype": f"{args.dtype} (VAE decode {args.vae_dtype}, encode fp32)",
        "attention": args.attn,
        "compile": args.compile_mode if args.compile else "off",
        "build_s": build_s,
        "warmup_s (incl. compilation)": warmup_s,
        "conditioning_s (VAE encode + CLIP + pose encoder)": median(conditioning),
        "first_block_latency_s": median([r[0] for r in runs]),
        "generation_s (diffusion + VAE decode)": total,
        "fps": args.frames / total,
        "fps incl. conditioning": args.frames / (total + median(conditioning)),
        "split: diffusion_s": diffusion_s,
        "split: vae_decode_s": decode_s,
        "split: diffusion per block": [median([d[i] for d in diffusion]) for i in range(len(diffusion[0]))],
        "split: vae decode per block": [median([d[i] for d in decode]) for i in range(len(decode[0]))],
        "block done at (s, end to end)": [median([r[i] for r in runs]) for i in range(len(runs[0]))],
        "repeats": args.repeats,
    }
    if device.type == "cuda":
        results["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    log.info("%s", table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
