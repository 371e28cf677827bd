"""UniAnimate-DiT pose conditioning: the two pose encoders (official layer layout and key names), the
student's `pose_proj`, and the pose-token / reference-pose-map computation shared by every model.

Pose frames [B, 3, F, H, W] in 0..255 (F = 1 + 4k) -> prefix the first frame 3 more times (F + 3 frames,
mirroring the VAE's 1 + 4k layout) -> /255 -> dwpose_embedding -> [B, pose_dim, k+1, H/16, W/16], exactly
the patch grid -> tokens ADDED after patch embedding. The reference pose [B, 3, H, W] -> randomref_embedding_pose
-> [B, y_ch, H/8, W/8] ADDED to `y` on every latent frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from wan.modules.model import WanModel

POSE_HIDDEN = 16  # channels of every encoder layer but the last (UniAnimate's layout)
FIRST_FRAME_REPEATS = 3


def build_dwpose_embedding(pose_dim: int) -> nn.Sequential:
    """Keys dwpose_embedding.{0,2,4,6,8,10,12}; spatial stride 16, temporal stride 4."""
    c = POSE_HIDDEN
    return nn.Sequential(
        nn.Conv3d(3, c, 3, stride=1, padding=1), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=1, padding=1), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=1, padding=1), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv3d(c, c, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv3d(c, pose_dim, (1, 2, 2), stride=(1, 2, 2), padding=0),
    )  # fmt: skip


def build_randomref_embedding_pose(y_channels: int = 20) -> nn.Sequential:
    """Keys randomref_embedding_pose.{0,2,4,6,8,10}; spatial stride 8 (the VAE's)."""
    c = POSE_HIDDEN
    return nn.Sequential(
        nn.Conv2d(3, c, 3, 1, 1), nn.SiLU(),
        nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(),
        nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(),
        nn.Conv2d(c, c, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(c, c, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(c, y_channels, 3, 2, 1),
    )  # fmt: skip


def pose_latent_frames(num_pose_frames: int) -> int:
    """Latent frames a pose clip covers: 1 + 4k frames -> k + 1."""
    if num_pose_frames < 1 or (num_pose_frames - 1) % 4:
        raise ValueError(
            f"a pose clip has {num_pose_frames} frames; it needs 1 + 4k frames (e.g. 81) like the video it drives"
        )
    return (num_pose_frames - 1) // 4 + 1


def folded_last_layer(model: WanModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The last dwpose conv with pose_proj folded in: Linear(pose_dim->dim) o Conv3d(16->pose_dim) is one
    Conv3d(16->dim), so no [tokens, 5120] tensor is ever made. Folded in fp32, returned in the conv's dtype."""
    last = model.dwpose_embedding[-1]
    if not hasattr(model, "pose_proj"):
        return last.weight, last.bias
    proj = model.pose_proj
    w = proj.weight.float() @ last.weight.float().flatten(1)  # [dim, pose_dim] @ [pose_dim, 16*1*2*2]
    b = proj.weight.float() @ last.bias.float() + proj.bias.float()
    return w.view(proj.out_features, *last.weight.shape[1:]).to(last.weight.dtype), b.to(last.weight.dtype)


def encode_pose(
    model: WanModel, pose_frames: torch.Tensor, ref_pose: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See WanModel.encode_pose."""
    if pose_frames.dim() != 5 or pose_frames.shape[1] != 3:
        raise ValueError(f"pose_frames must be [B, 3, F, H, W] in 0..255; got shape {tuple(pose_frames.shape)}")
    pose_latent_frames(pose_frames.shape[2])
    height, width = pose_frames.shape[-2:]
    if height % 16 or width % 16:
        raise ValueError(f"pose frames are {height}x{width}; height and width must be multiples of 16")
    enc = model.dwpose_embedding
    dtype = enc[0].weight.dtype
    x = torch.cat([pose_frames[:, :, :1].expand(-1, -1, FIRST_FRAME_REPEATS, -1, -1), pose_frames], dim=2)
    h = enc[:-1](x.to(dtype) / 255.0)  # [B, 3, F+3, H, W] -> [B, 16, F_lat, H/8, W/8]
    w, b = folded_last_layer(model)
    h = F.conv3d(h, w, b, stride=enc[-1].stride)  # [B, dim, F_lat, H/16, W/16]
    tokens = h.flatten(2).transpose(1, 2)  # [B, F_lat*h*w, dim]

    ref_map = None
    if ref_pose is not None:
        if not hasattr(model, "randomref_embedding_pose"):
            raise ValueError("a reference pose needs an i2v pose model (the map is added to y)")
        if ref_pose.dim() != 4 or tuple(ref_pose.shape[-2:]) != (height, width):
            raise ValueError(
                f"ref_pose must be [B, 3, {height}, {width}] like the pose frames; got {tuple(ref_pose.shape)}"
            )
        ref_enc = model.randomref_embedding_pose
        ref_map = ref_enc(ref_pose.to(ref_enc[0].weight.dtype) / 255.0)[:, :, None]  # [B, y_ch, 1, H/8, W/8]
    return tokens, ref_map


def check_pose_alignment(pose_tokens: torch.Tensor, grid: tuple[int, int, int]) -> None:
    """Pose tokens must cover exactly the video's latent frames (the pose-alignment check)."""
    frames, h, w = grid
    per_frame = h * w
    if pose_tokens.dim() != 3 or pose_tokens.shape[1] % per_frame:
        raise ValueError(
            f"pose tokens of shape {tuple(pose_tokens.shape)} do not fit the {h}x{w} patch grid of the video: "
            "pose frames and video must have the same size"
        )
    pose_frames = pose_tokens.shape[1] // per_frame
    if pose_frames != frames:
        raise ValueError(
            f"pose tokens cover {pose_frames} latent frames but the video has {frames} latent frames: give "
            f"{4 * frames - 3} pose frames at the video's pixel size ({16 * h}x{16 * w} for this {h}x{w} patch "
            "grid); when streaming, slice the clip's tokens per block with pose_tokens_for_frames"
        )


def pose_tokens_for_frames(
    tokens: torch.Tensor, start_frame: int, num_frames: int, tokens_per_frame: int
) -> torch.Tensor:
    """The slice of a clip's pose tokens [B, F_lat*T, dim] that covers latent frames [start, start+num)."""
    total = tokens.shape[1] // tokens_per_frame
    if start_frame + num_frames > total:
        raise ValueError(
            f"pose tokens cover {total} latent frames; frames {start_frame}..{start_frame + num_frames - 1} "
            "were asked for: the pose clip is shorter than the video"
        )
    return tokens[:, start_frame * tokens_per_frame : (start_frame + num_frames) * tokens_per_frame]
