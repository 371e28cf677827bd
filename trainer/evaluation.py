"""Evaluation while training (config section `eval:`): every `eval.every` iterations the trainer samples a few
fixed held-out world clips (validation seeds, never trained on) with the role's own sampler — the teacher's UniPC
+ CFG, a student's few-step stream — decodes them with the toy VAE and scores them against exact ground truth
(pose PCK@0.05, normalised L2, PSNR, SSIM, flicker). The scores go to the log, metrics.jsonl and wandb as
eval/*; a side-by-side preview (pose | generated | ground truth) of the first clip goes to <run>/previews/."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline.world import Sampler, held_out_clips, mean_scores, sample_clip, score, to_frames, world_encoders

log = logging.getLogger(__name__)
METRICS = ("pck@0.05", "kpt_l2", "psnr", "ssim", "flicker")


class WorldEvaluator:
    """Held-out world clips, their encoders and a sampler; call with a network to score it."""

    def __init__(self, cfg: Any, device: torch.device):
        self.cfg = cfg
        self.enc = world_encoders(device)
        seeds = [int(cfg.first_seed) + i for i in range(int(cfg.clips))]
        self.clips = held_out_clips(self.enc, seeds, num_frames=int(cfg.num_frames))
        self.sampler = Sampler(num_steps=int(cfg.num_steps), guidance=float(cfg.guidance), shift=float(cfg.shift),
                               steps=tuple(float(s) for s in cfg.steps), solver=str(cfg.solver))  # fmt: skip
        self._preview_failed = False

    @torch.no_grad()
    def __call__(self, model: nn.Module, iteration: int, run_dir: Path, write: bool) -> dict[str, float]:
        """eval/<metric> means over the clips; every rank samples (FSDP2 forwards are collective), `write` on
        the main rank only saves the preview."""
        was_training = model.training
        model.eval()
        rows = []
        try:
            for i, clip in enumerate(self.clips):
                latents = sample_clip(model, clip.batch, self.sampler, seed=i)
                frames = to_frames(self.enc.vae.decode(latents.float())[0])
                rows.append(score(frames, clip))
                if i == 0 and write and self.cfg.preview:
                    self._preview(frames, clip, run_dir / "previews" / f"iteration_{iteration:07d}.mp4")
        finally:
            model.train(was_training)
        means = mean_scores(rows)
        return {f"eval/{k}": means[k] for k in METRICS if k in means}

    def _preview(self, frames: np.ndarray, clip, path: Path) -> None:
        from utils.video_io import write_video

        pose = clip.world.pose  # [F, H, W, 3] uint8
        side = np.concatenate([pose, frames, clip.world.video], axis=2)  # pose | generated | ground truth
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, side, fps=16.0)
        except (ImportError, RuntimeError, OSError) as err:  # e.g. no ffmpeg on a GPU image: scores still count
            if not self._preview_failed:
                log.warning("eval preview not written (%s); the scores are logged all the same", err)
            self._preview_failed = True
