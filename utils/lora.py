"""LoRA checkpoint layouts (UniAnimate/DiffSynth, peft, kohya) and the merge W' = W + s·(α/r)·B@A.

Pure functions only: which base tensor each LoRA key targets, with what rank and scale, and the merge
math. Reading and writing files is scripts/merge_lora.py's job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Prefixes that trainers put in front of the network's own module names, most specific first.
# pipe.dit.: UniAnimate-DiT / DiffSynth; base_model.model.: peft; diffusion_model.: ComfyUI / musubi.
LORA_PREFIXES = ("pipe.dit.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "model.")
# kohya writes module paths with dots turned into underscores behind this prefix.
KOHYA_PREFIX = "lora_unet_"

_DOWN = re.compile(r"^(?P<module>.+)\.(?:lora_A(?:\.(?P<adapter>[^.]+))?|lora_down)\.weight$")
_UP = re.compile(r"^(?P<module>.+)\.(?:lora_B(?:\.(?P<adapter>[^.]+))?|lora_up)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_DIFF = re.compile(r"^(?P<module>.+)\.diff(?P<bias>_b)?$")
# Adapter kinds that are not plain LoRA, and peft internals of a whole wrapped model: merging them as
# plain tensors would be silently wrong.
_UNSUPPORTED = re.compile(
    r"lora_magnitude_vector|dora_scale|lora_embedding_[AB]|\.lora_mid\.|hada_|lokr_|"
    r"\.base_layer\.|\.modules_to_save\.|\.original_module\."
)


@dataclass(frozen=True)
class LoraKey:
    """One LoRA-file key, parsed: the module path as written in the file and which part it holds."""

    module: str
    part: str  # "down" (A, [r, in]) | "up" (B, [out, r]) | "alpha" | "diff" (weight) | "diff_b" (bias)
    adapter: str | None = None


def parse_lora_key(key: str) -> LoraKey | None:
    """Classify a key of a LoRA file; None for tensors that are not LoRA parts (e.g. pose encoders)."""
    for pattern, part in ((_DOWN, "down"), (_UP, "up")):
        match = pattern.match(key)
        if match:
            return LoraKey(match["module"], part, match["adapter"])
    match = _ALPHA.match(key)
    if match:
        return LoraKey(match["module"], "alpha")
    match = _DIFF.match(key)
    if match:
        return LoraKey(match["module"], "diff_b" if match["bias"] else "diff")
    return None


def strip_prefix(name: str) -> str:
    """Drop the first known trainer prefix (`pipe.dit.`, `base_model.model.`, ...) from a key."""
    for prefix in LORA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def lora_scale(rank: int, lora_alpha: float | None = None, strength: float = 1.0, rslora: bool = False) -> float:
    """The factor on B@A: strength·α/r (rsLoRA: strength·α/√r); α defaults to r, i.e. factor = strength."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    alpha = float(rank) if lora_alpha is None else float(lora_alpha)
    return strength * alpha / (math.sqrt(rank) if rslora else rank)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: Sequence[int]) -> torch.Tensor:
    """scale·B@A in float32, shaped like the target weight.

    down (A) [r, in] or [r, in, *k] (conv); up (B) [out, r] or [out, r, 1, ...] -> [out, in] or [out, in, *k].
    """
    down2 = down.to(torch.float32).flatten(1)  # [r, in·k]
    up2 = up.to(torch.float32).flatten(1)  # [out, r]
    if up2.shape[1] != down2.shape[0] or up.shape[2:].numel() != 1:
        raise ValueError(f"LoRA parts do not chain: up {list(up.shape)} @ down {list(down.shape)}")
    shape = tuple(shape)
    if up2.shape[0] != shape[0] or down2.shape[1] != math.prod(shape[1:]):
        raise ValueError(f"LoRA delta {[up2.shape[0], down2.shape[1]]} does not fit a weight {list(shape)}")
    return (up2 @ down2).mul_(scale).reshape(shape)


def merge_lora_weight(
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """W + scale·B@A computed in float32, then cast to out_dtype. Inputs are not modified."""
    return lora_delta(down, up, scale, weight.shape).add_(weight).to(out_dtype)


def merge_diff(weight: torch.Tensor, diff: torch.Tensor, strength: float, out_dtype: torch.dtype) -> torch.Tensor:
    """W + strength·diff in float32 (full-weight differences that some LoRA files carry for norms/biases)."""
    if diff.shape != weight.shape:
        raise ValueError(f"diff of shape {list(diff.shape)} does not fit a weight {list(weight.shape)}")
    return diff.to(torch.float32).mul(strength).add_(weight).to(out_dtype)


@dataclass(frozen=True)
class LoraTarget:
    """What the merge does to one base tensor."""

    target: str  # base key, e.g. "blocks.0.self_attn.q.weight"
    kind: str  # "lora" (B@A) | "diff" (full difference)
    keys: tuple[str, ...]  # LoRA-file keys used: (down, up) or (diff,)
    shape: tuple[int, ...]  # of the base tensor
    scale: float  # the factor on B@A (strength·α/r) or on diff (strength)
    rank: int | None = None
    alpha: float | None = None
    alpha_source: str = ""  # "rank" | ".alpha tensor" | "adapter_config.json" | "--lora-alpha"


@dataclass
class LoraPlan:
    """The merge of one LoRA file into one base, decided from names and shapes before any data moves."""

    targets: dict[str, LoraTarget] = field(default_factory=dict)  # base key -> merge
    copies: dict[str, str] = field(default_factory=dict)  # output key -> LoRA-file key, copied as is
    replaced: list[str] = field(default_factory=list)  # copies that overwrite a base tensor
    problems: list[str] = field(default_factory=list)  # non-empty: the merge must not run
    layouts: list[str] = field(default_factory=list)  # e.g. "pipe.dit. + lora_A.<adapter>.weight"


def _kohya_names(base_modules: Sequence[str]) -> dict[str, str | None]:
    names: dict[str, str | None] = {}
    for module in base_modules:
        key = KOHYA_PREFIX + module.replace(".", "_")
        names[key] = None if key in names else module  # None marks an ambiguous underscore name
    return names


def _resolve_module(module: str, base_modules: set[str], kohya: Mapping[str, str | None]) -> str:
    """The base module a LoRA-file module path means (its canonical name even when absent from the base)."""
    if module.startswith(KOHYA_PREFIX):
        return kohya.get(module) or module
    if module in base_modules:
        return module
    return strip_prefix(module)


def _peft_alpha(module: str, peft_config: Mapping | None) -> float | None:
    """lora_alpha from a peft adapter_config.json: alpha_pattern (suffix regex) first, then lora_alpha."""
    if not peft_config:
        return None
    for pattern, alpha in (peft_config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return float(alpha)
    alpha = peft_config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def plan_merge(
    lora: Mapping[str, torch.Tensor],
    base_shapes: Mapping[str, Sequence[int]],
    strength: float = 1.0,
    lora_alpha: float | None = None,
    peft_config: Mapping | None = None,
) -> LoraPlan:
    """Match every key of a LoRA file to the base; collect every problem instead of stopping at the first.

    lora: the LoRA file's tensors (only shapes, dtypes and the scalar alphas are read). base_shapes:
    canonical base key -> shape. lora_alpha overrides every other source of α; else a kohya `.alpha`
    tensor, else the peft config, else α = r.
    """
    plan = LoraPlan()
    base_modules = {k[: -len(".weight")] for k in base_shapes if k.endswith(".weight")}
    kohya = _kohya_names(sorted(base_modules))
    rslora = bool(peft_config and peft_config.get("use_rslora"))
    if peft_config and peft_config.get("use_dora"):
        plan.problems.append("the peft config has use_dora=true: DoRA adapters cannot be merged by this tool")

    parts: dict[str, dict[str, tuple[str, LoraKey]]] = {}  # canonical module -> part -> (file key, parsed)
    layouts: set[str] = set()
    for key, tensor in lora.items():
        if _UNSUPPORTED.search(key):
            plan.problems.append(
                f"LoRA key {key!r} is not a plain LoRA part (DoRA/LoHa/LoKr or a whole peft-wrapped model): "
                "save only the adapter (peft's save_pretrained) or merge it with the tool that trained it"
            )
            continue
        parsed = parse_lora_key(key)
        if parsed is None and "lora" in key.lower():
            plan.problems.append(
                f"LoRA key {key!r} is not a part this tool knows (lora_A/lora_B/lora_down/lora_up .weight, "
                ".alpha, .diff, .diff_b): e.g. a LoRA bias; merge it with the tool that trained it"
            )
            continue
        if parsed is None:
            name = strip_prefix(key)
            if name in plan.copies:
                plan.problems.append(f"LoRA-file tensors {plan.copies[name]!r} and {key!r} both mean {name!r}")
                continue
            if name in base_shapes:
                if tuple(base_shapes[name]) != tuple(tensor.shape):
                    plan.problems.append(
                        f"LoRA-file tensor {key!r} would replace base {name!r} but has shape "
                        f"{list(tensor.shape)} instead of {list(base_shapes[name])}: LoRA and base are for "
                        "different models"
                    )
                    continue
                plan.replaced.append(name)
            plan.copies[name] = key
            continue
        if parsed.part in ("down", "up", "diff") and not tensor.is_floating_point():
            plan.problems.append(
                f"LoRA key {key!r} has dtype {tensor.dtype}; expected a floating dtype (a quantised LoRA? "
                "dequantise it first)"
            )
            continue
        module = _resolve_module(parsed.module, base_modules, kohya)
        prefix = next((p for p in (*LORA_PREFIXES, KOHYA_PREFIX) if parsed.module.startswith(p)), "")
        suffix = re.sub(r"^(lora_[AB])\.[^.]+\.", r"\1.<adapter>.", key[len(parsed.module) + 1 :])
        layouts.add(f"{prefix or '(no prefix)'} + {suffix}")
        slot = parsed.part if parsed.adapter is None else f"{parsed.part}@{parsed.adapter}"
        if slot in parts.setdefault(module, {}):
            plan.problems.append(
                f"LoRA keys {parts[module][slot][0]!r} and {key!r} both target module {module!r}: "
                "the file holds two adapters for it; keep one"
            )
            continue
        parts[module][slot] = (key, parsed)
    plan.layouts = sorted(layouts)

    for module, slots in sorted(parts.items()):
        _plan_module(plan, module, slots, lora, base_shapes, strength, lora_alpha, peft_config, rslora)
    for target in sorted(plan.targets.keys() & plan.copies.keys()):
        plan.problems.append(
            f"base {target!r} is both replaced by {plan.copies[target]!r} and changed by a LoRA: keep one of them"
        )
    return plan


def _plan_module(
    plan: LoraPlan,
    module: str,
    slots: Mapping[str, tuple[str, LoraKey]],
    lora: Mapping[str, torch.Tensor],
    base_shapes: Mapping[str, Sequence[int]],
    strength: float,
    lora_alpha: float | None,
    peft_config: Mapping | None,
    rslora: bool,
) -> None:
    """Add one module's merges (or its problems) to the plan."""
    adapters = {slot.split("@")[1] for slot in slots if "@" in slot}
    if len(adapters) > 1:
        keys = sorted(key for key, _ in slots.values())
        plan.problems.append(
            f"module {module!r} has parts of several adapters {sorted(adapters)} ({keys[:4]}): keep one"
        )
        return
    by_part = {parsed.part: key for key, parsed in slots.values()}
    hint = "is the LoRA for this base? (UniAnimate's LoRA fits Wan2.1-I2V-14B only)"
    if re.search(r"(^|\.)(attn1|attn2|to_q|to_out|condition_embedder)(\.|$)", module):
        hint = "the LoRA uses diffusers module names (attn1.to_q, ...): rename them to the official ones first"

    for part, suffix in (("diff", "weight"), ("diff_b", "bias")):
        if part in by_part:
            target = f"{module}.{suffix}"
            if target not in base_shapes:
                plan.problems.append(
                    f"LoRA key {by_part[part]!r} targets {target!r}, which the base does not have: {hint}"
                )
            elif tuple(lora[by_part[part]].shape) != tuple(base_shapes[target]):
                plan.problems.append(
                    f"LoRA key {by_part[part]!r} has shape {list(lora[by_part[part]].shape)} but base "
                    f"{target!r} has {list(base_shapes[target])}: {hint}"
                )
            else:
                shape = tuple(base_shapes[target])
                plan.targets[target] = LoraTarget(target, "diff", (by_part[part],), shape, strength)

    if not {"down", "up", "alpha"} & by_part.keys():
        return
    down_key, up_key = by_part.get("down"), by_part.get("up")
    if down_key is None or up_key is None:
        have = down_key or up_key or by_part["alpha"]
        missing = "lora_A/lora_down" if down_key is None else "lora_B/lora_up"
        plan.problems.append(
            f"LoRA key {have!r} has no matching {missing} part for module {module!r}: the file is incomplete"
        )
        return
    target = f"{module}.weight"
    if target not in base_shapes:
        plan.problems.append(f"LoRA key {down_key!r} targets {target!r}, which the base lacks: {hint}")
        return
    if target in plan.targets:
        other = plan.targets[target].keys[0]
        plan.problems.append(f"LoRA keys {down_key!r} and {other!r} both change {target!r}: keep one")
        return
    down, up = lora[down_key], lora[up_key]
    shape = tuple(base_shapes[target])
    rank = down.shape[0]
    if down.dim() < 2 or up.dim() < 2 or up.shape[1] != rank or up.shape[2:].numel() != 1:
        plan.problems.append(
            f"LoRA keys {down_key!r} {list(down.shape)} and {up_key!r} {list(up.shape)} do not chain "
            "(expected A [r, in], B [out, r]): the file is corrupt or not a LoRA"
        )
        return
    if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]):
        plan.problems.append(
            f"LoRA for {target!r} is B {list(up.shape)} @ A {list(down.shape)} but the base tensor is "
            f"{list(shape)}: {hint} (e.g. a 14B LoRA on the 1.3B base)"
        )
        return
    if lora_alpha is not None:
        alpha, source = float(lora_alpha), "--lora-alpha"
    elif "alpha" in by_part:
        alpha, source = float(lora[by_part["alpha"]].float().item()), ".alpha tensor"
    elif _peft_alpha(module, peft_config) is not None:
        alpha, source = _peft_alpha(module, peft_config), "adapter_config.json"
    else:
        alpha, source = float(rank), "rank"
    scale = lora_scale(rank, alpha, strength, rslora)
    plan.targets[target] = LoraTarget(target, "lora", (down_key, up_key), shape, scale, rank, alpha, source)


# ----------------------------------------------------------------------------- adapters trained here (peft)

_PEFT_PART = re.compile(r"^(?P<module>.+)\.(?:base_layer\.(?P<base>weight|bias)|lora_(?P<ab>[AB])\.[^.]+\.weight)$")


def merged_peft_state(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft-wrapped network's state dict (modules with `base_layer` + `lora_A/lora_B.<adapter>`) as the plain
    network's: W + scale·B@A under the module's own key, base biases unwrapped, every other tensor unchanged.
    Merged in float32, returned in the base weight's dtype."""
    out: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PEFT_PART.match(key)
        if match is None:
            out[key] = value
        elif match["base"]:
            out[f"{match['module']}.{match['base']}"] = value
        else:
            adapters.setdefault(match["module"], {})[match["ab"]] = value
    for module, parts in adapters.items():
        if set(parts) != {"A", "B"} or f"{module}.weight" not in out:
            raise ValueError(f"peft state of {module!r} is incomplete: has {sorted(parts)} and no base weight")
        weight = out[f"{module}.weight"]
        out[f"{module}.weight"] = merge_lora_weight(weight, parts["A"], parts["B"], scale, weight.dtype)
    return out


def adapter_file_state(
    state: Mapping[str, torch.Tensor], alpha: float, full: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """The adapter of a peft-wrapped state dict as a LoRA file scripts/merge_lora.py reads: `<module>.lora_A.weight`
    [r, in], `<module>.lora_B.weight` [out, r] and `<module>.alpha` per module (canonical module names), plus the
    tensors named in `full` (fully trained beside the adapter, e.g. the pose encoders; copied by the merge)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _PEFT_PART.match(key)
        if match is not None and match["ab"]:
            out[f"{match['module']}.lora_{match['ab']}.weight"] = value
            out[f"{match['module']}.alpha"] = torch.tensor(float(alpha))
        elif match is None and key in full:
            out[key] = value
    return out
