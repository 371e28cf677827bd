"""Export N samples of the synthetic pose world as a clip dataset (format: utils/data.py), or, with --encode,
straight as training samples (what scripts/preprocess_data.py makes of the clip dataset, without the mp4 round
trip: toy VAE latents, y, CLIP features, prompt embeddings, pose frames).

    python scripts/make_toy_dataset.py --out data/toy --num-samples 1000 [--config configs/toy/world.yaml]
        [--seed 0] [--workers 4] [--lossless-video] [num_frames=33 height=64 ...]
    python scripts/make_toy_dataset.py --encode --out data/world/train --num-samples 4000 --seed 1000000 \
        --workers 16 [--vae assets/toy_vae --encoders assets/world_encoders --ref-choices 3]

Sample i is generate_sample(config, seed + i): the same command always writes the same dataset. The world's seed
ranges: training 1,000,000+, validation 2,000,000+, test 10,000,000+ (docs/results/world_teacher.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from multiprocessing import Pool, get_context
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/make_toy_dataset.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.data import to_contract, write_index, write_sample  # noqa: E402
from utils.world.synthetic_pose import SyntheticSample, WorldConfig, generate_sample, load_world_config  # noqa: E402

logger = logging.getLogger("make_toy_dataset")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "toy" / "world.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--num-samples", required=True, type=int, help="number of clips")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="world config YAML")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    p.add_argument("--workers", type=int, default=1, help="processes generating samples")
    p.add_argument("--lossless-video", action="store_true", help="store video.mp4 losslessly (larger files)")
    p.add_argument("--encode", action="store_true", help="write training samples (<id>.safetensors), not clips")
    p.add_argument("--vae", type=Path, default=ROOT / "assets" / "toy_vae", help="--encode: the VAE folder")
    p.add_argument("--encoders", type=Path, default=ROOT / "assets" / "world_encoders",
                   help="--encode: folder with text_encoder/, tokenizer/ and image_encoder/")  # fmt: skip
    p.add_argument(
        "--ref-choices",
        type=int,
        default=0,
        help="--encode: alternate reference frames per clip (the teacher stage draws one per step)",
    )
    p.add_argument("--negative-prompt", default="", help="--encode: CFG's negative prompt (world: empty)")
    p.add_argument("--text-len", type=int, default=32, help="--encode: text tokens per prompt (world presets: 32)")
    p.add_argument("--encode-batch", type=int, default=16, help="--encode: clips per batched VAE / CLIP call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--encode device")
    p.add_argument("overrides", nargs="*", help="world config overrides, key=value")
    return p


def export_one(index: int, out: Path, config: WorldConfig, seed: int, lossless_video: bool) -> dict:
    s = generate_sample(config, seed + index)
    return write_sample(
        out,
        f"{index:06d}",
        s.video,
        s.pose,
        s.ref_image,
        s.ref_pose,
        s.keypoints,
        s.prompt,
        config.fps,
        lossless_video=lossless_video,
    )


def render_one(index: int, config: WorldConfig, seed: int, ref_choices: int) -> tuple[SyntheticSample, list[int]]:
    """Sample `seed + index` and `ref_choices` alternate reference frames drawn by a generator of that seed (never
    the clip's own reference frame). NumPy only: it runs in worker processes."""
    s = generate_sample(config, seed + index)
    rng = np.random.default_rng([seed + index, 1])
    others = [f for f in range(config.num_frames) if f != s.ref_index]
    frames = rng.choice(others, size=min(ref_choices, len(others)), replace=False).tolist() if ref_choices else []
    return s, frames


def encode_dataset(args: argparse.Namespace, config: WorldConfig) -> int:
    """Render in worker processes, encode on --device in this one, write <id>.safetensors (resumable)."""
    from pipeline.world import encode_clips, world_encoders
    from utils.safetensors_io import atomic_save_safetensors

    todo = [i for i in range(args.num_samples) if not (args.out / f"{i:06d}.safetensors").exists()]
    logger.info("%d samples, %d to write to %s", args.num_samples, len(todo), args.out)
    if not todo:
        return 0
    # the world's encoders are small: fp32 throughout
    enc = world_encoders(torch.device(args.device), args.vae, args.encoders, args.out / ".text_cache",
                         args.text_len, args.negative_prompt)  # fmt: skip
    job = partial(render_one, config=config, seed=args.seed, ref_choices=args.ref_choices)

    seconds = {"render wait": 0.0, "encode": 0.0, "write": 0.0}  # where the time goes (logged every 8 flushes)
    flushes = 0

    def flush(group: list) -> None:
        nonlocal flushes
        clips = [(c["video"], c["ref_image"], c["pose"], c["ref_pose"], c["prompt"], ch) for _, c, ch in group]
        t0 = time.perf_counter()
        samples = encode_clips(enc, clips)
        t1 = time.perf_counter()
        for (index, clip, _), sample in zip(group, samples, strict=True):
            atomic_save_safetensors(sample, args.out / f"{clip['id']}.safetensors",
                                    {"prompt": clip["prompt"], "seed": str(args.seed + index)})  # fmt: skip
        seconds["encode"] += t1 - t0
        seconds["write"] += time.perf_counter() - t1
        group.clear()
        flushes += 1
        if flushes % 8 == 0:
            logger.info("after %d flushes: %s", flushes, ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))

    group: list = []
    # spawn, not fork: this process has started torch's thread pools, which a forked child can deadlock on
    with get_context("spawn").Pool(max(args.workers, 1)) as pool:
        rendered = pool.imap(job, todo)
        waited = time.perf_counter()
        for index, (s, frames) in zip(todo, tqdm(rendered, total=len(todo), desc="samples", unit="clip"), strict=True):
            seconds["render wait"] += time.perf_counter() - waited
            clip = to_contract(s.video, s.pose, s.ref_image, s.ref_pose, s.prompt, f"{index:06d}")
            group.append((index, clip, [(clip["video"][:, f], clip["pose"][:, f]) for f in frames]))
            if len(group) == args.encode_batch:
                flush(group)
            waited = time.perf_counter()
        if group:
            flush(group)
    return 0


def run(args: argparse.Namespace) -> int:
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))
    config = load_world_config(args.config, **overrides)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.encode:
        return encode_dataset(args, config)
    job = partial(export_one, out=args.out, config=config, seed=args.seed, lossless_video=args.lossless_video)
    bar = partial(tqdm, total=args.num_samples, desc="samples", unit="clip")
    if args.workers > 1:
        with Pool(args.workers) as pool:
            entries = list(bar(pool.imap(job, range(args.num_samples))))
    else:
        entries = [job(i) for i in bar(range(args.num_samples))]
    write_index(args.out, entries)
    logger.info(
        "wrote %d samples (%d frames %dx%d) to %s",
        len(entries),
        config.num_frames,
        config.width,
        config.height,
        args.out,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
