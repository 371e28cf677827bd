"""Export N samples of the synthetic pose world as a training dataset (format: utils/data.py).

    python scripts/make_toy_dataset.py --out data/toy --num-samples 1000 [--config configs/toy/world.yaml]
        [--seed 0] [--workers 4] [--lossless-video] [num_frames=33 height=64 ...]

Sample i is generate_sample(config, seed + i): the same command always writes the same dataset.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial
from multiprocessing import Pool
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/make_toy_dataset.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.data import write_index, write_sample  # noqa: E402
from utils.synthetic_pose import WorldConfig, generate_sample, load_world_config  # noqa: E402

logger = logging.getLogger("make_toy_dataset")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy" / "world.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--num-samples", required=True, type=int, help="number of clips")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="world config YAML")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    p.add_argument("--workers", type=int, default=1, help="processes generating samples")
    p.add_argument("--lossless-video", action="store_true", help="store video.mp4 losslessly (larger files)")
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


def run(args: argparse.Namespace) -> int:
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))
    config = load_world_config(args.config, **overrides)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
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
