"""Score a network on held-out world clips (seeds never trained on) against exact ground truth: the rows of
docs/results/world_teacher.md and world_distillation.md. Every row samples the same clips with the same noise.

    python scripts/evaluate_world.py --weights runs/world_teacher/export/teacher_ema.safetensors \\
        --out docs/results/world_teacher --clips 32 --rows ceiling,cfg50,nocfg50,steps4,no_pose,wrong_ref

Rows: ceiling (ground-truth latents through the toy VAE), cfg50 (50 UniPC steps, CFG 1.5: 100 NFE), nocfg50
(50 steps, no CFG), steps4 (4 UniPC steps with CFG: the naive few-step baseline), euler50 (50 Euler steps with CFG:
the schedule step distillation's half mode starts from), half25 (25 Euler steps, no CFG: a half-step distilled
teacher that learnt the guided flow; half25_cfg with CFG), few4 (4 few-step denoising steps: consistency distilled;
a CFG-distilled network guides every row in one forward, its NFE counted once), no_pose (cfg50 with pose tokens
and ref-pose map zeroed), wrong_ref (cfg50 with another clip's reference image, its latent and its pose), student
(a causal network's few-step stream). Metrics (utils/metrics.py) are computed on the decoded uint8 frames; the
exact marker detector reads the pose (tolerance 40); with `--keypoint-net assets/world_keypoints` the learned
detector too (net_pck@0.05, net_kpt_l2) and DRaFT's pose reward (pose_reward_first, pose_reward). Writes
OUT/metrics.json (per clip, per row, with the command, PCK per frame) and OUT/metrics.md (the table).

Students of the distillation table, on the same clips and noise: `--student NAME=PATH` (repeatable) adds a row
NAME (the few-step stream) and, with `--ablate NAME`, NAME_no_pose. Student-teacher agreement (agree_* columns:
pose detected in the row's frames vs in the teacher's own sample, PSNR / SSIM between them) is measured against
the frames of `--reference-row` (default cfg50) of this run, or of an earlier run's `--save-frames` folder
(`--reference-frames`):

    python scripts/evaluate_world.py --weights assets/world_teacher/teacher.safetensors --rows ceiling,cfg50 \
        --student ode_init=runs/world_ode_init/export/generator_ema.safetensors \
        --student dmd_a=runs/world_dmd_a/export/generator_ema.safetensors --ablate dmd_a --out runs/eval/table
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.world import (  # noqa: E402
    TEST_SEED,
    HeldOutClip,
    Sampler,
    agreement,
    held_out_clips,
    mean_scores,
    sample_clip,
    score,
    to_frames,
    world_encoders,
)
from utils.atomic_io import atomic_write_text  # noqa: E402
from utils.metrics import keypoint_metrics  # noqa: E402
from utils.rewards import PoseReward  # noqa: E402
from utils.world.keypoints import detect, to_model_input  # noqa: E402
from wan.checkpoint import load_model  # noqa: E402

logger = logging.getLogger("evaluate_world")
ROWS = {  # row -> (sampler, use_pose, wrong reference)
    "cfg50": (Sampler(num_steps=50, guidance=1.5), True, False),
    "nocfg50": (Sampler(num_steps=50, guidance=1.0), True, False),
    "steps4": (Sampler(num_steps=4, guidance=1.5), True, False),
    # the distilled teachers' schedules (docs/results/world_distillation_toolbox_plan.md)
    "euler50": (Sampler(num_steps=50, guidance=1.5, solver="euler"), True, False),
    "half25": (Sampler(num_steps=25, guidance=1.0, solver="euler"), True, False),
    "half25_cfg": (Sampler(num_steps=25, guidance=1.5, solver="euler"), True, False),
    "few4": (Sampler(num_steps=4, guidance=1.0, solver="few_step"), True, False),
    "no_pose": (Sampler(num_steps=50, guidance=1.5), False, False),
    "wrong_ref": (Sampler(num_steps=50, guidance=1.5), True, True),
    "student": (Sampler(guidance=1.0), True, False),
    "student_no_pose": (Sampler(guidance=1.0), False, False),
}
COLUMNS = ("pck@0.05", "kpt_l2", "detection_rate", "psnr", "ssim", "flicker", "jitter")
# with --keypoint-net: the learned detector's pose scores and DRaFT's pose reward (utils/rewards.py)
NET_COLUMNS = ("net_pck@0.05", "net_kpt_l2", "pose_reward_first", "pose_reward")


def learned_scores(reward: PoseReward, frames: np.ndarray, clip: HeldOutClip) -> dict:
    """net_* (keypoint_metrics of the learned detector against the driving keypoints) and the pose reward of the
    decoded first frame (pose_reward_first: what draft trains by default) and of every frame (pose_reward)."""
    f, h, w, _ = frames.shape
    found = detect(reward.net, frames, reward.threshold)
    out = {f"net_{k}": v for k, v in keypoint_metrics(clip.world.keypoints, found, w, h).items()}
    video = to_model_input(frames).permute(1, 0, 2, 3)[None].to(next(reward.net.parameters()).device)  # [1,3,F,H,W]
    pose = {"pose": clip.batch["pose"].to(video.device)}
    with torch.no_grad():
        out["pose_reward_first"] = float(reward(video[:, :, :1], pose)[0])
        out["pose_reward"] = float(reward(video, pose)[0])
    return out
AGREE_COLUMNS = ("agree_pck@0.05", "agree_kpt_l2", "agree_psnr", "agree_ssim")


def swap_reference(batch: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with the other clip's reference: y (its latent), CLIP features and reference pose."""
    return {**batch, **{k: other[k] for k in ("y", "clip_fea", "ref_pose")}}


def run_row(
    row: str, model, enc, clips: list[HeldOutClip], seed: int, spec: tuple[Sampler, bool, bool] | None,
    reward: PoseReward | None = None,
) -> tuple[list[dict], float, list[np.ndarray]]:
    """Per-clip scores of one row, the mean sampling seconds per clip and the decoded frames of every clip
    (spec: sampler, use_pose, wrong reference; None for the ceiling row; reward: the learned detector's scores
    too)."""
    scores, seconds, frames = [], [], []
    for i, clip in enumerate(tqdm(clips, desc=row, unit="clip")):
        start = time.perf_counter()
        if spec is None:
            latents = clip.batch["latents"]
        else:
            sampler, use_pose, wrong = spec
            batch = swap_reference(clip.batch, clips[(i + 1) % len(clips)].batch) if wrong else clip.batch
            latents = sample_clip(model, batch, sampler, seed + i, use_pose)
        video = enc.vae.decode(latents.to(next(enc.vae.parameters()).device))[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        frames.append(to_frames(video))
        scores.append({"seed": clip.seed, **score(frames[-1], clip)})
        if reward is not None:
            scores[-1].update(learned_scores(reward, frames[-1], clip))
    return scores, sum(seconds) / len(seconds), frames


def markdown(results: dict) -> str:
    columns = COLUMNS + (AGREE_COLUMNS if any("agree_psnr" in r["mean"] for r in results["rows"].values()) else ())
    columns += NET_COLUMNS if any("pose_reward" in r["mean"] for r in results["rows"].values()) else ()
    lines = ["| row | NFE | s / clip | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for row, r in results["rows"].items():
        vals = " | ".join(f"{r['mean'].get(c, float('nan')):.4g}" for c in columns)
        lines.append(f"| {row} | {r['nfe']} | {r['seconds_per_clip']:.2f} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="network export (wan.checkpoint.load_model); not needed for ceiling")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and metrics.md")
    p.add_argument("--rows", default="ceiling,cfg50,nocfg50,steps4,no_pose,wrong_ref", help="comma-separated rows")
    p.add_argument("--clips", type=int, default=32, help="held-out clips (seeds --first-seed + i)")
    p.add_argument("--first-seed", type=int, default=TEST_SEED, help="test seeds 10,000,000+ are never trained on")
    p.add_argument("--noise-seed", type=int, default=0, help="sampling noise of clip i: noise-seed + i")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--student", action="append", default=[], metavar="NAME=PATH",
                   help="a causal student export: adds row NAME (its few-step stream, no CFG); repeatable")
    p.add_argument("--ablate", action="append", default=[], metavar="NAME",
                   help="adds row NAME_no_pose: student NAME with its pose tokens and ref-pose map zeroed")
    p.add_argument("--reference-row", default="cfg50", help="agreement is measured against this row's frames")
    p.add_argument("--reference-frames", type=Path, help="or against frames an earlier --save-frames run wrote")
    p.add_argument("--save-frames", type=Path, help="write every row's decoded frames (ROW/<seed>.npy, uint8)")
    p.add_argument("--keypoint-net", type=Path, help="also score with the learned detector and DRaFT's pose reward "
                   "(e.g. assets/world_keypoints): net_* and pose_reward* columns")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="world config overrides (e.g. num_frames=33 for a quick look)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r != "ceiling" and r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; known: ceiling, {', '.join(ROWS)}")
    if any(r != "ceiling" for r in rows) and args.weights is None:
        raise SystemExit("--weights is needed for every row but ceiling")
    students = {}
    for item in args.student:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in ROWS or name == "ceiling":
            raise SystemExit(f"--student {item!r}: expected NAME=PATH with a new row name (not {', '.join(ROWS)})")
        students[name] = Path(path)
    if set(args.ablate) - set(students):
        raise SystemExit(f"--ablate {sorted(set(args.ablate) - set(students))}: not among --student {list(students)}")
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))  # as make_toy_dataset.py
    device = torch.device(args.device)
    enc = world_encoders(device)

    def load(path: Path):
        return load_model(path, device=device, dtype=torch.float32).eval().requires_grad_(False)

    model = load(args.weights) if args.weights is not None else None
    reward = None if args.keypoint_net is None else PoseReward.from_path(args.keypoint_net, device)
    clips = held_out_clips(enc, [args.first_seed + i for i in range(args.clips)], **overrides)
    results = {"command": " ".join(["python scripts/evaluate_world.py", *(argv or sys.argv[1:])]),
               "weights": str(args.weights), "students": {k: str(v) for k, v in students.items()},
               "clips": [c.seed for c in clips], "rows": {}}  # fmt: skip
    plan = [(row, model, None if row == "ceiling" else ROWS[row]) for row in rows]
    for name, path in students.items():
        student = load(path)
        plan.append((name, student, ROWS["student"]))
        if name in args.ablate:
            plan.append((f"{name}_no_pose", student, ROWS["student_no_pose"]))
    reference = None
    if args.reference_frames is not None:
        reference = [np.load(args.reference_frames / f"{c.seed}.npy") for c in clips]
    for row, net, spec in plan:
        scores, seconds, frames = run_row(row, net, enc, clips, args.noise_seed, spec, reward)
        if row == args.reference_row and reference is None:
            reference = frames
        if reference is not None and row not in ("ceiling", args.reference_row):
            for s, f, r in zip(scores, frames, reference, strict=True):
                s.update(agreement(f, r))
        if args.save_frames is not None:
            (args.save_frames / row).mkdir(parents=True, exist_ok=True)
            for c, f in zip(clips, frames, strict=True):
                np.save(args.save_frames / row / f"{c.seed}.npy", f)
        nfe = 0 if spec is None else spec[0].nfe(net)
        results["rows"][row] = {"nfe": nfe, "seconds_per_clip": seconds, "mean": mean_scores(scores),
                                "clips": scores}  # fmt: skip
        logger.info("%s: %s", row, ", ".join(f"{k} {v:.4g}" for k, v in results["rows"][row]["mean"].items()))
        write_results(results, args.out)  # after every row: a run stopped early keeps the rows it finished
    write_results(results, args.out)
    print(markdown(results))
    return 0


def write_results(results: dict, out: Path) -> None:
    """OUT/metrics.json and OUT/metrics.md, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(results, indent=2), out / "metrics.json")
    atomic_write_text(markdown(results), out / "metrics.md")


if __name__ == "__main__":
    sys.exit(main())
