"""Training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its shards into a temp
folder, rank 0 writes a manifest of file sizes and renames the folder into place. A crash mid-save leaves the
previous checkpoint untouched; a damaged one (manifest missing, a file truncated) is skipped on resume.

Layout of the saved state: {<role>: model state, <role>_ema: EMA state, "optimizers": {<role>: optim state}}.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp

from utils.dist import barrier, is_distributed
from utils.safetensors_io import atomic_write_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class CheckpointManager:
    def __init__(self, folder: str | Path, keep_last: int = 2, is_main: bool = True):
        self.folder, self.keep_last, self.is_main = Path(folder), max(1, keep_last), is_main

    def _dcp_kwargs(self) -> dict:
        return {} if is_distributed() else {"no_dist": True}

    def save(self, iteration: int, state: dict) -> Path:
        """Write the state after `iteration` steps as <folder>/step_<iteration>; returns its path."""
        final = self.folder / f"step_{iteration:08d}"
        tmp = self.folder / f".step_{iteration:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(state, checkpoint_id=str(tmp), **self._dcp_kwargs())
        barrier()
        if self.is_main:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            atomic_write_text(json.dumps({"iteration": iteration, "files": files}, indent=1), tmp / MANIFEST)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.valid()[self.keep_last :]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def valid(self) -> list[Path]:
        """Complete checkpoints, newest first (a folder whose files do not match its manifest is skipped)."""
        found = []
        for path in sorted(self.folder.glob("step_*"), reverse=True):
            problem = check_complete(path)
            if problem:
                log.warning("skipping checkpoint %s: %s", path, problem)
            else:
                found.append(path)
        return found

    def load_latest(self, state: dict) -> int | None:
        """Load the newest loadable checkpoint into `state` (in place); returns its iteration or None."""
        for path in self.valid():
            try:
                dcp.load(state, checkpoint_id=str(path), **self._dcp_kwargs())
            except Exception as err:  # a damaged file that kept its size: fall back to the previous one
                log.warning("checkpoint %s could not be read (%s); trying the previous one", path, err)
                continue
            iteration = json.loads((path / MANIFEST).read_text())["iteration"]
            log.info("resumed from %s (iteration %d)", path, iteration)
            return iteration
        return None


def check_complete(path: Path) -> str | None:
    """None if every file of the checkpoint is there with its recorded size, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, size in files.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return None
