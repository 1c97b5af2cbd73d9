"""ALFWorld on real TextWorld games (alfworld 0.4.2): splits, ETO's test list, expert replay,
invalid commands, the step cap and crash recovery in the worker pool."""

import json
import os
import signal
import time
from collections import Counter

import psutil
import pytest

from conftest import require_extra

# ALFWorld is the optional extra .[alfworld], installed by `make venv`: make test fails without it.
require_extra("alfworld", "alfworld")
require_extra("textworld", "alfworld")

from stepagent.config import AlfWorldTaskConfig, validate_task_config
from stepagent.data.experts import build_expert_trajectories, read_expert_cache
from stepagent.data.trajectory import Trajectory
from stepagent.envs import make_task
from stepagent.envs.alfworld import (
    DEFAULT_DATA_DIR,
    INVALID_ACTION_MSG,
    TASK_TYPES,
    clean_intro,
    clean_observation,
    expert_actions,
    read_eto_test_list,
)
from stepagent.envs.base import ExpertFailure
from stepagent.envs.pool import EnvPool


@pytest.fixture(scope="module")
def full():
    return make_task(AlfWorldTaskConfig())


@pytest.fixture(scope="module")
def small():
    return make_task(AlfWorldTaskConfig(train_per_type=1, eval_per_type=1))


@pytest.fixture(scope="module")
def env(small):
    e = small.env_factory()()
    yield e
    e.close()


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- splits (no game played)
def test_split_sizes_and_task_types(full):
    counts = {s: Counter(i.task_type for i in full.instances(s)) for s in ("train", "dev", "test")}
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 600, "dev": 140, "test": 134}
    assert all(set(c) == set(TASK_TYPES) for c in counts.values())
    assert counts["train"] == {t: 100 for t in TASK_TYPES}
    # ALFWorld's published valid_seen / valid_unseen counts per type
    assert counts["dev"] == {"pick_and_place_simple": 35, "look_at_obj_in_light": 13,
                             "pick_clean_then_place_in_recep": 27, "pick_heat_then_place_in_recep": 16,
                             "pick_cool_then_place_in_recep": 25, "pick_two_obj_and_place": 24}
    assert counts["test"] == {"pick_and_place_simple": 24, "look_at_obj_in_light": 18,
                              "pick_clean_then_place_in_recep": 31, "pick_heat_then_place_in_recep": 23,
                              "pick_cool_then_place_in_recep": 21, "pick_two_obj_and_place": 17}


def test_unseen_games_are_exactly_etos_list(full):
    eto = [line.strip() for line in (DEFAULT_DATA_DIR / "eto_test_unseen_gamefiles.txt").read_text().splitlines()
           if line.strip()]
    assert len(eto) == 134 == len(set(eto))
    assert [i.index for i in full.instances("test")] == eto == read_eto_test_list(
        DEFAULT_DATA_DIR / "eto_test_unseen_gamefiles.txt")
    assert not {i.index for i in full.instances("test")} & {i.index for i in full.instances("dev")}


def test_instances_ids_caps_and_step_cap(small, full):
    train = small.instances("train")
    assert len(train) == 6 and {i.task_type for i in train} == set(TASK_TYPES)
    # the caps keep the first game of each type, in the split's order
    first = {}
    for inst in full.instances("train"):
        first.setdefault(inst.task_type, inst)
    assert set(train) == set(first.values())
    inst = train[0]
    folder, trial = inst.index.split("/")
    assert folder.startswith(inst.task_type + "-") and trial.startswith("trial_")
    assert inst.id == f"alfworld/{inst.task_type}/{inst.index}" and inst.max_steps == 40
    assert all(i.split == "test" for i in small.instances("test"))
    t = make_task(AlfWorldTaskConfig(task_types=["look_at_obj_in_light"], eval_per_type=3, max_steps=7))
    dev = t.instances("dev")
    assert len(dev) == 3 and {i.task_type for i in dev} == {"look_at_obj_in_light"}
    assert {i.max_steps for i in dev} == {7}


def test_config_checks():
    from stepagent.config import ConfigError

    with pytest.raises(ConfigError, match="task_types"):
        validate_task_config({"name": "alfworld", "task_types": ["pick_and_place"]})
    with pytest.raises(ConfigError, match="does not exist"):
        validate_task_config({"name": "alfworld", "data_dir": "data/nowhere"})


def test_observation_clean_up():
    intro = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around "
             "you, you see a bed 1.\n\nYour task is to: look at alarmclock under the desklamp.")
    assert clean_intro(intro) == ("You are in the middle of a room. Looking quickly around you, you see a bed 1.\n"
                                  "Your task is to: look at alarmclock under the desklamp.")
    assert clean_observation("You arrive at loc 12. On the shelf 1, you see nothing.") == \
        "On the shelf 1, you see nothing."


def test_expert_file_read_through_the_project_reader(small):
    acts = expert_actions(str(DEFAULT_DATA_DIR / "train_expert_3554.jsonl.gz"))
    assert len(acts) == 3554
    assert all(i.index in acts for i in small.instances("train"))
    assert 3 <= min(map(len, acts.values())) and max(map(len, acts.values())) <= 106


# --------------------------------------------------------------------------- real games
def test_expert_trajectory_replays_and_wins(small, env):
    for inst in small.instances("train")[:2]:
        traj = env.expert_trajectory(inst)
        assert isinstance(traj, Trajectory) and traj.reward == 1.0 and traj.id == inst.id
        assert traj.instruction.startswith("You are in the middle of a room")
        assert "Welcome to TextWorld" not in traj.instruction and "Your task is to: " in traj.instruction
        # the same actions, played as the policy plays them, win at the last one
        assert env.reset(inst) == traj.instruction
        for k, step in enumerate(traj.steps):
            res = env.step(step.action)
            assert res.observation == step.observation
            assert res.done == (k == len(traj.steps) - 1 or k + 1 >= inst.max_steps)
            if res.done:
                break
        assert res.score == (1.0 if len(traj.steps) <= inst.max_steps else 0.0)


def test_invalid_command_gets_the_games_message(small, env):
    inst = small.instances("dev")[0]
    first = env.reset(inst)
    assert "Your task is to:" in first
    res = env.step("sing a song to the apple")
    assert res.observation == INVALID_ACTION_MSG and not res.done and res.score == 0.0
    assert res.info["valid"] is False
    res = env.step("look")  # a real command still works afterwards
    assert res.observation != INVALID_ACTION_MSG and res.info["valid"] is True


def test_step_cap_ends_the_episode(small, env):
    from dataclasses import replace

    inst = replace(small.instances("test")[0], max_steps=3)
    env.reset(inst)
    results = [env.step("look") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].info["truncated"] and results[-1].score == 0.0


def test_expert_failure_for_a_game_without_expert(small, env):
    inst = small.instances("dev")[0]  # valid_seen games have no record in the train expert file
    with pytest.raises(ExpertFailure) as e:
        env.expert_trajectory(inst)
    assert e.value.reason == "no_expert_trajectory"


def test_killed_worker_is_replaced(small):
    inst = small.instances("train")[0]
    with EnvPool(small.env_factory(), num_workers=1, step_timeout_s=120) as pool:
        assert not pool.reset_batch([(0, inst)])[0].crashed
        worker = pool.worker_pids()[0]
        os.kill(worker, signal.SIGKILL)
        assert _gone(worker)
        res = pool.step_batch([(0, "look")])[0]
        assert res.crashed and res.done and res.score == 0.0
        assert pool.worker_pids()[0] != worker
        start = pool.reset_batch([(0, inst)])[0]
        assert not start.crashed and "Your task is to:" in start.observation
        assert not pool.step_batch([(0, "look")])[0].crashed


def test_expert_builder_through_the_pool(small, tmp_path):
    out = tmp_path / "train.jsonl"
    report = build_expert_trajectories(small, "train", out, num_workers=2, progress=False)
    assert (report.total, report.built) == (6, 6)
    assert report.kept + report.num_dropped == 6 and report.kept >= 5, report.summary()
    kept, _ = read_expert_cache(out)
    assert all(t.reward == 1.0 and t.task == "alfworld" for t in kept.values())
    again = build_expert_trajectories(small, "train", out, num_workers=2, progress=False)
    assert (again.skipped, again.built, again.kept) == (6, 0, report.kept)


def test_experts_file_records_link_to_alfworld_instances(small, tmp_path):
    """The shipped expert file's ids (train/<task folder>/<trial>) link to train instances when the
    file is given as task.experts_file (unzipped)."""
    import gzip

    from stepagent.data.experts_file import load_experts_file

    lines = gzip.decompress((DEFAULT_DATA_DIR / "train_expert_3554.jsonl.gz").read_bytes()).decode().splitlines()
    wanted = {f"train/{i.index}" for i in small.instances("train")}
    picked = [ln for ln in lines if any(f'"id": "{w}"' in ln for w in wanted)] + lines[:2]
    path = tmp_path / "alfworld_experts.jsonl"
    path.write_text("\n".join(picked) + "\n")
    cfg = AlfWorldTaskConfig(train_per_type=1, eval_per_type=1, experts_file=str(path))
    trajs, report = load_experts_file(cfg, make_task(cfg), tmp_path / "cache", progress=False)
    # lines[:2]: the first is the sixth's game or one outside the shipped 600 (names no instance)
    present = {i.index for i in make_task(AlfWorldTaskConfig()).instances("train")}
    outside = sum(json.loads(ln)["id"].split("/", 1)[1] not in present for ln in lines[:2])
    assert report.linked_in_run == 6 and report.no_instance == outside
    assert {i.id for i in small.instances("train")} <= {t.id for t in trajs}


def test_sft_eval_and_an_implicit_cycle_end_to_end_on_alfworld(tmp_path):
    """run.py task=alfworld reward=implicit cycles=1 on real games: experts built and replayed in the
    pool, SFT, evaluation, one StepAgent cycle (inspection at every expert prefix, step DPO) and its
    evaluation (~20 s: a 2-layer policy, 6 train games, 2 evaluation games of 6 steps)."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "run.py"), "task=alfworld", "reward=implicit", "cycles=1",
           "task.train_per_type=1", "task.eval_per_type=1", "task.max_steps=6", "eval.max_episodes=2",
           "eval.final_splits=[]", "eval.before_sft=false", "inspection.trajectories=3",
           "inspection.heldout_trajectories=0", "policy.hidden_size=64", "policy.intermediate_size=128",
           "policy.num_layers=2", "policy.vocab_size=1024", "policy.max_new_tokens=12", "sft.epochs=2",
           "sft.batch_size=4", "logger=none", f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "alfworld/train: 6 instances, 0 from cache, 6 built now; kept 6" in r.stdout + r.stderr
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    for name in ("sft", "cycle 1"):
        s = results["summaries"][name]["overall"]
        assert s["episodes"] == 2 and s["crashed"] == 0 and 0.0 <= s["reward_x100"] <= 100.0
    cycle = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    cycle = next(m for m in cycle if m.get("cycle") == 1 and "dpo/steps" in m)
    # 3 inspected trajectories: one contrast segment per expert step, K = 2 samples each
    assert cycle["contrast/segments"] >= 3 and cycle["dpo/pairs"] >= 1 and cycle["dpo/steps"] >= 1
    before = load_file(str(run / "checkpoints" / "sft" / "model.safetensors"))
    after = load_file(str(run / "checkpoints" / "cycle_1" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "the implicit cycle changed no weight"


def test_eto_sft_records_link_through_their_game_file(small, tmp_path):
    """ETO's alfworld_sft.json numbers its records and names the game in ``game_file``; its actions are
    ReAct turns. Such a record links to the train instance of that game."""
    import gzip

    from stepagent.data.experts_file import load_experts_file

    inst = small.instances("train")[0]
    rec = next(json.loads(ln) for ln in gzip.decompress(
        (DEFAULT_DATA_DIR / "train_expert_3554.jsonl.gz").read_bytes()).decode().splitlines()
        if json.loads(ln)["id"] == f"train/{inst.index}")
    turns = [dict(t, value=f"Think: next.\nAction: {t['value']}") if t["from"] == "gpt" else t
             for t in rec["conversations"]]
    eto = [{"id": 0, "game_file": f"/data/alfworld/json_2.1.1/train/{inst.index}/game.tw-pddl",
            "conversations": turns},
           {"id": 1, "game_file": "json_2.1.1/train/no_such_folder/trial_0/game.tw-pddl", "conversations": turns}]
    path = tmp_path / "alfworld_sft.json"
    path.write_text(json.dumps(eto))
    cfg = AlfWorldTaskConfig(train_per_type=1, eval_per_type=1, experts_file=str(path))
    trajs, report = load_experts_file(cfg, make_task(cfg), tmp_path / "cache", progress=False)
    assert (report.linked_in_run, report.no_instance) == (1, 1)
    linked = next(t for t in trajs if t.id == inst.id)
    assert linked.meta["source_id"] == "0" and linked.steps[0].action.startswith("Think: next.\nAction: ")
