"""Model conditioning from a batch, in one place for training and sampling: `conditions` (the kwargs of
`model(x, t, **cond)`), `cfg_conditions` (the conditional and unconditional branches of CFG) and `block_conditions`
(the slice of whole-clip conditions for one block of latent frames)."""

from __future__ import annotations

import torch
import torch.nn as nn

from wan.modules.pose import pose_tokens_for_frames


def conditions(model: nn.Module, batch: dict[str, torch.Tensor], use_pose: bool = True) -> dict:
    """The keyword conditioning of `model(x, t, **conditions)` from a batch: text, CLIP and y for i2v models,
    pose tokens and the ref-pose map for pose models.

    use_pose=False drops both pose inputs (tokens and ref-pose map): UniAnimate's training-time condition
    dropout. CFG's unconditional branch is different on purpose and built in one place,
    cfg_conditions below: negative prompt, no pose tokens, ref-pose map kept (UniAnimate samples so).
    """
    out: dict[str, torch.Tensor | None] = {
        "context": batch["context"],
        "clip_fea": None,
        "y": None,
        "add_condition": None,
    }
    ref_map = None
    if use_pose and getattr(model, "pose_dim", None) is not None and "pose" in batch:
        out["add_condition"], ref_map = model.encode_pose(batch["pose"], batch.get("ref_pose"))
    if getattr(model, "model_type", "t2v") == "i2v":
        out["clip_fea"] = batch["clip_fea"]
        out["y"] = batch["y"] if ref_map is None else batch["y"] + ref_map.to(batch["y"].dtype)
    return out


def cfg_conditions(model: nn.Module, batch: dict[str, torch.Tensor], guidance: float) -> tuple[dict, dict | None]:
    """(cond, uncond) model kwargs for cfg_flow, pose tokens computed once per clip. The unconditional branch
    is the conditional one with the negative prompt and no pose tokens; CLIP and y (ref-pose map included)
    stay, as UniAnimate-DiT samples and as PosePipeline does. guidance 1: no unconditional branch."""
    cond = conditions(model, batch)
    if guidance == 1.0:
        return cond, None
    if "neg_context" not in batch:
        raise ValueError(f"guidance={guidance} needs batch['neg_context'] (the negative prompt's embeddings)")
    return cond, {**cond, "context": batch["neg_context"], "add_condition": None}


def block_conditions(cond: dict, start: int, frames: int, tokens_per_frame: int) -> dict:
    """The slice of whole-clip conditions (from `conditions` or `cfg_conditions`) for latent frames
    [start, start + frames)."""
    out = dict(cond)
    if cond.get("y") is not None:
        out["y"] = cond["y"][:, :, start : start + frames]
    if cond.get("add_condition") is not None:
        out["add_condition"] = pose_tokens_for_frames(cond["add_condition"], start, frames, tokens_per_frame)
    return out
