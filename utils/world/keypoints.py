"""A learned keypoint detector for the synthetic pose world: a small heatmap CNN that reads the 20 body keypoints
from world frames (rendered, toy-VAE decoded or generated) and from drawn pose frames. `detect` is a
utils.metrics Detector (the learned counterpart of utils.world.synthetic_pose.detect_markers, robust to blurred
markers); `keypoints` is differentiable, which makes it DRaFT's pose reward (utils/rewards.py).

Heatmaps are at stride 4: cell (i, j) covers pixels [4i, 4i + 4) x [4j, 4j + 4), its centre at pixel
(4j + 1.5, 4i + 1.5) (pixel centres at integer coordinates, as the world renders keypoints). A keypoint is the
soft-argmax of its logits (softmax over the cells, expected cell centre); it is visible when its heatmap's peak
sigmoid reaches `threshold`. scripts/train_world_keypoints.py trains it; assets/world_keypoints/ ships it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.pose.keypoints import NUM_BODY, NUM_HAND, PoseSequence

STRIDE = 4
ROOT = Path(__file__).resolve().parents[2]
WORLD_KEYPOINTS = ROOT / "assets" / "world_keypoints"
WEIGHTS_FILE = "keypoints.safetensors"
DEFAULT_THRESHOLD = 0.5
HEAD_BIAS = -4.0  # initial logits: sigmoid 0.018, near the empty heatmap most cells are


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> dilated 3x3 conv, twice, plus the input."""

    def __init__(self, channels: int, dilation: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=dilation,
                                                                 dilation=dilation),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class WorldKeypointNet(nn.Module):
    """frames [N, 3, H, W] in [-1, 1] (H, W multiples of 4) -> heatmap logits [N, 20, H/4, W/4].

    Two stride-2 convs, then `blocks` residual blocks at dilations 1, 2, 4, ... (a receptive field that spans a
    limb, so a blurred marker is read from its context), then a 1x1 head.
    """

    def __init__(self, width: int = 24, blocks: int = 3, num_joints: int = NUM_BODY, groups: int = 8):
        super().__init__()
        self.config = {"width": width, "blocks": blocks, "num_joints": num_joints, "groups": groups}
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        )  # fmt: skip
        self.blocks = nn.Sequential(*[_ResBlock(2 * width, 2 ** (i % 3), groups) for i in range(blocks)])
        self.head = nn.Sequential(nn.GroupNorm(groups, 2 * width), nn.SiLU(), nn.Conv2d(2 * width, num_joints, 1))
        nn.init.constant_(self.head[-1].bias, HEAD_BIAS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[2] % STRIDE or frames.shape[3] % STRIDE:
            raise ValueError(f"frames must be [N, 3, H, W] with H, W multiples of {STRIDE}, got {tuple(frames.shape)}")
        return self.head(self.blocks(self.stem(frames)))  # [N, 3, H, W] -> [N, J, H/4, W/4]


def cell_centres(height: int, width: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates of the stride-4 cell centres: xs [W/4], ys [H/4] (float32)."""
    xs = torch.arange(width // STRIDE, device=device, dtype=torch.float32) * STRIDE + (STRIDE - 1) / 2
    ys = torch.arange(height // STRIDE, device=device, dtype=torch.float32) * STRIDE + (STRIDE - 1) / 2
    return xs, ys


def soft_argmax(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Expected cell centre under softmax(logits) over each heatmap: logits [N, J, h, w] -> pixels [N, J, 2] (x, y)
    of an H x W frame (fp32; differentiable)."""
    n, j, h, w = logits.shape
    prob = logits.float().flatten(2).softmax(-1).view(n, j, h, w)
    xs, ys = cell_centres(height, width, logits.device)
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)


def keypoints(net: WorldKeypointNet, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel coordinates [N, J, 2] (x, y), peak sigmoid [N, J]) of frames [N, 3, H, W] in [-1, 1]; differentiable
    wrt the frames (the net's own weights are usually frozen)."""
    logits = net(frames.to(next(net.parameters()).dtype))
    peak = torch.sigmoid(logits.float().flatten(2).amax(-1))  # [N, J]
    return soft_argmax(logits, frames.shape[2], frames.shape[3]), peak


def to_model_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] (the utils.video_io / metrics format) -> float [F, 3, H, W] in [-1, 1]."""
    video = torch.as_tensor(np.ascontiguousarray(frames))
    if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {video.dtype} {tuple(video.shape)}")
    return video.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def detect(net: WorldKeypointNet, frames: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
           chunk: int = 64) -> PoseSequence:  # fmt: skip
    """Body keypoints of uint8 frames [F, H, W, 3] (H, W multiples of 4): the soft-argmax of each heatmap, score
    = its peak sigmoid where that reaches `threshold`, else 0 (not visible). Hands are not read (scores 0)."""
    device = next(net.parameters()).device
    f, h, w, _ = frames.shape
    coords, peaks = [], []
    for i in range(0, f, chunk):
        xy, peak = keypoints(net, to_model_input(frames[i : i + chunk]).to(device))
        coords.append(xy.cpu())
        peaks.append(peak.cpu())
    xy, peak = torch.cat(coords).double().numpy(), torch.cat(peaks).numpy()  # [F, J, 2], [F, J]
    score = np.where(peak >= threshold, peak, 0.0)
    return PoseSequence(xy / np.array([w, h]), score, np.zeros((f, 2, NUM_HAND, 2)), np.zeros((f, 2, NUM_HAND)),
                        w, h)  # fmt: skip


def load_keypoint_net(path: str | Path = WORLD_KEYPOINTS, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> WorldKeypointNet:  # fmt: skip
    """The shipped (or a trained) network: a folder with keypoints.safetensors, or that file; the architecture
    comes from the file's metadata. Frozen (requires_grad False) and in eval mode."""
    from utils.safetensors_io import load_file, read_metadata

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"keypoint network {file} does not exist: use assets/world_keypoints (shipped) or train one with "
            "scripts/train_world_keypoints.py --out runs/world_keypoints"
        )
    meta = read_metadata(file)
    if "config" not in meta:
        raise ValueError(f"{file} has no 'config' metadata: it was not written by scripts/train_world_keypoints.py")
    net = WorldKeypointNet(**json.loads(meta["config"]))
    net.load_state_dict({k: v.float() for k, v in load_file(file).items()})
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def keypoint_detector(path: str | Path = WORLD_KEYPOINTS, threshold: float = DEFAULT_THRESHOLD, device: str = "cpu"):
    """A utils.metrics Detector (uint8 [F, H, W, 3] -> PoseSequence) from the network at `path`."""
    net = load_keypoint_net(path, device)
    return lambda frames: detect(net, frames, threshold)
