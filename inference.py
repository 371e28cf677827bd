"""PoseForcing inference: a reference image, a pose sequence and a prompt -> an mp4, streamed block by block.

    python inference.py --config configs/inference/student_1.3b.yaml --weights student.safetensors \\
        --ref person.png --pose poses/dance/keypoints.json --ref-pose poses/dance/ref_keypoints.json \\
        --prompt "a person is dancing" --out outputs/dance.mp4 --preview outputs/dance_side_by_side.mp4

Pose input: --pose is a folder of drawn pose images, a pose video, or a keypoints JSON (scripts/extract_pose.py
writes one; keypoints are drawn at the reference's size and aligned to the reference pose when it is known).
--driving takes an RGB video instead and extracts its pose with DWPose (--det-onnx, --pose-onnx). The reference
pose comes from --ref-pose (image or keypoints JSON), else from DWPose on --ref when its models are there;
without one the input is pose-only (the reference-pose map stays zero). The video has the reference image's size.

With no arguments it runs the embedded default (configs/inference/world.yaml): the world teacher that ships in
assets/ (a bidirectional i2v pose model trained on the synthetic pose world, with the toy VAE and the world's text
and image encoders; nothing is downloaded) samples a held-out clip of that world (test seed 10,000,000, 128x128,
81 frames, its own caption as the prompt) with 50 UniPC steps and CFG 1.5: outputs/video.mp4 follows that clip's
pose (PCK@0.05 0.87 against its ground truth; 4-6 minutes on 2 busy CPU cores).
`--config configs/inference/tiny.yaml` is the old smoke demo: the tiny causal pose preset and tiny encoders, all
with RANDOM weights built in memory, through the whole streaming path (its output is noise, not a video).
Config paths are under --models-dir, or under the repo root when the config sets paths_relative_to: repo (as
world.yaml does). Config values can also be set as KEY=VALUE arguments (e.g. guidance_scale=3.0); flags win over
both.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from pipeline.bidirectional_inference import TeacherPosePipeline
from pipeline.causal_diffusion_inference import (
    WAN_NEGATIVE_PROMPT,
    PosePipeline,
    StreamingPosePipeline,
    check_clip_inputs,
)
from pipeline.rollout import DEFAULT_STEPS, SAMPLERS
from utils.config import DTYPES
from utils.encoders.text_cache import CachedTextEncoder
from utils.encoders.wan_wrapper import ImageEncoder, WanVAE
from utils.file_lock import LockHeldError, check_output_path, exit_on_sigterm, output_lock, process_alive
from utils.pose import (
    DWPoseDetector,
    DWPoseUnavailable,
    PoseSequence,
    align_pose,
    draw_pose_frames,
    iter_pose_frames,
    load_keypoints,
)
from utils.safetensors_io import SAFETENSORS_SUFFIX, open_safetensors, resolve_checkpoint_files
from utils.video_io import FrameStream, VideoReadError, VideoWriter, read_image
from wan.checkpoint import POSE_PREFIXES, CheckpointKeyError, _transformer_source, load_pose_weights, load_weights
from wan.configs import PRESETS, build_model
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel

if TYPE_CHECKING:  # the synthetic world is imported only when a run uses it
    from utils.world.synthetic_pose import SyntheticSample

log = logging.getLogger("inference")

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "inference" / "world.yaml"
TINY_CONFIG = ROOT / "configs" / "inference" / "tiny.yaml"  # random weights: the smoke demo (scripts/demo.py's default)
RANDOM_STD = 0.05  # random weights everywhere (the official init zeroes the head and pose_proj: no output)
# + "<pid>-": a run's temp folder (random weights, the text cache when the config keeps none), removed when it died
SCRATCH_PREFIX = "poseforcing-random-"
PATH_BASES = ("models_dir", "repo")  # paths_relative_to: --models-dir, or the repo root (the assets/ it ships)


@dataclass
class SyntheticClip:
    """The clip of the synthetic pose world used when no --ref / --pose is given."""

    height: int = 64
    width: int = 96
    num_frames: int = 33
    seed: int | None = None  # the world clip's seed (pipeline/world.py TEST_SEED: held out); null: --seed


@dataclass
class InferenceConfig:
    """Every key an inference config (configs/inference/*.yaml) may set; unknown keys are an error."""

    # Where the config's relative paths are: models_dir (under --models-dir: downloaded assets) or repo (under the
    # repo root: the assets/ it ships). Absolute paths are taken as they are; path flags win over the config.
    paths_relative_to: str = "models_dir"
    preset: str = "tiny"  # wan/configs.py; causal presets stream, bidirectional ones run the teacher sampler
    random_weights: bool = False  # every network random, built in memory: a smoke run, the output is noise
    weights: str | None = None  # the network's checkpoint (any format wan/checkpoint.py reads)
    ema: bool | None = None  # nested training checkpoints: true = generator_ema, false = raw, null = ema if present
    pose_weights: str | None = None  # UniAnimate checkpoint: pose encoders, for weights that lack them
    local_attn_size: int | None = None  # causal: attention window in latent frames (null: the preset's)
    sink_size: int | None = None  # causal: frames kept at the start when a window is set
    # Causal presets that attend globally, local_attn_size null: a clip longer than long_clip_window +
    # long_clip_sink latent frames (21, the training length), or a pose stream of unknown length, streams through
    # this local window + sink instead, so the KV cache (and memory) stays fixed however long the clip.
    long_clip_window: int = 18
    long_clip_sink: int = 3
    t5: str | None = None  # models_t5_umt5-xxl-enc-bf16.pth or a HF folder
    t5_tokenizer: str | None = None  # google/umt5-xxl tokenizer folder
    clip: str | None = None  # models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or a HF folder
    vae: str | None = None  # Wan2.1_VAE.pth or a diffusers folder
    det_onnx: str | None = None  # DWPose person detector yolox_l.onnx
    pose_onnx: str | None = None  # DWPose whole-body model dw-ll_ucoco_384.onnx
    text_cache: str | None = "text_cache"  # prompt embeddings cached on disk; null: in the run's temp folder
    prompt: str | None = "a person is dancing"  # null: the synthetic clip's own caption (needs no --ref / --pose)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    guidance_scale: float = 1.0  # CFG w (pred = u + w (c - u)); 1 = off
    denoising_steps: list[float] = field(default_factory=lambda: list(DEFAULT_STEPS))  # causal student
    num_steps: int = 50  # teacher: solver steps
    shift: float = 5.0  # teacher: timestep shift of the UniPC grid
    solver: str = "unipc"  # teacher: unipc, euler (half-step distilled schedule), few_step (consistency distilled)
    guidance_embed: bool = False  # CFG-distilled weights (stage cfg_distill): w is an input, one forward per step
    num_frames: int | None = None  # video frames, 1 + 4k; null: the longest 1 + 4k prefix of the pose clip
    fps: float = 16.0
    synthetic: SyntheticClip = field(default_factory=SyntheticClip)
    device: str = "auto"  # auto: cuda if available
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu; or bf16, fp16, fp32


# Config path keys: the flag that sets each, and where download_models.py gets it.
PATH_KEYS = {
    "weights": ("--weights", None),
    "pose_weights": ("--pose-weights", "UniAnimate-DiT"),
    "t5": ("--t5", "Wan2.1-T2V-1.3B"),
    "t5_tokenizer": ("--t5-tokenizer", "Wan2.1-T2V-1.3B"),
    "clip": ("--clip", "Wan2.1-CLIP"),
    "vae": ("--vae", "Wan2.1-T2V-1.3B"),
    "det_onnx": ("--det-onnx", "UniAnimate-DiT"),
    "pose_onnx": ("--pose-onnx", "UniAnimate-DiT"),
    "text_cache": ("--text-cache", None),
}


class InputError(ValueError):
    """Bad input: the message names the flag or file and the fix, and is printed as one line."""


# ----------------------------------------------------------------------------------------------------------
# Command line and config
# ----------------------------------------------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser, default_config: Path = DEFAULT_CONFIG) -> None:
    """The flags that pick the config, networks, weights, device and dtype (shared with scripts/demo.py)."""
    model = p.add_argument_group("model and weights (config paths are relative to --models-dir, or to the repo root "
                                 "when the config sets paths_relative_to: repo)")  # fmt: skip
    tiny = f"{TINY_CONFIG.relative_to(ROOT)}: the tiny RANDOM weights demo"
    default = tiny if default_config == TINY_CONFIG else f"{default_config.relative_to(ROOT)}; {tiny}"
    model.add_argument("--config", type=Path, default=default_config,
                       help=f"inference config YAML (default: {default})")  # fmt: skip
    model.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("WAN_MODELS_DIR", "models")),
        help="folder of downloaded assets (download_models.py) that config paths are under (paths_relative_to: "
        "models_dir, the default); default $WAN_MODELS_DIR or ./models",
    )
    model.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                       help="network preset from wan/configs.py (overrides the config's)")  # fmt: skip
    model.add_argument("--weights", type=Path, help="network checkpoint (file, shards folder or Wan model folder)")
    model.add_argument("--pose-weights", type=Path,
                       help="UniAnimate checkpoint with the pose encoders, for weights that lack them")  # fmt: skip
    model.add_argument("--t5", type=Path, help="UMT5-XXL text encoder, models_t5_umt5-xxl-enc-bf16.pth")
    model.add_argument("--t5-tokenizer", type=Path, help="UMT5 tokenizer folder (google/umt5-xxl)")
    model.add_argument(
        "--clip", type=Path, help="CLIP image encoder, models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    )
    model.add_argument("--vae", type=Path, help="Wan2.1 VAE, Wan2.1_VAE.pth")
    model.add_argument("--det-onnx", type=Path, help="DWPose person detector, yolox_l.onnx")
    model.add_argument("--pose-onnx", type=Path, help="DWPose whole-body model, dw-ll_ucoco_384.onnx")
    model.add_argument("--text-cache", type=Path, help="folder of cached prompt embeddings")
    model.add_argument("--guidance-scale", type=float, help="CFG scale w (1 = off, the student's default)")
    model.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    model.add_argument("--dtype", choices=["auto", *DTYPES], help="network dtype (default: bf16 on cuda, fp32 on cpu)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--ref", type=Path, help="reference image (png/jpg); its size is the video's size (multiples of 16)"
    )
    io.add_argument(
        "--pose", type=Path, help="pose input: a folder of drawn pose images, a pose video, or a keypoints JSON"
    )
    io.add_argument("--driving", type=Path,
                    help="RGB driving video instead of --pose: its pose is extracted with DWPose (--det-onnx, "
                         "--pose-onnx) and aligned to the reference")  # fmt: skip
    io.add_argument("--ref-pose", type=Path,
                    help="the reference's pose: a drawn pose image or a keypoints JSON (default: DWPose on --ref "
                         "when its models are there, else pose-only input)")  # fmt: skip
    io.add_argument("--no-align", action="store_true",
                    help="draw keypoints as given instead of aligning them to the reference pose")  # fmt: skip
    io.add_argument("--prompt", help="text prompt (default: the config's; a config with prompt: null uses the "
                    "synthetic clip's own caption)")  # fmt: skip
    io.add_argument(
        "--num-frames",
        type=int,
        help="video frames, 1 + 4k (default: the config's, else the longest 1 + 4k prefix of the pose)",
    )
    io.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video (also the "
                    "synthetic clip's world seed when the config sets no synthetic.seed)")  # fmt: skip
    io.add_argument("--out", type=Path, default=Path("outputs/video.mp4"), help="output mp4, written atomically")
    io.add_argument("--preview", type=Path, help="also write a side-by-side pose | output mp4 here")
    add_model_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config values, e.g. guidance_scale=3.0")
    return p


def load_config(args: argparse.Namespace) -> InferenceConfig:
    """InferenceConfig from its defaults <- the YAML file <- KEY=VALUE arguments <- flags; unknown keys fail."""
    if not args.config.is_file():
        configs = ", ".join(sorted(p.name for p in DEFAULT_CONFIG.parent.glob("*.yaml")))
        raise InputError(f"--config {args.config} does not exist; configs in configs/inference/: {configs}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise InputError(f"argument {bad[0]!r} is not KEY=VALUE (config overrides look like guidance_scale=3.0)")
    flags = {
        key: getattr(args, key)
        for key in ("preset", "prompt", "num_frames", "guidance_scale", "device", "dtype")
        if getattr(args, key) is not None
    }
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(InferenceConfig),
            OmegaConf.load(args.config),
            OmegaConf.from_dotlist(list(args.overrides)),
            flags,
        )
    except OmegaConfBaseException as e:
        raise InputError(f"--config {args.config}: {str(e).splitlines()[0]} (valid keys: InferenceConfig in "
                         "inference.py)") from e  # fmt: skip
    return OmegaConf.to_object(cfg)


def resolve_paths(cfg: InferenceConfig, args: argparse.Namespace) -> dict[str, Path]:
    """Asset paths: flags as given, config values under --models-dir or the repo root (paths_relative_to),
    absolute ones as they are."""
    if cfg.paths_relative_to not in PATH_BASES:
        raise InputError(f"paths_relative_to={cfg.paths_relative_to!r} (the config) is unknown: use "
                         f"{' or '.join(PATH_BASES)}")  # fmt: skip
    base = ROOT if cfg.paths_relative_to == "repo" else args.models_dir
    paths = {}
    for key in PATH_KEYS:
        flag_value = getattr(args, key)
        if flag_value is not None:
            paths[key] = flag_value.expanduser()
        elif getattr(cfg, key) is not None:
            value = Path(getattr(cfg, key)).expanduser()
            paths[key] = value if value.is_absolute() else base / value
    return paths


def require_file(paths: dict[str, Path], key: str, why: str, models_dir: Path | None) -> Path:
    """The path of an asset that must exist, or an error naming its flag and how to get it (models_dir: where
    download_models.py puts it; None: the repo ships it)."""
    flag, asset = PATH_KEYS[key]
    if key not in paths:
        raise InputError(f"{flag} is needed ({why}) and the config sets no '{key}': pass {flag} PATH")
    path = paths[key]
    if not path.exists():
        fetch = (f"fetch it with `python download_models.py {asset} --models-dir {models_dir}` or pass {flag} PATH"
                 if asset and models_dir is not None else f"pass the right path with {flag}")  # fmt: skip
        raise InputError(f"{flag} {path} does not exist ({why}): {fetch}")
    return path


# ----------------------------------------------------------------------------------------------------------
# Inputs: reference image, pose frames, reference pose
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PoseInput:
    """The pose clip, read as it is needed: `frames()` iterates uint8 [H, W, 3] frames from the first (memory does
    not grow with the clip); `first` is frame 0 (read up front, so a bad file fails before any work); `count` is
    the number of frames when it is known up front (None: the clip ends when its frames do)."""

    first: np.ndarray
    count: int | None
    frames: Callable[[], Iterator[np.ndarray]]

    @classmethod
    def of_array(cls, frames: np.ndarray) -> PoseInput:
        return cls(frames[0], len(frames), lambda: iter(frames))


@dataclass
class ClipInputs:
    """uint8 RGB arrays ref [H, W, 3] and ref_pose [H, W, 3] or None; the pose frames (read lazily); the prompt."""

    ref: np.ndarray
    pose: PoseInput
    ref_pose: np.ndarray | None
    prompt: str


def _read(flag: str, reader, path: Path, fix: str):
    """Call a reader; a missing or undecodable file becomes one line naming the flag, the file and the fix."""
    try:
        return reader(path)
    except (VideoReadError, FileNotFoundError, ValueError) as e:
        raise InputError(f"{flag}: {str(e).splitlines()[0]}; {fix}") from e


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _dwpose(paths: dict[str, Path], models_dir: Path, device: str) -> DWPoseDetector:
    det = require_file(paths, "det_onnx", "DWPose person detector", models_dir)
    pose = require_file(paths, "pose_onnx", "DWPose whole-body model", models_dir)
    return DWPoseDetector(det, pose, device=device)


def load_inputs(args: argparse.Namespace, cfg: InferenceConfig, paths: dict[str, Path]) -> ClipInputs:
    """The clip's inputs from the flags, or a synthetic clip when neither --ref nor a pose input is given."""
    if args.ref is None and args.pose is None and args.driving is None:
        return synthetic_inputs(cfg, args)
    if args.ref is None or (args.pose is None) == (args.driving is None):
        raise InputError("give --ref and exactly one of --pose / --driving (or none of them for a synthetic clip)")
    if cfg.prompt is None:
        raise InputError("--prompt is needed: the config sets prompt: null (the synthetic clip's own caption), and "
                         "--ref / --pose / --driving bring no caption")  # fmt: skip
    ref = _read("--ref", read_image, args.ref, "give a png/jpg image")
    height, width = ref.shape[:2]
    detector = None
    ref_keypoints: PoseSequence | None = None
    ref_pose = None
    if args.ref_pose is not None and _is_json(args.ref_pose):
        ref_keypoints = _read(
            "--ref-pose", load_keypoints, args.ref_pose, "give the JSON scripts/extract_pose.py wrote"
        )
    elif args.ref_pose is not None:
        ref_pose = _read("--ref-pose", read_image, args.ref_pose, "give a drawn pose image or a keypoints JSON")
        if ref_pose.shape != ref.shape:
            raise InputError(f"--ref-pose {args.ref_pose} is {ref_pose.shape[0]}x{ref_pose.shape[1]} but --ref "
                             f"{args.ref} is {height}x{width}: draw it at the reference's size")  # fmt: skip
    elif args.driving is not None:
        detector = _dwpose(paths, args.models_dir, "cpu")
        ref_keypoints = detector(ref[None])
    elif all(k in paths and paths[k].is_file() for k in ("det_onnx", "pose_onnx")):
        try:
            ref_keypoints = _dwpose(paths, args.models_dir, "cpu")(ref[None])
            log.info("reference pose: DWPose on %s", args.ref)
        except DWPoseUnavailable as e:  # the models are there but rtmlib/onnxruntime are not: pose-only input
            log.warning("%s", e)

    align_to = None if args.no_align else ref_keypoints
    if args.driving is not None:
        video = _read("--driving", FrameStream, args.driving, "give a video ffmpeg can decode (e.g. H.264 mp4)")
        keypoints = detect_keypoints(detector or _dwpose(paths, args.models_dir, "cpu"), video, "--driving")
        pose = drawn_pose(keypoints if align_to is None else align_pose(keypoints, align_to), height, width)
    elif _is_json(args.pose):
        keypoints = _read("--pose", load_keypoints, args.pose, "give the JSON scripts/extract_pose.py wrote")
        pose = drawn_pose(keypoints if align_to is None else align_pose(keypoints, align_to), height, width)
    else:
        stream = _read("--pose", FrameStream, args.pose,
                       "give a folder of pose images, a pose video ffmpeg can decode, or a keypoints JSON")  # fmt: skip
        pose = PoseInput(stream.first, stream.count, lambda: _checked_frames(stream, "--pose"))
    if ref_keypoints is not None:
        ref_pose = draw_pose_frames(ref_keypoints.select([0]), height, width)[0]
    if ref_pose is None:
        log.warning("no reference pose (--ref-pose, or DWPose models for --ref): pose-only input, the "
                    "reference-pose map stays zero")  # fmt: skip
    return ClipInputs(ref, pose, ref_pose, cfg.prompt)


def drawn_pose(keypoints: PoseSequence, height: int, width: int) -> PoseInput:
    """Keypoints (small, held whole) drawn a chunk of frames at a time as the clip plays."""
    if len(keypoints) == 0:
        raise InputError("the pose keypoints have no frames: give a clip with at least one frame")
    return PoseInput(draw_pose_frames(keypoints.select([0]), height, width)[0], len(keypoints),
                     lambda: iter_pose_frames(keypoints, height, width))  # fmt: skip


def detect_keypoints(detector: DWPoseDetector, video: FrameStream, flag: str, chunk: int = 16) -> PoseSequence:
    """DWPose over a video read a chunk at a time (only the keypoints, ~1 KB a frame, are kept)."""
    parts, frames = [], []
    for frame in _checked_frames(video, flag):
        frames.append(frame)
        if len(frames) == chunk:
            parts.append(detector(np.stack(frames)))
            frames = []
    if frames:
        parts.append(detector(np.stack(frames)))
    fields = ("body", "body_score", "hands", "hand_score")
    return PoseSequence(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields), parts[0].width,
                        parts[0].height)  # fmt: skip


def _checked_frames(stream: FrameStream, flag: str) -> Iterator[np.ndarray]:
    """A FrameStream whose read errors (a frame of another size, a broken file) name the flag."""
    try:
        yield from stream
    except (VideoReadError, OSError) as e:
        raise InputError(f"{flag}: {str(e).splitlines()[0]}") from e


def synthetic_clip(cfg: InferenceConfig, seed: int) -> SyntheticSample:
    """The synthetic world's clip (utils.world.synthetic_pose.SyntheticSample, with its ground-truth keypoints) that a
    run with --seed `seed` and no --ref / --pose generates from."""
    from pipeline.world import WORLD_CONFIG
    from utils.world.synthetic_pose import generate_sample, load_world_config

    clip = cfg.synthetic
    world = load_world_config(WORLD_CONFIG, height=clip.height, width=clip.width, num_frames=clip.num_frames)
    return generate_sample(world, seed if clip.seed is None else clip.seed)


def synthetic_inputs(cfg: InferenceConfig, args: argparse.Namespace) -> ClipInputs:
    """A clip of the synthetic pose world (figure video frame as the reference, its drawn pose); a config with
    prompt: null takes the clip's own caption as the prompt."""
    clip = cfg.synthetic
    sample = synthetic_clip(cfg, args.seed)
    prompt = sample.prompt if cfg.prompt is None else cfg.prompt
    log.info("no --ref / --pose: a synthetic %dx%d clip of %d frames, world seed %d (%s); prompt %r", clip.height,
             clip.width, clip.num_frames, args.seed if clip.seed is None else clip.seed, sample.prompt,
             prompt)  # fmt: skip
    return ClipInputs(sample.ref_image, PoseInput.of_array(sample.pose), sample.ref_pose, prompt)


def check_inputs(inputs: ClipInputs, args: argparse.Namespace, num_frames: int | None) -> int | None:
    """Validate sizes and lengths before any network is loaded; returns the number of video frames (None: a pose
    video whose length is known only at its end)."""
    ref = to_image_tensor(inputs.ref)
    pose = to_pose_tensor(inputs.pose.first[None])  # one frame: sizes only
    flag = "--driving" if args.driving is not None else "--pose"
    pose_source = args.pose or args.driving or "(synthetic clip)"
    have = inputs.pose.count
    if num_frames is None and have is not None:
        num_frames = (have - 1) // 4 * 4 + 1
    if num_frames is not None and num_frames < 1:
        raise InputError(f"--num-frames {num_frames} must be at least 1: use 1 + 4k frames (1, 5, 9, ..., 81)")
    if num_frames is not None and (num_frames - 1) % 4:
        below = (num_frames - 1) // 4 * 4 + 1
        raise InputError(f"--num-frames {num_frames} is not 1 + 4k: use {below} or {below + 4}")
    if have is not None and have < num_frames:
        raise InputError(f"{flag} {pose_source} has {have} frames but --num-frames is {num_frames}: give a longer "
                         f"pose clip or ask for at most {(have - 1) // 4 * 4 + 1} frames")  # fmt: skip
    try:
        check_clip_inputs(ref, pose, 1)
    except ValueError as e:
        raise InputError(f"--ref {args.ref or '(synthetic clip)'} / {flag} {pose_source}: {e}") from e
    return num_frames


def to_image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def to_pose_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 pose frames [F, H, W, 3] -> [1, 3, F, H, W] in 0..255, float; one image [H, W, 3] -> [1, 3, H, W]."""
    x = torch.from_numpy(np.array(frames)).float()
    return x.permute(2, 0, 1)[None] if x.dim() == 3 else x.permute(3, 0, 1, 2)[None]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video[0].float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------


def build_network(cfg: InferenceConfig, device: torch.device, dtype: torch.dtype, latent_frames: int | None = None):
    """The configured network; latent_frames (None: unknown) picks the long-clip window (window_overrides)."""
    overrides: dict = window_overrides(cfg, latent_frames)
    if cfg.guidance_embed:
        overrides["guidance_embed"] = True
    return build_model(cfg.preset, device=device, dtype=dtype, **overrides)


def window_overrides(cfg: InferenceConfig, latent_frames: int | None) -> dict[str, int]:
    """local_attn_size / sink_size for the network: the config's, else the long-clip window for a causal preset that
    attends globally when the clip is longer than the window + sink or of unknown length."""
    overrides = {k: getattr(cfg, k) for k in ("local_attn_size", "sink_size") if getattr(cfg, k) is not None}
    preset = PRESETS[cfg.preset]
    if preset.get("arch") != "causal" or "local_attn_size" in overrides or preset.get("local_attn_size", -1) > 0:
        return overrides
    window = cfg.long_clip_window + cfg.long_clip_sink
    if latent_frames is None or latent_frames > window:
        log.info("%s latent frames, more than the %d the %s preset attends to at once: streaming through a local "
                 "window of %d + a sink of %d (long_clip_window, long_clip_sink)",
                 "an unknown number of" if latent_frames is None else latent_frames, window, cfg.preset,
                 cfg.long_clip_window, cfg.long_clip_sink)  # fmt: skip
        overrides = {"local_attn_size": cfg.long_clip_window, "sink_size": cfg.long_clip_sink}
    return overrides


def required_files(cfg: InferenceConfig, paths: dict[str, Path], models_dir: Path) -> dict[str, Path]:
    """Every file the configured networks load, checked before anything is read or built."""
    fetch_dir = models_dir if cfg.paths_relative_to == "models_dir" else None  # repo: no download hint
    files = {"weights": require_file(paths, "weights", f"the {cfg.preset} checkpoint", fetch_dir)}
    needed = [("t5", "text encoder"), ("t5_tokenizer", "text tokenizer"), ("vae", "VAE")]
    if PRESETS[cfg.preset]["model_type"] == "i2v":
        needed.append(("clip", "image encoder of the i2v model"))
    if "pose_weights" in paths:
        needed.append(("pose_weights", "pose encoders"))
    files.update({key: require_file(paths, key, why, fetch_dir) for key, why in needed})
    for key in ("weights", "pose_weights"):
        if key in files:
            check_weight_files(files[key], PATH_KEYS[key][0])
    return files


def check_weight_files(path: Path, flag: str) -> None:
    """Read the header of every safetensors file the checkpoint consists of (no tensor data), so a truncated,
    random or text file fails here, naming it, before any network is built."""
    try:
        weight_files = resolve_checkpoint_files(_transformer_source(path))
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {path}: {str(e).splitlines()[0]}") from e
    for file in weight_files:
        if file.suffix != SAFETENSORS_SUFFIX:
            continue
        try:
            with open_safetensors(file):
                pass
        except ValueError as e:  # the message names the file and the fix
            raise InputError(f"{flag} {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise InputError(f"{flag} {file} cannot be read ({e}); check it or download it again") from None


def load_networks(cfg: InferenceConfig, files: dict[str, Path], text_cache: Path, device, dtype,
                  latent_frames: int | None = None):  # fmt: skip
    """(model, vae, text encoder, image encoder) from the checkpoint files (see required_files)."""
    model = build_network(cfg, device, dtype, latent_frames)
    # Pose encoders may be absent from the checkpoint only when --pose-weights supplies them.
    fresh = [f"{prefix}*" for prefix in POSE_PREFIXES] if "pose_weights" in files else []
    try:
        report = load_weights(model, files["weights"], allow_fresh=fresh, ema=cfg.ema)
    except CheckpointKeyError:
        raise
    except Exception as e:  # not a checkpoint at all (format, corrupt file; safetensors has its own error type)
        raise InputError(f"--weights {files['weights']}: {str(e).splitlines()[0]}; download or export it again") from e
    if any(key.startswith(POSE_PREFIXES) for key in report.fresh_init):
        load_pose_weights(model, files["pose_weights"])
    vae = WanVAE(files["vae"], device=device, dtype=dtype)
    text_encoder = CachedTextEncoder(text_cache, files["t5"], files["t5_tokenizer"], device=device, dtype=dtype,
                                     text_len=model.text_len)  # fmt: skip
    image_encoder = ImageEncoder(files["clip"], device=device, dtype=dtype) if "clip" in files else None
    return model.eval().requires_grad_(False), vae, text_encoder, image_encoder


def random_networks(cfg: InferenceConfig, folder: Path, device, dtype, seed: int = 0, latent_frames: int | None = None):
    """The network and tiny VAE / T5 / CLIP (the test suite's tiny configs, sized to the network's inputs) with
    random weights from `seed`, built in memory, saved to `folder` and loaded through the same loaders as real
    weights."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from utils.encoders.tiny_assets import TINY_VAE_CONFIG, make_tokenizer, tiny_clip_config, tiny_umt5_config

    torch.manual_seed(seed)
    model = build_network(cfg, device, dtype, latent_frames)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * RANDOM_STD)
    t5_config = tiny_umt5_config()
    t5_config.d_model = model.text_dim
    UMT5EncoderModel(t5_config).save_pretrained(folder / "text_encoder")
    make_tokenizer(folder / "tokenizer")
    text_encoder = CachedTextEncoder(folder / "text_cache", folder / "text_encoder", folder / "tokenizer",
                                     device=device, dtype=dtype, text_len=model.text_len)  # fmt: skip
    AutoencoderKLWan(**TINY_VAE_CONFIG).save_pretrained(folder / "vae")  # random weights from the seed above
    vae = WanVAE(folder / "vae", device=device, dtype=dtype)
    image_encoder = None
    if model.model_type == "i2v":
        clip_config = tiny_clip_config()
        clip_config.hidden_size = model.clip_dim
        CLIPVisionModel(clip_config).save_pretrained(folder / "image_encoder")
        image_encoder = ImageEncoder(folder / "image_encoder", device=device, dtype=dtype)
    return model.eval().requires_grad_(False), vae, text_encoder, image_encoder


def make_pipeline(cfg: InferenceConfig, model: WanModel, vae, text_encoder, image_encoder) -> PosePipeline:
    """The streaming student for causal networks, the teacher sampler for bidirectional ones."""
    if isinstance(model, CausalWanModel):
        return StreamingPosePipeline(model, vae, text_encoder, image_encoder, cfg.denoising_steps,
                                     cfg.guidance_scale, cfg.negative_prompt)  # fmt: skip
    return TeacherPosePipeline(model, vae, text_encoder, image_encoder, cfg.num_steps, cfg.shift,
                               cfg.guidance_scale, cfg.negative_prompt, progress=True, solver=cfg.solver)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, float]:
    """Generate the clip and write it; returns the timings (seconds) and FPS."""
    cfg = load_config(args)
    check_outputs(args)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.preset not in PRESETS:
        raise InputError(f"preset {cfg.preset!r} (--preset or the config) is unknown; presets: {sorted(PRESETS)}")
    if cfg.solver not in SAMPLERS:
        raise InputError(f"solver={cfg.solver!r} (the config) is unknown; teacher samplers: {list(SAMPLERS)}")
    paths = resolve_paths(cfg, args)
    if cfg.random_weights and "weights" in paths:
        raise InputError("random_weights is set (the demo config): drop --weights, or pick a config for real weights")
    files = {} if cfg.random_weights else required_files(cfg, paths, args.models_dir)  # before any loading
    inputs = load_inputs(args, cfg, paths)
    num_frames = check_inputs(inputs, args, cfg.num_frames)

    with contextlib.ExitStack() as outputs:  # one writer per output; a killed run's partial files are removed
        for flag, path in (("--out", args.out), ("--preview", args.preview)):
            if path is not None:
                try:
                    outputs.enter_context(output_lock(path, flag))
                except LockHeldError as e:
                    raise InputError(str(e)) from None
        return generate(args, cfg, paths, files, inputs, num_frames, device, dtype)


def generate(args, cfg: InferenceConfig, paths, files, inputs: ClipInputs, num_frames: int | None, device,
             dtype) -> dict:  # fmt: skip
    """Load the networks, stream the clip and write the outputs (run's checks done, outputs locked). The student
    reads the pose as it goes and writes each block's frames as they are decoded (memory does not grow with the
    clip); the files appear, atomically, when the clip is done."""
    start = time.perf_counter()
    latent_frames = None if num_frames is None else (num_frames - 1) // 4 + 1
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        if cfg.random_weights:
            log.warning("random_weights: the %s network, VAE, text and image encoders have RANDOM weights; the "
                        "output is noise, not a video", cfg.preset)  # fmt: skip
            networks = random_networks(cfg, Path(scratch), device, dtype, latent_frames=latent_frames)
        else:
            text_cache = paths.get("text_cache", Path(scratch) / "text_cache")
            networks = load_networks(cfg, files, text_cache, device, dtype, latent_frames)
        pipeline = make_pipeline(cfg, *networks)
        load_s = time.perf_counter() - start

        start = time.perf_counter()
        shown: deque[np.ndarray] = deque()  # pose frames read ahead of the preview (a few blocks at most)

        def pose_frames() -> Iterator[np.ndarray]:
            for frame in inputs.pose.frames():
                if args.preview:
                    shown.append(frame)
                yield frame

        ref = to_image_tensor(inputs.ref)
        ref_pose = None if inputs.ref_pose is None else to_pose_tensor(inputs.ref_pose)
        streaming = isinstance(pipeline, StreamingPosePipeline) and pipeline.model.pose_dim is not None
        if streaming:
            clip = pipeline.prepare_stream(ref, pose_frames(), inputs.prompt, ref_pose, max_frames=num_frames)
        else:  # the teacher samples the whole clip at once
            pose = np.stack(list(itertools.islice(pose_frames(), num_frames)))
            clip = pipeline.prepare(ref, to_pose_tensor(pose), inputs.prompt, num_frames, ref_pose)
        prepare_s = time.perf_counter() - start

        num_blocks = 1
        if isinstance(pipeline, StreamingPosePipeline):
            n = pipeline.model.num_frame_per_block
            num_blocks = None if latent_frames is None else -(-latent_frames // n)
        log.info("%s: %s frames at %dx%d, %s block(s), seed %d, guidance %.2f", cfg.preset, num_frames or "all",
                 *inputs.ref.shape[:2], num_blocks or "all", args.seed, cfg.guidance_scale)  # fmt: skip
        block_times, written = [], 0
        start = time.perf_counter()
        with contextlib.ExitStack() as writers:
            out = writers.enter_context(VideoWriter(args.out, cfg.fps))
            preview = writers.enter_context(VideoWriter(args.preview, cfg.fps)) if args.preview else None
            for block in tqdm(pipeline.stream(clip, args.seed), total=num_blocks, desc="blocks", unit="block"):
                video = to_uint8_frames(block.frames)  # copies to the host: the block is really done
                out.write(video)
                if preview is not None:
                    pose = np.stack([shown.popleft() for _ in range(len(video))])
                    preview.write(np.concatenate([pose, video], axis=2))
                written += len(video)
                block_times.append(time.perf_counter() - start)
            if not written:
                raise InputError(f"{'--driving' if args.driving else '--pose'}: the pose clip has no frames")
    stats = {
        "load_s": load_s, "conditioning_s": prepare_s, "first_block_s": block_times[0],
        "generation_s": block_times[-1], "fps": written / block_times[-1],
    }  # fmt: skip
    log.info("wrote %s (%d frames, %dx%d, %g fps)%s", args.out, written, *inputs.ref.shape[:2], cfg.fps,
             f" and {args.preview}" if args.preview else "")  # fmt: skip
    log.info("generation %.3f s for %d frames = %.1f FPS (diffusion + VAE decode); first block after %.3f s; "
             "conditioning %.3f s; loading %.1f s", stats["generation_s"], written, stats["fps"],
             stats["first_block_s"], prepare_s, load_s)  # fmt: skip
    return stats


def resolve_device(name: str) -> torch.device:
    """--device (or the config's) as a torch device that exists here; auto picks cuda when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, CUDA "
                             f"{torch.version.cuda or 'not built in'}): use --device cpu")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible: use "
                             "cuda:0 (or set CUDA_VISIBLE_DEVICES)")  # fmt: skip
    return device


def check_outputs(args: argparse.Namespace) -> None:
    """--out and --preview: mp4 paths that can be written, checked before anything is loaded or generated."""
    for flag, path in (("--out", args.out), ("--preview", args.preview)):
        if path is None:
            continue
        if path.suffix.lower() != ".mp4":
            raise InputError(f"{flag} {path}: the output is an mp4 video; give a path ending in .mp4")
        try:
            check_output_path(path, flag, file=True)
        except ValueError as e:
            raise InputError(str(e)) from None
    if args.preview is not None and args.preview.absolute() == args.out.absolute():
        raise InputError(f"--preview {args.preview} is also --out: give the side-by-side preview another path")


def remove_stale_scratch() -> None:
    """Temp folders of runs that were killed (kill -9 skips every cleanup)."""
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}(\d+)-")
    try:
        entries = list(Path(tempfile.gettempdir()).iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not process_alive(int(match.group(1))):
            log.info("removing %s, the temp folder of a run that died", entry)
            shutil.rmtree(entry, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exit_on_sigterm()  # SIGTERM cleans up (temp folder, partial outputs, locks) like Ctrl-C
    remove_stale_scratch()
    try:
        run(args)
    except InputError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    except (CheckpointKeyError, DWPoseUnavailable, VideoReadError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
