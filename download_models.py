"""Fetch the checkpoints PoseForcing uses from the Hugging Face Hub into a models folder.

    python download_models.py --list                          # what can be fetched, and what is here already
    python download_models.py student --dry-run               # the files that would be fetched, with sizes
    python download_models.py student --models-dir /data/wan  # Wan2.1-T2V-1.3B + Wan2.1-CLIP + UniAnimate-DiT

Each asset lands in MODELS_DIR/<folder> with the repository's layout (the paths configs/inference/*.yaml name).
Downloads are resumable: files already complete (by size) are skipped, and an interrupted file resumes from
where it stopped (huggingface_hub keeps the partial file). Gated or private repositories use the token of
`hf auth login` or HF_TOKEN; HF_ENDPOINT selects a mirror.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

log = logging.getLogger("download_models")


@dataclass(frozen=True)
class Asset:
    """A Hub repository (or the named files of one, fnmatch patterns) and the folder it lands in."""

    repo_id: str
    folder: str
    purpose: str
    patterns: tuple[str, ...] | None = None  # None: the whole repository


ASSETS: dict[str, Asset] = {
    "Wan2.1-T2V-1.3B": Asset(
        "Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B",
        "student initialisation (T2V-1.3B), UMT5 text encoder + tokenizer, VAE",
    ),
    "Wan2.1-CLIP": Asset(
        "Wan-AI/Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-480P",
        "the CLIP image encoder alone (the student's i2v input), from the I2V-14B-480P repository",
        ("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",),
    ),
    "Wan2.1-I2V-14B-480P": Asset("Wan-AI/Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-480P", "I2V-14B, 480p weights"),
    "Wan2.1-I2V-14B-720P": Asset(
        "Wan-AI/Wan2.1-I2V-14B-720P", "Wan2.1-I2V-14B-720P",
        "I2V-14B, 720p weights: the pose teacher's base (UniAnimate-DiT merges into these)",
    ),
    "Self-Forcing": Asset(
        "gdhe17/Self-Forcing", "Self-Forcing", "Self-Forcing T2V-1.3B generator checkpoints (DMD, ODE init)",
        ("checkpoints/self_forcing_dmd.pt", "checkpoints/ode_init.pt"),
    ),
    "UniAnimate-DiT": Asset(
        "ZheWang123/UniAnimate-DiT", "UniAnimate-DiT",
        "UniAnimate-DiT LoRA + pose encoders for I2V-14B, and the DWPose onnx models",
        ("UniAnimate-Wan2.1-14B-Lora-12000.ckpt", "yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
    ),
}  # fmt: skip
GROUPS: dict[str, tuple[str, ...]] = {
    "student": ("Wan2.1-T2V-1.3B", "Wan2.1-CLIP", "UniAnimate-DiT"),
    "teacher": ("Wan2.1-I2V-14B-720P", "UniAnimate-DiT"),
    "all": tuple(ASSETS),
}


class DownloadError(RuntimeError):
    """A download that cannot proceed; the message says why and what to do (printed as one line)."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _unreachable(error: BaseException) -> bool:
    """A network failure (no connection, timeout, proxy, offline mode) rather than an answer from the Hub."""
    if isinstance(error, ConnectionError | TimeoutError):  # includes huggingface_hub's OfflineModeIsEnabled
        return True
    names = {cls.__name__ for cls in type(error).__mro__}  # requests/httpx transport errors, any version
    return bool(names & {"TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutException"})


def hub_error(error: BaseException, asset: Asset, dest: Path) -> DownloadError | None:
    """One actionable line for a failed Hub call; None for errors that are not about the Hub (re-raise those)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if isinstance(error, GatedRepoError):
        return DownloadError(f"{asset.repo_id} is gated: accept its terms on {endpoint}/{asset.repo_id} and log in "
                             f"(`hf auth login` or HF_TOKEN)")  # fmt: skip
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(f"{asset.repo_id} was not found on {endpoint} (or needs a token: `hf auth login`)")
    reason = " ".join(str(error).split()) or type(error).__name__
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    if _unreachable(error):
        offline = " HF_HUB_OFFLINE is set: unset it to download." if os.environ.get("HF_HUB_OFFLINE") else ""
        return DownloadError(
            f"cannot reach the Hugging Face Hub at {endpoint} to fetch {asset.repo_id} ({reason}).{offline} Check "
            f"the network or proxy (HTTPS_PROXY), set HF_ENDPOINT for a mirror, or copy the files into {dest} by "
            "hand and rerun to verify; finished files are kept and interrupted ones resume"
        )
    if isinstance(error, HfHubHTTPError):
        return DownloadError(f"the Hub refused {asset.repo_id} ({reason}); retry later, finished files are kept")
    return None


def _hub_call(fn, asset: Asset, dest: Path):
    """fn() with Hub failures turned into DownloadError."""
    try:
        return fn()
    except DownloadError:
        raise
    except Exception as e:
        error = hub_error(e, asset, dest)
        if error is None:
            raise
        raise error from e


def remote_files(api: HfApi, asset: Asset) -> list[RemoteFile]:
    """The asset's files on the Hub with their sizes; every named pattern must match at least one file."""
    files = []
    for entry in api.list_repo_tree(asset.repo_id, recursive=True):
        if getattr(entry, "size", None) is None:  # folders
            continue
        lfs = getattr(entry, "lfs", None)
        files.append(RemoteFile(entry.path, int(lfs.size if lfs is not None else entry.size)))
    if asset.patterns is None:
        return files
    unmatched = [p for p in asset.patterns if not any(fnmatch.fnmatchcase(f.path, p) for f in files)]
    if unmatched:
        raise DownloadError(f"{asset.repo_id} has no file matching {unmatched}: the repository changed; update ASSETS "
                            "in download_models.py")  # fmt: skip
    return [f for f in files if any(fnmatch.fnmatchcase(f.path, p) for p in asset.patterns)]


def missing_files(files: list[RemoteFile], dest: Path) -> list[RemoteFile]:
    """Files not yet complete in dest (absent, or of another size: an interrupted or stale copy)."""
    return [f for f in files if not ((dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size)]


def fetch(name: str, models_dir: Path, api: HfApi, dry_run: bool) -> None:
    """Fetch (or with dry_run only list) the files of one asset that are not complete yet."""
    asset = ASSETS[name]
    dest = models_dir / asset.folder
    files = _hub_call(lambda: remote_files(api, asset), asset, dest)
    todo = missing_files(files, dest)
    total = sum(f.size for f in todo)
    log.info("%s (%s -> %s): %d of %d files to fetch, %s", name, asset.repo_id, dest, len(todo), len(files),
             human(total))  # fmt: skip
    if dry_run:
        for f in files:
            log.info("  %s %10s  %s", "fetch" if f in todo else "have ", human(f.size), f.path)
        return
    if not todo:
        return
    _hub_call(lambda: snapshot_download(asset.repo_id, local_dir=dest, allow_patterns=[f.path for f in todo]), asset,
              dest)  # fmt: skip
    still = missing_files(todo, dest)
    if still:
        raise DownloadError(f"{name}: {len(still)} file(s) are incomplete after the download ({still[0].path}); "
                            "rerun to resume")  # fmt: skip
    log.info("%s: complete in %s", name, dest)


def list_assets(models_dir: Path) -> None:
    """Every asset and group, and which folders exist under models_dir (no network)."""
    for name, asset in ASSETS.items():
        dest = models_dir / asset.folder
        files = [p for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts] if dest.is_dir() else []
        here = f"{len(files)} files in {dest}" if files else f"not in {dest}"
        what = "whole repository" if asset.patterns is None else ", ".join(asset.patterns)
        log.info("%-20s %-28s %s", name, asset.repo_id, asset.purpose)
        log.info("%-20s files: %s; %s", "", what, here)
    for group, names in GROUPS.items():
        log.info("group %-14s %s", group, " ".join(names))


def expand(names: Sequence[str]) -> list[str]:
    """Asset and group names -> asset names, in order, without repeats."""
    out: list[str] = []
    for name in names:
        if name not in ASSETS and name not in GROUPS:
            raise DownloadError(f"unknown asset {name!r}; assets: {', '.join(ASSETS)}; groups: {', '.join(GROUPS)}")
        out += [n for n in GROUPS.get(name, (name,)) if n not in out]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="ASSET",
                   help=f"assets ({', '.join(ASSETS)}) or groups ({', '.join(GROUPS)})")  # fmt: skip
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("WAN_MODELS_DIR", "models")),
                   help="where assets go (default $WAN_MODELS_DIR or ./models)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the assets and what is already here (no network)")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be fetched, fetch nothing")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        list_assets(args.models_dir)
        return
    if not args.names:
        parser.error("name the assets to fetch (or a group: student, teacher, all); --list shows them")
    try:
        api = HfApi()
        for name in expand(args.names):
            fetch(name, args.models_dir, api, args.dry_run)
    except DownloadError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
