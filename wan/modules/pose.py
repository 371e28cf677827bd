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

    ref_map = None if ref_pose is None else ref_pose_map(model, ref_pose, (height, width))
    return tokens, ref_map


def ref_pose_map(model: WanModel, ref_pose: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The reference-pose map added to `y`: ref_pose [B, 3, H, W] in 0..255 -> [B, y_ch, 1, H/8, W/8]."""
    height, width = size
    if not hasattr(model, "randomref_embedding_pose"):
        raise ValueError("a reference pose needs an i2v pose model (the map is added to y)")
    if ref_pose.dim() != 4 or tuple(ref_pose.shape[-2:]) != (height, width):
        raise ValueError(
            f"ref_pose must be [B, 3, {height}, {width}] like the pose frames; got {tuple(ref_pose.shape)}"
        )
    ref_enc = model.randomref_embedding_pose
    return ref_enc(ref_pose.to(ref_enc[0].weight.dtype) / 255.0)[:, :, None]


# ----------------------------------------------------------------------------------------------------------
# Streaming: pose tokens of each latent frame from a bounded window of pose frames
# ----------------------------------------------------------------------------------------------------------


def pose_receptive_field(model: WanModel) -> tuple[int, int, int]:
    """(left, right, stride) of dwpose_embedding along time, read from its Conv3d layers: latent frame j of the
    whole-clip encoding depends on padded input frames [stride*j - left, stride*j + right] (the padded input is
    the first pose frame 3 more times, then the clip). UniAnimate's layers give (7, 7, 4): three k3/s1/p1 convs,
    one k3/s1/p1 (stride 2 in space only), two k3/s2/p1, one k1/s1/p0."""
    left = right = 0
    stride = 1
    for conv in model.dwpose_embedding:
        if not isinstance(conv, nn.Conv3d):
            continue
        (k, s, p), dilation = (conv.kernel_size[0], conv.stride[0], conv.padding[0]), conv.dilation[0]
        if dilation != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"pose encoder conv {conv} has a temporal layout the streaming encoder does not know")
        left += p * stride  # output o reads inputs s*o - p .. s*o - p + k - 1 of this layer
        right += (k - 1 - p) * stride
        stride *= s
    return left, right, stride


def pose_lookahead(model: WanModel) -> int:
    """Pose frames past a latent frame's last pose frame that its tokens depend on (4 for UniAnimate's encoder:
    latent frame j covers pose frames up to 4j and needs frames up to 4j + 4, or the end of the clip)."""
    _, right, stride = pose_receptive_field(model)
    if stride != 4:
        raise ValueError(f"the pose encoder's temporal stride is {stride}; the VAE's 1 + 4k layout needs 4")
    return right - FIRST_FRAME_REPEATS


class _TemporalConvStream:
    """One Conv3d (+ activation) run over a growing time axis: each output frame is computed once, as soon as the
    input frames it reads are there, from a buffer of at most kernel + stride - 1 input frames. The conv's own
    zero padding in time becomes explicit zero frames at the start and, on finish(), at the end, so the outputs
    are those of the conv over the whole sequence. Spatial padding and strides stay the conv's."""

    def __init__(self, conv: nn.Conv3d, weight: torch.Tensor, bias: torch.Tensor | None, activation: bool):
        self.weight, self.bias, self.activation = weight, bias, activation
        self.k, self.s, self.p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.spatial_stride, self.spatial_padding = (1, *conv.stride[1:]), (0, *conv.padding[1:])
        self.stride = (self.s, *conv.stride[1:])
        self.buffer: torch.Tensor | None = None  # [B, C, t, H, W], input frames from index `first` on
        self.first = -self.p  # input-frame index of buffer[:, :, 0] (the left zero padding is frames -p .. -1)
        self.next_out = 0

    def push(self, x: torch.Tensor) -> torch.Tensor | None:
        """Input frames [B, C, n, H, W] -> the output frames that became computable (or None)."""
        if self.buffer is None:
            self.buffer = torch.cat([x.new_zeros(*x.shape[:2], self.p, *x.shape[3:]), x], dim=2)
        else:
            self.buffer = torch.cat([self.buffer, x], dim=2)
        return self._emit()

    def finish(self) -> torch.Tensor | None:
        """The end of the sequence: the right zero padding, then the remaining outputs."""
        if self.buffer is None:
            return None
        b = self.buffer
        self.buffer = torch.cat([b, b.new_zeros(*b.shape[:2], self.p, *b.shape[3:])], dim=2)
        return self._emit()

    def _emit(self) -> torch.Tensor | None:
        have = self.first + self.buffer.shape[2]  # input frames [.., have) are known
        last = (have - self.k + self.p) // self.s  # the last output whose inputs s*o - p + k - 1 < have
        if last < self.next_out:
            return None
        lo = self.s * self.next_out - self.p - self.first
        hi = self.s * last - self.p + self.k - self.first
        y = F.conv3d(self.buffer[:, :, lo:hi], self.weight, self.bias, stride=self.stride,
                     padding=self.spatial_padding)  # fmt: skip
        keep = self.s * (last + 1) - self.p  # the first input frame a later output reads
        self.buffer = self.buffer[:, :, keep - self.first :]
        self.first, self.next_out = keep, last + 1
        return F.silu(y) if self.activation else y


class StreamingPoseEncoder:
    """encode_pose's pose tokens for a clip fed a few pose frames at a time: push(frames) returns the tokens of
    every latent frame that became computable, finish() those of the last ones (the clip's end pads like the
    whole-clip encoding). Each conv keeps at most kernel + stride - 1 frames of its input, so memory does not grow
    with the clip; every frame is computed once. The tokens equal encode_pose's (fp32: rel. error ~1e-7).

    Latent frame j's tokens come out once pose frames up to 4j + lookahead (pose_lookahead: 4) are pushed, or at
    finish(). The clip may have any length; encode_pose's 1 + 4k frames give its k + 1 latent frames.
    """

    def __init__(self, model: WanModel):
        pose_lookahead(model)  # checks the stride
        self.model = model
        enc = model.dwpose_embedding
        self.dtype = enc[0].weight.dtype
        convs = [m for m in enc if isinstance(m, nn.Conv3d)]
        w, b = folded_last_layer(model)
        self.layers = [_TemporalConvStream(c, c.weight, c.bias, activation=True) for c in convs[:-1]]
        self.layers.append(_TemporalConvStream(convs[-1], w, b, activation=False))
        self.size: tuple[int, int] | None = None
        self.batch = 0
        self.frames_in = 0
        self.latent_frames_out = 0

    def push(self, pose_frames: torch.Tensor) -> torch.Tensor:
        """pose_frames [B, 3, n, H, W] in 0..255, the next n frames of the clip -> tokens [B, m*h*w, dim] of the
        m latent frames that are now complete (m may be 0)."""
        if pose_frames.dim() != 5 or pose_frames.shape[1] != 3:
            raise ValueError(f"pose_frames must be [B, 3, n, H, W] in 0..255; got shape {tuple(pose_frames.shape)}")
        size = tuple(pose_frames.shape[-2:])
        if self.size is None:
            if size[0] % 16 or size[1] % 16:
                raise ValueError(f"pose frames are {size[0]}x{size[1]}; height and width must be multiples of 16")
            self.size, self.batch = size, pose_frames.shape[0]
        elif size != self.size:
            raise ValueError(f"pose frames are {size[0]}x{size[1]} but the clip's first frames were "
                             f"{self.size[0]}x{self.size[1]}: every pose frame needs the same size")  # fmt: skip
        x = pose_frames
        if self.frames_in == 0 and x.shape[2]:
            x = torch.cat([x[:, :, :1].expand(-1, -1, FIRST_FRAME_REPEATS, -1, -1), x], dim=2)
        self.frames_in += pose_frames.shape[2]
        return self._run(x.to(self.dtype) / 255.0, finish=False)

    def finish(self) -> torch.Tensor:
        """The end of the clip: tokens [B, m*h*w, dim] of the remaining latent frames."""
        return self._run(None, finish=True)

    def _run(self, x: torch.Tensor | None, finish: bool) -> torch.Tensor:
        for layer in self.layers:
            if x is not None and x.shape[2]:
                x = layer.push(x)
                if finish:
                    tail = layer.finish()
                    x = x if tail is None else (tail if x is None else torch.cat([x, tail], dim=2))
            else:
                x = layer.finish() if finish else None
        if x is None:
            return self.layers[-1].weight.new_zeros(self.batch, 0, self.layers[-1].weight.shape[0])
        self.latent_frames_out += x.shape[2]
        return x.flatten(2).transpose(1, 2)  # [B, dim, m, h, w] -> [B, m*h*w, dim]


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
