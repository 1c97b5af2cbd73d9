"""ScienceWorld (Wang et al. 2022) as a StepAgent task, with ETO's splits and step limits.

* ``ScienceWorldTask`` (trainer side) reads the split tables in ``data/scienceworld``
  (see its README) and turns each ``[eto_task_name, variation]`` pair into a
  ``TaskInstance`` whose ``task_type`` is the package's task name (``find-animal``).
* ``ScienceWorldTextEnv`` (worker side) owns one ``ScienceWorldEnv``, i.e. one JVM
  reached through py4j, created lazily on first use.

Speed note: ``ScienceWorldEnv.step`` builds a large ``info`` dict on every call
(the full list of valid action/object combinations, look, inventory, ...). That is
~100 ms per step against ~6 ms for the simulator step itself, so this env talks to
the JVM-side ``server`` object directly and reproduces the package's scoring rules
(score 0..100, done on completion, on a negative score, or past ``envStepLimit``).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import stepagent
from stepagent.config import GoldLook, GoldNoops
from stepagent.data.trajectory import Step, Trajectory
from stepagent.envs.base import ExpertFailure, StepResult, Task, TaskInstance, TextEnv, register_task

REPO_ROOT = Path(stepagent.__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "scienceworld"
SPLITS = ("train", "dev", "test")
INVALID_ACTION_MSG = "No known action matches that input."
# Observations of gold-path actions that change nothing (task.gold_noops=drop leaves them out of the
# expert). Under ``easy`` every door starts open, yet the gold paths open each door before walking
# through it: a third of the find-* gold steps.
NOOP_OBSERVATIONS = frozenset({"The door is already open."})
GOLD_NOOPS = tuple(c.value for c in GoldNoops)  # the config's choices: one source of truth
# task.gold_look=before_focus: the simulator's gold paths focus on objects in a room they walked into
# without looking (lifespan-*: "go to outside", "focus on crocodile"), so an imitating agent must guess
# what is there; the built expert then looks around first, and its choice is read off an observation.
GOLD_LOOK = tuple(c.value for c in GoldLook)
LOOK_ACTION = "look around"

_ETO_PREFIX = re.compile(r"^task-\d+[a-z]?-")
# ETO spells "mendelian" with two l's; the package does not.
_ETO_SPELLING_FIXES = {"mendellian": "mendelian"}


# --------------------------------------------------------------------------- name mapping
@functools.lru_cache(maxsize=None)
def package_task_names(data_dir: str = str(DEFAULT_DATA_DIR)) -> FrozenSet[str]:
    """The package's task names, from ``tasks.json`` (the allenai/ScienceWorld task table)."""
    with open(Path(data_dir) / "tasks.json", encoding="utf-8") as f:
        return frozenset(row["task_name"] for row in json.load(f))


def eto_to_package_name(eto_name: str, data_dir: Optional[str] = None) -> str:
    """``task-6-lifespan-(longest-lived)`` -> ``lifespan-longest-lived``; fails on unknown names."""
    m = _ETO_PREFIX.match(eto_name)
    if m is None:
        raise ValueError(f"not an ETO ScienceWorld task name (no 'task-<id>-' prefix): {eto_name!r}")
    name = eto_name[m.end():].replace("(", "").replace(")", "")
    for wrong, right in _ETO_SPELLING_FIXES.items():
        name = name.replace(wrong, right)
    valid = package_task_names(str(data_dir or DEFAULT_DATA_DIR))
    if name not in valid:
        raise ValueError(
            f"ETO task name {eto_name!r} maps to {name!r}, which is not a task_name in tasks.json "
            f"(known: {', '.join(sorted(valid))})"
        )
    return name


# --------------------------------------------------------------------------- task (trainer side)
def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a DictConfig or a dataclass; ``default`` when absent, None or MISSING."""
    from omegaconf.errors import MissingMandatoryValue  # trainer side only: workers never call this

    try:
        value = getattr(cfg, key)
    except (AttributeError, KeyError, MissingMandatoryValue):
        return default
    if value is None or value == "???":  # "???" is omegaconf's MISSING on a plain dataclass
        return default
    return value


def resolve_data_dir(data_dir: Optional[str]) -> Path:
    """Relative paths are relative to the repository root, so runs work from any cwd."""
    if not data_dir:
        return DEFAULT_DATA_DIR
    path = Path(data_dir).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


# The files a ScienceWorld data_dir must hold (what ScienceWorldTask reads).
DATA_FILES = ("tasks.json", "max_steps.json", *(f"{s}_indices.json" for s in SPLITS))
# The simulator's own train/dev/test variations of every task (task.variations=simulator); written by
# ``python -m stepagent.envs.scienceworld --write-variations PATH`` from the installed package.
SIMULATOR_VARIATIONS = "simulator_variations.json"


@functools.lru_cache(maxsize=None)
def simulator_variations(data_dir: str = str(DEFAULT_DATA_DIR)) -> Dict[str, Dict[str, List[int]]]:
    """task type -> {"train" | "dev" | "test": the simulator's variation numbers}."""
    path = Path(data_dir) / SIMULATOR_VARIATIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: task.variations=simulator needs it (write it with "
                                f"python -m stepagent.envs.scienceworld --write-variations {path})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def interleave(by_type: Dict[str, List[int]]) -> List[Tuple[str, int]]:
    """Round-robin over the task types (sorted), each in its own order: the first N instances of
    the result cover the types evenly."""
    types = sorted(by_type)
    out: List[Tuple[str, int]] = []
    for i in range(max((len(v) for v in by_type.values()), default=0)):
        out.extend((t, by_type[t][i]) for t in types if i < len(by_type[t]))
    return out


def read_simulator_variations() -> Dict[str, Dict[str, List[int]]]:
    """The installed simulator's variation splits of every task (starts a JVM)."""
    from scienceworld import ScienceWorldEnv

    env = ScienceWorldEnv("", envStepLimit=100)
    try:
        out = {}
        for name in env.get_task_names():
            env.load(name, 0, "easy")
            out[name] = {"train": list(env.get_variations_train()), "dev": list(env.get_variations_dev()),
                         "test": list(env.get_variations_test())}
        return out
    finally:
        env.close()


def task_type_names(data_dir: str = str(DEFAULT_DATA_DIR)) -> List[str]:
    """The valid ``task_types`` (package task names of every ETO task with a step limit), read
    from ``max_steps.json`` and ``tasks.json`` as ``ScienceWorldTask`` reads them: no simulator."""
    with open(Path(data_dir) / "max_steps.json", encoding="utf-8") as f:
        return sorted({eto_to_package_name(n, data_dir) for n in json.load(f)})


PREAMBLE = """\
You are an agent in ScienceWorld, a text simulation of a house with a kitchen, a greenhouse, a workshop and an outdoor area, where science tasks are carried out.
Each turn you send one action and the environment tells you what happened. Actions (OBJ and LOC are names as they appear in observations):
- look around (describe the room) | look at OBJ | look in OBJ | read OBJ | inventory
- go to LOC (an adjacent room) | teleport to LOC (when allowed) | open OBJ / close OBJ, e.g. open door to kitchen
- pick up OBJ | put down OBJ | move OBJ to OBJ, e.g. move apple to red box
- focus on OBJ: marks the object your task is about; focusing on a wrong object fails the task, so do it only when sure
- activate OBJ / deactivate OBJ | use OBJ on OBJ | pour OBJ into OBJ | mix OBJ | connect OBJ to OBJ | eat OBJ
- wait1 (one time step passes) | wait (ten time steps pass)
If the environment lists numbered options for an ambiguous action, answer with the number.
Reply with one action."""


@register_task("scienceworld")
class ScienceWorldTask(Task):
    # Config fields an expert trajectory depends on (the expert cache key, see stepagent.data.experts).
    expert_cache_fields: Tuple[str, ...] = ("simplification", "env_step_limit", "gold_noops", "gold_look")
    # A field at this value is left out of the cache key, so caches built before it existed stay valid.
    expert_cache_defaults: Dict[str, Any] = {"gold_noops": "keep", "gold_look": "keep"}

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.data_dir = resolve_data_dir(_cfg_get(cfg, "data_dir"))
        with open(self.data_dir / "max_steps.json", encoding="utf-8") as f:
            self._eto_max_steps: Dict[str, int] = json.load(f)
        # Every ETO task with a step limit is a valid task type; map them all now so a bad
        # table fails at start-up, not when some split is first read.
        self._eto_to_type = {n: eto_to_package_name(n, str(self.data_dir)) for n in self._eto_max_steps}
        self._type_max_steps = {self._eto_to_type[n]: int(m) for n, m in self._eto_max_steps.items()}

    @property
    def task_types(self) -> List[str]:
        return sorted(set(self._eto_to_type.values()))

    def _selected_types(self) -> Optional[set]:
        wanted = _cfg_get(self.cfg, "task_types")
        if wanted is None:
            return None
        wanted = [str(t) for t in wanted]
        unknown = sorted(set(wanted) - set(self.task_types))
        if unknown:
            raise ValueError(
                f"unknown ScienceWorld task type(s) {unknown}; valid: {', '.join(self.task_types)}"
            )
        return set(wanted)

    def instances(self, split: str) -> List[TaskInstance]:
        """``split``'s instances of the selected task types, capped per type (``train_per_type``;
        dev/test: ``dev_per_type`` / ``test_per_type``, each null = ``eval_per_type``).

        ``task.variations=eto``: ETO's lists in file order. ``simulator``: per type, ETO's list first,
        then the simulator's other variations of the same split in ascending order — dev leaves out
        every variation of ETO's train list (ETO trains on some simulator-dev variations, and 54 of
        its 194 dev variations are also in its train list) — and the
        types are interleaved, so the first N per type are ETO's N whenever N fits in ETO's list."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        types = self._selected_types()
        cap = _cfg_get(self.cfg, "train_per_type") if split == "train" else \
            _cfg_get(self.cfg, f"{split}_per_type", _cfg_get(self.cfg, "eval_per_type"))
        by_type: Dict[str, List[int]] = {}
        for eto_name, variation in self._eto_pairs(split):  # file order: caps keep the first N, deterministically
            task_type = self._eto_to_type[eto_name]
            if types is None or task_type in types:
                by_type.setdefault(task_type, []).append(int(variation))
        if str(_cfg_get(self.cfg, "variations", "eto")) == "simulator":
            sim = simulator_variations(str(self.data_dir))
            in_eto_train: Dict[str, set] = {}
            for eto_name, variation in self._eto_pairs("train"):
                in_eto_train.setdefault(self._eto_to_type[eto_name], set()).add(int(variation))
            for task_type in sorted(types if types is not None else self.task_types):
                listed = by_type.setdefault(task_type, [])
                if split == "dev":  # a dev set for choosing settings: nothing ETO trains on
                    listed[:] = [v for v in listed if v not in in_eto_train.get(task_type, set())]
                seen = set(listed) | (in_eto_train.get(task_type, set()) if split == "dev" else set())
                listed.extend(v for v in sim[task_type][split] if v not in seen)
            order = interleave({t: v[: int(cap)] if cap is not None else v for t, v in by_type.items()})
        else:
            kept: Dict[str, int] = {}
            order = []
            for eto_name, v in self._eto_pairs(split):
                t = self._eto_to_type[eto_name]
                if t in by_type and (cap is None or kept.get(t, 0) < int(cap)):
                    kept[t] = kept.get(t, 0) + 1
                    order.append((t, v))
        max_steps_override = _cfg_get(self.cfg, "max_steps")
        return [TaskInstance("scienceworld", t, str(v), split, int(max_steps_override or self._type_max_steps[t]))
                for t, v in order]

    def _eto_pairs(self, split: str) -> List[Tuple[str, int]]:
        """ETO's ``[eto_task_name, variation]`` list of ``split``, checked against max_steps.json."""
        with open(self.data_dir / f"{split}_indices.json", encoding="utf-8") as f:
            pairs = json.load(f)
        for eto_name, _ in pairs:
            if eto_name not in self._eto_to_type:
                raise ValueError(f"{split}_indices.json: task {eto_name!r} has no entry in max_steps.json")
        return [(n, int(v)) for n, v in pairs]

    def env_factory(self) -> Callable[[], TextEnv]:
        return functools.partial(
            ScienceWorldTextEnv,
            simplification=str(_cfg_get(self.cfg, "simplification", "easy")),
            env_step_limit=int(_cfg_get(self.cfg, "env_step_limit", 100)),
            gold_noops=str(_cfg_get(self.cfg, "gold_noops", "keep")),
            gold_look=str(_cfg_get(self.cfg, "gold_look", "keep")),
        )

    def preamble(self) -> str:
        return PREAMBLE

    def step_score(self, result: StepResult) -> float:
        """The simulator's score after the step, ÷100, as it is (negative after a failed task)."""
        return result.info.get("score_raw", 100 * result.score) / 100.0

    def episode_score(self, step_scores: Sequence[Optional[float]]) -> float:
        """``task.score``: max (ETO's evaluation code: the highest score reached during the episode;
        a step whose output had no ``Action: `` resets it to 0, as ETO's running reward does) or
        final (the score when the episode ends, negative counted as 0)."""
        if str(_cfg_get(self.cfg, "score", "max")) == "final":
            return max(super().episode_score(step_scores), 0.0)
        best: Optional[float] = None
        for s in step_scores:
            if s is None:
                best = 0.0  # ETO: an invalid-format step sets the running reward to 0
            elif best is None or s > best:
                best = s
        return best if best is not None else 0.0


# --------------------------------------------------------------------------- env (worker side)
def _java_error_types() -> Tuple[type, ...]:
    """Exceptions meaning "Java threw but the JVM is alive" (vs. network errors: JVM gone)."""
    from py4j.protocol import Py4JJavaError

    return (Py4JJavaError,)


def _short(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
    return text[:limit]


class ScienceWorldTextEnv(TextEnv):
    """One ScienceWorld simulator (one JVM), playing one episode at a time."""

    def __init__(self, simplification: str = "easy", env_step_limit: int = 100, gold_noops: str = "keep",
                 gold_look: str = "keep"):
        if gold_noops not in GOLD_NOOPS:
            raise ValueError(f"gold_noops must be one of {GOLD_NOOPS}, got {gold_noops!r}")
        if gold_look not in GOLD_LOOK:
            raise ValueError(f"gold_look must be one of {GOLD_LOOK}, got {gold_look!r}")
        self.simplification = simplification
        self.env_step_limit = env_step_limit
        self.gold_noops = gold_noops
        self.gold_look = gold_look
        self._sim: Any = None  # scienceworld.ScienceWorldEnv, started on first use
        self._instance: Optional[TaskInstance] = None
        self._steps = 0

    # -- simulator access
    def _simulator(self) -> Any:
        if self._sim is None:
            from scienceworld import ScienceWorldEnv  # lazy: only ScienceWorld workers need py4j/java

            # py4j logs a full traceback for every failed connection once the JVM is gone;
            # the pool reports such crashes itself, in one line.
            logging.getLogger("py4j").setLevel(logging.CRITICAL)
            self._sim = ScienceWorldEnv("", envStepLimit=self.env_step_limit)
        return self._sim

    def jvm_pid(self) -> Optional[int]:
        return None if self._sim is None else int(self._sim._gateway.java_process.pid)

    def _load(self, instance: TaskInstance, gold_path: bool) -> str:
        """Load ``instance``, make the opening "look around"; return the instruction text."""
        sim = self._simulator()
        sim.load(instance.task_type, int(instance.index), self.simplification, generateGoldPath=gold_path)
        # ScienceWorldEnv.reset() would now call server.reset(), which rebuilds the world that
        # load() has just built (as long again, ~50 ms), then step("look around") with the
        # expensive info dict. A fresh load is already at move 0, so only the look is needed.
        sim.lastStepScore = 0
        first_obs = sim.server.step("look around")
        return f"{sim.get_task_description().strip()}\n\n{first_obs.strip()}"

    def _raw_step(self, action: str) -> Tuple[str, int, bool, int]:
        """(observation, score 0..100 (may be negative), completed, moves), package rules."""
        sim = self._sim
        obs = sim.server.step(action)
        score = int(round(100 * sim.server.getScore()))
        completed = bool(sim.server.getCompleted())
        moves = int(sim.get_num_moves())
        if moves > self.env_step_limit or score < 0:
            completed = True
        return obs.strip(), score, completed, moves

    # -- TextEnv
    def reset(self, instance: TaskInstance) -> str:
        self._instance = None  # if loading fails, step() must not continue an old episode
        text = self._load(instance, gold_path=False)
        self._instance, self._steps = instance, 0
        return text

    def step(self, action: str) -> StepResult:
        if self._instance is None:
            raise RuntimeError("ScienceWorldTextEnv.step() called before reset()")
        obs, score, completed, moves = self._raw_step(action)
        self._steps += 1
        truncated = not completed and self._steps >= self._instance.max_steps
        info = {
            "score_raw": score,
            "moves": moves,
            "valid": obs != INVALID_ACTION_MSG,
            "steps": self._steps,
            "truncated": truncated,
        }
        return StepResult(obs, max(score, 0) / 100.0, completed or truncated, info)

    def expert_trajectory(self, instance: TaskInstance) -> Trajectory:
        """Replay the simulator's gold path; keep it only if it reaches score 100.

        The replay stops at ``done`` (gold paths may carry actions past completion, e.g.
        ``wait1``). It is not cut at ``instance.max_steps``: the expert shows a full solution.
        With ``gold_noops="drop"`` an action whose observation is a no-op (``NOOP_OBSERVATIONS``)
        is played but not recorded: it changed nothing, so the recorded actions replayed on a
        fresh load reach the same states and full score (tests check this). With
        ``gold_look="before_focus"`` a "look around" is played and recorded before a "focus on"
        in a room the path has not looked at since it arrived (the opening look counts for the
        start room): looking changes nothing in the world, so the path still reaches full score.
        """
        self._instance = None
        java_errors = _java_error_types()
        try:
            instruction = self._load(instance, gold_path=True)
            gold = [str(a) for a in self._sim.get_gold_action_sequence()]
        except java_errors as e:
            raise ExpertFailure("simulator_error", _short(e)) from None
        if not gold or gold[0].startswith("ERROR"):
            raise ExpertFailure("gold_path_empty", gold[0] if gold else "no gold actions")

        steps: List[Step] = []
        score, done = 0, False
        dropped = added = 0
        looked_here = True  # _load made the opening look
        try:
            for action in gold:
                if action.startswith("go to"):
                    looked_here = False
                elif action == LOOK_ACTION:
                    looked_here = True
                elif action.startswith("focus on") and not looked_here and self.gold_look == "before_focus":
                    obs, score, done, _ = self._raw_step(LOOK_ACTION)
                    steps.append(Step(action=LOOK_ACTION, observation=obs))
                    added, looked_here = added + 1, True
                    if done:
                        break
                obs, score, done, _ = self._raw_step(action)
                # (The score may rise at a no-op: the simulator credits subgoals already met at
                # whichever step comes next, so the following action collects it instead.)
                if self.gold_noops == "drop" and obs in NOOP_OBSERVATIONS and not done:
                    dropped += 1
                    continue
                steps.append(Step(action=action, observation=obs))
                if done:
                    break
        except java_errors as e:
            raise ExpertFailure("simulator_error", f"at gold action {len(steps)}: {_short(e)}") from None
        if score < 100:
            raise ExpertFailure(
                "gold_path_score_below_100",
                f"score {score} after {len(steps)} of {len(gold)} gold actions (done={done})",
            )
        return Trajectory(
            id=instance.id,
            task="scienceworld",
            task_type=instance.task_type,
            instruction=instruction,
            steps=steps,
            reward=1.0,
            source="expert",
            meta={"variation": int(instance.index), "split": instance.split, "max_steps": instance.max_steps,
                  "gold_noops_dropped": dropped, "gold_looks_added": added},
        )

    def close(self) -> None:
        """Shut the gateway down and make sure the JVM is gone (kill it if it lingers)."""
        sim, self._sim, self._instance = self._sim, None, None
        if sim is None:
            return
        proc: subprocess.Popen = sim._gateway.java_process
        try:
            sim.close()
        except Exception:  # the JVM may already be dead; all we need is that it ends
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        # ScienceWorldEnv.__del__ calls close() again; make that a no-op on a dead gateway.
        sim.close = lambda: None


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="ScienceWorld data tables")
    ap.add_argument("--write-variations", metavar="PATH", required=True,
                    help=f"write the installed simulator's variation splits ({SIMULATOR_VARIATIONS})")
    args = ap.parse_args(argv)
    table = read_simulator_variations()
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table.items())]
    Path(args.write_variations).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{args.write_variations}: {len(table)} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
