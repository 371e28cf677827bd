"""Real-size training benchmark: a few iterations of a stage (default DMD: causal pose 1.3B generator, 1.3B
critic, 14B I2V pose teacher with CFG; random weights; 480x832, 21 latent frames) through the real Trainer,
on one GPU or under torchrun (FSDP2). Reports time per iteration, forward time per role (CUDA events on
each role's forward calls) and peak memory; prints a markdown table, writes JSON on rank 0.

    python scripts/benchmark_train.py --json docs/benchmarks/train_dmd_1gpu.json
    torchrun --nproc_per_node 2 scripts/benchmark_train.py --json docs/benchmarks/train_dmd_2gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import objective_registry  # noqa: E402
from trainer.objective import objective_defaults  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.dist import destroy  # noqa: E402

log = logging.getLogger("benchmark_train")


class RoleTimer:
    """Sums the GPU time of every forward() of a module (CUDA events; read after a synchronize)."""

    def __init__(self, module: torch.nn.Module):
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self.pairs.append((start, None))

    def _post(self, module, args, out):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pairs[-1] = (self.pairs[-1][0], end)

    def take(self) -> tuple[float, int]:
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self.pairs if e is not None) / 1000
        calls = len(self.pairs)
        self.pairs.clear()
        return total, calls


def benchmark(stage: str, model: str, iterations: int, overrides: list[str], shape: str) -> tuple[Trainer, dict]:
    """Time `iterations` iterations (after one warm-up) of a stage through the real Trainer at real size."""
    registry = objective_registry()
    overrides = [
        f"stage={stage}", f"model={model}", "train.dtype=bf16", "train.gradient_checkpointing=true",
        "train.batch_size=1", f"train.iterations={iterations + 1}", "train.save_every=1000000",
        "train.export=false", "data.type=synthetic", "data.num_samples=2", "data.latent_frames=21",
        "data.latent_size=[60,104]", "run.output_dir=/tmp/poseforcing_bench", f"run.name={stage}",
        "train.log_every=1", *overrides,
    ]  # fmt: skip
    cfg = load_config(None, overrides, objective_defaults(registry))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, registry)
    build_s = time.perf_counter() - t0
    trainer.ckpt.save = lambda *a, **k: None  # timing the step, not DCP writes
    timers = {name: RoleTimer(model) for name, model in trainer.roles.items()}
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "gpus": trainer.dist.world_size,
        "sequence_parallel": trainer.layout.sp_size,
        "parallel": trainer.mode,
        "stage": stage,
        "presets": {name: cfg.roles[name].preset for name in trainer.roles},
        "shape": shape,
        "build_and_load_s": build_s,
        "iterations": [],
    }
    for iteration in range(iterations + 1):
        trainer.start, cfg.train.iterations = iteration, iteration + 1
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        logs = trainer.train()[-1]
        torch.cuda.synchronize()
        row = {"iteration": iteration, "seconds": time.perf_counter() - start,
               "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
               "due": list(trainer.objective.due(iteration)),
               "losses": {k: v for k, v in logs.items() if k.startswith("loss/")}}  # fmt: skip
        for name, timer in timers.items():
            seconds, calls = timer.take()
            row[f"forward_s/{name}"], row[f"forward_calls/{name}"] = seconds, calls
        if iteration > 0:  # the first is warm-up (allocator, kernels)
            results["iterations"].append(row)
    return trainer, results


def table(results: dict) -> str:
    """The markdown table of a benchmark() result."""
    roles = list(results["presets"])
    lines = ["| iteration | due | seconds | peak GiB | " + " | ".join(f"fwd {n} (s, calls)" for n in roles) + " |"]
    lines.append("|" + "---|" * (4 + len(roles)))
    for row in results["iterations"]:
        per_role = " | ".join(f"{row[f'forward_s/{n}']:.2f} ({row[f'forward_calls/{n}']})" for n in roles)
        lines.append(f"| {row['iteration']} | {','.join(row['due'])} | {row['seconds']:.2f} | "
                     f"{row['peak_GiB']:.1f} | {per_role} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="dmd")
    p.add_argument("--model", default="wan_1.3b_causal_pose", help="configs/model/<name>.yaml")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--json", type=Path)
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape = "480x832, 21 latent frames, batch 1 per GPU, bf16, activation checkpointing"
    trainer, results = benchmark(args.stage, args.model, args.iterations, args.overrides, shape)
    if trainer.dist.is_main:
        print(table(results))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    destroy()


if __name__ == "__main__":
    main()
