"""task.experts_file: a user's trajectory file replaces the built experts (stepagent/data/experts_file.py).

Links to task instances, the task-type selection, the content-hash cache, errors as config errors,
and one run.py job (SFT + one implicit cycle) trained on an ETO-format file written from real gold
paths with ReAct thoughts."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
from omegaconf import OmegaConf

from conftest import SMALL_RUN
from stepagent.config import ConfigError, HotpotQATaskConfig, validate_task_config
from stepagent.data.experts import expert_cache_path, load_experts
from stepagent.data.experts_file import TYPE_NOT_SELECTED, instance_index, load_experts_file
from stepagent.data.readers import NO_ACTION
from stepagent.data.trajectory import Trajectory
from stepagent.envs import make_task

REPO = Path(__file__).resolve().parents[1]
SCIWORLD = REPO / "data" / "scienceworld"
LOGGER = "stepagent.data.experts_file"
ETO_NUM = json.loads((SCIWORLD / "taskname2id.json").read_text())  # ETO's ids: "<number>_<variation>"


def variations(split: str, eto_name: str) -> List[int]:
    pairs = json.loads((SCIWORLD / f"{split}_indices.json").read_text())
    return [int(v) for name, v in pairs if name == eto_name]


ANIMAL_TRAIN = variations("train", "task-3-find-animal")  # 0, 54, 22, 56, 26, 4, ...
# ETO's train list also holds some dev variations (find-animal 193): those are train instances
ANIMAL_DEV = [v for v in variations("dev", "task-3-find-animal") if v not in ANIMAL_TRAIN]
PLANT_TRAIN = variations("train", "task-3-find-plant")


def eto(record_id: Any, actions=("look around", "focus on dove"), task_text="Your task is to find a(n) animal."):
    conv = [{"from": "human", "value": "You are a helpful assistant."}, {"from": "gpt", "value": "OK"},
            {"from": "human", "value": task_text}]
    for a in actions:
        conv += [{"from": "gpt", "value": f"Thought: go on.\nAction: {a}"},
                 {"from": "human", "value": f"Observation: after {a}"}]
    return {"id": record_id, "conversations": conv}


def write(path: Path, records: List[Any]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def sciworld(path: Path, **overrides: Any):
    """(typed task config, task): the embedded ScienceWorld task reading ``path``."""
    node = OmegaConf.merge(OmegaConf.load(REPO / "conf/task/scienceworld.yaml"),
                           {"data_dir": str(SCIWORLD), "experts_file": str(path), **overrides})
    cfg = validate_task_config(node)
    return cfg, make_task(cfg)


def test_scienceworld_ids_are_linked_to_train_instances(tmp_path, caplog):
    a0, a1, a2, a3 = ANIMAL_TRAIN[:4]
    records = [
        eto(f"{ETO_NUM['task-3-find-animal']}_{a0}"),  # ETO's sciworld_sft.json ids
        eto(f"task-3-find-animal_{a1}"),  # ETO task name + variation
        eto(f"find-animal_{a2}"),  # package task name + variation
        eto(f"scienceworld/find-animal/{a3}"),  # this project's instance id
        eto(f"{ETO_NUM['task-3-find-animal']}_{a0}"),  # a second record for the same instance
        eto(f"{ETO_NUM['task-3-find-animal']}_{ANIMAL_DEV[0]}"),  # a dev ("seen") variation
        eto("sciworld_7"),  # AgentGym's ids index its own list: no instance
    ]
    cfg, task = sciworld(write(tmp_path / "sciworld_sft.json", records), task_types=["find-animal"],
                         train_per_type=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trajs, report = load_experts_file(cfg, task, tmp_path / "cache", progress=False)
    ids = [f"scienceworld/find-animal/{v}" for v in (a0, a1, a2, a3)]
    assert [t.id for t in trajs] == ids + [f"{ids[0]}#2", f"{ETO_NUM['task-3-find-animal']}_{ANIMAL_DEV[0]}",
                                           "sciworld_7"]
    assert [t.meta["source_id"] for t in trajs] == [str(r["id"]) for r in records]  # the original id is kept
    assert [t.task_type for t in trajs[:6]] == ["find-animal"] * 6
    assert trajs[5].meta["names_instance"] == f"scienceworld/find-animal/{ANIMAL_DEV[0]}"
    assert (report.records, report.kept, report.dropped) == (7, 7, {})
    # train_per_type=2: this run's train instances are the first two variations; both have one
    assert (report.linked, report.linked_in_run, report.run_train_instances) == (4, 2, 2)
    assert (report.repeats, report.other_split, report.no_instance) == (1, 1, 1)
    log = caplog.text
    assert "7 records read, 7 kept, 0 dropped" in log
    assert "4 of 7 trajectories linked to scienceworld train instances (2 of this run's 2 train instances" in log
    assert "1 name no instance, e.g. 'sciworld_7'" in log and "name dev/test instances" in log
    assert any(r.levelname == "WARNING" and "not held out" in r.getMessage() for r in caplog.records)
    # the rollout arms' candidates: this run's train instances with an expert of the same id
    assert [i.id for i in task.instances("train") if i.id in {t.id for t in trajs}] == ids[:2]
    # a variation in both ETO's train and dev lists is named as the train instance
    both = sorted(set(ANIMAL_TRAIN) & set(variations("dev", "task-3-find-animal")))
    assert both and instance_index(task)[f"{ETO_NUM['task-3-find-animal']}_{both[0]}"].split == "train"


def test_unselected_task_types_and_actionless_records_are_dropped_and_counted(tmp_path, caplog):
    animal, plant = ETO_NUM["task-3-find-animal"], ETO_NUM["task-3-find-plant"]
    no_action = eto(f"{animal}_{ANIMAL_TRAIN[1]}", actions=())
    path = write(tmp_path / "f.json", [eto(f"{animal}_{ANIMAL_TRAIN[0]}"), eto(f"{plant}_{PLANT_TRAIN[0]}"),
                                      no_action, eto("free-form")])
    cfg, task = sciworld(path, task_types=["find-animal"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trajs, report = load_experts_file(cfg, task, tmp_path / "cache", progress=False)
    assert [t.meta["source_id"] for t in trajs] == [f"{animal}_{ANIMAL_TRAIN[0]}", "free-form"]
    assert report.dropped == {TYPE_NOT_SELECTED: 1, NO_ACTION: 1}
    assert (f"4 records read, 2 kept, 2 dropped ({NO_ACTION}: 1, {TYPE_NOT_SELECTED}: 1)") in caplog.text
    # with every task type selected the find-plant record is kept and linked
    cfg, task = sciworld(path, task_types=None)
    trajs, report = load_experts_file(cfg, task, tmp_path / "cache", progress=False)
    assert f"scienceworld/find-plant/{PLANT_TRAIN[0]}" in [t.id for t in trajs] and report.linked == 2
    # nothing of a selected type: a config error naming the selection
    cfg, task = sciworld(write(tmp_path / "plants.json", [eto(f"{plant}_{PLANT_TRAIN[0]}")]),
                         task_types=["find-animal"])
    with pytest.raises(ConfigError, match=r"none of the 1 records .* is kept.*task.task_types=\['find-animal'\]"):
        load_experts_file(cfg, task, tmp_path / "cache", progress=False)


def test_cache_keyed_by_content(tmp_path, caplog):
    records = [eto(f"{ETO_NUM['task-3-find-animal']}_{v}") for v in ANIMAL_TRAIN[:3]]
    path = write(tmp_path / "a.json", records)
    cache = tmp_path / "cache"
    cfg, task = sciworld(path, task_types=["find-animal"])
    first, r1 = load_experts_file(cfg, task, cache, progress=False)
    assert not r1.cache_hit and Path(r1.cache_path).exists()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        second, r2 = load_experts_file(cfg, task, cache, progress=False)
    assert r2.cache_hit and second == first
    assert "parsed trajectories read from the cache" in caplog.text and "parsing" not in caplog.text
    # the key is the content: a copy elsewhere hits, an edited file misses
    copy = shutil.copy(path, tmp_path / "copy.json")
    cfg_copy, _ = sciworld(copy, task_types=["find-animal"])
    assert load_experts_file(cfg_copy, task, cache, progress=False)[1].cache_hit
    write(path, records + [eto("extra")])
    third, r3 = load_experts_file(cfg, task, cache, progress=False)
    assert not r3.cache_hit and len(third) == 4 and r3.cache_path != r1.cache_path
    # the cached file is this project's JSONL, one trajectory per line
    rows = [json.loads(x) for x in Path(r3.cache_path).read_text().splitlines()]
    assert [Trajectory.from_dict(r).meta["source_id"] for r in rows][-1] == "extra"
    # load_experts dispatches: a file when set, the gold-path builder otherwise (not started here)
    assert [t.id for t in load_experts(cfg, task, cache, progress=False)] == [t.id for t in third]


def test_bad_files_are_config_errors(tmp_path):
    cases = {
        "empty.json": ("", "file holds no records"),
        "no_actions.json": (json.dumps([eto("a_1", actions=()), eto("a_2", actions=())]),
                            "none of its 2 record(s) holds an action"),
        "bad.json": (json.dumps([eto("a_1"), {"id": "a_2", "conversations": "hi"}]),
                     "record 1: 'conversations' must be a list"),
    }
    for name, (text, problem) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        cfg, task = sciworld(path)
        with pytest.raises(ConfigError) as e:
            load_experts_file(cfg, task, tmp_path / "cache", progress=False)
        assert str(e.value).startswith(f"task.experts_file: malformed trajectory file {path}"), name
        assert problem in str(e.value), name


def test_hotpotqa_question_ids_are_linked(tmp_path):
    task = make_task(HotpotQATaskConfig(data_dir="data/hotpotqa"))
    inst = task.instances("train")[0]
    record = {"id": inst.index, "messages": [{"role": "user", "content": "Question: ?"},
                                             {"role": "assistant", "content": "finish[x]"}]}
    path = tmp_path / "hotpot.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(dict(record, id="not-a-question")) + "\n")
    cfg = HotpotQATaskConfig(data_dir="data/hotpotqa", experts_file=str(path))
    trajs, report = load_experts_file(cfg, make_task(cfg), tmp_path / "cache", progress=False)
    assert [t.id for t in trajs] == [inst.id, "not-a-question"]
    assert (trajs[0].task_type, report.linked, report.no_instance) == (inst.task_type, 1, 1)
    # the built (dev) experts' cache does not depend on the file: a run with one reuses it
    assert expert_cache_path(make_task(cfg), "dev", tmp_path) == expert_cache_path(task, "dev", tmp_path)


# ----------------------------------------------------------------------------- run.py
def _run_py(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run.py"), *SMALL_RUN, *overrides, f"hydra.run.dir={tmp_path}/run"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def test_run_py_empty_file_is_a_config_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    r = _run_py(tmp_path, f"task.experts_file={empty}", f"cache_dir={tmp_path}/cache", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"config error: task.experts_file: malformed trajectory file {empty}: file holds no records" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_py_trains_on_an_eto_file_with_thoughts(tmp_path):
    """Real gold paths of 4 find-animal train variations, written as ETO records with a thought before
    each action; run.py trains SFT on them and runs one implicit cycle."""
    from stepagent.data.experts import load_or_build_experts

    cfg = validate_task_config(OmegaConf.merge(
        OmegaConf.load(REPO / "conf/task/scienceworld.yaml"),
        {"data_dir": str(SCIWORLD), "task_types": ["find-animal"], "train_per_type": 4, "num_workers": 2}))
    gold = load_or_build_experts(make_task(cfg), "train", tmp_path / "gold", 2, progress=False)
    assert [t.id for t in gold] == [f"scienceworld/find-animal/{v}" for v in ANIMAL_TRAIN[:4]]
    records: List[Dict[str, Any]] = []
    for t in gold:
        variation = t.id.rsplit("/", 1)[1]
        conv = [{"from": "human", "value": "You are a helpful assistant to do some scientific experiment."},
                {"from": "gpt", "value": "OK"}, {"from": "human", "value": t.instruction}]
        for k, s in enumerate(t.steps):
            conv.append({"from": "gpt", "value": f"Thought: step {k + 1}, I find the animal.\nAction: {s.action}"})
            conv.append({"from": "human", "value": f"Observation: {s.observation}"})
        records.append({"id": f"{ETO_NUM['task-3-find-animal']}_{variation}", "conversations": conv})
    path = write(tmp_path / "sciworld_sft.json", records)
    steps = sum(len(t) for t in gold)

    cache = tmp_path / "cache"
    r = _run_py(tmp_path, f"task.experts_file={path}", f"cache_dir={cache}", "reward=implicit", "cycles=1",
                "eval.before_sft=false", "eval.final_splits=[]", "task.eval_per_type=1", "task.max_steps=6",
                "policy.max_new_tokens=24", "inspection.trajectories=4", "inspection.samples_per_state=2",
                "inspection.heldout_trajectories=1")
    out = r.stdout + r.stderr
    assert f"experts file {path} (eto): 4 records read, 4 kept, 0 dropped" in out
    assert "4 of 4 trajectories linked to scienceworld train instances (4 of this run's 6 train instances" in out
    assert f"4 expert trajectories ({steps} steps)" in out  # SFT trains on the file's trajectories
    assert "SFT on 4 sequences" in out
    # the train gold paths were not built; the held-out dev experts were
    assert not list((cache / "experts" / "scienceworld").glob("train-*.jsonl"))
    assert list((cache / "experts" / "scienceworld").glob("dev-*.jsonl"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (cycle,) = results["cycles"]
    assert cycle["cycle"] == 1 and cycle["dpo/steps"] >= 1
    assert results["sft"]["sft/last_epoch_loss"] < results["sft"]["sft/first_epoch_loss"]
