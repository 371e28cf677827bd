"""Wiring: every module imports, every model config names a preset that builds, presets hold only
constructor keys, and the default config parses."""

import importlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from wan.configs import PRESETS, build_model

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "wan.configs", "wan.checkpoint", "wan.modules.model", "wan.modules.causal_model", "wan.modules.pose",
    "wan.modules.attention", "utils.safetensors_io", "pipeline.causal_diffusion_inference",
    "pipeline.bidirectional_inference", "pipeline.ode_pairs", "pipeline.self_forcing_rollout", "model",
    "trainer.trainer", "utils.encoders.wan_wrapper", "utils.metrics", "utils.world.synthetic_pose", "utils.pose.draw",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_setups_name_buildable_presets(path):
    cfg = OmegaConf.load(path)
    assert set(cfg.roles) <= {"generator", "teacher", "critic", "discriminator"}
    for role, spec in cfg.roles.items():
        assert spec.preset in PRESETS, f"{path.name}: roles.{role} names an unknown preset"
        assert build_model(spec.preset, device="meta").dim == PRESETS[spec.preset]["dim"]


def test_default_config_parses():
    cfg = OmegaConf.load(ROOT / "configs" / "default.yaml")
    assert (ROOT / "configs" / "model" / f"{cfg.model}.yaml").exists()


def test_bidirectional_rejects_causal_options():
    with pytest.raises(ValueError, match="causal-model options"):
        build_model("tiny_bidirectional", num_frame_per_block=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        build_model("wan_2b")


def test_ci_runs_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    pip install torch==2.13.0")]
    assert len(commands) == 2, "README has one set-up+run command and one test command"
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci.splitlines()
    assert any("python inference.py" in c for c in commands)
