"""Differentiable rewards on decoded frames, for reward fine-tuning (DRaFT, model/draft.py).

A reward is a callable `reward(frames, batch) -> [B]`: frames [B, 3, F, H, W] in [-1, 1] are the clip's first F
frames (F = 1: the decoded first frame, DRaFT's default), batch the training batch (trainer/objective.py's layout);
higher is better, and it must be differentiable wrt the frames. Two are built in:

- PoseReward (the world's pose adherence): minus the mean distance, in frame sizes (pixels / max(H, W)), between the
  keypoints the world keypoint network (utils/world/keypoints.py) reads from the frames (soft-argmax, differentiable)
  and the driving pose's keypoints. The target is batch["keypoints"] [B, F_pix, 20, 3] (x, y normalised,
  visibility) when the samples carry it, else what the same network reads from the driving pose frames
  batch["pose"] (the drawn skeletons the student is conditioned on; no gradient), joints counted where the target
  is visible. Training samples hold only the pose frames, so the second path is what training uses.
- PreferenceReward (HPSv2-style image-text preference): `scale` x the cosine between a CLIP-like model's image
  embedding of each frame and its text embedding of `prompt`, averaged over frames; the model is a transformers
  CLIPModel folder (config.json + weights + tokenizer files), e.g. HPSv2.1 converted to that layout. The batch holds
  text embeddings only (not the prompt's words), so one prompt (objective.reward_prompt) scores every sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.world.keypoints import DEFAULT_THRESHOLD, WORLD_KEYPOINTS, keypoints, load_keypoint_net

log = logging.getLogger(__name__)

Reward = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]  # (frames, batch) -> [B]
# CLIP's (OpenAI's) pixel normalisation, used when the model folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dim() != 5 or frames.shape[1] != 3:
        raise ValueError(f"a reward takes frames [B, 3, F, H, W] in [-1, 1], got {tuple(frames.shape)}")


def flatten_frames(frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> [B*F, 3, H, W] (sample-major)."""
    b, c, f, h, w = frames.shape
    return frames.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def keypoint_error(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over visible joints of |pred - target| / size per sample: pred, target [B, F, J, 2] pixels, visible
    [B, F, J] bool, size the frame's larger side -> [B] (0 for a sample without a visible joint)."""
    dist = (pred.float() - target.float()).square().sum(-1).add(1e-12).sqrt() / size  # [B, F, J]
    weight = visible.float()
    return (dist * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


class PoseReward(nn.Module):
    """-keypoint_error between the network's keypoints of the frames and the driving pose's (module docstring)."""

    def __init__(self, net: nn.Module, threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        self.net, self.threshold = net, threshold

    @classmethod
    def from_path(cls, path: str | Path = WORLD_KEYPOINTS, device: torch.device | str = "cpu",
                  threshold: float = DEFAULT_THRESHOLD) -> PoseReward:  # fmt: skip
        return cls(load_keypoint_net(path, device), threshold)

    def target(self, batch: dict[str, torch.Tensor], frames: int, height: int, width: int
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(keypoints [B, frames, J, 2] in pixels of height x width, visible [B, frames, J]) of the driving pose."""
        if "keypoints" in batch:
            kp = batch["keypoints"][:, :frames].float()  # [B, F, J, 3]
            scale = torch.tensor([width, height], device=kp.device, dtype=torch.float32)
            return kp[..., :2] * scale, kp[..., 2] >= self.threshold
        if "pose" not in batch:
            raise ValueError("the pose reward needs batch['pose'] (drawn pose frames) or batch['keypoints']")
        pose = batch["pose"][:, :, :frames]  # [B, 3, F, H, W] in 0..255
        b = pose.shape[0]
        if pose.shape[-2:] != (height, width):
            raise ValueError(f"pose frames are {tuple(pose.shape[-2:])} but the decoded frames {(height, width)}")
        with torch.no_grad():
            xy, peak = keypoints(self.net, flatten_frames(pose.float() / 127.5 - 1.0))
        return xy.view(b, frames, -1, 2), (peak >= self.threshold).view(b, frames, -1)

    def forward(self, frames: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _check_frames(frames)
        b, _, f, h, w = frames.shape
        target, visible = self.target(batch, f, h, w)
        pred, _ = keypoints(self.net, flatten_frames(frames))  # [B*F, J, 2]
        return -keypoint_error(pred.view(b, f, -1, 2), target, visible, max(h, w))


class PreferenceReward(nn.Module):
    """scale x cos(image embedding of each frame, text embedding of the prompt), mean over frames (module
    docstring). Frames are resized (bicubic, antialiased) so the shorter side is the model's image size, centre
    cropped and normalised as CLIP preprocesses images; every step is differentiable."""

    def __init__(self, model: nn.Module, tokenizer, prompt: str, scale: float = 1.0,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):  # fmt: skip
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scale, self.size = float(scale), int(model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        tokens = tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt",
                           max_length=model.config.text_config.max_position_embeddings)  # fmt: skip
        with torch.no_grad():
            text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        self.register_buffer("text", F.normalize(_features(text).float(), dim=-1), persistent=False)  # [1, D]

    @classmethod
    def from_path(cls, path: str | Path, prompt: str, scale: float = 1.0, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> PreferenceReward:  # fmt: skip
        """A transformers CLIPModel folder with its tokenizer (and preprocessor_config.json for the pixel
        normalisation, if it has one); read offline."""
        import json

        from transformers import AutoTokenizer, CLIPModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"objective.reward_model={folder}: not a transformers CLIP folder (no config.json); convert the "
                "preference model (e.g. HPSv2.1) to a CLIPModel folder with its tokenizer"
            )
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            spec = json.loads(pre.read_text())
            mean, std = tuple(spec.get("image_mean", mean)), tuple(spec.get("image_std", std))
        return cls(model, tokenizer, prompt, scale, mean, std).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, 3, S, S] normalised model input (S = the model's image size)."""
        h, w = images.shape[-2:]
        ratio = self.size / min(h, w)
        size = (max(self.size, round(h * ratio)), max(self.size, round(w * ratio)))
        x = F.interpolate((images.float() + 1) / 2, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return (x - self.mean) / self.std

    def forward(self, frames: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _check_frames(frames)
        b, _, f = frames.shape[:3]
        pixels = self.preprocess(flatten_frames(frames)).to(next(self.model.parameters()).dtype)
        image = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        cos = (image * self.text).sum(-1)  # [B*F]
        return self.scale * cos.view(b, f).mean(1)


def _features(out) -> torch.Tensor:
    """transformers' get_*_features returns a tensor, or (newer versions) an output whose pooler_output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
