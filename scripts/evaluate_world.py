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
exact marker detector reads the pose (tolerance 40). Writes OUT/metrics.json (per clip, per row, with the
command) and OUT/metrics.md (the table).
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

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.world import (  # noqa: E402
    TEST_SEED,
    HeldOutClip,
    Sampler,
    held_out_clips,
    mean_scores,
    sample_clip,
    score,
    to_frames,
    world_encoders,
)
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


def swap_reference(batch: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with the other clip's reference: y (its latent), CLIP features and reference pose."""
    return {**batch, **{k: other[k] for k in ("y", "clip_fea", "ref_pose")}}


def run_row(row: str, model, enc, clips: list[HeldOutClip], seed: int) -> tuple[list[dict], float]:
    """Per-clip scores of one row and the mean sampling seconds per clip."""
    scores, seconds = [], []
    for i, clip in enumerate(tqdm(clips, desc=row, unit="clip")):
        start = time.perf_counter()
        if row == "ceiling":
            latents = clip.batch["latents"]
        else:
            sampler, use_pose, wrong = ROWS[row]
            batch = swap_reference(clip.batch, clips[(i + 1) % len(clips)].batch) if wrong else clip.batch
            latents = sample_clip(model, batch, sampler, seed + i, use_pose)
        video = enc.vae.decode(latents.to(next(enc.vae.parameters()).device))[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        scores.append({"seed": clip.seed, **score(to_frames(video), clip)})
    return scores, sum(seconds) / len(seconds)


def markdown(results: dict) -> str:
    lines = ["| row | NFE | s / clip | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for row, r in results["rows"].items():
        vals = " | ".join(f"{r['mean'].get(c, float('nan')):.4g}" for c in COLUMNS)
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
    p.add_argument("overrides", nargs="*", help="world config overrides (e.g. num_frames=33 for a quick look)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r != "ceiling" and r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; known: ceiling, {', '.join(ROWS)}")
    if any(r != "ceiling" for r in rows) and args.weights is None:
        raise SystemExit("--weights is needed for every row but ceiling")
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))  # as make_toy_dataset.py
    device = torch.device(args.device)
    enc = world_encoders(device)
    model = None
    if args.weights is not None:
        model = load_model(args.weights, device=device, dtype=torch.float32).eval().requires_grad_(False)
    clips = held_out_clips(enc, [args.first_seed + i for i in range(args.clips)], **overrides)
    results = {"command": " ".join(["python scripts/evaluate_world.py", *(argv or sys.argv[1:])]),
               "weights": str(args.weights), "clips": [c.seed for c in clips], "rows": {}}  # fmt: skip
    for row in rows:
        scores, seconds = run_row(row, model, enc, clips, args.noise_seed)
        nfe = 0 if row == "ceiling" else ROWS[row][0].nfe(model)
        results["rows"][row] = {"nfe": nfe, "seconds_per_clip": seconds, "mean": mean_scores(scores),
                                "clips": scores}  # fmt: skip
        logger.info("%s: %s", row, ", ".join(f"{k} {v:.4g}" for k, v in results["rows"][row]["mean"].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2))
    (args.out / "metrics.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
