"""PoseForcing inference: stream a pose-conditioned clip block by block through the causal student.

With no arguments it runs the embedded default: the tiny causal pose preset with RANDOM weights, a
synthetic pose clip and random text/CLIP features, streamed block by block through the KV cache. That
shows the streaming mechanics end to end (pose encoder -> per-block pose tokens -> 4 denoising steps + a
clean context pass per block); with random weights the latents are noise, not a video. The full pipeline
(reference image + pose video + prompt -> mp4 through T5, CLIP and the streaming VAE) builds on this.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.causal_diffusion_inference import DEFAULT_STEPS, Conditions, stream_latents
from utils.safetensors_io import atomic_save_safetensors
from wan.checkpoint import load_weights
from wan.configs import PRESETS, build_model

log = logging.getLogger("inference")


def synthetic_pose_clip(num_frames: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A moving bright bar on black, [1, 3, F, H, W] in 0..255: stands in for drawn DWPose frames."""
    clip = torch.zeros(1, 3, num_frames, height, width)
    colour = torch.rand(3, generator=generator) * 200 + 55
    for f in range(num_frames):
        x0 = int((width - width // 4) * f / max(1, num_frames - 1))
        clip[0, :, f, height // 4 : 3 * height // 4, x0 : x0 + width // 4] = colour[:, None, None]
    return clip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(n for n, c in PRESETS.items() if c["arch"] == "causal"),
                   help="network preset (default: tiny, random weights)")  # fmt: skip
    p.add_argument("--weights", type=Path, help="student checkpoint (any format wan/checkpoint.py reads)")
    p.add_argument("--num-frames", type=int, default=33, help="video frames, 1 + 4k (default 33 = 9 latent frames)")
    p.add_argument("--height", type=int, default=64, help="video height, multiple of 16")
    p.add_argument("--width", type=int, default=96, help="video width, multiple of 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/demo/latents.safetensors"),
                   help="where the generated latents [1, 16, F, H/8, W/8] are written")  # fmt: skip
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.num_frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise SystemExit(
            f"--num-frames must be 1 + 4k and --height/--width multiples of 16 "
            f"(got {args.num_frames}, {args.height}x{args.width})"
        )
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    model = build_model(args.preset, device=device, dtype=dtype).eval()
    if args.weights:
        load_weights(model, args.weights, allow_fresh=["pose"])
    else:
        log.warning("no --weights: the %s network has RANDOM weights; the output is noise, not a video", args.preset)
        with torch.no_grad():  # make every path active (the official init zeroes the head and pose_proj)
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    latent_frames = (args.num_frames - 1) // 4 + 1
    latent_size = (args.height // 8, args.width // 8)
    pose = synthetic_pose_clip(args.num_frames, args.height, args.width, gen).to(device)
    context = torch.randn(1, model.text_len, model.text_dim, generator=gen).to(device, dtype)
    clip_fea = y = None
    if model.model_type == "i2v":
        clip_fea = torch.randn(1, 257, model.clip_dim, generator=gen).to(device, dtype)
        y = torch.zeros(1, model.in_dim - model.out_dim, latent_frames, *latent_size, device=device)
        y[:, :4, 0] = 1  # the reference-frame mask; the reference latent itself stays zero in this demo
    with torch.no_grad():
        pose_tokens, ref_map = model.encode_pose(pose, ref_pose=pose[:, :, 0])
    if y is not None:
        y = y + ref_map.float()
    cond = Conditions(context=context, clip_fea=clip_fea, y=y, pose_tokens=pose_tokens)

    log.info("streaming %d latent frames (%d video frames) in blocks of %d, steps %s",
             latent_frames, args.num_frames, model.num_frame_per_block, [round(t, 1) for t in DEFAULT_STEPS])  # fmt: skip
    blocks, times = [], []
    start_time = time.perf_counter()
    stream = stream_latents(model, cond, latent_frames, latent_size, generator=gen.manual_seed(args.seed), dtype=dtype)
    for _, latents in tqdm(stream, total=-(-latent_frames // model.num_frame_per_block), desc="blocks", unit="block"):
        blocks.append(latents.cpu())
        times.append(time.perf_counter() - start_time)
    video_latents = torch.cat(blocks, dim=2)
    atomic_save_safetensors({"latents": video_latents.float().contiguous()}, args.out)
    log.info("first block after %.3f s, all %d blocks in %.3f s; latents %s written to %s",
             times[0], len(blocks), times[-1], tuple(video_latents.shape), args.out)  # fmt: skip


if __name__ == "__main__":
    main()
