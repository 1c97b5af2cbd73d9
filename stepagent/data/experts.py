"""Expert trajectories: built once through the env pool, cached as JSONL, resumable.

Cache layout (one file pair per task, split and expert-relevant config)::

    {cache_dir}/experts/{task.name}/{split}-{key}.jsonl          kept trajectories
    {cache_dir}/experts/{task.name}/{split}-{key}.dropped.jsonl  {"id", "reason", "detail"}

``key`` hashes the task config fields an expert trajectory depends on: the task's
``expert_cache_fields`` when it declares them (ScienceWorld: simplification and the
simulator's step limit), otherwise every task config field except those that only
select instances or tune the run (task types, per-type caps, workers, timeouts,
data_dir). Instance filters are deliberately left out, so runs on subsets of a split
share one cache file.

Every record is appended and fsynced as soon as it exists, so an interrupted build
loses nothing already written; a rerun reads both files and builds only what is
missing. Drops for transient reasons (a simulator crash) are retried on a rerun.

``load_experts`` is what a run calls for its train experts: ``task.experts_file``'s trajectories
when it is set (``stepagent.data.experts_file``), else these built ones.

CLI (any registered task)::

    python -m stepagent.data.experts task=scienceworld split=train task.task_types=[find-animal]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from stepagent.data.experts_file import load_experts_file
from stepagent.data.trajectory import Trajectory, append_jsonl, read_jsonl
from stepagent.envs.base import ExpertFailure, Task
from stepagent.envs.pool import EnvPool

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1  # bump when the stored trajectories change meaning
RETRY_REASONS = frozenset({"simulator_crash"})  # transient drops, retried on the next build
# Task config fields that never change an expert trajectory (used when a task declares no
# ``expert_cache_fields``).
_RUN_ONLY_FIELDS = frozenset(
    {"task_types", "train_per_type", "eval_per_type", "num_workers", "step_timeout_s", "data_dir",
     # what the policy is trained on / prompted with / scored by, never a gold path
     "experts_file", "experts_format", "action_format", "instruction_file", "icl_example", "score"}
)


# --------------------------------------------------------------------------- cache paths
def _cfg_dict(cfg: Any) -> Dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))


def expert_cache_key(task: Task) -> str:
    cfg = _cfg_dict(task.cfg)
    fields = getattr(task, "expert_cache_fields", None)
    if fields is None:
        relevant = {k: v for k, v in cfg.items() if k not in _RUN_ONLY_FIELDS}
    else:
        defaults = getattr(task, "expert_cache_defaults", {})
        relevant = {k: cfg.get(k) for k in fields if not (k in defaults and cfg.get(k) == defaults[k])}
    blob = json.dumps(
        {"task": task.name, "format": CACHE_FORMAT_VERSION, "cfg": relevant}, sort_keys=True, default=str
    )
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:10]


def expert_cache_path(task: Task, split: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "experts" / task.name / f"{split}-{expert_cache_key(task)}.jsonl"


def dropped_path(out_path: str | Path) -> Path:
    """``train-abc.jsonl`` -> ``train-abc.dropped.jsonl``."""
    out_path = Path(out_path)
    stem = out_path.name[: -len(".jsonl")] if out_path.name.endswith(".jsonl") else out_path.name
    return out_path.with_name(stem + ".dropped.jsonl")


# --------------------------------------------------------------------------- reading the cache
def read_expert_cache(out_path: str | Path) -> Tuple[Dict[str, Trajectory], Dict[str, Tuple[str, str]]]:
    """(kept: id -> trajectory, dropped: id -> (reason, detail)) from a possibly partial cache.

    A kept trajectory wins over any drop record for the same id; retryable drops are left
    out so that the caller builds those instances again.
    """
    out_path = Path(out_path)
    kept: Dict[str, Trajectory] = {}
    if out_path.exists():
        for row in read_jsonl(out_path):
            traj = Trajectory.from_dict(row)
            kept.setdefault(traj.id, traj)
    dropped: Dict[str, Tuple[str, str]] = {}
    drop_file = dropped_path(out_path)
    if drop_file.exists():
        for row in read_jsonl(drop_file):
            if row["id"] not in kept and row["reason"] not in RETRY_REASONS:
                dropped[row["id"]] = (row["reason"], row.get("detail", ""))
    return kept, dropped


# --------------------------------------------------------------------------- building
@dataclass
class ExpertBuildReport:
    """``skipped``/``built`` describe this run; ``kept``/``dropped`` the split's final state."""

    task: str
    split: str
    path: str
    total: int = 0  # instances in the split (after the config's filters)
    skipped: int = 0  # already in the cache (kept or dropped) before this run
    built: int = 0  # attempted in this run
    kept: int = 0  # instances with an expert trajectory in the cache now
    dropped: Dict[str, int] = field(default_factory=dict)  # reason -> instances without one

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) or "none"
        return (
            f"expert trajectories {self.task}/{self.split}: {self.total} instances, "
            f"{self.skipped} from cache, {self.built} built now; kept {self.kept}, "
            f"dropped {self.num_dropped} ({reasons}); file {self.path}"
        )


def build_expert_trajectories(
    task: Task,
    split: str,
    out_path: str | Path,
    num_workers: int,
    progress: bool = True,
) -> ExpertBuildReport:
    """Build the expert trajectories of ``task.instances(split)`` missing from ``out_path``."""
    out_path = Path(out_path)
    drop_file = dropped_path(out_path)
    instances = task.instances(split)
    kept, dropped = read_expert_cache(out_path)
    todo = [inst for inst in instances if inst.id not in kept and inst.id not in dropped]
    report = ExpertBuildReport(task.name, split, str(out_path), total=len(instances))
    report.skipped = len(instances) - len(todo)

    if todo:
        timeout = float(getattr(task.cfg, "step_timeout_s", 120.0))
        workers = max(1, min(num_workers, len(todo)))  # no idle simulators for a small remainder
        with EnvPool(task.env_factory(), workers, step_timeout_s=timeout) as pool:
            for inst, result in pool.map_experts(todo, progress=progress):
                if isinstance(result, Trajectory):
                    append_jsonl(out_path, [result.to_dict()])
                    kept[inst.id] = result
                else:
                    assert isinstance(result, ExpertFailure)
                    append_jsonl(drop_file, [{"id": inst.id, "reason": result.reason, "detail": result.detail}])
                    dropped[inst.id] = (result.reason, result.detail)
                report.built += 1

    report.kept = sum(inst.id in kept for inst in instances)
    report.dropped = dict(Counter(dropped[i.id][0] for i in instances if i.id not in kept and i.id in dropped))
    log.info("%s", report.summary())
    return report


def load_or_build_experts(
    task: Task, split: str, cache_dir: str | Path, num_workers: int, progress: bool = True
) -> List[Trajectory]:
    """Expert trajectories of ``task.instances(split)``, in instance order, built if missing."""
    path = expert_cache_path(task, split, cache_dir)
    build_expert_trajectories(task, split, path, num_workers, progress=progress)
    kept, _ = read_expert_cache(path)
    return [kept[inst.id] for inst in task.instances(split) if inst.id in kept]


def load_experts(
    task_cfg: Any, task: Task, cache_dir: str | Path, num_workers: Optional[int] = None, progress: bool = True
) -> List[Trajectory]:
    """The run's expert trajectories: ``task.experts_file``'s when it is set (read once, cached by
    content hash; ``stepagent.data.experts_file``), else the gold-path experts of the train split."""
    if getattr(task_cfg, "experts_file", None):
        return load_experts_file(task_cfg, task, cache_dir, progress=progress)[0]
    workers = task.num_workers if num_workers is None else num_workers
    return load_or_build_experts(task, "train", cache_dir, workers, progress=progress)


# --------------------------------------------------------------------------- CLI
def _compose(overrides: Sequence[str]) -> Any:
    """The project's Hydra config, as ``run.py`` would see it (``${hydra:...}`` resolvable)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import stepagent

    conf_dir = Path(stepagent.__file__).resolve().parents[1] / "conf"
    if not (conf_dir / "config.yaml").exists():
        raise SystemExit(f"no Hydra config at {conf_dir}/config.yaml")
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.cwd} in cache_dir resolves
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> ExpertBuildReport:
    from stepagent.config import validate_task_config
    from stepagent.envs import make_task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        raise SystemExit(0)
    split = "train"
    overrides = []
    for arg in args:  # "split=" is this tool's own argument; everything else goes to Hydra
        if arg.startswith("split="):
            split = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    cfg = _compose(overrides)
    task_cfg = validate_task_config(cfg.task)
    task = make_task(task_cfg)
    path = expert_cache_path(task, split, str(cfg.cache_dir))
    report = build_expert_trajectories(task, split, path, task.num_workers)
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
