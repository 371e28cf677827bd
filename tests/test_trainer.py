"""The trainer loop on toy objectives: loss falls, optimizers step on the objective's schedule, resume
reproduces a straight run, damaged checkpoints are skipped, bad input stops with a clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toy_objectives import REGISTRY
from safetensors.torch import load_file

from trainer.objective import objective_defaults
from trainer.trainer import NonFiniteLossError, Trainer
from utils.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny", "data.latent_frames=3", "data.num_samples=4", "train.batch_size=2", "train.log_every=100"]


def make_cfg(tmp_path, *overrides, stage="toy"):
    args = [f"stage={stage}", f"run.output_dir={tmp_path}", *BASE, *overrides]
    return load_config(None, args, objective_defaults(REGISTRY))


def run(tmp_path, *overrides, stage="toy"):
    trainer = Trainer(make_cfg(tmp_path, *overrides, stage=stage), REGISTRY)
    return trainer, trainer.train()


def test_config_typos_name_the_closest_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.iteratons'; did you mean 'train.iterations'"):
        make_cfg(tmp_path, "train.iteratons=3")
    with pytest.raises(ConfigError, match="unknown key 'objective.tt'; did you mean 'objective.t'"):
        make_cfg(tmp_path, "objective.tt=3")
    with pytest.raises(ConfigError, match="unknown stage 'dmdd'"):
        make_cfg(tmp_path, stage="dmdd")
    with pytest.raises(ConfigError, match="model='tinny' has no configs/model/tinny.yaml"):
        make_cfg(tmp_path, "model=tinny")


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    trainer, history = run(
        tmp_path,
        "train.iterations=30",
        "data.num_samples=2",
        "roles.generator.lr=5e-3",
        "roles.generator.betas=[0.9,0.99]",
    )
    losses = [h["loss/generator"] for h in history]
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses  # memorising 2 samples from pure noise
    run_dir = tmp_path / "toy"
    assert (run_dir / "config.yaml").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 30
    exported = load_file(run_dir / "export" / "generator.safetensors")
    assert torch.equal(exported["head.head.weight"], trainer.roles["generator"].head.head.weight.detach())


def test_schedule_steps_only_due_roles(tmp_path):
    trainer = Trainer(make_cfg(tmp_path, "train.iterations=1", stage="toy_two"), REGISTRY)
    gen, critic = trainer.roles["generator"], trainer.roles["critic"]
    snapshots = []
    for it in range(4):
        before = (gen.head.head.weight.clone(), critic.head.head.weight.clone())
        trainer.cfg.train.iterations = it + 1
        trainer.start = it
        trainer.cfg.train.export = False
        trainer.train()
        snapshots.append(
            (not torch.equal(before[0], gen.head.head.weight), not torch.equal(before[1], critic.head.head.weight))
        )
    assert snapshots == [(True, True), (False, True), (True, True), (False, True)]


def test_resume_equals_straight_run(tmp_path):
    common = ["roles.generator.lr=1e-3", "roles.generator.ema_decay=0.5", "train.save_every=2", "train.grad_accum=2"]
    straight, hist_a = run(tmp_path / "a", "train.iterations=4", *common)
    run(tmp_path / "b", "train.iterations=2", *common)
    resumed, hist_b = run(tmp_path / "b", "train.iterations=4", "run.resume=auto", *common)
    assert [h["iteration"] for h in hist_b] == [2, 3]
    for a, b in zip(hist_a[2:], hist_b, strict=True):
        assert abs(a["loss/generator"] - b["loss/generator"]) <= 1e-6
    for (name, p), q in zip(
        straight.roles["generator"].named_parameters(), resumed.roles["generator"].parameters(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6), name
    ema_a, ema_b = straight.emas["generator"].shadow, resumed.emas["generator"].shadow
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6) for k in ema_a)


def test_truncated_checkpoint_is_skipped(tmp_path, caplog):
    run(tmp_path, "train.iterations=4", "train.save_every=2", "train.keep_last=3")
    ckpts = sorted((tmp_path / "toy" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    victim = max((ckpts[-1]).glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    trainer = Trainer(make_cfg(tmp_path, "train.iterations=5", "run.resume=auto"), REGISTRY)
    assert trainer.start == 2
    assert "truncated" in caplog.text


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    run(tmp_path, "train.iterations=1")
    with pytest.raises(ConfigError, match="run.resume=auto"):
        Trainer(make_cfg(tmp_path, "train.iterations=2"), REGISTRY)


def test_nan_loss_stops_naming_step_and_role_checkpoint_intact(tmp_path):
    run(tmp_path, "train.iterations=2", "train.save_every=2")
    with pytest.raises(NonFiniteLossError, match="iteration 3: the generator loss is nan"):
        run(tmp_path, "train.iterations=6", "train.save_every=2", "objective.nan_at=3", "run.resume=auto")
    ckpts = sorted(p.name for p in (tmp_path / "toy" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002"]  # iteration 3 never stepped, nothing newer was saved


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"roles.generator.weights=.*nope.safetensors does not exist"):
        run(tmp_path, "roles.generator.weights=" + str(tmp_path / "nope.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no \\*.safetensors samples"):
        run(tmp_path, "data.type=latents", f"data.path={empty}", "run.name=e")
    with pytest.raises(ConfigError, match="needs roles.critic.preset"):
        run(tmp_path, "roles.critic.preset=null", "run.name=c", stage="toy_two")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_torchrun_dmd_stage_two_processes_equal_one(tmp_path, mode):
    """The DMD stage (tiny preset) under torchrun, gloo on CPU: 2 ranks x batch 1 == 1 rank x batch 2 (the same
    global batch), losses within 1e-5, with FSDP2 (activation checkpointing on) and with gradient averaging."""
    common = [
        "--config", str(ROOT / "configs" / "stages" / "dmd.yaml"), "model=tiny", "data.type=synthetic",
        "data.num_samples=4", "data.latent_frames=3", "train.dtype=fp32", "train.iterations=3", "train.export=false",
        "train.gradient_checkpointing=true", "objective.gen_every=2", "roles.generator.lr=1e-3", "roles.critic.lr=1e-3",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = [sys.executable, str(ROOT / "train.py"), *common, f"run.output_dir={tmp_path}/one", "train.batch_size=2"]
    single = subprocess.run(one, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"), *common,
           f"run.output_dir={tmp_path}/two", "train.batch_size=1", f"train.distributed={mode}"]  # fmt: skip
    multi = subprocess.run(two, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = [json.loads(line) for line in (tmp_path / "one" / "dmd" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "two" / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3 and a[2]["loss/generator"] > 1e-5  # the critic moved: a real DMD gradient
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key.startswith(("loss/", "grad_norm/")):
                assert abs(x[key] - y[key]) <= 1e-5 * abs(x[key]) + 1e-9, (key, x[key], y[key])
