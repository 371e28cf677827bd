"""One live writer per run folder or output path: a lock file that records its owner (pid, host, process start),
held with flock while the owner lives, so a second run fails naming the first and a dead owner's lock (and the
partial outputs it left behind) are recognised as stale and cleaned by the next run."""

from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the owner record alone decides
    fcntl = None

log = logging.getLogger(__name__)


class LockHeldError(RuntimeError):
    """Another live process owns the path; the message names it and what to do."""


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    start: int | None  # the process's start time in clock ticks since boot (Linux), to tell a reused pid
    since: float  # time.time() when the lock was taken

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} (since {when})"


def _process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` is a running process (not a zombie) and, when `start` is known, the same one."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    if _process_state(pid) == "Z":
        return False
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def this_owner() -> Owner:
    return Owner(os.getpid(), socket.gethostname(), _process_start(os.getpid()), time.time())


def read_owner(lock_path: str | os.PathLike) -> Owner | None:
    """The owner recorded in a lock file, None if there is none or it is unreadable (a torn write)."""
    try:
        record = json.loads(Path(lock_path).read_text())
        return Owner(int(record["pid"]), str(record["host"]), record.get("start"), float(record["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(owner: Owner) -> bool:
    """A recorded owner is stale when it ran on this host and is no longer alive. Another host's owner cannot
    be checked from here and is never called stale."""
    return owner.host == socket.gethostname() and not process_alive(owner.pid, owner.start)


# Locks this process holds: resolved lock path -> [PathLock, count]. Re-entrant within one process (a second
# Trainer on the same folder in one test process); another process is what the lock keeps out.
_HELD: dict[str, list] = {}


class PathLock:
    """An exclusive, re-entrant lock on `lock_path` for this process.

    `what` names the protected thing in errors ("run folder runs/dmd"); `fix` says what to do instead.
    `partials` are glob patterns (relative to the lock file's folder) of partial outputs that only an owner
    writes: they are removed once the lock is ours, since their writer is then known to be dead.
    """

    def __init__(self, lock_path: str | os.PathLike, what: str, fix: str, partials: Iterable[str] = ()):
        self.path = Path(lock_path).absolute()
        self.what, self.fix, self.partials = what, fix, tuple(partials)
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def _key(self) -> str:
        return str(self.path)

    def acquire(self) -> PathLock:
        held = _HELD.get(self._key())
        if held is not None and held[0]._owner_pid == os.getpid():
            held[1] += 1
            self._fd = None
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    owner = read_owner(self.path)
                    raise LockHeldError(self._message(owner)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed the file between our open and our flock: take the new one
                os.close(fd)
                continue
            break
        else:
            raise LockHeldError(f"{self.what}: could not take {self.path} (it keeps being replaced); {self.fix}")
        previous = read_owner(self.path)
        mine = this_owner()
        if previous is not None and previous.pid != mine.pid and not is_stale(previous):
            os.close(fd)
            raise LockHeldError(self._message(previous))
        if previous is not None and previous.pid != mine.pid:
            log.warning("%s: removed the stale lock of %s (no longer running)", self.what, previous.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(mine)).encode(), 0)
        os.fsync(fd)
        self._fd, self._owner_pid = fd, mine.pid
        _HELD[self._key()] = [self, 1]
        self._remove_partials()
        return self

    def _message(self, owner: Owner | None) -> str:
        if owner is None:
            who = "another process"
        elif owner.host != socket.gethostname():
            who = (f"{owner.describe()}, which cannot be checked from {socket.gethostname()}; if that run is dead, "
                   f"delete {self.path}")  # fmt: skip
        else:
            who = owner.describe()
        return f"{self.what} is in use by {who} (lock {self.path}); {self.fix}"

    def _remove_partials(self) -> None:
        for pattern in self.partials:
            for stale in self.path.parent.glob(pattern):
                if stale == self.path:
                    continue
                log.warning("%s: removing %s, a partial output left by a run that died", self.what, stale)
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    def release(self) -> None:
        held = _HELD.get(self._key())
        if held is None or held[0]._owner_pid != os.getpid():
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[self._key()]
        lock = held[0]
        try:
            if os.fstat(lock._fd).st_ino == os.stat(lock.path).st_ino:
                lock.path.unlink()  # while still holding flock: a waiting process then re-creates a fresh file
        except FileNotFoundError:
            pass
        os.close(lock._fd)
        lock._fd = None

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(out: str | os.PathLike, flag: str = "--out") -> PathLock:
    """The lock of an output path written through a staging folder beside it (utils.atomic_io): `.<name>.lock`;
    the partial outputs of a dead writer are that name's staging entries."""
    out = Path(out).absolute()
    return PathLock(
        out.parent / f".{out.name}.lock",
        f"{flag} {out}",
        f"wait for it to finish or choose another {flag}",
        partials=(f".{glob.escape(out.name)}.{'?' * 8}.tmp",),  # utils.atomic_io's staging: 8 random characters
    )


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        lock, _ = _HELD[key]
        if lock._owner_pid == os.getpid():
            _HELD[key][1] = 1
            lock.release()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) in the main thread, so `finally` blocks, context managers and atexit
    handlers run (temp folders, staging outputs and locks are removed) instead of the process vanishing."""

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def check_output_path(out: str | os.PathLike, flag: str = "--out", file: bool = False) -> None:
    """Fail before any work when `out` cannot be written: a parent is a file, `file` outputs that are folders, or
    the nearest existing folder is read-only (probed by creating and removing a temp file; nothing is left)."""
    out = Path(out).absolute()
    if file and out.is_dir():
        raise ValueError(f"{flag} {out} is a folder: give a file path")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {out}: {folder} is a file, not a folder: choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"{flag} {out}: cannot write in {folder} ({reason}): choose another {flag}") from None
