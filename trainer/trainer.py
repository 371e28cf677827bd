"""The training loop shared by every stage: roles and optimizers from the config, the objective's losses per
role, gradient accumulation, averaging across ranks, clipping, optimizer steps when the objective says they
are due, EMA, atomic DCP checkpoints with resume, logging (console, tqdm, metrics.jsonl, optional wandb)."""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from trainer.checkpoint import CheckpointManager, lock_run_folder, truncate_metrics
from trainer.data import build_dataset, global_indices, local_batch
from trainer.ema import EMA
from trainer.objective import Objective, TrainContext
from trainer.roles import build_role, forward_params, make_optimizer, parallel_mode
from utils.config import DTYPES, ConfigError, save_config, validate_config
from utils.dist import (
    all_reduce_mean,
    average_gradients,
    barrier,
    init_distributed,
    init_single_process_group,
    parallel_layout,
)
from utils.lora import adapter_file_state, merged_peft_state
from utils.safetensors_io import atomic_save_safetensors
from wan.configs import model_config
from wan.modules.model import WanModel

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf: the run stops before the step, leaving the last checkpoint intact."""


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global grad-norm clipping over plain and FSDP2 (DTensor) gradients alike; returns the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = [_full_tensor(g.detach().float().pow(2).sum()) for g in grads]
    total = float(torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)  # a Python float: scales plain and DTensor gradients alike
        for g in grads:
            g.mul_(scale)
    return total


def backward_per_role(losses: dict[str, torch.Tensor], params: dict[str, list[torch.nn.Parameter]]) -> None:
    """Backpropagate each role's loss into that role's parameters only (accumulating into .grad).

    A generator loss that runs through the critic or the discriminator (SiD, the GAN term) differentiates them
    wrt their inputs; the gradient it leaves on their parameters is discarded here, so each optimizer sees only
    its own loss. The parameters keep requires_grad throughout: toggling it around a forward breaks activation
    checkpointing, whose recomputation in backward would then see different flags.

    Each backward frees its graph: the roles' losses share no autograd graph in any objective (a generator
    sample reaches the critic's loss detached), so the generator's activations go before the critic's backward.
    An objective whose losses did share a graph fails loudly here ("backward through the graph a second time").
    """
    for role in losses:
        others = [p for r, ps in params.items() if r != role for p in ps]
        stash = [p.grad for p in others]
        for p in others:
            p.grad = None
        losses[role].backward()
        for p, g in zip(others, stash, strict=True):
            p.grad = g


class Trainer:
    def __init__(self, cfg: DictConfig, registry: dict[str, type[Objective]]):
        self.cfg = cfg
        self.dist = init_distributed()
        self.mode = parallel_mode(cfg, self.dist)
        if self.mode == "fsdp" and self.dist.world_size == 1:
            init_single_process_group(self.dist.device)  # bf16 in one process: FSDP2 over a world of one
        objective_cls = registry[cfg.stage]
        validate_config(cfg)
        self.layout = self._parallel_layout(cfg, objective_cls)
        self.run_dir = Path(cfg.run.output_dir) / (cfg.run.name or cfg.stage)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, self.dist.is_main)
        self.resume_from = self.ckpt.candidates(cfg.run.resume)  # a bad --resume PATH fails before anything is written
        self.lock = lock_run_folder(self.run_dir) if self.dist.is_main else None  # one live run per folder
        if self.lock is not None:
            weakref.finalize(self, self.lock.release)  # a finished (or failed) Trainer gives the folder back
        if cfg.run.resume is None and self.ckpt.folders():
            raise ConfigError(
                f"{self.run_dir} already has checkpoints: pass run.resume=auto (or --resume auto) to continue it, "
                "or choose another run.name"
            )
        self.global_batch = cfg.train.batch_size * self.layout.dp_size  # the ranks of an sp group share samples
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        torch.manual_seed(cfg.seed)
        # fixed shapes every iteration: let cuDNN time its conv algorithms once (the pose encoders' full-resolution
        # Conv3d, the VAE); a no-op on the CPU
        torch.backends.cudnn.benchmark = bool(cfg.train.get("cudnn_benchmark", True))
        self.trainable = objective_cls.trainable_roles
        self.roles = {
            name: objective_cls.prepare_role(
                name,
                build_role(name, cfg.roles[name], cfg, self.dist, name in self.trainable, self.layout.sp_group),
                cfg.objective,
            )
            for name in objective_cls.required_roles
        }
        self.optimizers = {name: make_optimizer(self.roles[name], cfg.roles[name]) for name in self.trainable}
        self.emas = {
            name: EMA(self.roles[name], cfg.roles[name].ema_decay, cfg.roles[name].ema_start)
            for name in self.trainable
            if cfg.roles[name].ema_decay is not None
        }
        compute_dtype = DTYPES[cfg.train.dtype]
        self.ctx = TrainContext(self.dist.device, compute_dtype, cfg.seed, self.layout.dp_rank, self.layout.dp_size,
                                emas=self.emas)  # fmt: skip
        self.objective = objective_cls(cfg.objective, self.roles, self.ctx)
        generator_preset = cfg.roles.generator.preset if "generator" in cfg.roles else None
        self.data = build_dataset(cfg.data, generator_preset, cfg.seed, self.dist.device)
        self.float_dtype = compute_dtype
        self.evaluator = None
        if cfg.eval.every:
            from trainer.evaluation import WorldEvaluator

            self.evaluator = WorldEvaluator(cfg.eval, self.dist.device)
        self.start = self._resume(cfg.run.resume)

    def _parallel_layout(self, cfg: DictConfig, objective_cls: type[Objective]):
        """The (dp, sp) grid of ranks; refuses sequence parallelism where it cannot split the stage."""
        sp = int(cfg.train.sequence_parallel)
        if sp > 1 and not objective_cls.sequence_parallel:
            raise ConfigError(
                f"stage {cfg.stage!r} runs a network through its KV cache with gradient, which "
                f"train.sequence_parallel={sp} cannot split (it covers the full-sequence forward): set "
                "train.sequence_parallel=1"
            )
        try:
            layout = parallel_layout(self.dist, sp)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if sp > 1 and self.mode not in ("fsdp", "ddp"):
            raise ConfigError(
                f"train.sequence_parallel={sp} with train.distributed={cfg.train.distributed}: the sp ranks' "
                "gradients must be reduced; use train.distributed=auto, fsdp or ddp"
            )
        return layout

    # -- state

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            name: get_model_state_dict(m) for name, m in self.roles.items() if name in self.trainable
        }
        state.update({f"{name}_ema": ema.state_dict() for name, ema in self.emas.items()})
        state["optimizers"] = {
            name: get_optimizer_state_dict(self.roles[name], opt) for name, opt in self.optimizers.items()
        }
        return state

    def _resume(self, resume: str | None) -> int:
        if not self.resume_from:
            if resume is not None:
                log.info("run.resume=%s: no checkpoint in %s yet, starting fresh", resume, self.ckpt.folder)
            if self.dist.is_main:
                truncate_metrics(self.run_dir / "metrics.jsonl", 0)  # lines of a run killed before its first save
            return 0
        state = self._state()
        _, manifest = self.ckpt.load(state, self.resume_from, exact=resume != "auto")
        for name in self.trainable:
            set_model_state_dict(self.roles[name], state[name])
            set_optimizer_state_dict(self.roles[name], self.optimizers[name], state["optimizers"][name])
        for name in manifest.get("unstepped_optimizers", []):
            self.optimizers[name].state.clear()  # see _save
        iteration = int(manifest["iteration"])
        if self.dist.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", iteration)
        return iteration

    def _save(self, iteration: int) -> None:
        # get_optimizer_state_dict initialises the state of an optimizer that has not stepped yet with a zero-lr
        # step (AdamW's step count becomes 1): undo that and record it, so that saving and resuming leave the
        # step counts exactly as a straight run has them.
        unstepped = sorted(name for name, opt in self.optimizers.items() if not opt.state)
        state = self._state()
        for name in unstepped:
            self.optimizers[name].state.clear()
        self.ckpt.save(iteration, state, {"unstepped_optimizers": unstepped})

    # -- loop

    def _micro_batch(self, iteration: int, micro: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        b, accum = self.cfg.train.batch_size, self.cfg.train.grad_accum
        step = iteration * accum + micro
        ids = global_indices(len(self.data), step, self.global_batch, self.cfg.seed, self.cfg.data.shuffle)
        lo = self.layout.dp_rank * b  # every rank of a sequence-parallel group takes the same samples
        positions = [step * self.global_batch + lo + i for i in range(b)]  # unique ids for the noise streams
        return local_batch(self.data, ids[lo : lo + b], self.dist.device, self.float_dtype), positions

    def train(self) -> list[dict[str, float]]:
        cfg = self.cfg
        history = []
        metrics_path = self.run_dir / "metrics.jsonl"
        bar = tqdm(range(self.start, cfg.train.iterations), initial=self.start, total=cfg.train.iterations,
                   desc=cfg.stage, disable=not self.dist.is_main)  # fmt: skip
        wandb_run = self._wandb()
        started, self.stopped_early = time.perf_counter(), False
        for iteration in bar:
            due = tuple(self.objective.due(iteration))
            unknown = [r for r in due if r not in self.optimizers]
            if unknown:
                raise RuntimeError(f"objective {cfg.stage} marked {unknown} due, but they have no optimizer")
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.train.grad_accum):
                draw = 0 if cfg.train.overfit else iteration  # overfit: one fixed batch and one set of draws
                batch, positions = self._micro_batch(draw, micro)
                self.ctx.begin_step(draw * cfg.train.grad_accum + micro, positions)
                out = self.objective.train_step(batch, iteration, due)
                missing = [r for r in due if r not in out.losses]
                if missing:
                    raise RuntimeError(f"objective {cfg.stage} returned no loss for due roles {missing}")
                backward_per_role(
                    {r: out.losses[r] / cfg.train.grad_accum for r in due},
                    {r: [p for p in m.parameters() if p.requires_grad] for r, m in self.roles.items()},
                )
                for key, value in [*((f"loss/{r}", v) for r, v in out.losses.items()), *out.logs.items()]:
                    value = torch.as_tensor(value, dtype=torch.float32).detach().to(self.dist.device)
                    sums[key] = sums.get(key, 0) + value / cfg.train.grad_accum
            logs = all_reduce_mean(sums)
            for role in due:
                value = logs.get(f"loss/{role}", 0.0)
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"iteration {iteration}: the {role} loss is {value}; stopped before the optimizer step, "
                        f"the last checkpoint in {self.ckpt.folder} is intact. Lower roles.{role}.lr or "
                        "train.grad_clip, or check the data and the role's weights"
                    )
            for role in due:
                model = self.roles[role]
                params = [p for p in model.parameters() if p.requires_grad]
                self._reduce_gradients(model, params)
                logs[f"grad_norm/{role}"] = clip_grad_norm(params, cfg.train.grad_clip)
                self.optimizers[role].step()
                if role in self.emas:
                    self.emas[role].update(model, iteration)
            logs["iteration"] = iteration
            done = iteration + 1
            out_of_time = self._out_of_time(started)
            # evaluated every eval.every iterations, and at the end of a run, also one stopped by max_minutes
            if self.evaluator is not None and (
                done % cfg.eval.every == 0 or done == cfg.train.iterations or out_of_time
            ):
                logs.update(self._evaluate(done))
            history.append(logs)
            if self.dist.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(logs) + "\n")
                if wandb_run is not None:
                    wandb_run.log(logs, step=iteration)
                if iteration % cfg.train.log_every == 0:
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
                    log.info("iteration %d: %s", iteration, ", ".join(f"{k} {v:.5g}" for k, v in logs.items()))
            if done % cfg.train.save_every == 0 or done == cfg.train.iterations or out_of_time:
                self._save(done)
            if out_of_time and done < cfg.train.iterations:
                log.info("train.max_minutes=%s reached after iteration %d: checkpoint saved, rerun with --resume "
                         "auto to continue", cfg.train.max_minutes, iteration)  # fmt: skip
                self.stopped_early = True
                break
        if cfg.train.export:
            self.export()
        if wandb_run is not None:
            wandb_run.finish()
        return history

    def _reduce_gradients(self, model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients over the ranks; under sequence parallelism the sp ranks of one sample hold
        shares of its gradient (forward_params), which must be summed, not averaged: sum over sp, mean over dp
        = the mean over all ranks times sp."""
        if self.mode == "ddp":
            average_gradients(params)
        elif self.mode == "fsdp":  # FSDP2 reduces its sharded params; the rest (pose encoders, heads) here
            average_gradients([p for p in params if not isinstance(p, DTensor)])
        if self.layout.sp_size > 1:
            for p in forward_params(model):
                if p.grad is not None:
                    p.grad.mul_(self.layout.sp_size)

    def _evaluate(self, done: int) -> dict[str, float]:
        """eval/* scores of the evaluated role on the held-out clips (every rank samples; rank 0 writes)."""
        role = self.cfg.eval.role or self.trainable[0]
        model = self.roles[role]
        scores = self.evaluator(model, done, self.run_dir, self.dist.is_main)
        if self.cfg.eval.get("ema", False) and role in self.emas:  # the EMA too, on the same clips: eval_ema/*
            with self.emas[role].swapped_in(model):
                ema = self.evaluator(model, done, self.run_dir, write=False)
            scores |= {k.replace("eval/", "eval_ema/", 1): v for k, v in ema.items()}
        log.info("iteration %d, eval of %s: %s", done - 1, role, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return scores

    def _out_of_time(self, started: float) -> bool:
        """train.max_minutes spent (decided on rank 0, so every rank stops at the same iteration)."""
        if self.cfg.train.max_minutes is None:
            return False
        over = {"stop": torch.tensor(float(time.perf_counter() - started > 60 * self.cfg.train.max_minutes))}
        if not self.dist.is_main:
            over["stop"].zero_()
        return all_reduce_mean(over)["stop"] > 0

    def _wandb(self):
        if not (self.cfg.logging.wandb and self.dist.is_main):
            return None
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install -e '.[train]'") from err
        return wandb.init(project=self.cfg.logging.project, mode=self.cfg.logging.wandb_mode, dir=str(self.run_dir),
                          name=self.run_dir.name, config=dict(self.cfg))  # fmt: skip

    def export(self) -> None:
        """<run>/export/<role>.safetensors and <role>_ema.safetensors: canonical keys, network config in the
        metadata (wan.checkpoint.load_model rebuilds them). A LoRA role exports its merged network under those
        names and the adapter (+ the fully trained tensors) as <role>[_ema]_lora.safetensors for merge_lora.py."""
        for name in self.trainable:
            model = self.roles[name]
            if isinstance(model, WanModel):  # rebuildable with wan.checkpoint.load_model
                metadata = {"format": "poseforcing", "config": json.dumps(model_config(model)), "stage": self.cfg.stage}
            else:  # an objective's wrapper (e.g. the GAN discriminator: backbone + heads)
                metadata = {"format": "poseforcing-aux", "class": type(model).__name__, "stage": self.cfg.stage}
            tensors = {k: _full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}
            shadows = {}
            if name in self.emas:
                shadows = {k: _full_tensor(v).detach().cpu() for k, v in self.emas[name].state_dict().items()}
            if self.dist.is_main:
                for suffix, state in (("", tensors), ("_ema", {**tensors, **shadows} if shadows else None)):
                    if state is None:
                        continue
                    folder = self.run_dir / "export"
                    if hasattr(model, "lora_scale"):  # LoRA: the merged network, and the adapter file beside it
                        adapter = adapter_file_state(state, model.lora_alpha, model.lora_full)
                        atomic_save_safetensors(adapter, folder / f"{name}{suffix}_lora.safetensors",
                                                {"format": "poseforcing-lora", "stage": self.cfg.stage})  # fmt: skip
                        state = merged_peft_state(state, model.lora_scale)
                    atomic_save_safetensors(state, folder / f"{name}{suffix}.safetensors", metadata)
        barrier()
