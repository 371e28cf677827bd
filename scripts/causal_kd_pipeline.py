"""The 3-stage distillation pipeline (FastGen's): teacher ODE pairs -> CausalKD -> Self-Forcing, as one command
sequence. Each stage is its own command (printed before it runs; --dry-run prints them all and stops):

  1. scripts/generate_ode_pairs.py: the teacher's trajectories, captured at the CausalKD config's t_list
  2. train.py --config <kd config>: CausalKD of the causal student on those pairs
  3. scripts/extract_net_weights.py: the CausalKD student's (EMA) weights out of its last checkpoint
  4. train.py --config <self-forcing config>: Self-Forcing (DMD on the student's own rollouts) from them

    python scripts/causal_kd_pipeline.py --teacher-weights assets/world_teacher/teacher.safetensors \\
        --source data/world/train --work runs/world_3stage                       # the world configs (defaults)
    python scripts/causal_kd_pipeline.py --teacher-preset wan_14b_i2v_pose_teacher \\
        --teacher-weights $WAN_MODELS_DIR/Wan2.1-I2V-14B-720P-UniAnimate --source data/latents --work runs/3stage \\
        --kd-config configs/stages/causal_kd.yaml --sf-config configs/stages/self_forcing.yaml \\
        --launcher "torchrun --nproc_per_node 8"

--set KEY=VALUE goes to both training stages, --kd / --sf to one; --pairs-arg passes a flag to stage 1
(e.g. --pairs-arg=--num-steps=50). Rerunning with --resume continues: written pairs are skipped and both trainings
resume from their newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/causal_kd_pipeline.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import objective_registry  # noqa: E402
from trainer.checkpoint import CheckpointManager  # noqa: E402
from trainer.objective import objective_defaults  # noqa: E402
from utils.config import ConfigError, load_config  # noqa: E402

logger = logging.getLogger("causal_kd_pipeline")
ROOT = Path(__file__).resolve().parents[1]
KD_RUN, SF_RUN, STUDENT = "causal_kd", "self_forcing", "causal_kd_student.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-weights", required=True, help="the teacher's checkpoint (stage 1 and the real score)")
    p.add_argument("--teacher-preset", default="world_teacher", help="the teacher's preset (wan/configs.py)")
    p.add_argument("--source", required=True, help="folder of conditioning samples (the ODE pairs' conditions)")
    p.add_argument("--work", required=True, type=Path, help="folder for the pairs, both runs and the student")
    p.add_argument("--kd-config", default="configs/world/causal_kd.yaml", help="stage 2 config")
    p.add_argument("--sf-config", default="configs/world/self_forcing.yaml", help="stage 4 config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both trainings")
    p.add_argument("--kd", action="append", default=[], metavar="KEY=VALUE", help="override for CausalKD")
    p.add_argument("--sf", action="append", default=[], metavar="KEY=VALUE", help="override for Self-Forcing")
    p.add_argument("--pairs-arg", action="append", default=[], metavar="FLAG", help="extra generate_ode_pairs flag")
    p.add_argument("--pairs-dtype", default="fp32", help="stage 1 network dtype (generate_ode_pairs --dtype)")
    p.add_argument("--launcher", help='distributed launcher for stages 1, 2, 4, e.g. "torchrun --nproc_per_node 8"')
    p.add_argument("--resume", action="store_true", help="continue both trainings from their newest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p


def kd_settings(args: argparse.Namespace) -> tuple[list[float], bool, str]:
    """From the resolved CausalKD config: its t_list (stage 1 captures there), whether the generator has an EMA
    (then stage 3 extracts generator_ema) and its last checkpoint's name."""
    cfg = load_config(args.kd_config, [*args.set, *args.kd], objective_defaults(objective_registry()))
    if cfg.stage != "causal_kd":
        raise ConfigError(f"--kd-config {args.kd_config} is stage {cfg.stage!r}; stage 2 is causal_kd")
    last = f"step_{int(cfg.train.iterations):08d}"
    return [float(t) for t in cfg.objective.t_list], cfg.roles.generator.ema_decay is not None, last


def commands(args: argparse.Namespace, checkpoint: Path | None = None) -> list[tuple[str, list[str]]]:
    """(stage name, argv) of the four stages; checkpoint: stage 3's input (default: the KD run's last step)."""
    t_list, ema, last = kd_settings(args)
    work = args.work
    pairs, student, ckpts = work / "ode_pairs", work / STUDENT, work / KD_RUN / "checkpoints"
    launch = shlex.split(args.launcher) if args.launcher else [sys.executable]
    resume = ["--resume", "auto"] if args.resume else []
    common = [f"run.output_dir={work}", *args.set]
    return [
        ("1 ODE pairs", [*launch, str(ROOT / "scripts" / "generate_ode_pairs.py"), "--preset", args.teacher_preset,
                         "--weights", args.teacher_weights, "--source", args.source, "--out", str(pairs),
                         "--student-steps", *map(repr, t_list), "--dtype", args.pairs_dtype, *args.pairs_arg]),
        ("2 CausalKD", [*launch, str(ROOT / "train.py"), "--config", args.kd_config, *resume, f"data.path={pairs}",
                        f"run.name={KD_RUN}", *common, *args.kd]),
        ("3 extract", [sys.executable, str(ROOT / "scripts" / "extract_net_weights.py"), "--checkpoint",
                       str(checkpoint or ckpts / last), "--role", "generator_ema" if ema else "generator",
                       "--out", str(student), "--overwrite"]),
        ("4 Self-Forcing", [*launch, str(ROOT / "train.py"), "--config", args.sf_config, *resume,
                            f"roles.generator.weights={student}", f"roles.teacher.weights={args.teacher_weights}",
                            f"run.name={SF_RUN}", *common, *args.sf]),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    steps = commands(args)
    if args.dry_run:
        for name, argv in steps:
            print(f"# stage {name}\n{shlex.join(argv)}")
        return 0
    for i, (name, argv) in enumerate(steps):
        if name.startswith("3"):  # the newest complete checkpoint, whatever stopped the run (max_minutes too)
            complete = CheckpointManager(args.work / KD_RUN / "checkpoints").complete()
            if not complete:
                logger.error("stage 2 left no complete checkpoint in %s", args.work / KD_RUN / "checkpoints")
                return 2
            name, argv = commands(args, complete[0])[i]
        logger.info("stage %s: %s", name, shlex.join(argv))
        code = subprocess.call(argv)
        if code:
            logger.error("stage %s failed (exit %d); rerun with --resume once it is fixed", name, code)
            return code
    logger.info("done: the Self-Forcing student is %s", args.work / SF_RUN / "export")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
