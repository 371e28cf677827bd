"""LoRA training of a role through peft (roles.<role>.lora): only the adapters and the `full` parameters move,
the export is the merged network (W + (alpha/r)·B@A, checked in float64) plus an adapter file that
scripts/merge_lora.py merges into the base to the same network, the merged export computes what the wrapped
network computed, bf16 + FSDP2 trains the adapters in fp32, and bad settings fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize, rel_err, tiny_inputs
from safetensors.torch import load_file

from model import objective_registry
from scripts.merge_lora import main as merge_lora
from trainer.objective import objective_defaults
from trainer.trainer import Trainer
from utils.config import ConfigError, load_config
from wan.checkpoint import load_model, save_weights
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0
TARGETS = (".q", ".v", ".o", ".ffn.0", ".ffn.2")  # the modules lora.targets=[q,v,o,ffn.0,ffn.2] names


def cfg_of(stage: str, *overrides: str):
    return load_config(ROOT / "configs" / "stages" / f"{stage}.yaml", list(overrides),
                       objective_defaults(objective_registry()))  # fmt: skip


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny pose teacher with every weight random (a zero head would stop every gradient)."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_weights(randomize(build_model("tiny_teacher"), std=0.05, seed=3), path)
    return path


def lora_teacher_run(tmp_path: Path, base_file: Path, *extra: str) -> Trainer:
    cfg = cfg_of(
        "teacher", "model=tiny", "data.type=synthetic", "data.num_samples=2", "data.latent_frames=3",
        "train.iterations=3", "train.dtype=fp32", "roles.teacher.lr=1e-2", "roles.teacher.ema_decay=0.5",
        f"roles.teacher.weights={base_file}", f"roles.teacher.lora.rank={RANK}", f"roles.teacher.lora.alpha={ALPHA}",
        "roles.teacher.lora.targets=[q,v,o,ffn.0,ffn.2]", "roles.teacher.lora.full=[dwpose_embedding.*]",
        f"run.output_dir={tmp_path}", *extra,
    )  # fmt: skip
    trainer = Trainer(cfg, objective_registry())
    trainer.train()
    return trainer


def test_lora_teacher_trains_adapters_and_pose_only_and_exports_the_merge(tmp_path, base_file):
    trainer = lora_teacher_run(tmp_path, base_file)
    base = load_file(base_file)
    export = tmp_path / "teacher" / "export"
    merged, adapter = load_file(export / "teacher.safetensors"), load_file(export / "teacher_lora.safetensors")
    assert set(merged) == set(base)  # canonical keys: loads as the plain preset
    lora_modules = {k[: -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")}
    expected_modules = {k[: -len(".weight")] for k in base if k.endswith(".weight") and k[: -7].endswith(TARGETS)}
    assert lora_modules == expected_modules  # suffixes on name boundaries: "v" is not v_img, "o" not norms
    for key, value in base.items():
        module = key[: -len(".weight")]
        if module in lora_modules:  # W + (alpha / r) B @ A, independently in float64
            a, b = adapter[f"{module}.lora_A.weight"].double(), adapter[f"{module}.lora_B.weight"].double()
            assert float(adapter[f"{module}.alpha"]) == ALPHA
            expected = value.double() + (ALPHA / RANK) * b @ a
            assert torch.allclose(merged[key].double(), expected, rtol=0, atol=1e-6), key
            assert (b.abs().sum() > 0) and not torch.equal(merged[key], value), key  # the adapter trained
        elif key.startswith("dwpose_embedding."):
            assert not torch.equal(merged[key], value) and torch.equal(adapter[key], merged[key]), key
        else:  # frozen: bit-identical to the base
            assert torch.equal(merged[key], value), key
    # the merged export computes what the peft-wrapped network computed
    wrapped = trainer.roles["teacher"].eval()
    plain = load_model(export / "teacher.safetensors", dtype=torch.float32).eval()
    inputs = tiny_inputs(batch=1, frames=3, seed=1)
    with torch.no_grad():
        assert rel_err(plain(**inputs), wrapped(**inputs)) < 1e-5


def test_adapter_file_merges_with_merge_lora_into_the_same_network(tmp_path, base_file):
    lora_teacher_run(tmp_path, base_file)
    export = tmp_path / "teacher" / "export"
    for suffix in ("", "_ema"):
        out = tmp_path / f"merged{suffix}.safetensors"
        assert merge_lora(["--base", str(base_file), "--lora", str(export / f"teacher{suffix}_lora.safetensors"),
                           "--out", str(out)]) == 0  # fmt: skip
        ours, theirs = load_file(export / f"teacher{suffix}.safetensors"), load_file(out)
        assert set(ours) == set(theirs)
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6), key


def test_lora_under_bf16_fsdp2_trains_fp32_adapters(tmp_path, base_file):
    trainer = lora_teacher_run(tmp_path, base_file, "train.dtype=bf16", "train.iterations=2")
    params = dict(trainer.roles["teacher"].named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("dwpose_embedding.") for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    merged = load_file(tmp_path / "teacher" / "export" / "teacher.safetensors")
    base = load_file(base_file)
    assert set(merged) == set(base) and not torch.equal(merged["blocks.0.ffn.0.weight"], base["blocks.0.ffn.0.weight"])


def test_lora_critic_in_dmd_keeps_its_base(tmp_path, base_file):
    critic = tmp_path / "critic.safetensors"
    save_weights(randomize(build_model("tiny_bidirectional"), std=0.05, seed=4), critic)
    cfg = cfg_of(
        "dmd", "model=tiny", "data.type=synthetic", "data.num_samples=2", "data.latent_frames=3",
        "train.iterations=2", "train.dtype=fp32", "train.gradient_checkpointing=false", "roles.critic.lr=1e-2",
        f"roles.critic.weights={critic}", "roles.critic.lora.rank=2", f"run.output_dir={tmp_path}",
    )  # fmt: skip
    trainer = Trainer(cfg, objective_registry())
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss/critic"])) for h in history)
    merged, base = load_file(tmp_path / "dmd" / "export" / "critic.safetensors"), load_file(critic)
    assert set(merged) == set(base)
    assert torch.equal(merged["patch_embedding.weight"], base["patch_embedding.weight"])  # not a LoRA target
    assert not torch.equal(merged["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["roles.teacher.lora.rank=4"], r"roles.teacher.lora.rank=4: stage 'dmd' keeps roles.teacher frozen"),
        (["roles.critic.lora.rank=4", "roles.critic.lora.targets=[nope]"], r"roles.critic.lora.targets=\['nope'\]"),
        (["roles.critic.lora.rank=4", "roles.critic.lora.full=[nope.*]"], r"roles.critic.lora.full=\['nope.\*'\]"),
    ],
)
def test_bad_lora_settings_name_the_key(tmp_path, overrides, match):
    cfg = cfg_of("dmd", "model=tiny", "data.type=synthetic", "train.dtype=fp32", f"run.output_dir={tmp_path}",
                 *overrides)  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        Trainer(cfg, objective_registry())
