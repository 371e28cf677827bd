"""Run configuration: configs/default.yaml <- configs/model/<model>.yaml <- a stage YAML <- key=value overrides.

default.yaml lists every key (the `objective:` section takes the stage's own defaults), so a typo anywhere is
an error that names the key and the closest valid one, before anything runs. Values are checked too (types
against the defaults, ranges of the numbers that size a run), and broken YAML is named with its file and line.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


def _load_yaml(path: Path) -> DictConfig:
    """OmegaConf.load, with broken YAML reported as file:line:column and the parser's complaint."""
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the file") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path} holds a {type(layer).__name__}, not a mapping of keys to values")
    return layer


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
    defaults = _load_yaml(CONFIG_DIR / "default.yaml")
    stage = OmegaConf.create()
    if stage_config is not None:
        path = Path(stage_config)
        if not path.exists():
            stages = sorted(p.stem for p in (CONFIG_DIR / "stages").glob("*.yaml"))
            raise ConfigError(f"stage config {path} does not exist; stages in configs/stages/: {stages}")
        stage = _load_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.iterations=4)")
    cli = OmegaConf.create()
    for item in overrides:
        try:
            cli = OmegaConf.merge(cli, OmegaConf.from_dotlist([item]))
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {item!r} is not a valid value ({problem}); quote or fix it") from None

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
    model_layer = _load_yaml(model_path)

    for where, layer in (
        (f"configs/model/{model_name}.yaml", model_layer),
        (str(stage_config) if stage_config else "stage", stage),
        ("command line", cli),
    ):
        _check_keys(_plain(layer), schema, where)
    try:
        cfg = OmegaConf.merge(OmegaConf.create(schema), model_layer, stage, cli)
    except OmegaConfBaseException as err:
        raise ConfigError(f"the config layers do not merge: {str(err).splitlines()[0]}") from None
    validate_config(cfg, schema)
    return cfg


# ---------------------------------------------------------------------------------------------- value checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _type_problems(value: Any, default: Any, key: str) -> list[str]:
    """A value must have its default's type (ints may stand for floats); null defaults take anything."""
    if default is None or (value is None and isinstance(default, (str, Sequence))):
        return []  # null defaults take anything; a null path, name or list means "none"
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            return [f"{key} must be a section (key: value pairs), got {value!r}"]
        return [p for k, v in value.items() if k in default for p in _type_problems(v, default[k], f"{key}.{k}")]
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif _is_int(default):
        ok, what = _is_int(value), "an integer"
    elif isinstance(default, float):
        ok, what = _is_number(value), "a number"
    elif isinstance(default, str):
        ok, what = isinstance(value, str), "a string"
    elif isinstance(default, Sequence):
        ok, what = isinstance(value, Sequence) and not isinstance(value, str), "a list"
    else:
        return []
    return [] if ok else [f"{key}={value!r} must be {what}"]


# Ranges of the values that size a run: (key, minimum, what it is). `*` stands for every role.
_INT_MINIMUM = (
    ("train.iterations", 1, "optimizer steps of the run"),
    ("train.batch_size", 1, "samples per rank and micro-step"),
    ("train.grad_accum", 1, "micro-steps per optimizer step"),
    ("train.save_every", 1, "iterations between checkpoints"),
    ("train.log_every", 1, "iterations between log lines"),
    ("train.keep_last", 1, "checkpoints kept"),
    ("train.sequence_parallel", 1, "ranks that split one sample's tokens (1: off)"),
    ("data.num_samples", 1, "synthetic samples"),
    ("data.latent_frames", 1, "latent frames of a synthetic sample"),
    ("data.num_workers", 0, "data loader workers"),
    ("roles.*.ema_start", 0, "iteration the EMA starts at"),
)
_CHOICES = (
    ("train.dtype", ("fp32", "bf16")),
    ("train.distributed", ("auto", "fsdp", "ddp", "none")),
    ("data.type", ("synthetic", "ode_pairs", "latents")),
)


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _expand(cfg: Mapping, dotted: str) -> list[str]:
    if "*" not in dotted:
        return [dotted]
    head, tail = dotted.split(".*.", 1)
    section = _get(cfg, head)
    return [f"{head}.{name}.{tail}" for name in section] if isinstance(section, Mapping) else []


def _range_problems(cfg: Mapping) -> list[str]:
    problems = []
    for pattern, minimum, what in _INT_MINIMUM:
        for key in _expand(cfg, pattern):
            value = _get(cfg, key)
            if _is_int(value) and value < minimum:
                problems.append(f"{key}={value} must be >= {minimum} ({what})")
    for key, value in (_get(cfg, "objective") or {}).items():  # an objective's *_every is a period in iterations
        if str(key).endswith("_every") and _is_int(value) and value < 1:
            problems.append(f"objective.{key}={value} must be >= 1 (a period in iterations)")
    for key, choices in _CHOICES:
        value = _get(cfg, key)
        if value not in choices:
            problems.append(f"{key}={value!r} must be one of {', '.join(choices)}")
    for name, role in (_get(cfg, "roles") or {}).items():
        key = f"roles.{name}"
        lr, eps, wd, decay = (role.get(k) for k in ("lr", "eps", "weight_decay", "ema_decay"))
        if _is_number(lr) and not (math.isfinite(lr) and lr > 0):
            problems.append(f"{key}.lr={lr} must be a finite number > 0")
        if _is_number(eps) and not (math.isfinite(eps) and eps > 0):
            problems.append(f"{key}.eps={eps} must be a finite number > 0")
        if _is_number(wd) and not (math.isfinite(wd) and wd >= 0):
            problems.append(f"{key}.weight_decay={wd} must be a finite number >= 0")
        if decay is not None and not (_is_number(decay) and 0 < decay < 1):
            problems.append(f"{key}.ema_decay={decay!r} must be null or a number in (0, 1)")
        betas = role.get("betas")
        if isinstance(betas, Sequence) and not (len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            problems.append(f"{key}.betas={list(betas)} must be two numbers in [0, 1)")
    clip = _get(cfg, "train.grad_clip")
    if _is_number(clip) and not (math.isfinite(clip) and clip >= 0):
        problems.append(f"train.grad_clip={clip} must be a finite number >= 0 (0 turns clipping off)")
    fraction = _get(cfg, "data.max_bad_fraction")
    if _is_number(fraction) and not 0 <= fraction <= 1:
        problems.append(f"data.max_bad_fraction={fraction} must be in [0, 1]")
    size = _get(cfg, "data.latent_size")
    if isinstance(size, Sequence) and not (len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
        problems.append(f"data.latent_size={list(size)} must be two integers >= 1 (H, W)")
    resume = _get(cfg, "run.resume")
    if resume is not None and not (isinstance(resume, str) and resume.strip()):
        problems.append(f"run.resume={resume!r} must be null, auto or a checkpoint folder")
    return problems


def validate_config(cfg: DictConfig | Mapping, schema: Mapping | None = None) -> None:
    """Check the values of a merged config before anything is built: types against the defaults (`schema`, the
    merged defaults; default.yaml when not given) and the ranges that size a run. One ConfigError lists every
    problem on one line."""
    plain = _plain(cfg)
    if schema is None:
        schema = OmegaConf.to_container(_load_yaml(CONFIG_DIR / "default.yaml"))
    problems = [p for key, default in schema.items() if key in plain for p in _type_problems(plain[key], default, key)]
    problems += _range_problems(plain)
    if problems:
        raise ConfigError("; ".join(problems))


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """The resolved config, written atomically beside a run's outputs."""
    from utils.atomic_io import atomic_write_text

    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), path)
