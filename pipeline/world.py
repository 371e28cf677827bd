"""The synthetic world as a test bench: its clips encoded into the batch layout (toy VAE, world encoders), a
network's samples of held-out clips (the teacher's UniPC + CFG, the student's few-step stream) and their scores
against exact ground truth (pose PCK / L2 through the marker detector, PSNR, SSIM, flicker: utils/metrics.py).
Shared by scripts/make_toy_dataset.py, scripts/evaluate_world.py and the trainer's evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.conditions import cfg_conditions, conditions, image_condition, latent_shape
from pipeline.rollout import DEFAULT_STEPS, is_guided, sample_latents, stream_latents
from utils.data import to_contract
from utils.metrics import evaluate_clip, keypoint_metrics, psnr, ssim
from utils.world.synthetic_pose import SyntheticSample, detect_markers, generate_sample, load_world_config
from wan.modules.causal_model import CausalWanModel

ROOT = Path(__file__).resolve().parents[1]
WORLD_CONFIG = ROOT / "configs" / "toy" / "world.yaml"
TOY_VAE = ROOT / "assets" / "toy_vae"
WORLD_ENCODERS = ROOT / "assets" / "world_encoders"
Y_CHANNELS = 20  # Wan I2V: 4 mask channels + 16 latent channels
# Seed ranges of the world's clips (never mixed): training, validation (evaluation while training), test (results).
TRAIN_SEED, VAL_SEED, TEST_SEED = 1_000_000, 2_000_000, 10_000_000
MARKER_TOLERANCE = 40  # colour tolerance of the exact detector on decoded frames (as scripts/evaluate.py)


@dataclass
class ClipEncoders:
    """The frozen encoders a training sample is made with."""

    vae: nn.Module
    image_encoder: nn.Module
    text_encoder: Callable[[list[str]], torch.Tensor]
    negative_prompt: str


def world_encoders(
    device: torch.device | str,
    vae: Path = TOY_VAE,
    encoders: Path = WORLD_ENCODERS,
    text_cache: Path | None = None,
    text_len: int = 32,
    negative_prompt: str = "",
) -> ClipEncoders:
    """The world's toy VAE and text / image encoders (assets/), fp32; prompts cached in text_cache if given."""
    from utils.encoders.text_cache import CachedTextEncoder
    from utils.encoders.wan_wrapper import ImageEncoder, TextEncoder, WanVAE

    dtype = torch.float32
    if text_cache is None:
        text = TextEncoder(encoders / "text_encoder", encoders / "tokenizer", device=device, dtype=dtype,
                           text_len=text_len)  # fmt: skip
    else:
        text = CachedTextEncoder(text_cache, encoders / "text_encoder", encoders / "tokenizer", device=device,
                                 dtype=dtype, text_len=text_len)  # fmt: skip
    return ClipEncoders(
        vae=WanVAE(vae, device=device, dtype=dtype),
        image_encoder=ImageEncoder(encoders / "image_encoder", device=device, dtype=dtype),
        text_encoder=text,
        negative_prompt=negative_prompt,
    )


@torch.no_grad()
def encode_clips(enc: ClipEncoders, clips: Sequence[tuple]) -> list[dict[str, torch.Tensor]]:
    """Training samples (batch layout of trainer/objective.py, on the CPU) from clips in the data contract, each
    (video [3, F, H, W] in [-1, 1], ref_image [3, H, W], pose [3, F, H, W] and ref_pose [3, H, W] in 0..255,
    prompt, ref_choices): one batched VAE / CLIP call for all of them (the VAE's chunked encode is bound by kernel
    launches at small sizes, so batching is what makes it fast).

    ref_choices: alternate (reference image, its pose) pairs, stored as ref_choices_{y, clip_fea, ref_pose}
    [K, ...] (the teacher stage draws one per step).
    """
    device = next(enc.vae.parameters()).device
    videos = torch.stack([c[0] for c in clips]).to(device)  # [N, 3, F, H, W]
    frames = videos.shape[2]
    refs = [c[1] for c in clips] + [r for c in clips for r, _ in c[5]]  # own references, then the alternates
    refs = torch.stack(refs).to(device)  # [N + sum K, 3, H, W]
    latents = enc.vae.encode(videos)  # [N, 16, F_lat, H/8, W/8]
    ys = image_condition(enc.vae, refs, frames, Y_CHANNELS)  # [N + sum K, 20, F_lat, H/8, W/8]
    clip_fea = enc.image_encoder(refs)  # [N + sum K, L_clip, clip_dim]
    neg_context = enc.text_encoder([enc.negative_prompt])[0]
    contexts = enc.text_encoder([c[4] for c in clips])  # [N, text_len, text_dim]
    samples, alt = [], len(clips)
    for i, (_, _, pose, ref_pose, _, choices) in enumerate(clips):
        sample = {
            "latents": latents[i], "y": ys[i], "clip_fea": clip_fea[i], "context": contexts[i],
            "neg_context": neg_context, "pose": pose.round().to(torch.uint8),  # [3, F, H, W]
            "ref_pose": ref_pose.round().to(torch.uint8),  # [3, H, W]
        }  # fmt: skip
        if choices:
            k = len(choices)
            sample["ref_choices_y"], sample["ref_choices_clip_fea"] = ys[alt : alt + k], clip_fea[alt : alt + k]
            sample["ref_choices_ref_pose"] = torch.stack([p for _, p in choices]).round().to(torch.uint8)
            alt += k
        samples.append({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                        for k, v in sample.items()})  # fmt: skip
    return samples


@dataclass
class HeldOutClip:
    """One world clip for evaluation: the rendered sample (ground truth) and its encoded conditions."""

    seed: int
    world: SyntheticSample
    batch: dict[str, torch.Tensor]  # the training-sample layout, batch of 1, on the CPU


def held_out_clips(enc: ClipEncoders, seeds: Sequence[int], world_config: Path = WORLD_CONFIG, **overrides) -> list:
    """The world clips of `seeds` with their conditions (deterministic: same seeds, same clips)."""
    config = load_world_config(world_config, **overrides)
    out = []
    for seed in seeds:
        s = generate_sample(config, seed)
        clip = to_contract(s.video, s.pose, s.ref_image, s.ref_pose, s.prompt, str(seed))
        sample = encode_clips(enc, [(clip["video"], clip["ref_image"], clip["pose"], clip["ref_pose"],
                                     clip["prompt"], ())])[0]  # fmt: skip
        batch = {k: (v.float() if v.dtype == torch.uint8 else v)[None] for k, v in sample.items()}
        out.append(HeldOutClip(seed, s, batch))
    return out


@dataclass(frozen=True)
class Sampler:
    """How a network samples a clip: the teacher's solver (UniPC, Euler or few-step) + CFG over the whole clip
    (bidirectional models), or the student's few-step block stream (causal models, `steps`)."""

    num_steps: int = 50
    guidance: float = 1.5
    shift: float = 5.0
    steps: tuple[float, ...] = tuple(DEFAULT_STEPS)
    solver: str = "unipc"

    def nfe(self, model: nn.Module) -> int:
        """Network evaluations per latent frame, as papers count them (CFG counts twice, once for a CFG-distilled
        model): the teacher's steps over the whole clip; the student's steps per block (each forward sees one
        block; the clean-context pass that writes the cache is not counted)."""
        cfg = 2 if self.guidance != 1.0 and not is_guided(model) else 1
        return (len(self.steps) if isinstance(model, CausalWanModel) else self.num_steps) * cfg


@torch.no_grad()
def sample_clip(model: nn.Module, batch: dict[str, torch.Tensor], sampler: Sampler, seed: int,
                use_pose: bool = True) -> torch.Tensor:  # fmt: skip
    """Clean latents [B, 16, F, H, W] of the network for a batch (on the network's device); use_pose=False zeroes
    the pose tokens and the ref-pose map (the pose-ablation row)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    generator = torch.Generator(device).manual_seed(seed)
    if use_pose:
        cond, uncond = cfg_conditions(model, batch, sampler.guidance)
    else:
        cond = conditions(model, batch, use_pose=False)
        uncond = cond.unconditional(batch["neg_context"]) if sampler.guidance != 1.0 else None
    shape = latent_shape(model, batch)
    if isinstance(model, CausalWanModel):
        blocks = stream_latents(model, cond, shape[2], shape[3:], sampler.steps, generator=generator, uncond=uncond,
                                guidance_scale=sampler.guidance)  # fmt: skip
        return torch.cat([b for _, b in blocks], dim=2)
    return sample_latents(model, cond, shape, sampler.num_steps, sampler.shift, sampler.guidance, uncond, generator,
                          solver=sampler.solver)  # fmt: skip


def to_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (rounded as the mp4 writer does)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def detector() -> Callable[[np.ndarray], object]:
    """The exact marker detector at the tolerance decoded frames need."""
    return partial(detect_markers, tolerance=MARKER_TOLERANCE)


def score(frames: np.ndarray, clip: HeldOutClip) -> dict:
    """utils.metrics.evaluate_clip of decoded frames against the clip's driving pose and ground-truth video,
    with the PCK of every frame (`pck_per_frame`)."""
    return evaluate_clip(frames, clip.world.keypoints, detector(), clip.world.video, per_frame=True)


def agreement(frames: np.ndarray, reference: np.ndarray) -> dict:
    """Student-teacher agreement: the pose detected in `frames` against the pose detected in the teacher's own
    sample of the clip (`reference`, same shape), and PSNR / SSIM between the two; keys prefixed `agree_`."""
    if frames.shape != reference.shape:
        raise ValueError(f"frames {frames.shape} and the reference sample {reference.shape} differ in shape")
    _, h, w, _ = frames.shape
    detect = detector()
    pose = keypoint_metrics(detect(reference), detect(frames), w, h)
    out = {f"agree_{k}": v for k, v in pose.items()}
    return out | {"agree_psnr": psnr(frames, reference), "agree_ssim": ssim(frames, reference)}


def mean_scores(rows: list[dict]) -> dict:
    """Mean of every metric over clips (NaN-skipping: e.g. a clip with no visible joint has no PCK)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != "seed"]
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
