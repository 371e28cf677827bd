"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically and read back only when
verified: every rank writes its shards into a temp folder, the files are hashed (sha256) into a manifest, and
the folder is renamed into place. Loading checks every file against the manifest first, reads DCP's pickled
`.metadata` through an unpickler that accepts only DCP's own metadata classes, and loads non-tensor entries
with torch's weights_only loader, so a crafted checkpoint folder cannot run code. `--resume auto` falls back to
the next newest checkpoint on any read error; an explicit checkpoint path loads exactly that one or fails.

Layout of the saved state: {<role>: model state, <role>_ema: EMA state, "optimizers": {<role>: optim state}}.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import logging
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from utils.atomic_io import atomic_write_text
from utils.config import ConfigError
from utils.dist import barrier, is_distributed
from utils.file_lock import LockHeldError, PathLock

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
STEP_GLOB = "step_*"
RUN_LOCK = "run.lock"
FORMAT = 2  # manifest format: 1 = sizes only (older runs), 2 = sizes and sha256 of every file
_CHUNK = 8 << 20


class CheckpointError(ConfigError):
    """A checkpoint that was asked for cannot be used; the message names it, what is wrong and what to do."""


# ------------------------------------------------------------------------------------------ reading safely


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    *(
        ("pathlib", name)
        for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
    ),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: its dataclasses and enums, torch.Size, dtypes, layouts, memory formats and
    paths. Any other global (os.system, builtins.eval, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: DCP checkpoint metadata never needs it (the file may be "
            "crafted to run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: DCP checkpoint metadata has none")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by RestrictedUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        with open(Path(self.path) / name, "rb") as f:
            metadata = RestrictedUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(
                f"{Path(self.path) / name} holds a {type(metadata).__name__}, not DCP metadata"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries (optimizer hyperparameters, counters) are read with
    torch.load(weights_only=True): DCP itself unpickles them without restriction."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"WeightsUnpickler error: ([^.]*)", str(err))
            reason = found.group(1) if found else str(err).splitlines()[0]
            raise pickle.UnpicklingError(
                f"refusing to load {read_item.dest_index.fqn}: {reason} (non-tensor entries of a checkpoint are plain "
                "numbers, strings and lists; the file may be crafted to run code)"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_dcp_metadata(path: str | Path) -> dcp_metadata.Metadata:
    """The metadata of a DCP folder, read safely."""
    return SafeFileSystemReader(str(path)).read_metadata()


def load_dcp(state: dict, path: str | Path) -> None:
    """Load a DCP folder into `state` in place (tensors copied into the given ones), safely."""
    kwargs = {} if is_distributed() else {"no_dist": True}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), **kwargs)


# ------------------------------------------------------------------------------------------ manifests


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _share(names: Sequence[str]) -> list[str]:
    """This rank's share of a list of files (hashing is split across ranks)."""
    if not is_distributed():
        return list(names)
    return list(names)[dist.get_rank() :: dist.get_world_size()]


def _gather(value: Any) -> list[Any]:
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of every file in `folder`, each rank hashing a share (collective)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    mine = {
        name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in _share(names)
    }
    merged: dict[str, dict[str, Any]] = {}
    for part in _gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def read_manifest(path: str | Path) -> dict:
    """The manifest of a checkpoint folder; ValueError/OSError when it is missing or unreadable."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{Path(path) / MANIFEST} has no 'files' table")
    return manifest


def check_checkpoint(path: str | Path, contents: bool = True) -> str | None:
    """None if the checkpoint is complete (every manifest file present with its size and, when `contents`, its
    sha256), else what is wrong. Collective when distributed and `contents`: each rank hashes a share."""
    path = Path(path)
    problem = _check_sizes(path)
    if problem is None and contents:
        manifest = read_manifest(path)
        if manifest.get("format", 1) < FORMAT:
            log.warning("checkpoint %s predates checksums: its file sizes match, its contents are not verified", path)
        else:
            wrong = [
                f"{name} does not match its sha256 in the manifest (corrupted)"
                for name in _share(sorted(manifest["files"]))
                if file_sha256(path / name) != manifest["files"][name]["sha256"]
            ]
            problem = wrong[0] if wrong else None
    if contents:
        found = [p for p in _gather(problem) if p]
        problem = found[0] if found else None
    return problem


def _check_sizes(path: Path) -> str | None:
    if not path.is_dir():
        return "not a folder" if path.exists() else "does not exist"
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST} (the save did not finish, or this is not a train.py checkpoint)"
    try:
        files = read_manifest(path)["files"]
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST} ({err})"
    if DCP_METADATA not in files:
        return f"its manifest lists no {DCP_METADATA}: not a DCP checkpoint"
    for name, entry in files.items():
        size = entry["size"] if isinstance(entry, dict) else entry  # format 1 stored the size alone
        if Path(name).name != name:
            return f"its manifest names {name!r}, which is not a file of the folder"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return None


def iteration_of(path: str | Path) -> int:
    return int(read_manifest(path)["iteration"])


# ------------------------------------------------------------------------------------------ the run's checkpoints


def describe_error(err: BaseException) -> str:
    """One line for a read error; for DCP's CheckpointException (a traceback per failed rank), the first rank's
    underlying exception."""
    failures = getattr(err, "failures", None)
    inner = next(iter(failures.values()), None) if isinstance(failures, dict) else None
    if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
        return f"{type(err).__name__}: {describe_error(inner[0])}"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"


def _is_fatal(err: BaseException) -> bool:
    """Errors that must stop the process rather than trigger a fallback (DCP's CheckpointException is a
    BaseException, so a plain `except Exception` misses real read errors)."""
    return isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


class CheckpointManager:
    def __init__(self, folder: str | Path, keep_last: int = 2, is_main: bool = True):
        self.folder, self.keep_last, self.is_main = Path(folder), max(1, keep_last), is_main

    def save(self, iteration: int, state: dict, extra: dict | None = None) -> Path:
        """Write the state after `iteration` steps as <folder>/step_<iteration>; returns its path. `extra` (JSON)
        goes into the manifest."""
        final = self.folder / f"step_{iteration:08d}"
        tmp = self.folder / f".step_{iteration:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(state, checkpoint_id=str(tmp), **({} if is_distributed() else {"no_dist": True}))
        barrier()
        files = _hash_files(tmp)
        if self.is_main:
            manifest = {"format": FORMAT, "iteration": iteration, **(extra or {}), "files": files}
            atomic_write_text(json.dumps(manifest, indent=1), tmp / MANIFEST)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._rotate()
        barrier()
        return final

    def _set_aside_newer(self, path: Path) -> None:
        """Resuming this run from an older checkpoint abandons the newer ones: move them to checkpoints/superseded/
        (not deleted), so that neither rotation nor a later --resume auto mixes the two histories."""
        if path.absolute().parent != self.folder.absolute():
            return
        newer = [p for p in self.folders() if p.name > path.name]
        if newer and self.is_main:
            aside = self.folder / "superseded"
            aside.mkdir(exist_ok=True)
            for p in newer:
                target = aside / p.name
                shutil.rmtree(target, ignore_errors=True)
                p.rename(target)
            log.warning("resuming from %s: the newer checkpoints %s were moved to %s", path.name,
                        ", ".join(p.name for p in newer), aside)  # fmt: skip
        barrier()

    def _rotate(self) -> None:
        """Keep the newest keep_last complete checkpoints; delete everything older than the oldest kept (older
        complete ones, and damaged ones such as a folder a killed deletion left half-removed)."""
        kept = self.complete()[: self.keep_last]
        if len(kept) < self.keep_last:
            return
        for old in self.folders():
            if old.name < kept[-1].name:
                shutil.rmtree(old, ignore_errors=True)

    def folders(self) -> list[Path]:
        """Every step_* folder, newest first, complete or not."""
        return sorted((p for p in self.folder.glob(STEP_GLOB) if p.is_dir()), reverse=True)

    def complete(self) -> list[Path]:
        """Checkpoints whose files all have their manifest sizes, newest first (contents not hashed)."""
        found = []
        for path in self.folders():
            problem = _check_sizes(path)
            if problem:
                log.warning("skipping checkpoint %s: %s", path, problem)
            else:
                found.append(path)
        return found

    def candidates(self, resume: str | None) -> list[Path]:
        """The checkpoints to try for run.resume, in order; [] means start fresh. Raises CheckpointError for a
        path that is not a complete checkpoint (before anything is built or written)."""
        if resume is None:
            return []
        if resume == "auto":
            return self.folders()
        path = Path(resume)
        problem = _check_sizes(path)
        if problem is not None:
            hint = "pass a checkpoint folder (<run>/checkpoints/step_NNNNNNNN) or --resume auto"
            inside = sorted(p.name for p in path.glob(STEP_GLOB)) if path.is_dir() else []
            if not inside and path.is_dir() and (path / "checkpoints").is_dir():
                inside = sorted(f"checkpoints/{p.name}" for p in (path / "checkpoints").glob(STEP_GLOB))
            if inside:
                hint = f"it holds {', '.join(inside[-3:])}: pass one of them, or --resume auto"
            raise CheckpointError(f"run.resume={resume}: {problem}; {hint}")
        return [path]

    def load(self, state: dict, candidates: Sequence[Path], exact: bool) -> tuple[Path, dict]:
        """Load the first candidate that verifies and reads into `state`; returns (path, manifest).

        exact: the one candidate was named by the user: any problem is an error naming it. Otherwise a damaged
        checkpoint is skipped with a warning; when none loads, nothing is started over it.
        """
        problems = []
        for path in candidates:
            try:
                problem = check_checkpoint(path)
                if problem is None:
                    load_dcp(state, path)
                    manifest = read_manifest(path)
                    log.info("resumed from %s (iteration %d)", path, int(manifest["iteration"]))
                    if exact:
                        self._set_aside_newer(path)
                    return path, manifest
            except BaseException as err:  # noqa: B036 - DCP raises CheckpointException, a BaseException
                if _is_fatal(err):
                    raise
                problem = f"cannot be read ({describe_error(err)})"
            if exact:
                raise CheckpointError(f"run.resume={path}: {problem}; pass another checkpoint or --resume auto")
            log.warning("checkpoint %s %s; trying the previous one", path, problem if problem.startswith("cannot")
                        else f"is unusable: {problem}")  # fmt: skip
            problems.append(f"{path.name}: {problem}")
        raise CheckpointError(
            f"none of the checkpoints in {self.folder} can be loaded ({'; '.join(problems)}): nothing was started "
            "over them. Move them away to start this run over, or choose another run.name"
        )


def lock_run_folder(run_dir: str | Path) -> PathLock:
    """Take the run folder's lock (rank 0), refusing a folder another live run writes; once it is ours, the
    partial files a dead run left (unfinished checkpoint saves, half-written exports) are removed."""
    run_dir = Path(run_dir)
    lock = PathLock(
        run_dir / RUN_LOCK,
        f"run folder {run_dir}",
        "wait for that run to finish, or choose another run.name",
        partials=("checkpoints/.step_*.tmp", f"export/.*.{'?' * 8}.tmp", f".config.yaml.{'?' * 8}.tmp"),
    )
    try:
        return lock.acquire()
    except LockHeldError as err:
        raise ConfigError(str(err)) from None


def truncate_metrics(path: str | Path, iteration: int) -> None:
    """Keep the metrics.jsonl lines of iterations before `iteration` (the resumed checkpoint's): lines a killed
    run wrote after that checkpoint, and a torn last line, would otherwise repeat or break the log."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("iteration"), int) and entry["iteration"] < iteration:
            kept.append(line + "\n")
    atomic_write_text("".join(kept), path)
