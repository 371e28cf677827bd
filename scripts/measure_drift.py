"""Drift of a long stream on the synthetic world: one held-out world clip of N frames (default 2001) streamed by a
causal student through a local attention window + sink (StreamingPosePipeline.prepare_stream: streamed pose tokens
and y), scored per 81-frame window against the exact ground truth (pose PCK@0.05, keypoint L2 and detection rate
through the marker detector, as pipeline/world.py scores; PSNR against the rendered video). A student that drifts
loses PCK window after window. Writes OUT/drift.json, OUT/drift.md (table) and OUT/drift.png (plot).

    python scripts/measure_drift.py --weights runs/world_dmd/export/generator_ema.safetensors --out docs/results/drift
    # smoke run on random weights (the output shows only that the measurement works):
    python scripts/measure_drift.py --random-weights --frames 401 --out /tmp/drift
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.causal_diffusion_inference import StreamingPosePipeline  # noqa: E402
from pipeline.rollout import DEFAULT_STEPS  # noqa: E402
from pipeline.world import MARKER_TOLERANCE, TEST_SEED, WORLD_CONFIG, to_frames, world_encoders  # noqa: E402
from utils.metrics import PCK_THRESHOLD, keypoint_metrics, psnr  # noqa: E402
from utils.safetensors_io import read_metadata  # noqa: E402
from utils.video_io import VideoWriter  # noqa: E402
from utils.world.synthetic_pose import detect_markers, generate_sample, load_world_config  # noqa: E402
from wan.checkpoint import load_weights  # noqa: E402
from wan.configs import build_model  # noqa: E402

log = logging.getLogger("measure_drift")
PCK = f"pck@{PCK_THRESHOLD}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="a causal student export (save_weights safetensors, config inside)")
    p.add_argument("--random-weights", action="store_true",
                   help="the --preset with random weights, not --weights: checks the measurement only")  # fmt: skip
    p.add_argument("--preset", default="world_student", help="preset for --random-weights (wan/configs.py)")
    p.add_argument("--frames", type=int, default=2001, help="stream length in video frames, 1 + 4k")
    p.add_argument("--window", type=int, default=81, help="frames per scored window")
    p.add_argument("--seed", type=int, default=TEST_SEED, help="world clip seed (test seeds: 10,000,000+)")
    p.add_argument("--noise-seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--local-attn-size", type=int, default=18, help="attention window in latent frames")
    p.add_argument("--sink-size", type=int, default=3, help="latent frames kept at the start (attention sink)")
    p.add_argument("--steps", type=float, nargs="+", default=list(DEFAULT_STEPS), help="denoising timesteps")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1 = off, the student's)")
    p.add_argument("--height", type=int, help="world frame height (default: configs/toy/world.yaml's, 128)")
    p.add_argument("--width", type=int, help="world frame width (default: configs/toy/world.yaml's, 128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--video", type=Path, help="also write the generated stream to this mp4")
    p.add_argument("--out", type=Path, required=True, help="folder for drift.json, drift.md, drift.png")
    return p


def load_student(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    window = {"local_attn_size": args.local_attn_size, "sink_size": args.sink_size}
    if args.random_weights:
        model = build_model(args.preset, device=device, dtype=torch.float32, **window)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    else:
        config = json.loads(read_metadata(args.weights)["config"])
        model = build_model(config, device=device, dtype=torch.float32, **window)
        load_weights(model, args.weights)
    return model.eval().requires_grad_(False)


def score_window(frames: np.ndarray, truth, start: int) -> dict:
    """Metrics of generated frames [n, H, W, 3] = stream frames [start, start + n) against the world clip."""
    n, h, w, _ = frames.shape
    driving = truth.keypoints.select(slice(start, start + n))
    detected = detect_markers(frames, tolerance=MARKER_TOLERANCE)
    row = {"window": start // max(1, n), "start": start, "end": start + n, **keypoint_metrics(driving, detected, w, h)}
    real = truth.video[start : start + n]
    row["psnr"] = psnr(frames, real)
    ceiling = keypoint_metrics(driving, detect_markers(real, tolerance=MARKER_TOLERANCE), w, h)
    row[f"ceiling_{PCK}"] = ceiling[PCK]  # the detector on the rendered ground truth: the best a window can score
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[plots]'): no %s", path)
        return
    mid = [(r["start"] + r["end"]) / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    ax.plot(mid, [r[PCK] for r in rows], "o-", label=PCK)
    ax.plot(mid, [r["detection_rate"] for r in rows], "s--", label="detection rate", alpha=0.7)
    ax.plot(mid, [r[f"ceiling_{PCK}"] for r in rows], ":", color="gray", label=f"{PCK} of the ground truth")
    ax.set_xlabel("frame of the stream (window centre)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = [f"| window | frames | {PCK} | kpt L2 | detection rate | PSNR dB | {PCK} of the ground truth |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['window']} | {r['start']}-{r['end'] - 1} | {r[PCK]:.3f} | {r['kpt_l2']:.3f} | "
                     f"{r['detection_rate']:.3f} | {r['psnr']:.2f} | {r[f'ceiling_{PCK}']:.3f} |")  # fmt: skip
    return "\n".join(lines)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.weights is None) == (not args.random_weights):
        raise SystemExit("error: give --weights PATH (a student export) or --random-weights (a smoke run)")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise SystemExit(f"error: --frames {args.frames} is not 1 + 4k (e.g. 2001)")
    device = torch.device(args.device)
    sizes = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    truth = generate_sample(load_world_config(WORLD_CONFIG, num_frames=args.frames, **sizes), args.seed)
    model = load_student(args, device)
    enc = world_encoders(device, text_len=model.text_len)
    pipe = StreamingPosePipeline(model, enc.vae, enc.text_encoder, enc.image_encoder, args.steps, args.guidance,
                                 enc.negative_prompt)  # fmt: skip
    to_tensor = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float()  # [H, W, 3] -> [1, 3, H, W]
    ref = to_tensor(truth.ref_image) / 127.5 - 1.0
    start = time.perf_counter()
    clip = pipe.prepare_stream(ref, iter(truth.pose), truth.prompt, to_tensor(truth.ref_pose), max_frames=args.frames)
    rows, pending, made = [], [], 0
    writer = VideoWriter(args.video, fps=16, mode="yuv444") if args.video else None
    with writer or contextlib.nullcontext():
        for block in pipe.stream(clip, args.noise_seed):
            frames = to_frames(block.frames[0])  # [n, H, W, 3]
            if writer is not None:
                writer.write(frames)
            pending.append(frames)
            made += len(frames)
            while sum(len(f) for f in pending) >= args.window:  # score each full window, keep only the rest
                window = np.concatenate(pending)
                rows.append(score_window(window[: args.window], truth, len(rows) * args.window))
                pending = [window[args.window :]] if len(window) > args.window else []
                log.info("frames %d-%d: %s %.3f", rows[-1]["start"], rows[-1]["end"] - 1, PCK, rows[-1][PCK])
    seconds = time.perf_counter() - start
    title = (f"{args.weights.name if args.weights else args.preset + ' (random weights)'}: world clip {args.seed}, "
             f"{made} frames, window {args.local_attn_size} + sink {args.sink_size}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "title": title, "frames": made, "seconds": seconds, "rows": rows,
              "first_window": rows[0][PCK] if rows else math.nan, "last_window": rows[-1][PCK] if rows else math.nan}
    (args.out / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "drift.md").write_text(f"{title}\n\n`{result['command']}`\n\n{table(rows)}\n")
    plot(rows, args.out / "drift.png", title)
    log.info("%s\n%s", title, table(rows))


if __name__ == "__main__":
    main()
