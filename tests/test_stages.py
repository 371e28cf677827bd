"""Every stage config in configs/stages/ runs through the trainer on the tiny preset (CPU), and the loss it
optimises falls on a fixed one-sample batch (train.overfit: the same batch and random draws every iteration)."""

import math
from pathlib import Path

import pytest
import torch
from conftest import randomize
from safetensors import safe_open

from model import objective_registry
from trainer.objective import objective_defaults
from trainer.trainer import Trainer
from utils.config import load_config
from wan.checkpoint import save_weights
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny", "data.type=synthetic", "data.num_samples=1", "data.latent_frames=3", "train.dtype=fp32",
    "train.gradient_checkpointing=false", "train.log_every=1000", "train.save_every=1000", "train.export=false",
    "train.overfit=true",
]  # fmt: skip
# stage -> (the role whose loss must fall, iterations, extra overrides)
CASES = {
    "ode_init": ("generator", 12, ["roles.generator.lr=6e-3", "roles.generator.betas=[0.9,0.99]"]),
    "pose_finetune": ("generator", 12, ["roles.generator.lr=6e-3", "roles.generator.betas=[0.9,0.99]",
                                        "objective.pose_dropout=0", "objective.image_dropout=0"]),
    "dmd": ("critic", 12, ["roles.critic.lr=6e-3", "roles.critic.betas=[0.9,0.99]", "objective.gen_every=100"]),
    "sid": ("critic", 12, ["roles.critic.lr=6e-3", "roles.critic.betas=[0.9,0.99]", "objective.gen_every=100"]),
    "self_forcing": ("critic", 12, ["roles.critic.lr=6e-3", "roles.critic.betas=[0.9,0.99]",
                                    "objective.gen_every=100"]),
    # full training: the shipped LoRA cannot move a random-init tiny net (its zero head is frozen; the LoRA path
    # learns in tests/test_lora_training.py from a random base)
    "teacher": ("teacher", 12, ["roles.teacher.lr=6e-3", "roles.teacher.betas=[0.9,0.99]", "roles.teacher.lora.rank=0",
                                "objective.pose_dropout=0", "objective.image_dropout=0", "objective.uncond_dropout=0"]),
    "self_forcing_gan": ("critic", 12, ["roles.critic.lr=6e-3", "roles.critic.betas=[0.9,0.99]",
                                        "objective.gen_every=100"]),
    "kd": ("generator", 12, ["roles.generator.lr=6e-3", "roles.generator.betas=[0.9,0.99]"]),
    "causal_kd": ("generator", 12, ["roles.generator.lr=6e-3", "roles.generator.betas=[0.9,0.99]"]),
    # the teacher's init outputs zero flow (a zero head): these two learn from a random-weight teacher ({teacher})
    "cfg_distill": ("generator", 12, ["roles.generator.lr=6e-3", "roles.generator.betas=[0.9,0.99]",
                                      "roles.teacher.weights={teacher}"]),
    "step_distill": ("generator", 12, ["roles.generator.lr=6e-3", "roles.generator.betas=[0.9,0.99]",
                                       "objective.teacher_steps=8", "roles.teacher.weights={teacher}"]),
    # the LoRA student needs a random base ({student}: the init's zero head is frozen); loss = -pose reward
    "draft": ("generator", 12, ["roles.generator.lr=2e-2", "roles.generator.weights={student}", *(
        DRAFT_WORLD_ASSETS := ["objective.reward=pose", "objective.vae=assets/toy_vae",
                               "objective.keypoint_threshold=0.0", "objective.vae_dtype=fp32"])]),
}  # fmt: skip
# What a stage config as shipped points at that a CPU test cannot have, replaced by the world's shipped assets: the
# draft stage's HPSv2 preference model and the Wan2.1 VAE (its preference reward: tests/test_draft.py).
SHIPPED_EXTRA = {"draft": DRAFT_WORLD_ASSETS}


def test_every_stage_config_is_covered():
    assert {p.stem for p in (ROOT / "configs" / "stages").glob("*.yaml")} == set(CASES)
    assert set(objective_registry()) == set(CASES)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    """A tiny_teacher checkpoint with every weight random (its own init would give zero flow)."""
    path = tmp_path_factory.mktemp("teacher") / "tiny_teacher.safetensors"
    save_weights(randomize(build_model("tiny_teacher"), seed=5), path)
    return path


@pytest.fixture(scope="module")
def random_student(tmp_path_factory) -> Path:
    """A tiny causal student checkpoint with every weight random."""
    path = tmp_path_factory.mktemp("student") / "tiny_student.safetensors"
    save_weights(randomize(build_model("tiny"), seed=6), path)
    return path


@pytest.mark.parametrize("stage", sorted(CASES))
def test_stage_runs_and_its_loss_falls(tmp_path, stage, random_teacher, random_student):
    role, iterations, extra = CASES[stage]
    extra = [o.replace("{teacher}", str(random_teacher)).replace("{student}", str(random_student)) for o in extra]
    registry = objective_registry()
    overrides = [*TINY, f"run.output_dir={tmp_path}", f"train.iterations={iterations}", *extra]
    cfg = load_config(ROOT / "configs" / "stages" / f"{stage}.yaml", overrides, objective_defaults(registry))
    history = Trainer(cfg, registry).train()
    losses = [h[f"loss/{role}"] for h in history if f"loss/{role}" in h]
    assert len(losses) >= iterations // 2
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.8 * first, (stage, role, losses)
    if "loss/generator" in history[0]:  # DMD-type stages step the generator at iteration 0 (gen_every)
        assert all(abs(v) < 1e6 for h in history for k, v in h.items() if k.startswith("loss/"))


@pytest.mark.parametrize("stage", sorted(CASES))
def test_stage_config_runs_as_shipped(tmp_path, stage):
    """Each stage config with its own precision (bf16: FSDP2 with fp32 masters, a process group of one here) and
    activation checkpointing, only the networks tiny and the data synthetic: 2 iterations, finite losses, an
    export whose weights are fp32 and moved."""
    registry = objective_registry()
    overrides = ["model=tiny", "data.type=synthetic", "data.num_samples=2", "data.latent_frames=3",
                 f"run.output_dir={tmp_path}", "train.iterations=2", "train.log_every=1000",
                 *SHIPPED_EXTRA.get(stage, [])]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "stages" / f"{stage}.yaml", overrides, objective_defaults(registry))
    assert cfg.train.dtype == "bf16" and cfg.train.gradient_checkpointing  # what the real runs use
    history = Trainer(cfg, registry).train()
    assert len(history) == 2
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k.startswith("loss/"))
    role = registry[stage].trainable_roles[0]
    with safe_open(str(tmp_path / stage / "export" / f"{role}.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_missing_teacher_checkpoint_names_the_role_and_fix(tmp_path):
    registry = objective_registry()
    overrides = [*TINY, f"run.output_dir={tmp_path}", f"roles.teacher.weights={tmp_path / 'teacher_missing'}"]
    cfg = load_config(ROOT / "configs" / "stages" / "dmd.yaml", overrides, objective_defaults(registry))
    with pytest.raises(FileNotFoundError, match=r"roles.teacher.weights=.*teacher_missing does not exist.*merge_lora"):
        Trainer(cfg, registry)
