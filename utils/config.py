"""Run configuration: configs/default.yaml <- configs/model/<model>.yaml <- a stage YAML <- key=value overrides.

default.yaml lists every key (the `objective:` section takes the stage's own defaults), so a typo anywhere is
an error that names the key and the closest valid one, before anything runs.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# dtype names in configs and on command lines
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConfigError(ValueError):
    """A configuration that cannot run: says which key or file, and what to write instead."""


def _check_keys(layer: Any, schema: Any, where: str, prefix: str = "") -> None:
    if not isinstance(layer, Mapping):
        return
    if not isinstance(schema, Mapping):
        raise ConfigError(
            f"{where}: '{prefix.rstrip('.')}' is a value, not a section; it has no key {list(layer)[0]!r}"
        )
    for key, value in layer.items():
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {sorted(schema)}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        _check_keys(value, schema[key], where, f"{prefix}{key}.")


def _plain(cfg: DictConfig | Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def load_config(
    stage_config: str | Path | None = None,
    overrides: Sequence[str] = (),
    objective_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> DictConfig:
    """Merge the layers and validate every key.

    objective_defaults: {stage name: that objective's `defaults`} (the registry); the chosen stage's defaults
    become the schema and defaults of the `objective:` section.
    """
    defaults = OmegaConf.load(CONFIG_DIR / "default.yaml")
    stage = OmegaConf.create()
    if stage_config is not None:
        path = Path(stage_config)
        if not path.exists():
            stages = sorted(p.stem for p in (CONFIG_DIR / "stages").glob("*.yaml"))
            raise ConfigError(f"stage config {path} does not exist; stages in configs/stages/: {stages}")
        stage = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.iterations=4)")
    cli = OmegaConf.from_dotlist(list(overrides))

    stage_name = cli.get("stage", stage.get("stage", defaults.stage))
    schema = OmegaConf.to_container(defaults)
    if objective_defaults is not None:
        if stage_name is None:
            raise ConfigError("no stage given: pass a configs/stages/*.yaml file or stage=<name>")
        if stage_name not in objective_defaults:
            raise ConfigError(f"unknown stage {stage_name!r}; stages: {sorted(objective_defaults)}")
        schema["objective"] = dict(objective_defaults[stage_name])

    model_name = cli.get("model", stage.get("model", defaults.model))
    model_path = CONFIG_DIR / "model" / f"{model_name}.yaml"
    if not model_path.exists():
        names = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model={model_name!r} has no configs/model/{model_name}.yaml; choose one of {names}")
    model_layer = OmegaConf.load(model_path)

    for where, layer in (
        (f"configs/model/{model_name}.yaml", model_layer),
        (str(stage_config) if stage_config else "stage", stage),
        ("command line", cli),
    ):
        _check_keys(_plain(layer), schema, where)
    return OmegaConf.merge(OmegaConf.create(schema), model_layer, stage, cli)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """The resolved config, written atomically beside a run's outputs."""
    from utils.safetensors_io import atomic_write_text

    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), path)
