"""`stage:` name -> training objective (the classes live in model/, one file each)."""

from __future__ import annotations

from trainer.objective import Objective


def objective_registry() -> dict[str, type[Objective]]:
    from model import REGISTRY

    return dict(REGISTRY)


def objective_defaults(registry: dict[str, type[Objective]]) -> dict[str, dict]:
    return {name: dict(cls.defaults) for name, cls in registry.items()}
