"""``task.experts_file``: a user's trajectory file as the run's expert trajectories (docs/tasks.md).

``load_experts_file(task_cfg, task, cache_dir)`` reads the file once (any format of
``stepagent.data.readers``: ETO/IPR, chat, bare message lists, this project's JSONL) and
returns the trajectories that replace the built gold-path experts everywhere (SFT,
inspection, the discriminator, ETO's pairs). The held-out dev experts stay the built ones.

Cache: what the reader makes of the file is kept as this project's JSONL, keyed by the
sha256 of the file's bytes, the requested format and ``readers.READER_VERSION``::

    {cache_dir}/experts_file/{task}/{sha256[:16]}-{format}-r{READER_VERSION}.jsonl   trajectories
    {cache_dir}/experts_file/{task}/{sha256[:16]}-{format}-r{READER_VERSION}.json    counts, full hash

An unchanged file is read from there (the file itself is only hashed); an edited one is
parsed again. Linking to task instances and the task-type selection are cheap and redone
on every run, so one cache serves every config.

Links: a record whose id names an instance of the task keeps that link: its trajectory's
id becomes the instance id (``scienceworld/<task-type>/<variation>``,
``hotpotqa/<type>/<question id>``), the original id stays in ``meta["source_id"]``.
Recognised ids (any split; only train instances are linked):

* every task: the instance id itself;
* ScienceWorld: ETO's ``<taskname2id>_<variation>`` (``11_0`` = ``task-3-find-animal``
  variation 0, what ETO's ``sciworld_sft.json`` uses), ``<ETO task name>_<variation>``
  (``task-3-find-animal_0``) and ``<task type>_<variation>`` (``find-animal_0``);
* HotpotQA: the question id.
* ALFWorld: ``<task folder>/<trial>`` and ``<release split>/<task folder>/<trial>`` (the shipped
  ``train_expert_3554`` ids, ``train/...``), also read from a record's ``game_file`` (ETO's
  ``alfworld_sft.json`` numbers its records and names the game there).

Other records (AgentGym's ``sciworld_12``, chat exports without ids, records naming dev/test
instances, a second record for an instance already linked) keep an id of their own and
serve everything that needs no environment; the rollout arms use only linked ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from stepagent.config import ConfigError
from stepagent.data.readers import READER_VERSION, read_trajectories
from stepagent.data.trajectory import Trajectory, TrajectoryFormatError, load_trajectories, save_trajectories
from stepagent.envs.base import Task, TaskInstance, make_task

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
# Config fields that only select instances: off when looking for the instance a record names.
_FILTER_KEYS = frozenset({"task_types", "train_per_type", "eval_per_type"})
TYPE_NOT_SELECTED = "task type not in task.task_types"


# --------------------------------------------------------------------------- report
@dataclass
class ExpertsFileReport:
    path: str
    format: str  # the format the records were read as
    sha256: str
    cache_path: str
    cache_hit: bool  # the parsed trajectories came from the cache
    records: int = 0  # records in the file
    kept: int = 0  # trajectories returned
    dropped: Dict[str, int] = field(default_factory=dict)  # reason -> records
    linked: int = 0  # kept trajectories linked to a train instance (id = instance id)
    linked_in_run: int = 0  # ... to one of this run's train instances (task.instances("train"))
    run_train_instances: int = 0
    repeats: int = 0  # further records for an instance already linked (kept, not linked)
    other_split: int = 0  # records naming a dev/test instance (kept, not linked)
    no_instance: int = 0  # records whose id names no instance
    below_one: int = 0  # kept trajectories with reward < 1
    examples: Dict[str, List[str]] = field(default_factory=dict)  # kind -> a few original ids

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def counts(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items()))
        line = (f"{self.records} records read, {self.kept} kept, {self.num_dropped} dropped"
                + (f" ({reasons})" if reasons else ""))
        if self.below_one:
            line += f"; {self.below_one} kept with reward < 1"
        return line

    def summary(self) -> str:
        return f"experts file {self.path} ({self.format}): {self.counts()}"

    def links(self, task_name: str) -> str:
        unlinked = self.kept - self.linked
        parts = []
        if self.no_instance:
            parts.append(f"{self.no_instance} name no instance{_eg(self.examples.get('no_instance'))}")
        if self.other_split:
            parts.append(f"{self.other_split} name dev/test instances{_eg(self.examples.get('other_split'))}")
        if self.repeats:
            parts.append(f"{self.repeats} repeat an instance already linked")
        return (f"experts file: {self.linked} of {self.kept} trajectories linked to {task_name} train instances "
                f"({self.linked_in_run} of this run's {self.run_train_instances} train instances have one; the "
                f"arms that roll out use those); {unlinked} not linked"
                + (f" ({'; '.join(parts)})" if parts else "")
                + (": usable for SFT, inspection and the discriminator" if unlinked else ""))


def _eg(ids: Optional[List[str]]) -> str:
    return f", e.g. {', '.join(repr(i) for i in ids)}" if ids else ""


# --------------------------------------------------------------------------- cache
def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def experts_file_cache_path(task_name: str, sha256: str, fmt: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "experts_file" / task_name / f"{sha256[:16]}-{fmt}-r{READER_VERSION}.jsonl"


def _meta_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(".json")


def _read_cache(cache_path: Path, sha256: str) -> Optional[Tuple[Dict[str, Any], List[Trajectory]]]:
    meta_path = _meta_path(cache_path)
    if not (meta_path.exists() and cache_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("sha256") != sha256 or meta.get("reader_version") != READER_VERSION:
            return None
        trajs = load_trajectories(cache_path)
    except (OSError, ValueError) as e:  # a damaged cache is parsed again, never trusted
        log.warning("experts file cache %s unreadable (%s): parsing the file again", cache_path, e)
        return None
    if len(trajs) != meta.get("trajectories"):
        return None
    return meta, trajs


def _write_cache(cache_path: Path, meta: Dict[str, Any], trajs: List[Trajectory]) -> None:
    save_trajectories(cache_path, trajs)  # atomic: tmp file + rename
    meta_path = _meta_path(cache_path)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, meta_path)  # written last: its presence marks a complete cache


# --------------------------------------------------------------------------- instances a record can name
class _NoFilters:
    """A task config seen with its instance filters off (every instance of every split)."""

    def __init__(self, cfg: Any):
        self._cfg = cfg

    def __getattr__(self, key: str) -> Any:
        if key in _FILTER_KEYS:
            return None
        return getattr(self._cfg, key)


def _sciworld_aliases(task: Task) -> Any:
    from stepagent.envs.scienceworld import DEFAULT_DATA_DIR, eto_to_package_name

    data_dir = Path(getattr(task, "data_dir", DEFAULT_DATA_DIR))
    names: Dict[str, List[Tuple[str, int]]] = {}
    table = data_dir / "taskname2id.json"
    if table.exists():
        for eto_name, num in json.loads(table.read_text(encoding="utf-8")).items():
            try:
                names.setdefault(eto_to_package_name(eto_name, str(data_dir)), []).append((eto_name, num))
            except ValueError:
                continue

    def aliases(inst: TaskInstance) -> List[str]:
        out = [f"{inst.task_type}_{inst.index}"]
        for eto_name, num in names.get(inst.task_type, ()):
            out += [f"{num}_{inst.index}", f"{eto_name}_{inst.index}"]
        return out

    return aliases


# task name -> (task -> (instance -> extra ids naming it)); every task also has the instance id
_ALIASES = {
    "scienceworld": _sciworld_aliases,
    "hotpotqa": lambda task: (lambda inst: [inst.index]),
    # ALFWorld: <task folder>/<trial>, and the release's train/<task folder>/<trial> (the shipped expert file)
    "alfworld": lambda task: (lambda inst: [inst.index, f"{_ALFWORLD_SPLIT_DIRS[inst.split]}/{inst.index}"]),
}
_ALFWORLD_SPLIT_DIRS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}


def _game_file_ids(t: Trajectory) -> List[str]:
    """ETO's ALFWorld records name their game in ``game_file`` (``.../json_2.1.1/train/<task folder>/
    <trial>/game.tw-pddl``) and carry a bare number as id: the ``<release split>/<folder>/<trial>`` part."""
    game = t.meta.get("game_file")
    if not isinstance(game, str):
        return []
    parts = [p for p in game.replace("\\", "/").split("/") if p and p != "."]
    if parts and parts[-1].startswith("game."):
        parts = parts[:-1]
    if len(parts) < 2:
        return []
    return ["/".join(parts[-3:]), "/".join(parts[-2:])]


def instance_index(task: Task) -> Dict[str, TaskInstance]:
    """Every id a record may use for an instance of ``task`` (all splits, filters off) -> the instance.
    An instance in several splits (ETO's ScienceWorld train list holds 54 dev/test variations) is
    its train one; an id naming two different instances is left out."""
    full = make_task(_NoFilters(task.cfg), task.name) if task.cfg is not None else task
    extra = _ALIASES.get(task.name, lambda _t: (lambda _i: []))(full)
    index: Dict[str, TaskInstance] = {}
    ambiguous = set()
    for split in SPLITS:
        try:
            instances = full.instances(split)
        except ValueError:  # a task without this split
            continue
        for inst in instances:
            for alias in [inst.id, *extra(inst)]:
                if index.setdefault(alias, inst).id != inst.id:  # splits in order: train wins
                    ambiguous.add(alias)
    for alias in ambiguous:
        del index[alias]
    return index


def link_experts(trajs: List[Trajectory], task: Task, report: ExpertsFileReport) -> List[Trajectory]:
    """Set the ids of trajectories naming a train instance to that instance's id; drop those of
    task types the config does not select; fill the link counts of ``report``."""
    index = instance_index(task)
    known_types = {inst.task_type for inst in index.values()}
    selected = getattr(task.cfg, "task_types", None) if task.cfg is not None else None
    selected = None if selected is None else {str(t) for t in selected}
    run_train = {inst.id for inst in task.instances("train")}
    report.run_train_instances = len(run_train)
    dropped: Counter = Counter(report.dropped)
    examples: Dict[str, List[str]] = {}
    seen: Counter = Counter()
    used: set = set()
    out: List[Trajectory] = []
    for t in trajs:
        source_id = str(t.meta.get("source_id", t.id))
        inst = next((index[k] for k in (t.id.strip(), source_id.strip(), *_game_file_ids(t)) if k in index), None)
        task_type = inst.task_type if inst is not None else t.task_type
        if selected is not None and task_type in known_types and task_type not in selected:
            dropped[TYPE_NOT_SELECTED] += 1
            continue
        meta = dict(t.meta, source_id=source_id)
        new_id = source_id
        if inst is not None and inst.split == "train":
            meta["instance_id"] = inst.id
            seen[inst.id] += 1
            if seen[inst.id] == 1 and inst.id not in used:
                new_id = inst.id
                report.linked += 1
                report.linked_in_run += inst.id in run_train
            else:
                new_id = f"{inst.id}#{seen[inst.id]}"
                report.repeats += 1
        elif inst is not None:
            meta["names_instance"] = inst.id
            report.other_split += 1
            examples.setdefault("other_split", []).append(source_id)
        else:
            report.no_instance += 1
            examples.setdefault("no_instance", []).append(source_id)
        base, k = new_id, 2
        while new_id in used:  # ids are unique: inspection and the arms index trajectories by id
            new_id, k = f"{base}#{k}", k + 1
        used.add(new_id)
        report.below_one += t.reward < 1.0
        out.append(replace(t, id=new_id, task_type=task_type, meta=meta))
    report.dropped = dict(dropped)
    report.kept = len(out)
    report.examples = {kind: ids[:3] for kind, ids in examples.items()}
    return out


# --------------------------------------------------------------------------- the loader
def load_experts_file(
    task_cfg: Any, task: Task, cache_dir: str | Path, progress: bool = True
) -> Tuple[List[Trajectory], ExpertsFileReport]:
    """The trajectories of ``task_cfg.experts_file`` (format ``task_cfg.experts_format``), linked to
    ``task``'s train instances, and what happened to the file's records. Raises ``ConfigError``
    (run.py: "config error: ...", exit 2) on a missing, empty, malformed or action-less file."""
    path = Path(str(task_cfg.experts_file)).expanduser().resolve()
    fmt = str(getattr(task_cfg, "experts_format", "auto") or "auto")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"task.experts_file: cannot read {path}: {e.strerror or e}") from None
    sha = file_sha256(data)
    cache_path = experts_file_cache_path(task.name, sha, fmt, cache_dir)
    cached = _read_cache(cache_path, sha)
    if cached is not None:
        meta, trajs = cached
        log.info("experts file %s unchanged (sha256 %s...): parsed trajectories read from the cache %s",
                 path, sha[:12], cache_path)
    else:
        log.info("experts file %s (sha256 %s...): parsing (task.experts_format=%s)", path, sha[:12], fmt)
        try:
            read = read_trajectories(path, task.name, fmt, drop_actionless=True, progress=progress, data=data)
        except TrajectoryFormatError as e:
            raise ConfigError(f"task.experts_file: {e}") from None
        trajs = read.trajectories
        meta = {"path": str(path), "sha256": sha, "reader_version": READER_VERSION, "format": read.format,
                "records": read.records, "dropped": read.dropped, "trajectories": len(trajs)}
        _write_cache(cache_path, meta, trajs)
        log.info("experts file: parsed trajectories cached in %s", cache_path)
    report = ExpertsFileReport(str(path), meta["format"], sha, str(cache_path), cached is not None,
                               records=int(meta["records"]), dropped=dict(meta["dropped"]))
    experts = link_experts(trajs, task, report)
    log.info("%s", report.summary())
    if not experts:
        types = sorted({t.task_type for t in trajs})
        raise ConfigError(
            f"task.experts_file: none of the {report.records} records of {path} is kept: "
            f"{report.counts()}; the file's task types: {', '.join(types[:10])} "
            f"(task.task_types={list(getattr(task.cfg, 'task_types', None) or [])}; null selects all)"
        )
    log.info("%s", report.links(task.name))
    if report.other_split:
        log.warning("experts file: %d trajectories name dev/test instances of %s%s: evaluation on those "
                    "instances is not held out from training", report.other_split, task.name,
                    _eg(report.examples.get("other_split")))
    return experts, report
