"""Train a tiny Wan VAE (diffusers AutoencoderKLWan: strides 4 x 8 x 8, z 16) on the synthetic pose world.

    python scripts/train_toy_vae.py --out runs/toy_vae [--config configs/toy/vae.yaml] [steps=3000 ...]
    python scripts/train_toy_vae.py --out /tmp/vae_smoke --smoke      # 2 CPU steps on tiny clips
    python scripts/train_toy_vae.py --out runs/toy_vae max_minutes=8   # stops at a checkpoint; rerun to resume
    python scripts/train_toy_vae.py --out runs/next init_from=assets/toy_vae steps=6000   # another round

The committed assets/toy_vae/ and the six rounds that made it: docs/results/toy_vae.md.

Training state is saved every `save_every` steps to OUT/train_state.pt (atomically); a rerun with the same --out
resumes exactly (clips and noise are functions of the step). With export_on_stop=true a run stopped by max_minutes
also evaluates and exports the weights it has (metrics.json says "complete": false).

Clips are generated on the fly (train seeds seed + i; held-out seeds from HELD_OUT_SEED). Loss: MSE (plus
l1_weight * L1) of the reconstruction of a posterior sample, joint-marker pixels weighted marker_weight times, plus
kl_weight * KL. At the end the posterior means of the held-out clips give per-channel latent mean/std (latents are
normalised as (mu - mean) / std, as for Wan2.1) and the held-out PSNR of decode(mu). Writes OUT/vae/ (config.json
with latents_mean/latents_std + diffusion_pytorch_model.safetensors, loadable with
AutoencoderKLWan.from_pretrained), OUT/latent_stats.json and OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/train_toy_vae.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import ConfigKeyError  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.atomic_io import atomic_output  # noqa: E402
from utils.dist import all_reduce_mean, average_gradients, barrier, destroy, init_distributed  # noqa: E402
from utils.encoders.wan_vae_parallel import decode, encode_moments  # noqa: E402
from utils.metrics import psnr  # noqa: E402
from utils.safetensors_io import load_file  # noqa: E402
from utils.world.synthetic_pose import (  # noqa: E402
    COLOR_PACK,
    MARKER_CODES,
    WorldConfig,
    generate_sample,
    load_world_config,
    pixel_regions,
)

logger = logging.getLogger("train_toy_vae")
ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 10_000_000
SMOKE = {
    "steps": 2,
    "batch_size": 1,
    "num_frames": 5,
    "height": 64,
    "width": 64,
    "eval_clips": 1,
    "num_workers": 0,
    "log_every": 1,
    "warmup": 1,
    "save_every": 1,
    "eval_every": 0,
    "crop": None,
    "crops_per_clip": 1,
    "eval_frames": 9,
    "amp": None,
    "compile": None,
    "device": "cpu",
}


def load_config(path: Path, overrides: Sequence[str], smoke: bool) -> DictConfig:
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)  # an override of an unknown key is an error
    if smoke:
        cfg = OmegaConf.merge(cfg, SMOKE)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as e:
        raise ValueError(f"unknown key '{e.full_key}' in overrides; the keys of {path} are {list(cfg)}") from e


class WorldClips(Dataset):
    """Videos of the synthetic world: item i -> [3, F, H, W] float in [-1, 1] from seed base + i.

    With `crop`, a crop x crop window at a position drawn from the clip's seed (fully convolutional training on
    smaller windows; evaluation uses whole frames); with `crops` > 1, that many windows of the same clip
    stacked [crops, 3, F, crop, crop] (rendering a clip costs more than a training step spends on one window).
    `index` maps the dataset position to the clip number, so each rank of a data-parallel run reads its own
    share of every global batch.
    """

    def __init__(
        self, world: WorldConfig, length: int, base: int, crop: int | None = None, index=None, crops: int = 1
    ) -> None:
        if crops > 1 and crop is None:
            raise ValueError("crops > 1 needs a crop size")
        self.world, self.length, self.base, self.crop, self.index, self.crops = world, length, base, crop, index, crops

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        seed = self.base + (self.index(i) if self.index is not None else i)
        video = generate_sample(self.world, seed, draw_pose=False).video
        if self.crop is not None:
            rng = np.random.default_rng([seed, 7])
            windows = []
            for _ in range(self.crops):
                y = int(rng.integers(0, video.shape[1] - self.crop + 1))
                x = int(rng.integers(0, video.shape[2] - self.crop + 1))
                windows.append(video[:, y : y + self.crop, x : x + self.crop])
            video = windows[0] if self.crops == 1 else np.stack(windows)
        clip = torch.from_numpy(np.ascontiguousarray(video)).float() / 127.5 - 1.0  # [(K,) F, H, W, 3]
        return clip.movedim(-1, -4)  # [(K,) 3, F, H, W]


class _RankShare:
    """Dataset position -> global clip number: rank r takes items [r*b, (r+1)*b) of each global batch."""

    def __init__(self, first_step: int, global_batch: int, rank: int, world: int) -> None:
        self.first, self.gb, self.rank, self.local = first_step, global_batch, rank, global_batch // world

    def __call__(self, i: int) -> int:
        step, j = divmod(i, self.local)
        return (self.first + step) * self.gb + self.rank * self.local + j


def build_vae(cfg: DictConfig) -> AutoencoderKLWan:
    vae = AutoencoderKLWan(
        base_dim=cfg.vae.base_dim,
        z_dim=cfg.vae.z_dim,
        dim_mult=list(cfg.vae.dim_mult),
        num_res_blocks=cfg.vae.num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    if cfg.vae.init_logvar is not None:
        # diffusers' init gives the posterior std ~1, so early latents carry little signal above the sampling noise
        # (and with a KL weight of 1e-6 the logvar bias takes ~1e4 Adam steps to come down). Start it small.
        with torch.no_grad():
            vae.quant_conv.weight[cfg.vae.z_dim :].zero_()
            vae.quant_conv.bias[cfg.vae.z_dim :].fill_(float(cfg.vae.init_logvar))
    return vae


def _res_blocks_of(weights: dict) -> int:
    """num_res_blocks of a Wan VAE state dict (the decoder's first up block holds num_res_blocks + 1 resnets)."""
    prefix = "decoder.up_blocks.0.resnets."
    return len({k[len(prefix) :].split(".")[0] for k in weights if k.startswith(prefix)}) - 1


def _encoder_layout(levels: int, n: int) -> tuple[dict, dict]:
    """Flat indices of encoder.down_blocks: {(level, j): index} of the resblocks, {level: index} of the resamples."""
    res, resample, i = {}, {}, 0
    for level in range(levels):
        for j in range(n):
            res[level, j], i = i, i + 1
        if level < levels - 1:
            resample[level], i = i, i + 1
    return res, resample


def grow_res_blocks(weights: dict, vae: AutoencoderKLWan) -> tuple[dict, list[str]]:
    """Map a state dict with fewer res blocks per level onto `vae` (more per level): every trained block keeps its
    place, the extra ones keep `vae`'s fresh weights with their last conv zeroed, so they start as the identity
    (x + 0) and the grown network computes exactly what the source computed. Returns the new state dict and the
    prefixes of the new blocks."""
    levels, n_new, n_old = len(vae.config.dim_mult), vae.config.num_res_blocks, _res_blocks_of(weights)
    old_res, old_resample = _encoder_layout(levels, n_old)
    new_res, new_resample = _encoder_layout(levels, n_new)
    rename = {f"encoder.down_blocks.{old_res[key]}.": f"encoder.down_blocks.{new_res[key]}." for key in old_res}
    rename.update(
        {f"encoder.down_blocks.{old_resample[v]}.": f"encoder.down_blocks.{new_resample[v]}." for v in old_resample}
    )
    out = {}
    for k, v in weights.items():
        if k.startswith("encoder.down_blocks."):
            head = ".".join(k.split(".")[:3]) + "."
            k = rename[head] + k[len(head) :]
        out[k] = v
    fresh = vae.state_dict()
    added = [f"encoder.down_blocks.{new_res[lv, j]}." for lv in range(levels) for j in range(n_old, n_new)]
    added += [f"decoder.up_blocks.{lv}.resnets.{j}." for lv in range(levels) for j in range(n_old + 1, n_new + 1)]
    for prefix in added:
        for k, v in fresh.items():
            if k.startswith(prefix):
                out[k] = torch.zeros_like(v) if k.startswith(prefix + "conv2.") else v.clone()
    return out, added


def init_weights(vae: AutoencoderKLWan, path: Path) -> None:
    """Load an exported VAE (a folder with diffusion_pytorch_model.safetensors, or that file) into `vae`:
    strict, with the missing and unexpected keys named when they differ. A source with fewer res blocks per
    level (vae.num_res_blocks) is grown into `vae` (grow_res_blocks: the new blocks start as the identity)."""
    file = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise ValueError(f"init_from={str(path)!r}: no {file.name} there; point it at an exported OUT/vae folder")
    weights = load_file(file)
    n_old, n_new = _res_blocks_of(weights), vae.config.num_res_blocks
    if 1 <= n_old < n_new:
        weights, added = grow_res_blocks(weights, vae)
        logger.info(
            "grew %s from %d to %d res blocks per level: %d new blocks start as the identity",
            file,
            n_old,
            n_new,
            len(added),
        )
    own = vae.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"init_from={str(path)!r} does not fit the configured VAE: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); use the vae.* settings it was trained with"
        )
    bad = [k for k in own if own[k].shape != weights[k].shape]
    if bad:
        raise ValueError(
            f"init_from={str(path)!r}: shapes differ for {bad[:5]}; use the vae.* settings it was trained with"
        )
    vae.load_state_dict({k: v.float() for k, v in weights.items()})
    logger.info("initialised the VAE from %s (%d tensors)", file, len(weights))


def marker_mask(video: torch.Tensor) -> torch.Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> bool [B, 1, F, H, W]: pixels in a joint-marker colour of the world."""
    rgb = ((video + 1) * 127.5).round().to(torch.int32)
    code = rgb[:, :1] * int(COLOR_PACK[0]) + rgb[:, 1:2] * int(COLOR_PACK[1]) + rgb[:, 2:]  # as COLOR_PACK packs
    return torch.isin(code, _marker_codes(video.device))


@functools.lru_cache
def _marker_codes(device: torch.device) -> torch.Tensor:
    """MARKER_CODES on `device`, made once (not a host-to-device copy every step)."""
    return torch.as_tensor(MARKER_CODES, device=device)


def weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(weight * x) / sum(weight), weight broadcast over x's channel dim (x [B, C, ...], weight [B, 1, ...])."""
    return (weight * x).sum() / (weight.sum() * x.shape[1])


def vae_loss(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    kl_weight: float,
    amp: torch.dtype | None = None,
    l1_weight: float = 1.0,
    mse_weight: float = 1.0,
    marker_weight: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """video [B, 3, F, H, W] in [-1, 1] -> loss and its parts (the network under autocast to `amp` if given).

    loss = l1_weight * L1 + mse_weight * MSE + kl_weight * KL, where pixels of the joint markers count
    `marker_weight` times in L1 and MSE (a weighted mean; the logged parts are the plain means).
    """
    # the whole-clip forward (utils.encoders.wan_vae_parallel): equal to vae.encode / vae.decode, without their
    # per-chunk kernel launches (those made training launch-bound: ~3 steps/s for any model size)
    with torch.autocast(video.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        posterior = DiagonalGaussianDistribution(encode_moments(vae, video))  # [B, z, 1 + (F-1)/4, H/8, W/8]
        # unclamped: diffusers clamps to [-1, 1], which zeroes the gradient of every pixel that overshoots, so
        # saturated colours (common in the world) get stuck (evaluation and export decode with the clamp)
        recon = decode(vae, posterior.sample(), clamp=False)
    recon, posterior.mean, posterior.var, posterior.logvar = (
        t.float() for t in (recon, posterior.mean, posterior.var, posterior.logvar)
    )
    err = recon - video
    l1, mse = err.abs().mean(), err.pow(2).mean()
    if marker_weight != 1.0:
        weight = 1.0 + (marker_weight - 1.0) * marker_mask(video).float()  # [B, 1, F, H, W]
        fit = l1_weight * weighted_mean(err.abs(), weight) + mse_weight * weighted_mean(err.pow(2), weight)
    else:
        fit = l1_weight * l1 + mse_weight * mse
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return fit + kl_weight * kl, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def evaluate(vae: AutoencoderKLWan, clips: Dataset, device: torch.device) -> dict:
    """Held-out PSNR of decode(mu) and the per-channel mean/std of mu over all held-out latents."""
    vae.eval()
    mus, scores = [], []
    region_se = {"marker": 0.0, "edge": 0.0, "flat": 0.0}
    region_n = dict.fromkeys(region_se, 0)
    for i in range(len(clips)):
        video = clips[i][None].to(device)
        mu = vae.encode(video).latent_dist.mean  # [1, z, f, h, w]
        recon, truth = to_uint8(vae.decode(mu).sample[0]), to_uint8(video[0])
        scores.append(psnr(recon, truth))
        se = ((recon.astype(np.float64) - truth) ** 2).mean(-1)  # [F, H, W]
        for name, mask in pixel_regions(truth).items():
            region_se[name] += float(se[mask].sum())
            region_n[name] += int(mask.sum())
        mus.append(mu.transpose(0, 1).flatten(1).double().cpu())  # [z, f*h*w]
    vae.train()
    mu = torch.cat(mus, 1)
    total = sum(region_se.values())
    regions = {
        name: {
            "pixels": region_n[name] / sum(region_n.values()),
            "share_of_error": region_se[name] / total if total else 0.0,
            "psnr": 10 * math.log10(255.0**2 * region_n[name] / region_se[name]) if region_se[name] else math.inf,
        }
        for name in region_se
        if region_n[name]
    }
    return {
        "psnr": float(np.mean(scores)),
        "regions": regions,
        "latents_mean": mu.mean(1).tolist(),
        "latents_std": mu.std(1).tolist(),
    }


def save_state(path: Path, vae: AutoencoderKLWan, opt: torch.optim.Optimizer, step: int) -> None:
    """Training state after `step` steps, written atomically."""
    with atomic_output(path, overwrite=True) as tmp:
        torch.save({"vae": vae.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)


def lr_at(step: int, cfg: DictConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, args.smoke)
    world_path = Path(cfg.world) if Path(cfg.world).is_absolute() else ROOT / cfg.world
    world = load_world_config(world_path, num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)
    eval_world = load_world_config(world_path, num_frames=cfg.eval_frames, height=cfg.height, width=cfg.width)
    info = init_distributed(cfg.device)
    device = info.device
    amp = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, "bad")
    if amp == "bad":
        raise ValueError(f"amp={cfg.amp!r}: use bf16, fp16 or null (fp32)")
    if cfg.export_dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"export_dtype={cfg.export_dtype!r}: use fp32, fp16 or bf16")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("config asks for device cuda but no GPU is visible; pass device=cpu (slow) or --smoke")
    if cfg.batch_size % (info.world_size * cfg.crops_per_clip):
        raise ValueError(
            f"batch_size={cfg.batch_size} (global) must be divisible by the {info.world_size} rank(s) x "
            f"crops_per_clip={cfg.crops_per_clip}"
        )
    if cfg.compile not in (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs"):
        raise ValueError(
            f"compile={cfg.compile!r}: use null (eager), default, reduce-overhead (CUDA graphs: fixed shapes, fewer "
            "kernel launches) or max-autotune-no-cudagraphs"
        )
    if cfg.crops_per_clip > 1 and cfg.crop is None:
        raise ValueError("crops_per_clip > 1 needs crop (a window size); set crop=64 or crops_per_clip=1")
    if cfg.crop is not None and not (8 <= cfg.crop <= min(cfg.height, cfg.width) and cfg.crop % 8 == 0):
        raise ValueError(f"crop={cfg.crop}: use a multiple of 8 no larger than the frame ({cfg.height}x{cfg.width})")
    if not info.is_main:
        logger.setLevel(logging.WARNING)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    vae = build_vae(cfg).to(device).train()
    n_params = sum(p.numel() for p in vae.parameters())
    logger.info(
        "VAE %.2fM parameters (%.1f MB fp32); clips %dx%dx%d%s, global batch %d over %d rank(s)",
        n_params / 1e6,
        n_params * 4 / 1e6,
        cfg.num_frames,
        world.height,
        world.width,
        f" cropped to {cfg.crop}x{cfg.crop}" if cfg.crop else "",
        cfg.batch_size,
        info.world_size,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state_path = args.out / "train_state.pt"
    first = 0
    if state_path.exists():  # resume: the clips are a pure function of the step, so the data resumes too
        state = torch.load(state_path, map_location=device, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["optimizer"])
        first = int(state["step"])
        logger.info("resumed from %s at step %d", state_path, first)
    elif cfg.init_from is not None:  # weights of an earlier export; a fresh optimizer and schedule
        init_weights(vae, Path(cfg.init_from))
    local_clips = cfg.batch_size // info.world_size // cfg.crops_per_clip  # clips per rank and step
    loader = DataLoader(
        WorldClips(
            world,
            max(cfg.steps - first, 0) * local_clips,
            cfg.seed,
            cfg.crop,
            _RankShare(first, cfg.batch_size // cfg.crops_per_clip, info.rank, info.world_size),
            cfg.crops_per_clip,
        ),
        batch_size=local_clips,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    # torch.compile of the whole training forward (dynamic=False: every step has the same shapes)
    loss_fn = vae_loss if cfg.compile is None else torch.compile(vae_loss, mode=cfg.compile, dynamic=False)
    quick_eval = WorldClips(world, min(4, cfg.eval_clips), HELD_OUT_SEED)  # whole frames, training length
    start = time.perf_counter()
    bar = tqdm(loader, total=cfg.steps, initial=first, desc="train", unit="step", disable=not sys.stderr.isatty())
    done = first
    for step, video in enumerate(bar, start=first):
        # the posterior sample's noise: a function of the step and the rank
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + info.rank)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        video = video.flatten(0, 1) if video.ndim == 6 else video  # [clips, crops, ...] -> [batch, ...]
        loss, parts = loss_fn(
            vae,
            video.to(device, non_blocking=True),
            cfg.kl_weight,
            amp,
            cfg.l1_weight,
            cfg.mse_weight,
            cfg.marker_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(vae.parameters())
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            logs = all_reduce_mean(parts)  # one host sync per log interval
            bar.set_postfix(l1=f"{logs['l1']:.4f}", kl=f"{logs['kl']:.1f}")
            logger.info(
                "step %d/%d l1 %.4f mse %.5f (%.1f dB) kl %.2f lr %.2e, %.2f steps/s",
                done,
                cfg.steps,
                logs["l1"],
                logs["mse"],
                10 * math.log10(4.0 / max(logs["mse"], 1e-12)),  # PSNR of the [-1, 1] range
                logs["kl"],
                lr_at(step, cfg),
                (done - first) / (time.perf_counter() - start),
            )
        if cfg.eval_every and done % cfg.eval_every == 0 and info.is_main:
            logger.info(
                "step %d: held-out PSNR %.2f dB (%d whole clips)",
                done,
                evaluate(vae, quick_eval, device)["psnr"],
                len(quick_eval),
            )
        out_of_time = False
        if cfg.max_minutes is not None and done % cfg.log_every == 0:  # checked where the log syncs anyway
            flag = torch.tensor(float(time.perf_counter() - start > 60 * cfg.max_minutes), device=device)
            if info.world_size > 1:  # every rank stops at the same step
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if done % cfg.save_every == 0 or out_of_time:
            if info.is_main:
                save_state(state_path, vae, opt, done)
            barrier()
        if out_of_time and done < cfg.steps:
            logger.info("max_minutes=%s reached at step %d: state saved, rerun to continue", cfg.max_minutes, done)
            if not cfg.export_on_stop:
                return 0
            break
    if not info.is_main:
        return 0
    train_s = time.perf_counter() - start

    stored = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.export_dtype]
    if stored != torch.float32:  # round to the stored precision first: the held-out PSNR scores what is saved
        vae = vae.to(stored).float()
    stats = evaluate(vae, WorldClips(eval_world, cfg.eval_clips, HELD_OUT_SEED), device)
    if stored != torch.float32:
        vae.to(stored)
    vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
    args.out.mkdir(parents=True, exist_ok=True)
    vae.to("cpu").save_pretrained(args.out / "vae", safe_serialization=True)
    (args.out / "latent_stats.json").write_text(
        json.dumps(
            {
                "latents_mean": stats["latents_mean"],
                "latents_std": stats["latents_std"],
                "measured_on": f"{cfg.eval_clips} held-out clips, posterior means",
            },
            indent=2,
        )
    )
    metrics = {
        "heldout_psnr": stats["psnr"],
        "heldout_regions": stats["regions"],  # where the error sits: joint markers, colour edges, flat areas
        "steps": done,
        "complete": done == cfg.steps,
        "train_seconds_this_run": train_s,
        "heldout_clips": f"{cfg.eval_clips} x {cfg.eval_frames}x{cfg.height}x{cfg.width}, seeds {HELD_OUT_SEED}+",
        "params": n_params,
        "config": OmegaConf.to_container(cfg),
        "world": vars(world),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    size = (args.out / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size
    logger.info(
        "held-out PSNR by region: %s",
        ", ".join(
            f"{k} {v['psnr']:.1f} dB ({100 * v['pixels']:.1f}% of pixels, {100 * v['share_of_error']:.0f}% of error)"
            for k, v in stats["regions"].items()
        ),
    )
    logger.info(
        "held-out PSNR %.2f dB; weights %.1f MB in %s (%.0f s training)",
        stats["psnr"],
        size / 1e6,
        args.out / "vae",
        train_s,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "toy" / "vae.yaml", help="training config")
    p.add_argument("--smoke", action="store_true", help="2 steps on CPU with 5-frame 64x64 clips (a test)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. steps=3000 vae.base_dim=16)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        logger.error("error: %s", e)
        return 1
    finally:
        destroy()


if __name__ == "__main__":
    sys.exit(main())
