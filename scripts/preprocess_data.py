"""Turn a clip dataset (utils/data.py format: index.jsonl + video, pose, reference image and pose per clip) into
training samples in the batch layout of trainer/objective.py: one safetensors per clip with VAE latents of the
video, `y` (mask + latent of [reference, zeros...]), CLIP features of the reference, the prompt's and negative
prompt's T5 embeddings, and the pose frames / reference pose (uint8). `data.type=latents` trains on the result;
scripts/generate_ode_pairs.py takes it as its conditioning source.

    python scripts/preprocess_data.py --data data/clips --out data/latents --num-frames 81
    torchrun --nproc_per_node 8 scripts/preprocess_data.py ...     # rank r does clips r::world

Resumable: clips whose sample exists are skipped; every file is written atomically. A clip that cannot be read
(a file missing, undecodable or of the wrong size) is skipped and named; the run then ends with status 1 after
the readable clips are done, so a rerun after fixing them only does those.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/preprocess_data.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.causal_diffusion_inference import WAN_NEGATIVE_PROMPT  # noqa: E402
from pipeline.world import ClipEncoders, encode_clips  # noqa: E402
from utils.data import PoseVideoDataset  # noqa: E402
from utils.dist import barrier, destroy, init_distributed  # noqa: E402
from utils.encoders.text_cache import CachedTextEncoder  # noqa: E402
from utils.encoders.wan_wrapper import ImageEncoder, WanVAE  # noqa: E402
from utils.safetensors_io import atomic_save_safetensors  # noqa: E402
from utils.video_io import VideoReadError  # noqa: E402

log = logging.getLogger("preprocess_data")
DEFAULT_ASSETS = {  # relative to --models-dir, where download_models.py puts them
    "vae": "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
    "clip": "Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "t5": "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
    "t5_tokenizer": "Wan2.1-T2V-1.3B/google/umt5-xxl",
}


@torch.no_grad()
def encode_clip(
    enc: ClipEncoders,
    video: torch.Tensor,
    ref_image: torch.Tensor,
    pose: torch.Tensor,
    ref_pose: torch.Tensor,
    prompt: str,
    ref_choices: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> dict[str, torch.Tensor]:
    """One training sample from a clip in the data contract (pipeline.world.encode_clips for one clip)."""
    return encode_clips(enc, [(video, ref_image, pose, ref_pose, prompt, ref_choices)])[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="clip dataset folder (index.jsonl, utils/data.py format)")
    p.add_argument("--out", type=Path, required=True, help="output folder of <clip id>.safetensors samples")
    p.add_argument("--num-frames", type=int, help="keep the first 1 + 4k frames of each clip (default: all)")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("WAN_MODELS_DIR", "models")),
                   help="where the encoders are ($WAN_MODELS_DIR, default ./models)")  # fmt: skip
    for key, default in DEFAULT_ASSETS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=Path, help=f"default: <models-dir>/{default}")
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="CFG's negative prompt (Wan's default)")
    p.add_argument("--text-cache", type=Path, default=Path("text_cache"), help="prompt-embedding cache folder")
    p.add_argument("--text-len", type=int, default=512, help="text tokens per prompt (the network's text_len)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def asset(args: argparse.Namespace, key: str) -> Path:
    path = getattr(args, key) or args.models_dir / DEFAULT_ASSETS[key]
    if not path.exists():
        flag = f"--{key.replace('_', '-')}"
        raise SystemExit(f"{flag} {path} does not exist: fetch it with download_models.py or pass {flag} PATH")
    return path


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    dist = init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(name)s: %(message)s")
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        raise SystemExit(f"--num-frames must be 1 + 4k (e.g. 81), got {args.num_frames}")
    try:
        dataset = PoseVideoDataset(args.data, skip_bad=True)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--data {args.data}: {err}") from None
    bad = list(dataset.problems) if dist.is_main else []
    for problem in bad:
        log.error("skipping: %s", problem)
    todo = [i for i in range(dist.rank, len(dataset), dist.world_size)
            if not (args.out / f"{dataset.entries[i]['id']}.safetensors").exists()]  # fmt: skip
    log.info("%d clips, %d to do on this rank", len(dataset), len(todo))
    if todo:
        bad += encode_dataset(args, dataset, todo, dist)
    barrier()
    destroy()
    if bad:
        total = len(dataset) + len(dataset.problems)
        raise SystemExit(
            f"{len(bad)} of {total} clips could not be read and were skipped (each named above, e.g. {bad[0]}); "
            "fix or remove them in index.jsonl and rerun: finished clips are not redone"
        )


def encode_dataset(args: argparse.Namespace, dataset: PoseVideoDataset, todo: list[int], dist) -> list[str]:
    """Encode the clips `todo` into samples; returns the problems of clips that could not be read."""
    bad = []
    device = dist.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoders = ClipEncoders(
        vae=WanVAE(asset(args, "vae"), device=device, dtype=dtype),
        image_encoder=ImageEncoder(asset(args, "clip"), device=device, dtype=dtype),
        text_encoder=CachedTextEncoder(
            args.text_cache,
            asset(args, "t5"),
            asset(args, "t5_tokenizer"),
            device=device,
            dtype=dtype,
            text_len=args.text_len,
        ),  # fmt: skip
        negative_prompt=args.negative_prompt,
    )
    for i in tqdm(todo, desc="clips", disable=not dist.is_main):
        try:
            clip = dataset[i]
        except (VideoReadError, ValueError, OSError) as err:  # the message names the file
            bad.append(f"sample {dataset.entries[i]['id']}: {' '.join(str(err).split())}")
            log.error("skipping: %s", bad[-1])
            continue
        frames = clip["video"].shape[1] if args.num_frames is None else args.num_frames
        if (frames - 1) % 4 or clip["video"].shape[1] < frames:
            bad.append(
                f"sample {clip['id']}: {args.data / dataset.entries[i]['video']} has {clip['video'].shape[1]} frames; "
                f"it needs 1 + 4k frames (>= {frames}): pass --num-frames or trim the clip"
            )
            log.error("skipping: %s", bad[-1])
            continue
        sample = encode_clip(encoders, clip["video"][:, :frames], clip["ref_image"], clip["pose"][:, :frames],
                             clip["ref_pose"], clip["prompt"])  # fmt: skip
        atomic_save_safetensors(sample, args.out / f"{clip['id']}.safetensors", {"prompt": clip["prompt"]})
    return bad


if __name__ == "__main__":
    main()
