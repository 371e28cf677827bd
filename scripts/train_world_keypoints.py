"""Train the world keypoint network (utils/world/keypoints.py) on frames rendered by utils/world/synthetic_pose.py with
exact keypoints, and validate it against the exact marker detector.

    python scripts/train_world_keypoints.py --out runs/world_keypoints --max-minutes 8   # rerun to resume
    python scripts/train_world_keypoints.py --out /tmp/kp_smoke --smoke                   # seconds (a test)

Data: a pool rendered once and cached in OUT/pool.pt (a rerun reuses it): `--pool-clips` training clips of
`--clip-frames` frames (seeds TRAIN_SEED+, `--frames-per-clip` of their frames kept), their drawn pose frames, and
`--vae-clips` further training clips passed through the toy VAE (encode -> decode: blurred markers, shifted
colours, like generated frames); `--val-clips` validation clips (seeds VAL_SEED+) clean, VAE-reconstructed and as
pose frames. A training batch is half rendered frames (with random blur, noise and contrast), a quarter VAE
frames, a quarter pose frames.

Loss per heatmap: BCE of the logits against a Gaussian (sigma one cell) at the keypoint (all zero where the joint is
not visible), summed over cells, plus `--coord-weight` x the L1 pixel error of the soft-argmax of visible joints.
The state is saved to OUT/train_state.pt (atomically) every `--save-every` steps and when `--max-minutes` runs out;
a rerun continues exactly (batches and augmentations are functions of the step). At the end: PCK@0.05 (and
detection rate, L2) of the network and of the exact detector against the true keypoints on the validation frames,
OUT/metrics.json, and OUT/keypoints.safetensors (fp16, the architecture in the metadata; load_keypoint_net reads
it). assets/world_keypoints/ holds the shipped one; docs/results/world_keypoints.md the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/train_world_keypoints.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.world import MARKER_TOLERANCE, TOY_VAE, TRAIN_SEED, VAL_SEED, WORLD_CONFIG  # noqa: E402
from utils.atomic_io import atomic_output  # noqa: E402
from utils.metrics import keypoint_metrics  # noqa: E402
from utils.pose.keypoints import NUM_HAND, PoseSequence  # noqa: E402
from utils.safetensors_io import atomic_save_safetensors  # noqa: E402
from utils.world.keypoints import (  # noqa: E402
    DEFAULT_THRESHOLD,
    WEIGHTS_FILE,
    WorldKeypointNet,
    cell_centres,
    detect,
    soft_argmax,
)
from utils.world.synthetic_pose import detect_markers, generate_sample, load_world_config  # noqa: E402

logger = logging.getLogger("train_world_keypoints")
VAE_SEED_OFFSET = 500_000  # the VAE pool's clips: training seeds TRAIN_SEED + 500,000 + i (apart from the clean pool)
SMOKE = {"steps": 3, "pool_clips": 2, "vae_clips": 1, "val_clips": 1, "clip_frames": 5, "frames_per_clip": 2,
         "batch_size": 4, "log_every": 1, "save_every": 2}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the pool


def _frames(video: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(video))  # uint8 [F, H, W, 3]


@torch.no_grad()
def _vae_reconstruct(videos: list[np.ndarray], batch: int = 8) -> list[np.ndarray]:
    """uint8 clips [F, H, W, 3] -> their toy-VAE reconstructions (posterior mean, decoded, clamped), uint8."""
    from utils.encoders.wan_vae_parallel import decode, encode_moments
    from utils.encoders.wan_wrapper import WanVAE

    vae = WanVAE(TOY_VAE, device="cpu", dtype=torch.float32).vae
    out = []
    for i in range(0, len(videos), batch):
        x = torch.stack([_frames(v) for v in videos[i : i + batch]]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        z = encode_moments(vae, x)[:, : vae.config.z_dim]  # [B, z, f, h, w]
        recon = decode(vae, z)  # [B, 3, F, H, W] in [-1, 1]
        out += list(((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy())
        logger.info("toy VAE: %d / %d clips", min(i + batch, len(videos)), len(videos))
    return out


def build_pool(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """{name: tensor}: train_{rgb, pose, vae} uint8 [N, H, W, 3] with train_{rgb, vae}_kp [N, 20, 3] (x, y
    normalised, visibility) (pose frames share the rgb keypoints), and the same for val_*."""
    world = load_world_config(WORLD_CONFIG, num_frames=args.clip_frames)
    rng = np.random.default_rng(args.seed)

    def clips(first: int, count: int, keep: int | None) -> tuple[list, list, list]:
        rgb, pose, kp = [], [], []
        for i in range(count):
            s = generate_sample(world, first + i)
            idx = np.arange(world.num_frames) if keep is None else np.sort(rng.choice(world.num_frames, keep, False))
            k = np.concatenate([s.keypoints.body, s.keypoints.body_score[..., None]], -1)  # [F, 20, 3]
            rgb.append(s.video[idx])
            pose.append(s.pose[idx])
            kp.append(k[idx])
        return rgb, pose, kp

    t0 = time.perf_counter()
    rgb, pose, kp = clips(TRAIN_SEED, args.pool_clips, args.frames_per_clip)
    vae_src, _, vae_kp = clips(TRAIN_SEED + VAE_SEED_OFFSET, args.vae_clips, None)
    val_rgb, val_pose, val_kp = clips(VAL_SEED, args.val_clips, None)
    logger.info("rendered %d + %d + %d clips in %.0f s", args.pool_clips, args.vae_clips, args.val_clips,
                time.perf_counter() - t0)  # fmt: skip
    vae_rgb = _vae_reconstruct(vae_src + val_rgb)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs))  # noqa: E731
    return {
        "train_rgb": cat(rgb), "train_pose": cat(pose), "train_rgb_kp": cat(kp).float(),
        "train_vae": cat(vae_rgb[: args.vae_clips]), "train_vae_kp": cat(vae_kp).float(),
        "val_rgb": cat(val_rgb), "val_pose": cat(val_pose), "val_vae": cat(vae_rgb[args.vae_clips :]),
        "val_kp": cat(val_kp).float(),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------- training


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur: x [N, 3, H, W], sigma [N] (0: unchanged)."""
    offsets = torch.arange(-3, 4, dtype=x.dtype)
    kern = torch.exp(-(offsets[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # [N, 7]
    n, c, h, w = x.shape
    weight = kern.repeat_interleave(c, 0)  # [N*3, 7]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), weight[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), weight[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Random blur (sigma up to 1.5 * strength, half the images), contrast / brightness and pixel noise."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.5 * strength * (torch.rand(n, generator=gen) < 0.5)
    x = _blur(x, sigma)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2 * strength
    bright = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1 * strength
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.04 * strength
    return (x * contrast + bright + noise).clamp(-1, 1)


def draw_batch(pool: dict[str, torch.Tensor], step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` (a pure function of step and seed): frames [B, 3, H, W] in [-1, 1], keypoints [B, 20, 3]."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n_vae, n_pose = size // 4, size // 4
    n_rgb = size - n_vae - n_pose
    parts = []
    for key, kp_key, count, strength in (("train_rgb", "train_rgb_kp", n_rgb, 1.0),
                                         ("train_vae", "train_vae_kp", n_vae, 0.5),
                                         ("train_pose", "train_rgb_kp", n_pose, 0.0)):  # fmt: skip
        idx = torch.randint(0, pool[key].shape[0], (count,), generator=gen)
        x = pool[key][idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        parts.append((augment(x, gen, strength) if strength else x, pool[kp_key][idx]))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def keypoint_loss(logits: torch.Tensor, kp: torch.Tensor, height: int, width: int,
                  coord_weight: float) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """logits [B, J, h, w], kp [B, J, 3] (x, y normalised, visibility) -> loss and its parts (module docstring)."""
    xs, ys = cell_centres(height, width)
    px = kp[..., 0] * width  # [B, J] pixels
    py = kp[..., 1] * height
    visible = kp[..., 2] > 0.5
    sigma = 4.0  # pixels: one cell
    gauss = torch.exp(-((xs[None, None, None, :] - px[..., None, None]) ** 2
                        + (ys[None, None, :, None] - py[..., None, None]) ** 2) / (2 * sigma**2))  # fmt: skip
    target = gauss * visible[..., None, None]
    heat = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum((2, 3)).mean()
    xy = soft_argmax(logits, height, width)
    err = (xy - torch.stack([px, py], -1)).abs().sum(-1)  # [B, J] L1 pixels
    coord = (err * visible).sum() / visible.sum().clamp_min(1)
    return heat + coord_weight * coord, {"heat": heat.item(), "coord_px": coord.item()}


def lr_at(step: int, args: argparse.Namespace) -> float:
    warm = max(1, args.steps // 50)
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(args.steps - warm, 1)))


def save_state(path: Path, net: WorldKeypointNet, opt: torch.optim.Optimizer, step: int, seconds: float) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "seconds": seconds}, tmp)


# ----------------------------------------------------------------------------------------------------- validation


def _pose_of(kp: torch.Tensor, width: int, height: int) -> PoseSequence:
    f = kp.shape[0]
    return PoseSequence(kp[..., :2].numpy(), kp[..., 2].numpy(), np.zeros((f, 2, NUM_HAND, 2)),
                        np.zeros((f, 2, NUM_HAND)), width, height)  # fmt: skip


def validate(net: WorldKeypointNet, pool: dict[str, torch.Tensor], threshold: float) -> dict[str, dict]:
    """keypoint_metrics (pck@0.05, kpt_l2, detection_rate) of each detector on each kind of validation frame."""
    net.eval()
    _, h, w, _ = pool["val_rgb"].shape
    truth = _pose_of(pool["val_kp"], w, h)
    rows = {
        "net_clean": detect(net, pool["val_rgb"].numpy(), threshold),
        "net_vae": detect(net, pool["val_vae"].numpy(), threshold),
        "net_pose_frames": detect(net, pool["val_pose"].numpy(), threshold),
        "exact_clean": detect_markers(pool["val_rgb"].numpy()),
        f"exact_clean_tol{MARKER_TOLERANCE}": detect_markers(pool["val_rgb"].numpy(), tolerance=MARKER_TOLERANCE),
        f"exact_vae_tol{MARKER_TOLERANCE}": detect_markers(pool["val_vae"].numpy(), tolerance=MARKER_TOLERANCE),
    }
    net.train()
    return {name: keypoint_metrics(truth, found, w, h) for name, found in rows.items()}


# ----------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pool_path = args.out / "pool.pt"
    if pool_path.exists():
        pool = torch.load(pool_path, weights_only=True)
        logger.info("pool from %s: %d rendered, %d VAE, %d validation frames", pool_path, len(pool["train_rgb"]),
                    len(pool["train_vae"]), len(pool["val_rgb"]))  # fmt: skip
    else:
        pool = build_pool(args)
        with atomic_output(pool_path, overwrite=True) as tmp:
            torch.save(pool, tmp)
    _, h, w, _ = pool["train_rgb"].shape
    torch.manual_seed(args.seed)
    net = WorldKeypointNet(width=args.width, blocks=args.blocks)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    state_path, first, spent = args.out / "train_state.pt", 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        first, spent = int(state["step"]), float(state["seconds"])
        logger.info("resumed from %s at step %d (%.1f min trained)", state_path, first, spent / 60)
    logger.info("network %d parameters; %d steps of batch %d", sum(p.numel() for p in net.parameters()),
                args.steps, args.batch_size)  # fmt: skip
    start, done = time.perf_counter(), first
    for step in range(first, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        frames, kp = draw_batch(pool, step, args.batch_size, args.seed)
        loss, parts = keypoint_loss(net(frames), kp, h, w, args.coord_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        done = step + 1
        elapsed = time.perf_counter() - start
        if done % args.log_every == 0 or done == args.steps:
            logger.info("step %d/%d heat %.3f coord %.2f px, lr %.2e, %.2f steps/s", done, args.steps, parts["heat"],
                        parts["coord_px"], lr_at(step, args), (done - first) / elapsed)  # fmt: skip
        out_of_time = args.max_minutes is not None and elapsed > 60 * args.max_minutes
        if done % args.save_every == 0 or out_of_time or done == args.steps:
            save_state(state_path, net, opt, done, spent + elapsed)
        if out_of_time and done < args.steps:
            logger.info("--max-minutes %s reached at step %d: state saved, rerun to continue", args.max_minutes, done)
            return 0
    minutes = (spent + time.perf_counter() - start) / 60
    net = net.half().float()  # score what is shipped: the fp16 weights
    metrics = validate(net, pool, args.threshold)
    for name, row in metrics.items():
        logger.info("%-22s pck@0.05 %.4f  kpt_l2 %.4f  detection %.4f", name, row["pck@0.05"], row["kpt_l2"],
                    row["detection_rate"])  # fmt: skip
    meta = {"format": "poseforcing-world-keypoints", "config": json.dumps(net.config), "steps": str(done),
            "threshold": str(args.threshold)}  # fmt: skip
    atomic_save_safetensors({k: v.half() for k, v in net.state_dict().items()}, args.out / WEIGHTS_FILE, meta)
    summary = {
        "steps": done,
        "train_minutes": minutes,
        "validation": metrics,
        "val_frames": len(pool["val_rgb"]),
        "params": sum(p.numel() for p in net.parameters()),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    size = (args.out / WEIGHTS_FILE).stat().st_size
    logger.info(
        "wrote %s (%.2f MB, %d steps, %.1f min of training)", args.out / WEIGHTS_FILE, size / 1e6, done, minutes
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (pool, state, weights, metrics)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--coord-weight", type=float, default=0.1)
    p.add_argument("--width", type=int, default=24, help="channels of the first conv (then 2x)")
    p.add_argument("--blocks", type=int, default=3, help="residual blocks at stride 4")
    p.add_argument("--pool-clips", type=int, default=1200)
    p.add_argument("--frames-per-clip", type=int, default=4)
    p.add_argument("--clip-frames", type=int, default=9, help="frames per rendered clip (1 + 4k)")
    p.add_argument("--vae-clips", type=int, default=48)
    p.add_argument("--val-clips", type=int, default=16)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="visibility: peak sigmoid")
    p.add_argument("--max-minutes", type=float, default=None, help="stop at a checkpoint after this long")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="a few steps on a tiny pool (seconds)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.batch_size < 4:
        parser.error(f"--batch-size {args.batch_size}: at least 4 (rendered, VAE and pose frames in each batch)")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
