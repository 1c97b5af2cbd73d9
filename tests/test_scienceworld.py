"""ScienceWorld task/env on the real simulator, and the resumable expert builder."""

import json
import pickle

import psutil
import pytest
from omegaconf import OmegaConf

from stepagent.config import ScienceWorldTaskConfig
from stepagent.data.experts import (
    build_expert_trajectories,
    dropped_path,
    expert_cache_path,
    load_or_build_experts,
)
from stepagent.data.trajectory import load_trajectories, read_jsonl
from stepagent.envs import make_task
from stepagent.envs.base import TaskInstance
from stepagent.envs.pool import EnvPool
from stepagent.envs.scienceworld import (
    DEFAULT_DATA_DIR,
    INVALID_ACTION_MSG,
    NOOP_OBSERVATIONS,
    ScienceWorldTask,
    ScienceWorldTextEnv,
    eto_to_package_name,
    interleave,
    package_task_names,
    read_simulator_variations,
    simulator_variations,
)

FIND_TYPES = ["find-animal", "find-living-thing", "find-non-living-thing", "find-plant"]


def sw_task(**kw) -> ScienceWorldTask:
    kw.setdefault("data_dir", "data/scienceworld")
    return make_task(OmegaConf.structured(ScienceWorldTaskConfig(**kw)))


# --------------------------------------------------------------------------- no simulator
def test_eto_names_in_every_split_map_to_package_tasks():
    names = package_task_names()
    for split in ("train", "dev", "test"):
        pairs = json.loads((DEFAULT_DATA_DIR / f"{split}_indices.json").read_text())
        for eto_name, _ in pairs:
            assert eto_to_package_name(eto_name) in names
    for eto_name in json.loads((DEFAULT_DATA_DIR / "taskname2id.json").read_text()):
        assert eto_to_package_name(eto_name) in names  # incl. ETO's "mendellian" spelling
    assert eto_to_package_name("task-6-lifespan-(longest-lived)") == "lifespan-longest-lived"
    assert eto_to_package_name("task-2a-test-conductivity") == "test-conductivity"
    assert eto_to_package_name("task-9-mendellian-genetics-(known-plant)") == "mendelian-genetics-known-plant"
    with pytest.raises(ValueError, match="not a task_name"):
        eto_to_package_name("task-3-find-unicorn")
    with pytest.raises(ValueError, match="prefix"):
        eto_to_package_name("find-animal")


def test_instances_filter_cap_and_step_limits():
    full = sw_task()
    assert len(full.instances("train")) == 1483
    assert len(full.instances("dev")) == 194 and len(full.instances("test")) == 211
    assert len(full.task_types) == 24

    task = sw_task(task_types=["find-plant", "find-animal"], train_per_type=3, eval_per_type=2)
    train = task.instances("train")
    assert [i.task_type for i in train].count("find-animal") == 3
    assert [i.task_type for i in train].count("find-plant") == 3 and len(train) == 6
    assert all(i.max_steps == 15 and i.split == "train" and i.task == "scienceworld" for i in train)
    # the first N of each type, in file order, deterministically
    pairs = json.loads((DEFAULT_DATA_DIR / "train_indices.json").read_text())
    first_animals = [str(v) for n, v in pairs if n == "task-3-find-animal"][:3]
    assert [i.index for i in train if i.task_type == "find-animal"] == first_animals
    assert task.instances("train") == train
    assert len(task.instances("dev")) == 4 and len(task.instances("test")) == 4
    assert train[0].id == f"scienceworld/{train[0].task_type}/{train[0].index}"

    assert all(i.max_steps == 7 for i in sw_task(task_types=["boil"], max_steps=7).instances("dev"))
    assert {i.max_steps for i in sw_task(task_types=["boil"]).instances("dev")} == {100}
    with pytest.raises(ValueError, match="find-animal"):  # the message lists the valid types
        sw_task(task_types=["find-unicorn"]).instances("train")
    with pytest.raises(ValueError, match="split"):
        task.instances("validation")


def test_simulator_variations_enlarge_dev_and_test_and_keep_eto_first():
    eto = sw_task(task_types=FIND_TYPES)
    sim = sw_task(task_types=FIND_TYPES, variations="simulator")
    table = simulator_variations()
    eto_train = {(i.task_type, i.index) for i in eto.instances("train")}
    test = sim.instances("test")
    # test: every simulator test variation of the four types, ETO's 10 per type first
    assert len(test) == 300 and {(i.task_type, int(i.index)) for i in test} == \
        {(t, v) for t in FIND_TYPES for v in table[t]["test"]}
    for t in FIND_TYPES:
        assert [i.index for i in test if i.task_type == t][:10] == \
            [i.index for i in eto.instances("test") if i.task_type == t]
    # interleaved: the first 4k instances hold k of every type
    assert sorted(i.task_type for i in test[:8]) == sorted(FIND_TYPES * 2)
    # dev: the simulator's dev variations minus everything ETO trains on (some of ETO's own dev list too)
    dev = sim.instances("dev")
    assert not {(i.task_type, i.index) for i in dev} & eto_train
    assert any((i.task_type, i.index) in eto_train for i in eto.instances("dev"))  # ETO's "seen" overlap
    assert all(int(i.index) in table[i.task_type]["dev"] for i in dev) and len(dev) == 170
    # train: ETO's list first, then the simulator's other train variations
    train = sim.instances("train")
    assert [i.index for i in train if i.task_type == "find-plant"][:120] == \
        [i.index for i in eto.instances("train") if i.task_type == "find-plant"]
    assert len(train) == len({(i.task_type, i.index) for i in train}) > len(eto_train)
    # caps: dev_per_type / test_per_type, each defaulting to eval_per_type
    capped = sw_task(task_types=FIND_TYPES, variations="simulator", eval_per_type=3, test_per_type=20)
    assert len(capped.instances("dev")) == 12 and len(capped.instances("test")) == 80
    assert len(sw_task(task_types=FIND_TYPES, eval_per_type=3, dev_per_type=5).instances("dev")) == 20
    assert len(sw_task(task_types=FIND_TYPES, eval_per_type=3, dev_per_type=5).instances("test")) == 12
    assert interleave({"b": [1, 2, 3], "a": [7]}) == [("a", 7), ("b", 1), ("b", 2), ("b", 3)]


def test_simulator_variations_table_matches_the_installed_simulator():
    assert read_simulator_variations() == simulator_variations()


def test_gold_noops_is_in_the_expert_cache_key_only_when_it_drops(tmp_path):
    keep, drop = sw_task(), sw_task(gold_noops="drop")
    # keep (the default) hashes as before the field existed: caches built earlier stay valid
    assert expert_cache_path(keep, "train", tmp_path).name == "train-565a3e814d.jsonl"
    assert expert_cache_path(drop, "train", tmp_path) != expert_cache_path(keep, "train", tmp_path)
    with pytest.raises(Exception, match="gold_noops"):
        OmegaConf.structured(ScienceWorldTaskConfig(gold_noops="sometimes"))
    with pytest.raises(ValueError, match="gold_noops"):
        ScienceWorldTextEnv(gold_noops="sometimes")


def test_gold_look_is_in_the_expert_cache_key_only_when_it_looks(tmp_path):
    keep, look = sw_task(), sw_task(gold_look="before_focus")
    assert expert_cache_path(keep, "train", tmp_path).name == "train-565a3e814d.jsonl"  # as before the field
    assert expert_cache_path(look, "train", tmp_path) != expert_cache_path(keep, "train", tmp_path)
    both = sw_task(gold_look="before_focus", gold_noops="drop")
    assert expert_cache_path(both, "train", tmp_path) not in {
        expert_cache_path(look, "train", tmp_path), expert_cache_path(sw_task(gold_noops="drop"), "train", tmp_path)}
    with pytest.raises(Exception, match="gold_look"):
        OmegaConf.structured(ScienceWorldTaskConfig(gold_look="always"))
    with pytest.raises(ValueError, match="gold_look"):
        ScienceWorldTextEnv(gold_look="always")
    assert ScienceWorldTextEnv(gold_look="before_focus").gold_look == "before_focus"
    assert pickle.loads(pickle.dumps(both.env_factory()))().gold_look == "before_focus"


def test_env_factory_is_picklable_and_preamble():
    task = sw_task(simplification="easy", env_step_limit=50)
    env = pickle.loads(pickle.dumps(task.env_factory()))()
    assert isinstance(env, ScienceWorldTextEnv) and env.env_step_limit == 50
    assert env.jvm_pid() is None  # the JVM starts lazily
    assert "Reply with one action." in task.preamble()


# --------------------------------------------------------------------------- real simulator
def test_invalid_action_step_limit_and_close():
    env = ScienceWorldTextEnv()
    try:
        inst = TaskInstance("scienceworld", "find-animal", "0", "train", max_steps=3)
        text = env.reset(inst)
        assert text.startswith("Your task is to find a(n) animal") and "\n\nThis room is called" in text
        res = env.step("fly to the moon")
        assert res.observation == INVALID_ACTION_MSG and not res.info["valid"]
        assert not res.done and not res.crashed and res.score < 1.0
        res = env.step("go to kitchen")
        assert res.info["valid"] and not res.done and res.score > 0
        res = env.step("look around")  # third step: the instance's limit
        assert res.done and res.info["truncated"] and 0 < res.score < 1
        pid = env.jvm_pid()
        assert psutil.pid_exists(pid)
    finally:
        env.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("gold_noops", ["keep", "drop"])
def test_expert_trajectories_replay_to_full_score(tmp_path, gold_noops):
    """Experts of three find-* types, built by the pool, replayed by a fresh pool via step_batch.
    With gold_noops=drop the recorded path (no "open door" on an open door) replays just the same."""
    # max_steps=50: some find-* gold paths are longer than ETO's limit of 15.
    task = sw_task(task_types=["find-animal", "find-plant", "find-non-living-thing"], eval_per_type=1, max_steps=50,
                   gold_noops=gold_noops)
    insts = task.instances("dev")
    experts = load_or_build_experts(task, "dev", tmp_path, num_workers=2, progress=False)
    assert [t.id for t in experts] == [i.id for i in insts]  # instance order, all kept
    for traj in experts:
        assert traj.reward == 1.0 and traj.source == "expert" and traj.task == "scienceworld"
        assert traj.meta["split"] == "dev" and str(traj.meta["variation"]) == traj.id.rsplit("/", 1)[1]
    noops = [sum(s.observation in NOOP_OBSERVATIONS for s in traj.steps) for traj in experts]
    dropped = [traj.meta["gold_noops_dropped"] for traj in experts]
    if gold_noops == "drop":
        assert sum(noops) == 0 and sum(dropped) > 0
    else:
        assert sum(noops) > 0 and sum(dropped) == 0

    replay_to_full_score(task, insts, experts)


def replay_to_full_score(task, insts, experts) -> None:
    """A fresh pool plays each expert's recorded actions: the same observations, done at the last
    step, score 1."""
    with EnvPool(task.env_factory(), num_workers=len(insts)) as pool:
        starts = pool.reset_batch(list(enumerate(insts)))
        assert [same_text(r.observation, t.instruction) for r, t in zip(starts, experts)] == [True] * len(insts)
        last = {}
        for t in range(max(len(x) for x in experts)):
            items = [(slot, traj.steps[t].action) for slot, traj in enumerate(experts) if t < len(traj)]
            for (slot, _), res in zip(items, pool.step_batch(items)):
                assert not res.crashed
                assert same_text(res.observation, experts[slot].steps[t].observation)
                assert res.done == (t == len(experts[slot]) - 1)
                last[slot] = res
    assert len(last) == len(insts) and all(r.score == 1.0 and r.done and r.won for r in last.values())


def test_gold_look_shows_the_expert_the_animals_before_it_focuses(tmp_path):
    """lifespan-*: the simulator's gold path walks outside and focuses on an animal it never looked at.
    With gold_look=before_focus the built expert looks around first (and only then), the look lists
    the animal it then focuses on, and the recorded path replays to full score."""
    types = ["lifespan-longest-lived", "lifespan-longest-lived-then-shortest-lived"]
    plain = sw_task(task_types=types, eval_per_type=3, gold_noops="drop")
    task = sw_task(task_types=types, eval_per_type=3, gold_noops="drop", gold_look="before_focus")
    insts = task.instances("dev")
    before = load_or_build_experts(plain, "dev", tmp_path, num_workers=2, progress=False)
    experts = load_or_build_experts(task, "dev", tmp_path, num_workers=2, progress=False)
    # (each load draws its own route to the animals, so the two builds' paths are compared by shape)
    assert all("look around" not in [s.action for s in old.steps] for old in before)  # why the option exists
    added = 0
    for new in experts:
        actions = [s.action for s in new.steps]
        first_focus = next(i for i, a in enumerate(actions) if a.startswith("focus on"))
        if not any(a.startswith("go to") for a in actions[:first_focus]):
            # it starts outside: the opening look (in the instruction) already lists the animals
            assert "look around" not in actions and new.meta["gold_looks_added"] == 0
            continue
        added += 1
        # one look, right after arriving; then-shortest-lived's second focus is in the same room
        assert actions.count("look around") == 1 and new.meta["gold_looks_added"] == 1
        assert actions[first_focus - 1] == "look around" and actions[first_focus - 2].startswith("go to")
        focused = actions[first_focus].split()[-1]  # "focus on baby baby brown bear" -> "bear"
        assert focused in new.steps[first_focus - 1].observation
    assert added >= 1
    replay_to_full_score(task, insts, experts)


def same_text(a: str, b: str) -> bool:
    # The simulator lists a room's objects in no fixed order; everything else replays exactly.
    return sorted(a.splitlines()) == sorted(b.splitlines())


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def test_resumable_expert_builder(tmp_path):
    task = sw_task(task_types=["find-animal"], train_per_type=3)
    ids = [i.id for i in task.instances("train")]
    path = expert_cache_path(task, "train", tmp_path)
    assert path.parent == tmp_path / "experts" / "scienceworld"

    r1 = build_expert_trajectories(task, "train", path, num_workers=2, progress=False)
    assert (r1.total, r1.skipped, r1.built, r1.kept, r1.dropped) == (3, 0, 3, 3, {})
    assert "kept 3" in r1.summary()

    # Simulate damage: lose the first record entirely and cut the last one mid-line
    # (an interrupted append); mark a kept instance dropped (the kept record must win).
    lines = _lines(path)
    survivor = json.loads(lines[1])["id"]
    path.write_text(lines[1] + lines[2][: len(lines[2]) // 2])
    dropped_path(path).write_text(json.dumps({"id": survivor, "reason": "gold_path_empty", "detail": ""}) + "\n")

    r2 = build_expert_trajectories(task, "train", path, num_workers=2, progress=False)
    assert (r2.total, r2.skipped, r2.built, r2.kept, r2.dropped) == (3, 1, 2, 3, {})
    trajs = load_trajectories(path)  # every line valid again: the torn tail was cut before appending
    assert sorted(t.id for t in trajs) == sorted(ids) and len(trajs) == 3
    assert [t.id for t in load_or_build_experts(task, "train", tmp_path, 2, progress=False)] == ids

    r3 = build_expert_trajectories(task, "train", path, num_workers=2, progress=False)
    assert (r3.skipped, r3.built, r3.kept) == (3, 0, 3)


def test_builder_records_drops_and_retries_crashes(tmp_path):
    # With a 3-move simulator limit the gold paths (~10 actions) cannot reach score 100.
    task = sw_task(task_types=["find-animal"], train_per_type=2, env_step_limit=3)
    path = expert_cache_path(task, "train", tmp_path)
    assert path != expert_cache_path(sw_task(task_types=["find-animal"]), "train", tmp_path)
    r1 = build_expert_trajectories(task, "train", path, num_workers=1, progress=False)
    assert (r1.built, r1.kept, r1.dropped) == (2, 0, {"gold_path_score_below_100": 2})
    rows = read_jsonl(dropped_path(path))
    assert {r["reason"] for r in rows} == {"gold_path_score_below_100"} and "score" in rows[0]["detail"]

    # A drop for a transient reason is retried; the others are not.
    first = rows[0]["id"]
    dropped_path(path).write_text(
        json.dumps({"id": first, "reason": "simulator_crash", "detail": "x"}) + "\n"
        + json.dumps(rows[1]) + "\n"
    )
    r2 = build_expert_trajectories(task, "train", path, num_workers=1, progress=False)
    assert (r2.skipped, r2.built, r2.kept, r2.dropped) == (1, 1, 0, {"gold_path_score_below_100": 2})
