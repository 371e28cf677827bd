"""The one way outputs are written atomically: into a staging folder beside the target, then renamed over it.

A crash, an error, Ctrl-C or SIGTERM (utils.file_lock.exit_on_sigterm) leaves either the complete new output or
the old one; a `kill -9`ed writer's staging entry `.<name>.XXXXXXXX.tmp` is removed by utils.file_lock.output_lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging path beside `path` (same name and suffix, inside a fresh hidden folder) for the caller to
    create as a file or a folder; on success move it to `path`, else delete it.

    An existing `path` is refused unless `overwrite`; when replaced, the old content stays in place until the new
    one is complete. Staging is on the same file system, so the final move is a rename.
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
            old = staging / f"{path.name}.old"  # a folder cannot be renamed over: set the old one aside first
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


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write (or replace) a text file atomically: configs, manifests, indexes."""
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text)
