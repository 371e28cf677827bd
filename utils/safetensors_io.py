"""Low-level weight-file IO: find the files of a checkpoint, read them, write them atomically and in shards.

The libraries do the format: safetensors reads and writes the files, huggingface_hub plans the shards and the
index. Format knowledge (key names, layouts) lives in wan/checkpoint.py; this module only moves tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file

from utils.atomic_io import atomic_output
from utils.atomic_io import atomic_write_text as atomic_write_text  # re-exported: callers import it from here

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"


def resolve_checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """Return the weight files of a checkpoint given as a file, a sharded folder or a single-file folder.

    A folder is read through its `*.safetensors.index.json` when it has exactly one, else it must hold
    exactly one weight file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (check the path, or fetch it with download_models.py)")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _files_from_index(path)
        return [path]
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _files_from_index(indexes[0])
    if len(indexes) > 1:
        raise ValueError(f"{path} holds several index files {[p.name for p in indexes]}: pass the one to use")
    files = sorted(p for p in path.iterdir() if p.suffix == SAFETENSORS_SUFFIX or p.suffix in PICKLE_SUFFIXES)
    if len(files) != 1:
        raise ValueError(
            f"{path} holds {len(files)} weight files and no *{INDEX_SUFFIX}: "
            "pass the file to load, or add the index of the shards"
        )
    return files


def _files_from_index(index_path: Path) -> list[Path]:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map': not a sharded-checkpoint index")
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shard files that do not exist: {missing}")
    return files


# --- Reading -----------------------------------------------------------------------------------------------


@contextmanager
def open_safetensors(path: str | os.PathLike, backend: str = "mmap") -> Iterator[Any]:
    """safe_open(path) for torch, its header validated, with a rejection as a ValueError that names the file.

    backend "pread" reads each tensor into fresh memory of its own; "mmap" maps the file, and every page read
    then stays in the process's RSS until the file is closed.
    """
    # mmap is safe_open's default: passing `backend` only for pread keeps older safetensors (no backend argument)
    # reading everything but the merge's pread path
    options = {} if backend == "mmap" else {"backend": backend}
    try:
        handle = safe_open(str(path), framework="pt", **options)
    except SafetensorError as err:
        raise _unreadable(path, err) from None
    with handle:
        yield handle


def _unreadable(path: str | os.PathLike, err: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({err}): the file is truncated or not safetensors; "
        "download or write it again"
    )


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read one weight file (safetensors, or a torch pickle loaded with weights_only) into a dict."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            return _load_safetensors(path, device=str(device))
        except SafetensorError as err:
            raise _unreadable(path, err) from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
            return torch.load(path, map_location=device, weights_only=True)
    raise ValueError(f"cannot read {path}: expected a .safetensors file or a torch file ({', '.join(PICKLE_SUFFIXES)})")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read every weight file of a checkpoint into one dict; a key present in two shards is an error."""
    merged: dict = {}
    for file in resolve_checkpoint_files(path):
        tensors = load_file(file, device)
        clash = merged.keys() & tensors.keys()
        if clash:
            raise ValueError(f"{file} repeats keys already read from another shard: {sorted(clash)[:5]}")
        merged.update(tensors)
    return merged


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none)."""
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


class WeightFile:
    """One weight file opened for reading one tensor at a time, without reading any tensor up front.

    `specs` holds every tensor as a meta tensor (name -> dtype and shape), in storage order. Safetensors files
    are read through safe_open's pread backend, so each `get` allocates exactly that tensor and a caller that
    drops it keeps RSS near one tensor; torch files are loaded as a memory-mapped dict (weights_only).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stack = ExitStack()
        if self.path.suffix == SAFETENSORS_SUFFIX:
            handle = self._stack.enter_context(open_safetensors(self.path, backend="pread"))
            self._get: Callable[[str], torch.Tensor] = handle.get_tensor
            self.specs = {name: _meta_of(handle, name) for name in handle.offset_keys()}
        else:
            tensors = load_file(self.path)
            bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise ValueError(f"{self.path} holds entries that are not tensors: {bad[:5]}; expected a state dict")
            self._get = tensors.__getitem__
            self.specs = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
            self._stack.callback(tensors.clear)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, on the CPU."""
        if name not in self.specs:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._get(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _meta_of(handle: Any, name: str) -> torch.Tensor:
    """A meta tensor of a safetensors tensor's dtype and shape. The torch dtype comes from the library itself: an
    empty slice reads no data (a scalar, or a tensor empty along dim 0, has no such slice and is read whole: at
    most one element)."""
    view = handle.get_slice(name)
    shape = view.get_shape()
    dtype = (view[:0] if shape and shape[0] else handle.get_tensor(name)).dtype
    return torch.empty(shape, dtype=dtype, device="meta")


# --- Writing -----------------------------------------------------------------------------------------------


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write (or replace) a safetensors file through a staging path beside it and an atomic rename."""
    with atomic_output(path, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def check_free_space(folder: str | os.PathLike, needed_bytes: int) -> None:
    """Fail before writing when the output's file system cannot hold `needed_bytes` more."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OSError(
            f"{folder} has {free / 1e9:.2f} GB free but the output needs {needed_bytes / 1e9:.2f} GB: "
            "free space or write elsewhere"
        )


def plan_shards(
    specs: Mapping[str, torch.Tensor], max_shard_bytes: int, stem: str = "diffusion_pytorch_model"
) -> StateDictSplit:
    """huggingface_hub's split of tensors (meta tensors are enough), in order, into shards of at most
    `max_shard_bytes` (a larger tensor gets its own), named officially: stem-00001-of-00007.safetensors ..., or
    stem.safetensors alone.

    Sizes are the tensors' own bytes: split_torch_state_dict_into_shards's storage sizes and ids would also
    import torch.distributed.tensor (~40 MB of RSS) for tensors that never share storage here.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    return split_state_dict_into_shards_factory(
        dict(specs),
        get_storage_size=lambda tensor: tensor.nbytes,
        filename_pattern=f"{stem}{{suffix}}{SAFETENSORS_SUFFIX}",
        max_shard_size=max_shard_bytes,
    )


def save_sharded(
    out: str | os.PathLike,
    specs: Mapping[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    stem: str = "diffusion_pytorch_model",
    on_tensor: Callable[[torch.Tensor], None] | None = None,
) -> list[Path]:
    """Write the tensors planned in `specs` (name -> a tensor of their dtype and shape, e.g. on "meta") atomically
    to `out`, asking `produce(name)` for them one shard at a time, so at most one shard is in memory.

    `out` ending in .safetensors is one file (the whole output is then the one shard in memory); anything else a
    folder of shards + `<stem>.safetensors.index.json` (the official layout). A produced tensor whose dtype or
    shape differs from its spec fails naming it, and nothing is left at `out`. Returns the files written.
    """
    out = Path(out).absolute()
    metadata = dict(metadata) if metadata else None
    check_free_space(out.parent, sum(spec.nbytes for spec in specs.values()))
    with atomic_output(out, overwrite=overwrite) as staging:
        if out.suffix == SAFETENSORS_SUFFIX:
            save_file(_produce_shard(list(specs), specs, produce, out, on_tensor), staging, metadata=metadata)
            return [out]
        split = plan_shards(specs, max_shard_bytes, stem)
        staging.mkdir()
        for name, keys in split.filename_to_tensors.items():
            save_file(_produce_shard(keys, specs, produce, out, on_tensor), staging / name, metadata=metadata)
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (staging / f"{stem}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2, sort_keys=True))
    return [out / name for name in split.filename_to_tensors]


def _produce_shard(
    keys: list[str],
    specs: Mapping[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    out: Path,
    on_tensor: Callable[[torch.Tensor], None] | None,
) -> dict[str, torch.Tensor]:
    """The tensors of one shard, each checked against its spec (a wrong plan fails at its tensor, by name)."""
    shard = {}
    for key in keys:
        tensor, spec = produce(key), specs[key]
        if tensor.dtype != spec.dtype or tensor.shape != spec.shape:
            raise ValueError(
                f"{key!r}: produced {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} {list(spec.shape)} "
                f"for {out}"
            )
        shard[key] = tensor.contiguous()
        if on_tensor is not None:
            on_tensor(tensor)
    return shard
