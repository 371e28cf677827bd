"""Extract one role's network weights (generator, generator_ema, critic, ...) from a training checkpoint into
plain safetensors with canonical Wan keys: the bridge from one training stage to the next.

Reads a torch.distributed.checkpoint (DCP) folder or a single torch file holding {"generator": state dict,
"generator_ema": ..., "critic": ..., "optimizers": ..., "step": ...}, including Self-Forcing's files. A DCP
folder must be a complete train.py checkpoint (its manifest's checksums are verified first) and is read without
unpickling anything unsafe; torch files are read with weights_only. The output is written atomically; a run
killed mid-write leaves a staging entry beside --out that the next run for the same --out removes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/extract_net_weights.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math  # noqa: E402

import torch  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

from trainer.checkpoint import MANIFEST, check_checkpoint, describe_error, load_dcp, read_dcp_metadata  # noqa: E402
from utils.file_lock import LockHeldError, check_output_path, exit_on_sigterm, output_lock  # noqa: E402
from utils.safetensors_io import load_file, save_sharded  # noqa: E402
from wan.checkpoint import to_canonical  # noqa: E402

logger = logging.getLogger("extract_net_weights")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DCP_METADATA = ".metadata"


class ExtractError(ValueError):
    """The checkpoint does not hold what was asked for; the message names what it does hold."""


def is_dcp(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def _dcp_entries(path: Path) -> tuple[dict[str, dict[str, TensorStorageMetadata]], list[str]]:
    """DCP metadata -> ({role: {key within the role: tensor metadata}}, other top-level entries).

    A role is a top-level entry whose children are all tensors (a flat state dict); optimizer states and
    counters nest deeper or are not tensors and are listed as other entries.
    """
    metadata = read_dcp_metadata(path)
    paths = metadata.planner_data or {}
    grouped: dict[str, dict[str, TensorStorageMetadata]] = {}
    other: set[str] = set()
    for fqn, entry in metadata.state_dict_metadata.items():
        parts = tuple(str(p) for p in paths.get(fqn, fqn.split(".", 1)))
        if len(parts) == 2 and isinstance(entry, TensorStorageMetadata):
            grouped.setdefault(parts[0], {})[parts[1]] = entry
        else:
            other.add(parts[0])
    return grouped, sorted(other - grouped.keys())


def _file_entries(path: Path) -> tuple[dict[str, Mapping], list[str]]:
    """A torch file -> ({role: its flat dict}, other top-level entries)."""
    try:
        ckpt = load_file(path)
    except Exception as err:
        raise ExtractError(
            f"cannot read {path} as a torch checkpoint ({err}); expected a file written by torch.save with "
            "tensors, dicts and numbers only, or a DCP folder"
        ) from err
    if not isinstance(ckpt, Mapping):
        raise ExtractError(f"{path} holds a {type(ckpt).__name__}, not a dict of roles")
    roles = {
        k: v for k, v in ckpt.items() if isinstance(v, Mapping) and all(isinstance(t, torch.Tensor) for t in v.values())
    }
    other = sorted(k for k in ckpt if k not in roles)
    if not roles and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ExtractError(
            f"{path} is a plain state dict ({len(ckpt)} tensors), not a training checkpoint with roles: it already "
            "is network weights; load it directly (wan.checkpoint.load_weights)"
        )
    return roles, other


def _describe(counts: Mapping[str, int], other: Sequence[str]) -> str:
    roles = ", ".join(f"{name} ({n} tensors)" for name, n in sorted(counts.items())) or "none"
    return f"roles present: {roles}" + (f"; other entries: {', '.join(other)}" if other else "")


def load_role(path: str | Path, role: str) -> dict[str, torch.Tensor]:
    """The raw (not yet canonical) state dict of `role`; fails naming the roles present if it is absent/empty."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_dcp(path) or (path.is_dir() and (path / MANIFEST).is_file()):
        problem = check_checkpoint(path)
        if problem is not None:
            raise ExtractError(
                f"{path} is not a complete, intact training checkpoint: {problem}; extract from another one "
                "(e.g. the previous step_* folder)"
            )
        try:
            grouped, other = _dcp_entries(path)
        except Exception as err:  # the restricted unpickler's refusal, or a damaged file
            raise ExtractError(f"cannot read the DCP metadata of {path}: {err}") from None
        counts = {name: len(entries) for name, entries in grouped.items()}
        if role not in grouped:
            raise ExtractError(
                f"DCP checkpoint {path} has no tensors for role {role!r} (absent, or saved empty); "
                f"{_describe(counts, other)}. Pass --role with one of the roles present."
            )
        state = {
            role: {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in grouped[role].items()}
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            try:
                load_dcp(state, path)
            except BaseException as err:  # noqa: B036 - DCP's CheckpointException is a BaseException
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                raise ExtractError(f"cannot read {role!r} from {path}: {describe_error(err)}") from None
        return state[role]
    if path.is_dir():
        raise ExtractError(f"{path} is a folder without {DCP_METADATA}: not a DCP checkpoint; pass the folder or file")
    roles, other = _file_entries(path)
    counts = {name: len(sd) for name, sd in roles.items()}
    if role not in roles:
        raise ExtractError(
            f"{path} has no role {role!r}; {_describe(counts, other)}. Pass --role with one of the roles present."
        )
    if not roles[role]:
        with_weights = {name: n for name, n in counts.items() if n}
        raise ExtractError(
            f"role {role!r} in {path} is empty (0 tensors), e.g. saved before the EMA started; "
            f"{_describe(with_weights, other)}."
        )
    return dict(roles[role])


def canonical_state_dict(raw: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip trainer prefixes (model., _fsdp_wrapped_module., _orig_mod., ...) with wan.checkpoint's rules."""
    sd, fmt = to_canonical(dict(raw))
    if len(sd) != len(raw):
        raise ExtractError(f"{source}: {len(raw)} keys collapse to {len(sd)} after stripping prefixes (duplicates)")
    if not any(k.startswith("blocks.") for k in sd):
        logger.warning("%s: no blocks.* keys after canonicalisation (%s): is this a Wan network?", source, fmt)
    return sd


def extract(
    checkpoint: str | Path,
    role: str,
    out: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    shard_gb: float = 10.0,
) -> list[Path]:
    """Write `role`'s weights from `checkpoint` to `out` (.safetensors file, else a sharded folder)."""
    if not (math.isfinite(shard_gb) and shard_gb > 0):
        raise ExtractError(f"--shard-size {shard_gb} must be a finite number of GB > 0")
    if Path(out).exists() and not overwrite:  # before reading gigabytes
        raise FileExistsError(f"{out} already exists: choose another --out or pass --overwrite")
    check_output_path(out)
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist: pass a <run>/checkpoints/step_* folder")
    with output_lock(out):  # one writer per --out; a killed run's staging beside it is removed here
        sd = canonical_state_dict(load_role(checkpoint, role), f"{checkpoint}[{role}]")
        sd = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}
        metadata = {"format": "pt", "source": str(checkpoint), "role": role}
        files = save_sharded(out, sd, sd.__getitem__, int(shard_gb * 1e9), metadata, overwrite)
    total = sum(v.nbytes for v in sd.values())
    logger.info("wrote %d tensors (%.3f GB) of %r from %s to %s", len(sd), total / 1e9, role, checkpoint, out)
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="training checkpoint: a DCP folder or a single torch file"
    )
    parser.add_argument(
        "--role",
        default="generator",
        help="which weights: generator, generator_ema, critic, ... (default: %(default)s; an error lists the roles "
        "the checkpoint holds)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="output: a path ending in .safetensors writes one file, anything else a folder of shards + index",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep the stored dtype)"
    )
    parser.add_argument(
        "--shard-size", type=float, default=10.0, help="largest shard in GB, folder output only (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    exit_on_sigterm()  # SIGTERM removes the staging output like Ctrl-C does
    try:
        extract(args.checkpoint, args.role, args.out, DTYPES.get(args.dtype), args.overwrite, args.shard_size)
    except (ValueError, OSError, LockHeldError) as err:
        logger.error("error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
