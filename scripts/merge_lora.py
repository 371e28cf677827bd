"""Merge a LoRA (UniAnimate, peft or kohya layout) into a Wan checkpoint, one output shard at a time.

Builds the distillation teacher: Wan2.1-I2V-14B + the UniAnimate-DiT LoRA, with the LoRA file's pose
encoders copied into the output. Peak memory stays near the largest output shard, not the checkpoint.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/merge_lora.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.file_lock import LockHeldError, check_output_path, exit_on_sigterm, output_lock  # noqa: E402
from utils.lora import LoraPlan, merge_diff, merge_lora_weight, plan_merge  # noqa: E402
from utils.safetensors_io import (  # noqa: E402
    SAFETENSORS_SUFFIX,
    WeightFile,
    load_checkpoint,
    plan_shards,
    resolve_checkpoint_files,
    save_sharded,
)

logger = logging.getLogger("merge_lora")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_CONFIG = "adapter_config.json"


class MergeError(ValueError):
    """The merge cannot run as asked; the message says what to fix."""


@dataclass
class Base:
    """The base checkpoint, opened: its weight files and the file of every tensor."""

    path: Path
    files: list[WeightFile]
    file_of: dict[str, WeightFile]
    specs: dict[str, torch.Tensor]  # every tensor as a meta tensor, in file then storage order (sequential reads)

    def close(self) -> None:
        for file in self.files:
            file.close()


def open_base(path: str | Path) -> Base:
    """Open every weight file of the base (single file, folder, or index) without reading tensor data."""
    files: list[WeightFile] = []
    file_of: dict[str, WeightFile] = {}
    specs: dict[str, torch.Tensor] = {}
    try:
        for name in resolve_checkpoint_files(path):
            try:
                files.append(WeightFile(name))
            except Exception as err:
                raise MergeError(f"cannot read base file {name}: {err}") from err
            for key, spec in files[-1].specs.items():
                if key in file_of:
                    raise MergeError(f"base tensor {key!r} is in both {file_of[key].path} and {name}")
                file_of[key] = files[-1]
                specs[key] = spec
    except BaseException:
        for file in files:
            file.close()
        raise
    if not specs:
        raise MergeError(f"base {path} holds no tensors")
    return Base(Path(path), files, file_of, specs)


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The LoRA file's tensors (memory-mapped where the format allows) and its peft config, if any."""
    path = Path(path)
    try:
        tensors = load_checkpoint(path)
    except Exception as err:
        raise MergeError(f"cannot read LoRA file {path}: {err}") from err
    if len(tensors) == 1 and isinstance(next(iter(tensors.values())), Mapping):  # {"state_dict": {...}}
        (wrapper,) = tensors
        logger.info("LoRA file %s wraps its tensors in %r: using that entry", path, wrapper)
        tensors = dict(tensors[wrapper])
    bad = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise MergeError(f"LoRA file {path} holds entries that are not tensors: {bad[:5]}; expected a flat dict")
    config_path = (path if path.is_dir() else path.parent) / PEFT_CONFIG
    config = None
    if config_path.is_file():
        with open(config_path) as f:
            config = json.load(f)
        logger.info("read lora_alpha=%s from %s", config.get("lora_alpha"), config_path)
    return tensors, config


def _meta(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device="meta")


def output_specs(
    base: Base, plan: LoraPlan, lora: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every output tensor as a meta tensor: base tensors (floating ones cast to `dtype`), then the LoRA file's copies.

    Copied tensors keep their dtype (byte-for-byte), also where they replace a base tensor.
    """
    specs = {}
    for name, spec in base.specs.items():
        if name in plan.copies:
            specs[name] = _meta(lora[plan.copies[name]])
        else:
            specs[name] = _meta(spec, dtype if spec.dtype.is_floating_point else spec.dtype)
    for name, key in sorted(plan.copies.items()):
        if name not in base.specs:
            specs[name] = _meta(lora[key])
    return specs


def make_producer(
    base: Base,
    plan: LoraPlan,
    lora: Mapping[str, torch.Tensor],
    specs: Mapping[str, torch.Tensor],
    strength: float,
    device: torch.device,
) -> Callable[[str], torch.Tensor]:
    """The function that computes one output tensor by name (read, merge on `device`, cast to its spec's dtype)."""

    def produce(name: str) -> torch.Tensor:
        if name in plan.copies:
            return lora[plan.copies[name]]
        dtype = specs[name].dtype
        weight = base.file_of[name].get(name)
        target = plan.targets.get(name)
        if target is None:
            return weight.to(dtype)
        weight = weight.to(device)
        parts = [lora[key].to(device) for key in target.keys]
        if target.kind == "diff":
            merged = merge_diff(weight, parts[0], strength, dtype)
        else:
            merged = merge_lora_weight(weight, parts[0], parts[1], target.scale, dtype)
        return merged.cpu()

    return produce


def _pattern(name: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", name)


def describe_plan(
    base: Base,
    plan: LoraPlan,
    lora: Mapping[str, torch.Tensor],
    specs: Mapping[str, torch.Tensor],
    args: argparse.Namespace,
) -> list[str]:
    """The plan as lines of text: targets grouped by block pattern, copies, replacements, problems."""
    lines = [
        f"base: {base.path} ({len(base.files)} file(s), {len(base.specs)} tensors, "
        f"{sum(s.nbytes for s in base.specs.values()) / 1e9:.3f} GB, dtypes "
        f"{dict(Counter(str(s.dtype).removeprefix('torch.') for s in base.specs.values()))})",
        f"lora: {args.lora} ({len(lora)} tensors; layout {', '.join(plan.layouts) or 'no LoRA keys'})",
    ]
    groups = Counter(
        (_pattern(t.target), t.kind, t.rank, t.alpha, t.alpha_source, t.scale, t.shape) for t in plan.targets.values()
    )
    lines.append(f"targets: {len(plan.targets)} base tensors get W += scale·B@A in float32 (--alpha {args.alpha})")
    for (pattern, kind, rank, alpha, source, scale, shape), count in sorted(groups.items()):
        what = f"rank {rank}, lora_alpha {alpha:g} (from {source})" if kind == "lora" else "full diff"
        lines.append(f"  {pattern:<40} x{count:<4} {what}, scale {scale:g}, shape {list(shape)}")
    lines.append(f"copied from the LoRA file byte-for-byte: {len(plan.copies)} tensors")
    for name, key in sorted(plan.copies.items()):
        lines.append(f"  {name} <- {key} {list(lora[key].shape)} {str(lora[key].dtype).removeprefix('torch.')}")
    if plan.replaced:
        lines.append(f"of those, {len(plan.replaced)} REPLACE the base tensor of the same name: {plan.replaced}")
    untouched = len(base.specs) - len(plan.targets) - len(plan.replaced)
    lines.append(f"unchanged base tensors (cast to {args.dtype} if floating): {untouched}")
    total = sum(s.nbytes for s in specs.values())
    if Path(args.out).suffix == SAFETENSORS_SUFFIX:
        layout = "one file, held in memory whole while written"
    else:
        num_shards = len(plan_shards(specs, shard_bytes(args.shard_size)).filename_to_tensors)
        layout = f"{num_shards} shard(s) of <= {args.shard_size:g} GB + index"
    lines.append(f"output: {args.out} ({layout}, {len(specs)} tensors, {total / 1e9:.3f} GB)")
    lines.append(f"problems: {len(plan.problems)}" + ("" if plan.problems else " (none)"))
    lines.extend(f"  {problem}" for problem in plan.problems)
    return lines


def shard_bytes(gigabytes: float) -> int:
    return int(gigabytes * 1e9)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="The output is written to a temporary path beside --out and moved there only when complete.",
    )
    parser.add_argument(
        "--base",
        required=True,
        metavar="PATH",
        help="base checkpoint: a .safetensors/.pth file, a folder of shards with *.safetensors.index.json, "
        "or the index file itself (e.g. the Wan2.1-I2V-14B-720P folder)",
    )
    parser.add_argument(
        "--lora",
        required=True,
        metavar="PATH",
        help="LoRA checkpoint (.ckpt/.pt/.safetensors, or a peft adapter folder): UniAnimate/DiffSynth "
        "(pipe.dit. + lora_A/lora_B.default), peft (base_model.model. + lora_A/lora_B, alpha from "
        "adapter_config.json) or kohya (lora_unet_* + lora_down/lora_up + .alpha); its non-LoRA tensors "
        "(the pose encoders) are copied into the output unchanged",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="output: a path ending in .safetensors writes one file (built in memory whole: use a folder for a "
        "large model); anything else a folder of shards (diffusion_pytorch_model-0000i-of-0000N.safetensors + "
        "index, the official layout), built one shard at a time",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="merge strength: W += alpha · (lora_alpha / r) · B @ A (default: %(default)s)",
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="override lora_alpha for every module (default: the file's .alpha tensors or "
        "adapter_config.json, else r, i.e. scale 1; UniAnimate trained with r = lora_alpha = 128)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="device for the float32 merge matmuls: cpu, cuda, cuda:1 ... (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="dtype of the output's floating base tensors; merged ones are computed in float32, then cast "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--shard-size",
        type=float,
        default=10.0,
        help="largest output shard in GB, folder output only; the merge holds about one shard in memory "
        "(default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (targets matched, ranks, scales, shapes, copied and unmatched keys) and "
        "write nothing; exit status 1 if the merge would fail",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Plan the merge, print the plan on --dry-run, else write the output. Returns the exit status."""
    out = Path(args.out)
    if out.exists() and not args.overwrite and not args.dry_run:
        raise MergeError(f"{out} already exists: choose another --out or pass --overwrite")
    check_arguments(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.dry_run:
        return merge(args, out, device, dtype)
    with output_lock(out):  # one writer per --out; a killed merge's staging beside it is removed here
        return merge(args, out, device, dtype)


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag that can be checked before a byte is read: numbers finite, device present, paths usable."""
    if not math.isfinite(args.alpha):
        raise MergeError(f"--alpha {args.alpha} is not a finite number: it scales every merged LoRA delta (e.g. 1.0)")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise MergeError(f"--lora-alpha {args.lora_alpha} must be a finite number > 0 (UniAnimate's is 128)")
    if not (math.isfinite(args.shard_size) and args.shard_size > 0):
        raise MergeError(f"--shard-size must be a finite number of GB > 0, got {args.shard_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise MergeError(f"--device {args.device!r} is not a device ({err}): use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(f"--device {args.device} asked for, but CUDA is not available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MergeError(
                f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) are visible; use cuda:0"
            )
    for flag, path in (("--base", args.base), ("--lora", args.lora)):
        if not Path(path).exists():
            raise MergeError(f"{flag} {path} does not exist: check the path (download_models.py fetches the assets)")
    if not args.dry_run:
        try:
            check_output_path(args.out)
        except ValueError as err:
            raise MergeError(str(err)) from None


def merge(args: argparse.Namespace, out: Path, device: torch.device, dtype: torch.dtype) -> int:
    """Plan the merge and print it (--dry-run) or write it."""
    lora, peft_config = load_lora(args.lora)
    base = open_base(args.base)
    try:
        plan = plan_merge(lora, {k: tuple(s.shape) for k, s in base.specs.items()}, args.alpha, args.lora_alpha,
                          peft_config)  # fmt: skip
        specs = output_specs(base, plan, lora, dtype)
        report = describe_plan(base, plan, lora, specs, args)
        if args.dry_run:
            for line in report:
                logger.info("%s", line)
            return 1 if plan.problems else 0
        if plan.problems:
            shown = "\n  ".join(plan.problems[:20])
            if len(plan.problems) > 20:
                shown += f"\n  ... and {len(plan.problems) - 20} more (see --dry-run)"
            raise MergeError(f"cannot merge {args.lora} into {args.base}:\n  {shown}\nNothing was written.")
        if not plan.targets:
            raise MergeError(f"{args.lora} has no LoRA keys that target {args.base}: nothing to merge")
        for line in report:
            logger.info("%s", line)
        metadata = {
            "format": "pt",
            "merged_base": str(args.base),
            "merged_lora": str(args.lora),
            "merge_strength": repr(args.alpha),
        }
        produce = make_producer(base, plan, lora, specs, args.alpha, device)
        with tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True, desc="merge") as bar:
            files = save_sharded(
                out,
                specs,
                produce,
                shard_bytes(args.shard_size),
                metadata,
                overwrite=args.overwrite,
                on_tensor=lambda tensor: bar.update(tensor.nbytes),
            )
        logger.info("wrote %d file(s) to %s", len(files), out)
        return 0
    finally:
        base.close()


def release_large_frees_to_os(threshold: int = 1 << 20) -> None:
    """Pin glibc's mmap threshold: allocations above 1 MB are mmapped and go back to the OS when freed. By default
    glibc raises the threshold after large frees and then serves the next tensor-sized buffers from the heap,
    which it keeps, so the peak would grow with the number of tensors merged instead of staying near one."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: nothing to pin
        pass


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    release_large_frees_to_os()
    args = build_parser().parse_args(argv)
    exit_on_sigterm()  # SIGTERM removes the staging output like Ctrl-C does
    try:
        return run(args)
    except (ValueError, OSError, LockHeldError) as err:  # MergeError, unreadable files, an existing or busy --out
        logger.error("error: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
