"""What loading weights into a built network needs below the checkpoint formats (wan/checkpoint.py): wrapper
prefixes stripped, the load report, and the UniAnimate pose encoders (`load_pose_weights`, and
`PoseWeightsLoader`, which build_model gives a pose model for pose_weights_path: the network reads no files)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import CheckpointKeyError
from utils.safetensors_io import load_checkpoint

log = logging.getLogger(__name__)

POSE_PREFIXES = ("dwpose_embedding.", "randomref_embedding_pose.")
WRAPPER_PREFIXES = (
    "pipe.dit.",
    "model.",
    "module.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
    "_orig_mod.",
)
_MAX_LISTED = 20


def listed(keys: list[str]) -> str:
    """Keys for an error message, the first 20 and a count of the rest."""
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def strip_prefixes(key: str) -> str:
    """A checkpoint key without the prefixes of training wrappers and pipelines (FSDP, compile, UniAnimate)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    fresh_zero: list[str] = field(default_factory=list)
    fresh_init: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors ({self.source})"]
        if self.fresh_zero or self.fresh_init or self.partial:
            parts.append(
                f"fresh: {len(self.fresh_zero)} zero-initialised {_group_names(self.fresh_zero)}, "
                f"{len(self.fresh_init)} at the model's init {_group_names(self.fresh_init)}, "
                f"{len(self.partial)} extended with zeros {self.partial}"
            )
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} {_group_names(self.ignored)}")
        return "; ".join(parts)


def _group_names(keys: list[str]) -> str:
    """Compress keys like blocks.3.cross_attn.v_img.weight to patterns for a one-line report."""
    return "[" + ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", k).rsplit(".", 1)[0] for k in keys})) + "]"


def load_pose_weights(model: nn.Module, source: str | os.PathLike | dict | None) -> LoadReport:
    """Load exactly the pose-encoder keys (dwpose_embedding.*, randomref_embedding_pose.*) from a UniAnimate
    checkpoint (keys under `pipe.dit.`, LoRA tensors beside them are skipped) or any checkpoint holding them."""
    if source is None:
        raise ValueError("no pose weights path given")
    if not isinstance(source, dict) and not Path(source).exists():
        raise FileNotFoundError(
            f"pose weights not found: {source} (the UniAnimate checkpoint, e.g. UniAnimate-Wan2.1-14B-Lora-12000.ckpt;"
            " fetch it with download_models.py)"
        )
    raw = source if isinstance(source, dict) else load_checkpoint(source)
    sd = {strip_prefixes(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    pose_sd = {k: v for k, v in sd.items() if k.startswith(POSE_PREFIXES)}
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(POSE_PREFIXES)}
    missing = sorted(set(expected) - set(pose_sd))
    extra = sorted(set(pose_sd) - set(expected))
    if missing or extra:
        raise CheckpointKeyError(
            f"pose weights {source if not isinstance(source, dict) else '(dict)'} do not fit the model's pose "
            f"encoders: missing {listed(missing)}; unexpected {listed(extra)}"
        )
    for key, value in pose_sd.items():
        if value.shape != expected[key].shape:
            raise CheckpointKeyError(
                f"pose weights: {key} has shape {tuple(value.shape)}, the model's is {tuple(expected[key].shape)} "
                "(UniAnimate's encoders end in 5120 channels: build the model with pose_dim=5120)"
            )
    with torch.no_grad():
        model.load_state_dict(pose_sd, strict=False)
    report = LoadReport(source=f"pose weights from {source if not isinstance(source, dict) else 'dict'}")
    report.loaded = sorted(pose_sd)
    log.info("%s", report)
    return report


@dataclass(frozen=True)
class PoseWeightsLoader:
    """load_pose_weights(model, path), deferred: a pose model calls it at its first encode_pose, so building a
    network reads nothing."""

    path: str | os.PathLike

    def __call__(self, model: nn.Module) -> None:
        load_pose_weights(model, self.path)
