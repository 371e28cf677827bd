"""Train any stage: `python train.py --config configs/stages/<stage>.yaml [key=value ...]`.

The config is configs/default.yaml <- configs/model/<model>.yaml <- the stage file <- key=value overrides;
unknown keys are an error naming the closest valid one; the resolved config is saved in the run folder.
Runs alone (CPU or one GPU) or under torchrun on many GPUs and nodes (FSDP2):

    python train.py --config configs/stages/dmd.yaml model=tiny data.type=synthetic train.dtype=fp32  # CPU, tiny
    torchrun --nproc_per_node 8 train.py --config configs/stages/dmd.yaml model=wan_1.3b_causal_pose ...
    python train.py --config configs/stages/dmd.yaml run.name=my_run --resume auto
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from omegaconf import OmegaConf

from model import objective_registry
from trainer.objective import objective_defaults
from trainer.trainer import Trainer
from utils.config import ConfigError, load_config
from utils.dist import destroy
from utils.file_lock import exit_on_sigterm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage config, e.g. configs/stages/dmd.yaml")
    p.add_argument("--resume", help="'auto' (latest complete checkpoint of the run) or a checkpoint folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.iterations=100 roles.generator.lr=1e-5"
    )
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    registry = objective_registry()
    overrides = list(args.overrides) + ([f"run.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides, objective_defaults(registry))
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return
    exit_on_sigterm()  # a SIGTERM'd run removes its lock on the way out, like Ctrl-C
    try:
        Trainer(cfg, registry).train()
    except ConfigError as err:  # a bad run folder, checkpoint or dataset: one line, no traceback
        sys.exit(f"error: {err}")
    finally:
        destroy()


if __name__ == "__main__":
    main()
