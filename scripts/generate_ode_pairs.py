"""Generate ODE pairs for the ode_init stage: teacher (pose + CFG) trajectories captured at the student's
timesteps, one safetensors per sample (format: pipeline/ode_pairs.py). Resumable (samples already written are
skipped) and sharded over torchrun ranks (rank r does samples r::world).

  python scripts/generate_ode_pairs.py --weights teacher.safetensors --pose-weights unianimate.ckpt \\
      --source data/conditioning --out data/ode_pairs
  torchrun --nproc_per_node 8 scripts/generate_ode_pairs.py ...          # same output, 8x faster
  torchrun --nproc_per_node 8 scripts/generate_ode_pairs.py --sequence-parallel 4 ...   # 720p: each clip on 4 GPUs
  python scripts/generate_ode_pairs.py --causal --preset wan_1.3b_causal_pose --weights ode_init.safetensors ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/generate_ode_pairs.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from torch.utils.data import Subset  # noqa: E402

from pipeline.ode_pairs import ODEPairSettings, generate_ode_pairs  # noqa: E402
from pipeline.rollout import DEFAULT_STEPS  # noqa: E402
from trainer.data import SyntheticPoseDataset, TensorFolderDataset  # noqa: E402
from utils.config import DTYPES  # noqa: E402
from utils.dist import barrier, destroy, init_distributed, parallel_layout  # noqa: E402
from utils.scheduler import SOLVERS  # noqa: E402
from wan.checkpoint import load_pose_weights, load_weights  # noqa: E402
from wan.configs import build_model, get_config  # noqa: E402
from wan.modules.sequence_parallel import SequenceParallel  # noqa: E402

logger = logging.getLogger("generate_ode_pairs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan_14b_i2v_pose_teacher", help="network preset (wan/configs.py)")
    p.add_argument("--weights", required=True, help="the model's checkpoint (any format wan/checkpoint.py reads)")
    p.add_argument("--pose-weights", help="UniAnimate checkpoint holding the pose encoders, if not in --weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="folder of conditioning samples (*.safetensors in the batch layout)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N random conditioning samples (smoke tests)")
    p.add_argument("--latent-frames", type=int, default=6, help="--synthetic: latent frames F")
    p.add_argument("--latent-size", type=int, nargs=2, default=(8, 12), metavar=("H", "W"), help="--synthetic")
    p.add_argument("--out", required=True, help="output folder (created; resumed when it exists)")
    p.add_argument("--num-steps", type=int, default=ODEPairSettings.num_steps, help="teacher solver steps")
    p.add_argument("--shift", type=float, default=ODEPairSettings.shift, help="grid shift (use the DMD stage's)")
    p.add_argument("--guidance", type=float, default=ODEPairSettings.guidance, help="CFG u + w (c - u)")
    p.add_argument("--solver", choices=SOLVERS, default=ODEPairSettings.solver)
    p.add_argument("--student-steps", type=float, nargs="+", default=list(DEFAULT_STEPS), help="capture timesteps")
    p.add_argument("--causal", action="store_true", help="causal variant: a causal model, block by block")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i is a function of (seed, i)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="network dtype")
    p.add_argument("--limit", type=int, help="only the first N samples of --source")
    p.add_argument("--batch-size", type=int, default=1, help="samples solved together (same shapes); small models")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="split each clip's tokens over N ranks (Ulysses; N divides the heads and h*w)")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    dist = init_distributed()
    layout = parallel_layout(dist, args.sequence_parallel)
    model = build_model(args.preset, device=dist.device, dtype=DTYPES[args.dtype])
    if layout.sp_group is not None:
        model.sequence_parallel = SequenceParallel(layout.sp_group)
    load_weights(model, args.weights)
    if args.pose_weights:
        load_pose_weights(model, args.pose_weights)
    model.eval().requires_grad_(False)
    if args.source:
        source = TensorFolderDataset(args.source)
        if args.limit is not None:
            source = Subset(source, range(min(args.limit, len(source))))
    else:
        size = tuple(args.latent_size)
        source = SyntheticPoseDataset(get_config(args.preset), args.synthetic, args.latent_frames, size, [], args.seed)
    settings = ODEPairSettings(
        num_steps=args.num_steps, shift=args.shift, guidance=args.guidance, solver=args.solver,
        student_steps=tuple(args.student_steps), causal=args.causal, seed=args.seed,
    )  # fmt: skip
    written = generate_ode_pairs(model, source, args.out, settings, layout.dp_rank, layout.dp_size, dist.device,
                                 batch_size=args.batch_size, writer=layout.sp_rank == 0)  # fmt: skip
    if layout.sp_rank == 0:
        logger.info("rank %d: wrote %d new samples to %s", dist.rank, len(written), args.out)
    barrier()
    destroy()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
