"""CPU probes of the toy VAE and of the world it is trained on (the numbers in docs/benchmarks/toy_vae.md).

    python scripts/toy_vae_probe.py pca                       # a linear baseline with the VAE's latent budget
    python scripts/toy_vae_probe.py detect --vae OUT/vae      # the exact joint detector on reconstructed clips
    python scripts/toy_vae_probe.py errors --vae OUT/vae      # where the reconstruction error sits
    python scripts/toy_vae_probe.py heldout --vae assets/toy_vae   # the training script's held-out PSNR, re-measured

pca: PCA with 16 components per 4x8x8x3 patch (one latent cell of the VAE: 16 channels for 4 frames of 8x8
pixels), fitted on the patches of training clips and scored on held-out ones, PSNR overall and per region
(utils.world.synthetic_pose.pixel_regions), for the hard-edged and the anti-aliased world.
detect: detect_markers on the VAE's reconstructions (posterior mean, diffusers' encode/decode) of held-out clips:
share of visible markers found, median error, share within 2 px.
errors: the squared error split by region x moving/static pixels, by frame position inside a latent chunk and by
the clip's wall kind.
heldout: the evaluation train_toy_vae.py runs before it exports (32 held-out clips x 81 frames x 128x128, PSNR
overall and per region, per-channel latent statistics), on any exported VAE; --json writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from scripts import train_toy_vae  # noqa: E402
from utils.metrics import psnr  # noqa: E402
from utils.world.synthetic_pose import detect_markers, generate_sample, load_world_config, pixel_regions  # noqa: E402

HELD_OUT = train_toy_vae.HELD_OUT_SEED


def _db(se_sum: float, count: int) -> float:
    return float(10 * np.log10(255.0**2 * count / se_sum)) if se_sum else float("inf")


def _patches(video: np.ndarray) -> np.ndarray:
    """[16k, H, W, 3] uint8 -> [cells, 4*8*8*3] float: one row per latent cell."""
    f, h, w, _ = video.shape
    v = video.astype(np.float32).reshape(f // 4, 4, h // 8, 8, w // 8, 8, 3)
    return v.transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, 4 * 8 * 8 * 3)


def _unpatch(rows: np.ndarray, shape: tuple) -> np.ndarray:
    f, h, w, _ = shape
    v = rows.reshape(f // 4, h // 8, w // 8, 4, 8, 8, 3).transpose(0, 3, 1, 4, 2, 5, 6)
    return v.reshape(f, h, w, 3)


def _clips(world, seeds) -> list[np.ndarray]:
    """Frames 1.. of each clip (16 frames for 17: whole latent chunks, no lone first frame)."""
    return [generate_sample(world, s, draw_pose=False).video[1:] for s in seeds]


def pca(args: argparse.Namespace) -> None:
    for ss in (1, 2):
        world = load_world_config(num_frames=17, supersample=ss)
        train = np.concatenate([_patches(v) for v in _clips(world, range(args.train_clips))])
        mean = train.mean(0)
        basis = np.linalg.svd(train - mean, full_matrices=False)[2][: args.components]  # [k, 768]
        se, n = (
            dict.fromkeys(("marker", "edge", "flat", "all"), 0.0),
            dict.fromkeys(("marker", "edge", "flat", "all"), 0),
        )
        for video in _clips(world, range(HELD_OUT, HELD_OUT + args.clips)):
            fit = (_patches(video) - mean) @ basis.T @ basis + mean
            err = ((np.clip(_unpatch(fit, video.shape), 0, 255) - video) ** 2).mean(-1)
            for name, mask in {**pixel_regions(video), "all": np.ones(err.shape, bool)}.items():
                se[name] += float(err[mask].sum())
                n[name] += int(mask.sum())
        parts = ", ".join(f"{k} {_db(se[k], n[k]):.2f} dB" for k in ("marker", "edge", "flat"))
        print(f"supersample {ss}: PCA-{args.components} {_db(se['all'], n['all']):.2f} dB ({parts})")


def _reconstruct(vae, video: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(video).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    with torch.no_grad():
        return train_toy_vae.to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample[0])


def _load(path: Path) -> AutoencoderKLWan:
    """An exported VAE (any size: its config.json travels with it), in fp32."""
    return AutoencoderKLWan.from_pretrained(path, local_files_only=True).float().eval()


def detect(args: argparse.Namespace) -> None:
    vae, world = _load(args.vae), load_world_config(num_frames=args.frames)
    samples = [generate_sample(world, s, draw_pose=False) for s in range(HELD_OUT, HELD_OUT + args.clips)]
    recons = [_reconstruct(vae, s.video) for s in samples]
    print(f"PSNR {np.mean([psnr(r, s.video) for r, s in zip(recons, samples, strict=True)]):.2f} dB")
    for tol in (40, 60):
        visible = found = 0
        errors = []
        for s, r in zip(samples, recons, strict=True):
            det, truth = detect_markers(r, tolerance=tol), s.keypoints
            both = det.body_visible & truth.body_visible
            visible += int(truth.body_visible.sum())
            found += int(both.sum())
            errors.append(np.linalg.norm(det.body_pixels() - truth.body_pixels(), axis=-1)[both])
        e = np.concatenate(errors)
        print(
            f"tolerance {tol}: found {found / visible:.3f} of visible markers, median error {np.median(e):.2f} px, "
            f"within 2 px {np.mean(e <= 2):.3f}"
        )


def errors(args: argparse.Namespace) -> None:
    vae, world = _load(args.vae), load_world_config(num_frames=args.frames)
    se, n = {}, {}

    def add(key: str, err: np.ndarray, mask: np.ndarray) -> None:
        se[key] = se.get(key, 0.0) + float(err[mask].sum())
        n[key] = n.get(key, 0) + int(mask.sum())

    for seed in range(HELD_OUT, HELD_OUT + args.clips):
        s = generate_sample(world, seed, draw_pose=False)
        err = ((_reconstruct(vae, s.video) - s.video.astype(np.float64)) ** 2).mean(-1)  # [F, H, W]
        moving = np.zeros(err.shape, bool)
        moving[1:] = (s.video[1:] != s.video[:-1]).any(-1)
        for name, mask in pixel_regions(s.video).items():
            add(f"{name} moving", err, mask & moving)
            add(f"{name} static", err, mask & ~moving)
        for p in range(4):
            chunk = np.zeros(err.shape, bool)
            chunk[1 + p :: 4] = True
            add(f"chunk position {p}", err, chunk)
        add(f"{s.meta['background']} wall", err, np.ones(err.shape, bool))  # the whole clip, by its wall kind
        add("all", err, np.ones(err.shape, bool))
    for key in sorted(se, key=lambda k: k == "all"):  # insertion order, the total last
        print(
            f"{key:18s} pixels {n[key] / n['all']:.3f}  share of error {se[key] / se['all']:.3f}  "
            f"{_db(se[key], n[key]):.2f} dB"
        )


def heldout(args: argparse.Namespace) -> None:
    cfg = train_toy_vae.load_config(train_toy_vae.ROOT / "configs" / "toy" / "vae.yaml", [], smoke=False)
    world = load_world_config(num_frames=args.frames, height=cfg.height, width=cfg.width)
    device = torch.device(args.device)
    stats = train_toy_vae.evaluate(
        _load(args.vae).to(device), train_toy_vae.WorldClips(world, args.clips, HELD_OUT), device
    )
    regions = ", ".join(
        f"{k} {v['psnr']:.2f} dB ({100 * v['share_of_error']:.0f}% of error)" for k, v in stats["regions"].items()
    )
    print(f"held-out PSNR {stats['psnr']:.2f} dB on {args.clips} clips x {args.frames} frames ({regions})")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"vae": str(args.vae), "clips": args.clips, "frames": args.frames, **stats}, indent=2)
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="probe", required=True)
    q = sub.add_parser("pca", help="linear baseline with the VAE's latent budget")
    q.add_argument("--train-clips", type=int, default=60)
    q.add_argument("--clips", type=int, default=30, help="held-out clips (17 frames; the first is dropped)")
    q.add_argument("--components", type=int, default=16)
    for name, clips, frames in (("detect", 4, 33), ("errors", 12, 33), ("heldout", 32, 81)):
        q = sub.add_parser(name, help=f"{name} probe of an exported VAE")
        q.add_argument("--vae", type=Path, required=True, help="an exported OUT/vae folder (or assets/toy_vae)")
        q.add_argument("--clips", type=int, default=clips)
        q.add_argument("--frames", type=int, default=frames)
        if name == "heldout":
            q.add_argument("--device", default="cpu", help="cpu or cuda")
            q.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    {"pca": pca, "detect": detect, "errors": errors, "heldout": heldout}[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
