"""PNG plots of the world results: training curves of one or more runs (their metrics.jsonl: losses smoothed,
evaluation scores as logged) and PCK per frame index of evaluated rows (scripts/evaluate_world.py's metrics.json,
mean over clips). Needs matplotlib (`pip install -e ".[plots]"`).

    python scripts/plot_world.py curves --run "Path A=runs/world_dmd_a" --run "Path B=runs/world_dmd_b" \\
        --keys eval/pck@0.05,eval/psnr --out docs/results/world_distillation_curves.png
    python scripts/plot_world.py per-frame --metrics docs/results/world_teacher/metrics.json \\
        --rows ceiling,cfg50,steps4 --out docs/results/world_teacher_pck_per_frame.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (a run folder or the file itself); a torn last line is skipped."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass a run folder (runs/<name>) or its metrics.jsonl")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial line
    return records


def series(records: list[dict], key: str, smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of `key` where it was logged; a trailing moving average over `smooth` points."""
    points = [(r["iteration"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    if not points:
        return np.zeros(0), np.zeros(0)
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*points, strict=True))
    if smooth > 1 and len(y) >= smooth:
        kernel = np.ones(smooth) / smooth
        y = np.convolve(y, kernel, mode="valid")
        x = x[smooth - 1 :]
    return x, y


def mean_per_frame(clips: list[dict]) -> np.ndarray:
    """[F] mean over clips of the per-frame PCK (NaN-skipping)."""
    rows = np.asarray([c["pck_per_frame"] for c in clips], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.nanmean(rows, axis=0)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit('plots need matplotlib: pip install -e ".[plots]"') from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, Path], keys: list[str], out: Path, smooth: int) -> None:
    plt = _pyplot()
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, path in runs.items():
            records = read_jsonl(path)
            x, y = series(records, key, smooth if key.startswith("loss/") else 1)
            if len(x):
                ax.plot(x, y, label=name, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(key + (f" (mean of {smooth})" if key.startswith("loss/") and smooth > 1 else ""))
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def plot_per_frame(metrics: Path, rows: list[str] | None, out: Path) -> None:
    plt = _pyplot()
    results = json.loads(metrics.read_text())
    names = rows or list(results["rows"])
    missing = [r for r in names if r not in results["rows"]]
    if missing:
        raise SystemExit(f"--rows {missing} are not in {metrics} (it has {list(results['rows'])})")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in names:
        clips = results["rows"][name]["clips"]
        if "pck_per_frame" not in clips[0]:
            raise SystemExit(f"{metrics} has no pck_per_frame for {name}: rerun scripts/evaluate_world.py")
        ax.plot(mean_per_frame(clips), label=name)
    ax.set_xlabel("frame index")
    ax.set_ylabel("PCK@0.05")
    ax.set_ylim(0, 1)
    ax.set_title(f"PCK per frame, mean over {len(results['clips'])} held-out clips")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def named_paths(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        runs[name if sep else Path(path).name] = Path(path)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="plot", required=True)
    c = sub.add_parser("curves", help="training curves of runs (metrics.jsonl)")
    c.add_argument("--run", action="append", required=True, metavar="[NAME=]PATH", help="run folder or jsonl")
    c.add_argument("--keys", default="eval/pck@0.05,eval/psnr", help="comma-separated logged keys")
    c.add_argument("--smooth", type=int, default=50, help="moving average of loss curves, in logged points")
    c.add_argument("--out", type=Path, required=True, help="PNG to write")
    f = sub.add_parser("per-frame", help="PCK per frame index of evaluate_world.py rows")
    f.add_argument("--metrics", type=Path, required=True, help="metrics.json of scripts/evaluate_world.py")
    f.add_argument("--rows", help="comma-separated rows (default: all)")
    f.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    if args.plot == "curves":
        plot_curves(named_paths(args.run), [k for k in args.keys.split(",") if k], args.out, args.smooth)
    else:
        plot_per_frame(args.metrics, args.rows.split(",") if args.rows else None, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
