"""Low-level weight-file IO: find the files of a checkpoint, read them, write them atomically.

Format knowledge (key names, layouts) lives in wan/checkpoint.py; this module only moves tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


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
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _files_from_index(indexes[0])
    if len(indexes) > 1:
        raise ValueError(f"{path} holds several index files {[p.name for p in indexes]}: pass the one to use")
    files = sorted(p for p in path.iterdir() if p.suffix == SAFETENSORS_SUFFIX or p.suffix in PICKLE_SUFFIXES)
    if len(files) != 1:
        raise ValueError(
            f"{path} holds {len(files)} weight files and no *.safetensors.index.json: "
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


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read one weight file (safetensors, or a torch pickle loaded with weights_only) into a dict."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    if path.suffix in PICKLE_SUFFIXES:
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
            return torch.load(path, map_location=device, weights_only=True)
    raise ValueError(f"cannot read {path}: expected a .safetensors file or a torch file ({', '.join(PICKLE_SUFFIXES)})")


def iter_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Iterator[tuple[Path, dict]]:
    """Yield (file, tensors) one weight file at a time, so a large sharded checkpoint never sits in RAM twice."""
    for file in resolve_checkpoint_files(path):
        yield file, load_file(file, device)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read every weight file of a checkpoint into one dict; a key present in two shards is an error."""
    merged: dict = {}
    for file, tensors in iter_checkpoint(path, device):
        clash = merged.keys() & tensors.keys()
        if clash:
            raise ValueError(f"{file} repeats keys already read from another shard: {sorted(clash)[:5]}")
        merged.update(tensors)
    return merged


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file through a temp file in the same folder and an atomic rename."""
    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file (configs, manifests) atomically."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --- Streaming IO: one tensor in RAM at a time --------------------------------------------------------
# safe_open memory-maps the whole file, and every page a merge touches then stays in the process's RSS
# until the file is closed. The reader and writer below use plain reads and writes of one tensor's
# bytes, so rewriting a 57 GB checkpoint needs about one tensor of memory, not one file.

_DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own cap on the JSON header
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """What a writer must know about a tensor before its bytes exist: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


class SafetensorsReader:
    """Random access to the tensors of one safetensors file through plain reads (no mmap).

    Each `get` allocates exactly that tensor, so a caller that drops it keeps RSS near one tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self.specs, self._offsets, self.metadata = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], dict[str, str]]:
        size_bytes = self._file.read(8)
        file_size = os.fstat(self._file.fileno()).st_size
        if len(size_bytes) != 8:
            raise ValueError(f"{self.path} is not a safetensors file: shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", size_bytes)
        if header_len > min(_HEADER_LIMIT, file_size - 8):
            raise ValueError(
                f"{self.path} is not a readable safetensors file (header length {header_len} for a file of "
                f"{file_size} bytes): the file is truncated or not safetensors; download or write it again"
            )
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{self.path} has a corrupt safetensors header ({err}): download or write it again"
            ) from err
        data_start = 8 + header_len
        metadata = header.pop("__metadata__", None) or {}
        specs: dict[str, TensorSpec] = {}
        offsets: dict[str, tuple[int, int]] = {}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _ST_TO_DTYPE.get(entry["dtype"])
            if dtype is None:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which this reader does not "
                    f"support (supported: {sorted(_ST_TO_DTYPE)}); convert the file to one of them"
                )
            spec = TensorSpec(name, dtype, tuple(int(s) for s in entry["shape"]))
            begin, end = entry["data_offsets"]
            if end - begin != spec.nbytes or data_start + end > file_size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} claims bytes [{begin}, {end}) that do not fit its shape "
                    f"{list(spec.shape)} {entry['dtype']} or the file ({file_size} bytes): the file is "
                    "corrupt or truncated; download or write it again"
                )
            specs[name] = spec
            offsets[name] = (data_start + begin, data_start + end)
        return specs, offsets, metadata

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh CPU memory."""
        if name not in self.specs:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        spec = self.specs[name]
        begin, end = self._offsets[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(begin)
        got = self._file.readinto(memoryview(buffer.numpy()))
        if got != end - begin:
            raise ValueError(f"{self.path}: read {got} of {end - begin} bytes of {name!r}: the file is truncated")
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return buffer.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorDictReader:
    """The `SafetensorsReader` interface over a dict already loaded (e.g. a memory-mapped torch file)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str | os.PathLike):
        self.path = Path(path)
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{self.path} holds entries that are not tensors: {bad[:5]}; expected a flat state dict")
        self._tensors = tensors
        self.specs = {k: TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        self.metadata: dict[str, str] = {}

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


def open_weight_file(path: str | os.PathLike) -> SafetensorsReader | TensorDictReader:
    """A reader for one weight file: streaming for safetensors, a (memory-mapped) dict for torch files."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return SafetensorsReader(path)
    return TensorDictReader(load_file(path), path)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor as safetensors stores them (no copy when already contiguous)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors is little-endian; writing it on a big-endian host is unsupported")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata values must be strings; got {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_TO_ST:
            raise ValueError(f"cannot write {spec.name!r}: dtype {spec.dtype} has no safetensors code")
        header[spec.name] = {
            "dtype": _DTYPE_TO_ST[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces


def write_safetensors_streaming(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> None:
    """Write a safetensors file whose header is known up front, asking `produce` for one tensor at a time.

    Not atomic by itself: write inside `atomic_output`. `produce` must return exactly the spec's dtype and
    shape (checked), so a wrong plan fails at its tensor with its name instead of writing a corrupt file.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate tensor names planned for {path}: {repeated[:5]}")
    header = _header_bytes(specs, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in specs:
            tensor = produce(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"{spec.name!r}: produced {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} "
                    f"{list(spec.shape)} for {path}"
                )
            f.write(tensor_bytes(tensor))
            del tensor
            if on_tensor is not None:
                on_tensor(spec)
        expected = 8 + len(header) + sum(spec.nbytes for spec in specs)
        if f.tell() != expected:
            raise OSError(f"wrote {f.tell()} bytes to {path}, expected {expected}")


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards or [[]]


def shard_names(stem: str, num_shards: int) -> list[str]:
    """Official (Hugging Face / Wan) shard names: stem-00001-of-00007.safetensors ..."""
    return [f"{stem}-{i + 1:05d}-of-{num_shards:05d}{SAFETENSORS_SUFFIX}" for i in range(num_shards)]


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging path beside `path`; on success move it to `path` (file or folder), else delete it.

    Either the complete new output is at `path` or nothing new is: a crash, an error or Ctrl-C leaves
    the old content (or nothing) there. Staging is in the same folder, so the final move is a rename.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another output path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        new = staging / path.name
        yield new
        if not new.exists():
            raise FileNotFoundError(f"nothing was written to the staging path {new}")
        if path.exists() and not (path.is_file() and new.is_file()):
            old = staging / f"{path.name}.old"
            os.rename(path, old)
            try:
                os.rename(new, path)
            except BaseException:
                os.rename(old, path)
                raise
        else:
            os.replace(new, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def save_streaming(
    out: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    stem: str = "diffusion_pytorch_model",
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> list[Path]:
    """Write tensors one at a time, atomically, to `out`: one file when it ends in .safetensors, else a
    folder of shards + `<stem>.safetensors.index.json` (the official layout). Returns the files written.
    """
    out = Path(out).absolute()
    check_free_space(out.parent, sum(spec.nbytes for spec in specs))
    with atomic_output(out, overwrite=overwrite) as staging:
        if out.suffix == SAFETENSORS_SUFFIX:
            write_safetensors_streaming(staging, specs, produce, metadata, on_tensor)
            names = [out.name]
        else:
            staging.mkdir()
            shards = plan_shards(specs, max_shard_bytes)
            names = shard_names(stem, len(shards))
            for name, shard in zip(names, shards, strict=True):
                write_safetensors_streaming(staging / name, shard, produce, metadata, on_tensor)
            weight_map = {spec.name: n for n, shard in zip(names, shards, strict=True) for spec in shard}
            index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)}, "weight_map": weight_map}
            with open(staging / f"{stem}{INDEX_SUFFIX}", "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        for written in [staging] if staging.is_file() else [staging / n for n in names]:
            with safe_open(str(written), framework="pt"):  # the library's own header validation
                pass
    return [out] if out.suffix == SAFETENSORS_SUFFIX else [out / name for name in names]
