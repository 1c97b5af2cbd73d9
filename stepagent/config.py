"""Typed config schemas.

Hydra composes plain YAML from ``conf/``; ``validate_config`` then merges every
group into its dataclass schema, so an unknown key or a wrong type fails at
start-up with the dotted key in the message (not at hour three). Groups whose
options have different fields (``task``, ``policy``) pick their schema from a
registry keyed by the option's ``name``/``kind`` (verl-style).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


# ----------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = MISSING
    data_dir: str = MISSING  # folder with the task's data files (the repo's data/<task> by default)
    num_workers: int = 2  # environment worker processes (ScienceWorld: one JVM each)
    task_types: Optional[List[str]] = None  # keep only these task types (None: all)
    train_per_type: Optional[int] = None  # cap on train instances per task type (None: all)
    eval_per_type: Optional[int] = None  # cap on dev/test instances per task type (None: all)
    step_timeout_s: float = 120.0  # a worker silent for this long is killed and restarted


@dataclass
class ScienceWorldTaskConfig(TaskConfig):
    name: str = "scienceworld"
    simplification: str = "easy"  # ETO's simplificationStr
    max_steps: Optional[int] = None  # None: ETO's per-task step limits (max_steps.json)
    env_step_limit: int = 100  # the simulator's own hard limit


@dataclass
class HotpotQATaskConfig(TaskConfig):
    name: str = "hotpotqa"
    max_steps: int = 8
    search_sentences: int = 5  # sentences returned by search[...] (ReAct returns the first 5)
    n_train: int = 300  # deterministic split of the 500 questions, see data/hotpotqa/README.md
    n_dev: int = 100  # test = the remaining 100


TASK_SCHEMAS: Dict[str, type] = {
    "scienceworld": ScienceWorldTaskConfig,
    "hotpotqa": HotpotQATaskConfig,
}


class ConfigError(ValueError):
    pass


def _merge_typed(schema: type, node: Any, where: str) -> Any:
    try:
        typed = OmegaConf.structured(schema)
        return OmegaConf.merge(typed, node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        raise ConfigError(
            f"bad config in group '{where}' (schema {schema.__name__})"
            + (f": key '{where}.{key}'" if key else "")
            + f": {str(e).splitlines()[0]}"
        ) from None


def validate_task_config(node: Any) -> Any:
    """Merge a ``task`` node into its schema (picked by ``name``)."""
    name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
    if name not in TASK_SCHEMAS:
        raise ConfigError(
            f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASK_SCHEMAS))}"
        )
    return _merge_typed(TASK_SCHEMAS[name], node, "task")
