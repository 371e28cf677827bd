"""The conditioning of a network call, one type for training and sampling: `Conditions` (text, CLIP, y, pose
tokens; sliced per block; its CFG unconditional branch built in one place), `conditions` / `cfg_conditions`
(from a batch) and `latent_shape` (the clip a batch describes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from wan.modules.pose import pose_tokens_for_frames

VAE_STRIDE = (4, 8, 8)  # temporal, height, width: 1 + 4k frames -> k + 1 latent frames, H/8 x W/8

# The network's keyword names (forward(x, t, context, clip_fea, y, add_condition)); pose tokens are passed as
# add_condition, UniAnimate's name for them.
_KWARGS = ("context", "clip_fea", "y", "add_condition")


@dataclasses.dataclass(frozen=True, eq=False)
class Conditions(Mapping):
    """Whole-clip conditioning of `model(x, t, **cond)`.

    context [B, L, text_dim]; clip_fea [B, 257, clip_dim] (i2v); y [B, C_y, F, H, W] (i2v: mask + reference
    latent, ref-pose map already added); pose_tokens [B, F*h*w, dim] from model.encode_pose, or None.
    As a mapping its keys are the network's keywords (pose_tokens under "add_condition"), so `**cond` is a call.
    """

    context: torch.Tensor
    clip_fea: torch.Tensor | None = None
    y: torch.Tensor | None = None
    pose_tokens: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor | None:
        if key not in _KWARGS:
            raise KeyError(key)
        return self.pose_tokens if key == "add_condition" else getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_KWARGS)

    def __len__(self) -> int:
        return len(_KWARGS)

    def replace(self, **changes: torch.Tensor | None) -> Conditions:
        return dataclasses.replace(self, **changes)

    def unconditional(self, negative_context: torch.Tensor) -> Conditions:
        """CFG's unconditional branch, built only here: the negative prompt and no pose tokens; CLIP and y (the
        ref-pose map included) stay, as UniAnimate-DiT samples. Training's condition dropout is another thing
        (conditions(use_pose=False) drops the ref-pose map too)."""
        return self.replace(context=negative_context, pose_tokens=None)

    def block(self, start: int, frames: int, tokens_per_frame: int) -> Conditions:
        """The slice for latent frames [start, start + frames): y and pose tokens are per frame, the rest whole."""
        y = None if self.y is None else self.y[:, :, start : start + frames]
        pose = None
        if self.pose_tokens is not None:
            pose = pose_tokens_for_frames(self.pose_tokens, start, frames, tokens_per_frame)
        return self.replace(y=y, pose_tokens=pose)


def conditions(model: nn.Module, batch: dict[str, torch.Tensor], use_pose: bool = True) -> Conditions:
    """The conditioning of `model(x, t, **conditions)` from a batch: text, CLIP and y for i2v models, pose
    tokens and the ref-pose map for pose models (each network computes its own tokens from `pose`).

    use_pose=False drops both pose inputs (tokens and ref-pose map): UniAnimate's training-time condition
    dropout. CFG's unconditional branch differs on purpose: Conditions.unconditional.
    """
    pose_tokens = ref_map = clip_fea = y = None
    if use_pose and getattr(model, "pose_dim", None) is not None and "pose" in batch:
        pose_tokens, ref_map = model.encode_pose(batch["pose"], batch.get("ref_pose"))
    if getattr(model, "model_type", "t2v") == "i2v":
        clip_fea = batch["clip_fea"]
        y = batch["y"] if ref_map is None else batch["y"] + ref_map.to(batch["y"].dtype)
    return Conditions(batch["context"], clip_fea, y, pose_tokens)


def cfg_conditions(
    model: nn.Module, batch: dict[str, torch.Tensor], guidance: float
) -> tuple[Conditions, Conditions | None]:
    """(cond, uncond) for CFG from a batch, pose tokens computed once per clip; guidance 1: no unconditional
    branch. The unconditional branch needs batch['neg_context'] (the negative prompt's embeddings)."""
    cond = conditions(model, batch)
    if guidance == 1.0:
        return cond, None
    if "neg_context" not in batch:
        raise ValueError(f"guidance={guidance} needs batch['neg_context'] (the negative prompt's embeddings)")
    return cond, cond.unconditional(batch["neg_context"])


def latent_shape(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """[B, out_dim, F, H, W] of the clip a batch describes: from `y`, else `latents`, else the pose frames."""
    if "y" in batch:
        b, _, f, h, w = batch["y"].shape
    elif "latents" in batch:
        b, _, f, h, w = batch["latents"].shape
    elif "pose" in batch:
        b, _, frames, height, width = batch["pose"].shape  # [B, 3, 4F-3, 8H, 8W]
        f, h, w = (frames + 3) // 4, height // 8, width // 8
    else:
        raise ValueError(f"cannot size the generated clip: the batch has none of y, latents, pose ({sorted(batch)})")
    return b, model.out_dim, f, h, w


def image_condition(vae: nn.Module, ref_image: torch.Tensor, num_frames: int, y_channels: int) -> torch.Tensor:
    """The i2v input `y`: a mask marking latent frame 0 as given, then the latents of [reference, zeros...].

    ref_image [B, 3, H, W] in [-1, 1] -> y [B, y_channels, F_lat, H/8, W/8] fp32 (VAE encode runs in fp32).
    The mask has y_channels - 16 = 4 channels: the 4 video frames each latent frame stands for (the first
    latent frame is the reference frame repeated, as in Wan2.1 I2V).
    """
    b, _, h, w = ref_image.shape
    video = torch.zeros(b, 3, num_frames, h, w, device=ref_image.device)
    video[:, :, 0] = ref_image.float()  # [B, 3, F, H, W]: the reference, then black frames
    latents = vae.encode(video)  # [B, 16, F_lat, H/8, W/8]
    mask_channels = y_channels - latents.shape[1]
    if mask_channels != VAE_STRIDE[0]:
        raise ValueError(
            f"the model takes {y_channels} y channels; the VAE gives {latents.shape[1]} latent channels, leaving "
            f"{mask_channels} for the mask where Wan's I2V layout has {VAE_STRIDE[0]}"
        )
    mask = torch.zeros(b, mask_channels, *latents.shape[2:], device=latents.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)
