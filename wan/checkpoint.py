"""Checkpoint formats for the Wan network: official Wan (single file or shards + index), diffusers-format
transformers, Self-Forcing generator checkpoints, UniAnimate pose/LoRA checkpoints and our own safetensors.

Everything is converted to the canonical (official) key names, then loaded strictly: missing, unexpected
and mis-shaped keys are errors unless the caller names the parameters that may start fresh. The pose encoders'
loader, prefix stripping and the load report live one level down, in wan/loading.py (build_model needs them).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path

import torch

from utils.errors import CheckpointKeyError
from utils.safetensors_io import atomic_save_safetensors, load_checkpoint, read_metadata
from wan.configs import build_model, model_config
from wan.loading import POSE_PREFIXES as POSE_PREFIXES
from wan.loading import LoadReport, listed, strip_prefixes
from wan.loading import load_pose_weights as load_pose_weights
from wan.modules.model import WanModel

log = logging.getLogger(__name__)

# Parameters that may start fresh, by group name (fnmatch patterns on canonical keys).
FRESH_GROUPS: dict[str, tuple[str, ...]] = {
    # i2v inputs of a student initialised from T2V-1.3B; patch_embedding gains the y input channels.
    "i2v": (
        "img_emb.*", "blocks.*.cross_attn.k_img.*", "blocks.*.cross_attn.v_img.*",
        "blocks.*.cross_attn.norm_k_img.*", "patch_embedding.weight",
    ),
    "pose": ("dwpose_embedding.*", "randomref_embedding_pose.*", "pose_proj.*"),
    # CFG distillation's guidance embedding (guidance_embed): no official checkpoint has it.
    "guidance": ("guidance_embedding.*",),
}  # fmt: skip
# Groups that may always be absent: optional modules whose fresh state leaves the network exactly its base model.
ALWAYS_FRESH = ("guidance",)
# Fresh parameters set to zero so the new path adds nothing at first (the rest keep the model's init,
# so gradients can flow through them): the student starts as exactly its T2V initialisation, a guided model as
# exactly the checkpoint it is loaded from.
ZERO_WHEN_FRESH = ("pose_proj.*", "blocks.*.cross_attn.v_img.*", "guidance_embedding.2.*")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")

# Official <-> diffusers WanTransformer3DModel names: (official, diffusers) for a key or a key prefix.
_TOP_LEVEL_DIFFUSERS = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
)
_BLOCK_DIFFUSERS = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("norm3", "norm2"),  # the affine pre-cross-attention norm: official norm3 is diffusers' norm2
    ("modulation", "scale_shift_table"),
)  # fmt: skip


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for official, diffusers in pairs:
        if key == diffusers or key.startswith(diffusers + "."):
            return official + key[len(diffusers) :]
    return key


def _official_key(key: str) -> str:
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        return f"blocks.{index}.{_rename(rest, _BLOCK_DIFFUSERS)}"
    return _rename(key, _TOP_LEVEL_DIFFUSERS)


def diffusers_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_official_key(k): v for k, v in state_dict.items()}


def _is_diffusers(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k or k == "scale_shift_table" for k in keys)


def to_canonical(raw: dict, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported checkpoint dict -> (canonical state dict, format name).

    Nested training/Self-Forcing dicts ({"generator": sd, "generator_ema": sd}) pick the EMA weights when
    `ema` is True, the raw ones when False, and EMA when present if None.
    """
    fmt = "official"
    nested = {k: v for k, v in raw.items() if isinstance(v, dict)}
    if nested:
        if ema is None:
            ema = "generator_ema" in nested
        wanted = ["generator_ema"] if ema else ["generator", "model", "state_dict", "module"]
        choice = next((k for k in wanted if k in nested), None)
        if choice is None:
            raise CheckpointKeyError(
                f"the checkpoint holds the entries {sorted(nested)} but none of {wanted}: "
                + ("it has no EMA weights, load with ema=False" if ema else "pass the entry's state dict directly")
            )
        raw, fmt = nested[choice], f"nested[{choice}]"
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointKeyError("the checkpoint holds no tensors")
    if any(k.startswith("pipe.dit.") for k in tensors):
        fmt = "unianimate"
    sd = {strip_prefixes(k): v for k, v in tensors.items()}
    if _is_diffusers(sd):
        sd, fmt = diffusers_to_official(sd), "diffusers"
    return sd, fmt


def _transformer_source(path: Path) -> Path:
    """A Wan model folder holds T5, VAE and CLIP files beside the transformer: pick the transformer's."""
    if path.is_file():
        return path
    for candidate in (
        path / "diffusion_pytorch_model.safetensors.index.json",
        path / "diffusion_pytorch_model.safetensors",
        path / "transformer",
    ):
        if candidate.exists():
            return _transformer_source(candidate) if candidate.is_dir() else candidate
    return path


def read_state_dict(source: str | os.PathLike | dict, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint (file, sharded folder, Wan model folder, diffusers folder or an in-memory dict)
    into canonical keys. Returns (state dict, description of the format and source)."""
    if isinstance(source, dict):
        sd, fmt = to_canonical(source, ema)
        return sd, fmt
    path = _transformer_source(Path(source))
    sd, fmt = to_canonical(load_checkpoint(path), ema)
    return sd, f"{fmt} from {path}"


def _expand_fresh(allow_fresh) -> tuple[str, ...]:
    patterns: list[str] = []
    for item in allow_fresh:
        patterns.extend(FRESH_GROUPS.get(item, (item,)))
    return tuple(patterns)


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_weights(
    model: WanModel,
    source: str | os.PathLike | dict,
    allow_fresh=(),
    ignore_unexpected=(),
    ema: bool | None = None,
) -> LoadReport:
    """Load a checkpoint into `model` strictly.

    allow_fresh: group names from FRESH_GROUPS ('i2v', 'pose') or fnmatch patterns of parameters that may be
    absent; they keep the model's init except ZERO_WHEN_FRESH (zeroed). The guidance embedding of a CFG-distilled
    model (ALWAYS_FRESH) may always be absent: it then starts at zero, the model as the checkpoint. A
    patch_embedding with fewer input channels is copied into the first channels and the rest zeroed (T2V -> i2v).
    ignore_unexpected: patterns of checkpoint keys to skip (e.g. 'dwpose_embedding.*' when the model has no pose
    encoders).
    """
    sd, fmt = read_state_dict(source, ema)
    lora = [k for k in sd if any(m in k for m in _LORA_MARKERS)]
    if lora:
        raise CheckpointKeyError(
            f"{fmt} holds LoRA tensors ({listed(lora[:3])}): merge them into the base with scripts/merge_lora.py "
            "and load the merged checkpoint; pose encoders alone load through pose_weights_path"
        )
    fresh_patterns = _expand_fresh([*allow_fresh, *ALWAYS_FRESH])
    own = model.state_dict()
    report = LoadReport(source=fmt)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    report.ignored = [k for k in unexpected if _matches(k, ignore_unexpected)]
    unexpected = [k for k in unexpected if k not in report.ignored]
    not_allowed = [k for k in missing if not _matches(k, fresh_patterns)]
    if not_allowed or unexpected:
        lines = [f"checkpoint {fmt} does not match the model:"]
        if not_allowed:
            lines.append(f"missing {len(not_allowed)} keys: {listed(not_allowed)}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} keys: {listed(unexpected)}")
        if any(k.startswith("guidance_embedding.") for k in unexpected):
            lines.append("guidance_embedding.* is a CFG-distilled checkpoint's (stage cfg_distill): build the model "
                         "with guidance_embed=True (inference: guidance_embed: true; training: "
                         "roles.<role>.guidance_embed=true)")  # fmt: skip
        lines.append(
            "If the checkpoint is right, the model config is not (compare presets in wan/configs.py); parameters "
            "that should start fresh are named with allow_fresh (groups: " + ", ".join(FRESH_GROUPS) + ")"
        )
        raise CheckpointKeyError("\n  ".join(lines))

    to_load: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in report.ignored:
            continue
        target = own[key]
        if value.shape == target.shape:
            to_load[key] = value
        elif key == "patch_embedding.weight" and _matches(key, fresh_patterns) and _extends_in_channels(value, target):
            extended = torch.zeros(target.shape, dtype=value.dtype)
            extended[:, : value.shape[1]] = value
            to_load[key] = extended
            report.partial.append(f"{key} in_channels {value.shape[1]}->{target.shape[1]}")
        else:
            raise CheckpointKeyError(
                f"checkpoint {fmt}: {key} has shape {tuple(value.shape)} but the model's is {tuple(target.shape)} "
                "(a checkpoint of another model size or type?)"
            )
    with torch.no_grad():
        for key in missing:
            if _matches(key, ZERO_WHEN_FRESH):
                own[key].zero_()
                report.fresh_zero.append(key)
            else:
                report.fresh_init.append(key)
        result = model.load_state_dict(to_load, strict=False)
    if set(result.missing_keys) != set(missing) or result.unexpected_keys:
        raise RuntimeError(f"internal key bookkeeping failed: {result}")
    report.loaded = list(to_load)
    log.info("%s", report)
    return report


def _extends_in_channels(value: torch.Tensor, target: torch.Tensor) -> bool:
    return (
        value.dim() == target.dim() == 5
        and value.shape[1] < target.shape[1]
        and value.shape[0] == target.shape[0]
        and value.shape[2:] == target.shape[2:]
    )


def save_weights(model: WanModel, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Our own format: canonical keys in safetensors, the network config in the metadata; written atomically."""
    metadata = {"format": "poseforcing", "config": json.dumps(model_config(model))}
    metadata.update(extra_metadata or {})
    atomic_save_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, metadata)


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> WanModel:
    """Rebuild a network saved with save_weights (config from the file's metadata) and load it strictly."""
    metadata = read_metadata(path)
    if metadata.get("format") != "poseforcing" or "config" not in metadata:
        raise ValueError(
            f"{path} has no PoseForcing config metadata: build the model from a preset and call load_weights"
        )
    model = build_model(json.loads(metadata["config"]), device=device, dtype=dtype)
    load_weights(model, path)
    return model
