"""W&B tracking: run identity, cycle charts and tables, read back from real offline run files."""

import json
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stepagent.config import validate_config
from stepagent.tracking import RunLogger, by_step_curves, read_metrics, read_offline_run, wandb_identity

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, *overrides):
    os.environ.setdefault("STEPAGENT_ROOT", str(REPO))  # experiments/ on the search path, as run.py does
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=wandb", *overrides,
                                           f"run_dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"])
    return validate_config(cfg)


def test_identity_defaults_and_overrides(tmp_path):
    cfg = config(tmp_path, "experiment=ablation_mini", "arm=inverse", "seed=2")
    ident = wandb_identity(cfg, cfg.logger)
    assert ident["name"] == "inverse_s2" and ident["group"] == "ablation_mini" and ident["job_type"] == "inverse"
    assert ident["tags"] == ["experiment:ablation_mini", "task:scienceworld", "arm:inverse", "algo:stepagent",
                             "reward:inverse", "policy:tiny", "seed:2"]
    # no arm, no experiment: algo-reward, grouped by task; logger.* overrides
    cfg = config(tmp_path, "reward=implicit", "task=hotpotqa", "logger.tags=[lr-sweep]")
    ident = wandb_identity(cfg, cfg.logger)
    assert (ident["name"], ident["group"], ident["job_type"]) == ("stepagent-implicit_s0", "hotpotqa",
                                                                  "stepagent-implicit")
    assert ident["tags"][-1] == "lr-sweep" and "task:hotpotqa" in ident["tags"]
    cfg = config(tmp_path, "arm=sft", "logger.group=mine", "logger.job_type=jt", "logger.run_name=nm",
                 "logger.auto_tags=false", "logger.tags=[a,b]")
    assert wandb_identity(cfg, cfg.logger) == {"name": "nm", "group": "mine", "job_type": "jt", "tags": ["a", "b"]}
    (tmp_path / "models/Llama-3-8B").mkdir(parents=True)  # a local model directory must exist
    cfg = config(tmp_path, "arm=sft", "policy=hf", f"policy.name_or_path={tmp_path}/models/Llama-3-8B/")
    assert "model:Llama-3-8B" in wandb_identity(cfg, cfg.logger)["tags"]


def test_by_step_curves():
    row = {"cycle": 1, "step_reward/expert_by_step": [0.5, None, 1.0], "step_reward/agent_by_step": [0.1],
           "agreement/heldout_by_step": [], "agreement/heldout": 0.5, "notalist_by_step": [1]}
    assert by_step_curves(row) == {"step_reward": {"expert": [0.5, None, 1.0], "agent": [0.1]}}


def test_run_logger_mirrors_metrics_to_offline_wandb(tmp_path):
    """RunLogger -> real offline W&B files -> read back: same values, cycle x-axis, tables and charts."""
    cfg = config(tmp_path, "arm=implicit", "seed=3")
    logger = RunLogger(tmp_path / "run", cfg, cfg.logger)
    run_id = logger.run_id
    logger.log({"sft/loss": 2.5})
    logger.log({"cycle": 0, "agreement/heldout": 0.25, "agreement/heldout_by_step": [0.5, 0.0]})
    row1 = {"cycle": 1, "eval/reward_x100": 12.5, "agreement/inspection": 0.75, "dpo/loss": 0.69,
            "step_reward/expert_by_step": [0.125, 0.25, None], "step_reward/agent_by_step": [-0.5, -0.25, -1.0]}
    logger.log(row1)
    logger.log_table("eval_sft/episodes", ["task_type", "reward"], [["find-animal", 1.0], ["find-plant", 0.0]])
    logger.finish()
    assert logger.run_id is None and len(run_id) >= 8

    wb = read_offline_run(tmp_path / "run", wait_s=30)
    assert wb["run"]["id"] == run_id
    assert (wb["run"]["name"], wb["run"]["group"], wb["run"]["job_type"]) == ("implicit_s3", "scienceworld", "implicit")
    assert "arm:implicit" in wb["run"]["tags"] and "seed:3" in wb["run"]["tags"]
    assert wb["config"]["reward"]["name"] == "implicit" and wb["config"]["seed"] == 3
    assert {"glob_name": "eval/*", "step_metric": "cycle"}.items() <= next(
        m for m in wb["metrics"] if m.get("glob_name") == "eval/*").items()
    hist = [r for r in wb["history"]]
    assert hist[0]["sft/loss"] == 2.5
    (h1,) = [r for r in hist if r.get("cycle") == 1]
    assert h1["eval/reward_x100"] == 12.5 and h1["dpo/loss"] == 0.69
    assert h1["step_reward/expert_by_step"] == [0.125, 0.25, None]  # the list as logged, and as table + chart:
    assert h1["step_reward/cycle_1_values"]["columns"] == ["step_index", "expert", "agent"]
    assert h1["step_reward/cycle_1_values"]["data"] == [[0, 0.125, -0.5], [1, 0.25, -0.25], [2, None, -1.0]]
    chart = h1["step_reward/cycle_1_table"]  # the line chart's data: (step, series, value), Nones left out
    assert sorted(map(tuple, chart["data"])) == sorted(
        [(0, "expert", 0.125), (1, "expert", 0.25), (0, "agent", -0.5), (1, "agent", -0.25), (2, "agent", -1.0)])
    assert "step_reward/cycle_1" in wb["config"]["_wandb"]["visualize"]
    (h0,) = [r for r in hist if r.get("cycle") == 0]
    assert h0["agreement/cycle_0_values"]["data"] == [[0, 0.5], [1, 0.0]]
    (ep,) = [r["eval_sft/episodes"] for r in hist if "eval_sft/episodes" in r]
    assert ep["data"] == [["find-animal", 1.0], ["find-plant", 0.0]]
    # metrics.jsonl keeps the lists as they were logged
    rows = read_metrics(tmp_path / "run")
    assert rows[2]["step_reward/expert_by_step"] == [0.125, 0.25, None] and rows[2]["cycle"] == 1


# A real run.py job, as small as tests/test_end_to_end.py's: SFT, one implicit-reward cycle, evaluation.
SMALL_IMPLICIT = [
    "task.task_types=[find-animal]", "task.train_per_type=4", "task.eval_per_type=2", "task.max_steps=6",
    "policy.hidden_size=64", "policy.intermediate_size=128", "policy.num_layers=2",
    "policy.vocab_size=1024", "policy.max_new_tokens=12", "sft.epochs=1", "sft.batch_size=4",
    "reward=implicit", "cycles=1", "eval.before_sft=false",
    "inspection.trajectories=2", "inspection.samples_per_state=2", "inspection.heldout_trajectories=1",
]


def test_offline_wandb_run_of_a_real_job(tmp_path):
    """run.py reward=implicit cycles=1 logger=wandb: the offline run holds the identity, the
    config, the cycle rows, the step-reward table and the per-episode tables with the values
    of metrics.jsonl / results.json / eval_*.json."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "run.py"), *SMALL_IMPLICIT, "logger=wandb", "seed=1",
           f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    (c1,) = [x for x in rows if x.get("cycle") == 1]
    assert c1 == {**results["cycles"][0], "_time": c1["_time"]}

    wb = read_offline_run(run_dir, wait_s=30)
    assert (wb["run"]["name"], wb["run"]["group"], wb["run"]["job_type"]) == (
        "stepagent-implicit_s1", "scienceworld", "stepagent-implicit")
    assert {"task:scienceworld", "reward:implicit", "algo:stepagent", "policy:tiny", "seed:1"} <= set(wb["run"]["tags"])
    assert wb["config"]["reward"]["beta"] == 0.1 and wb["config"]["cycles"] == 1
    assert wb["config"]["run_dir"] == str(run_dir)

    # every metrics.jsonl row is a W&B history row with the same values (tables aside)
    hist = [h for h in wb["history"] if any(not k.startswith("_") for k in h)]
    scalar_hist = [{k: v for k, v in h.items() if not k.startswith("_") and not isinstance(v, dict)} for h in hist]
    scalar_hist = [h for h in scalar_hist if h]
    assert scalar_hist == [{k: v for k, v in x.items() if not k.startswith("_")} for x in rows]
    (h1,) = [h for h in hist if h.get("cycle") == 1]
    assert h1["eval/reward_x100"] == results["summaries"]["cycle 1"]["overall"]["reward_x100"]
    assert h1["agreement/inspection"] == c1["agreement/inspection"] and h1["dpo/loss"] == c1["dpo/loss"]
    (h0,) = [h for h in hist if h.get("cycle") == 0 and "eval/reward_x100" in h]
    assert h0["eval/reward_x100"] == results["summaries"]["sft"]["overall"]["reward_x100"]

    # the step-reward curves of cycle 1: table (step_index, expert, agent) and line chart
    table = h1["step_reward/cycle_1_values"]
    assert table["columns"] == ["step_index", "expert", "agent"]
    assert [row[0] for row in table["data"]] == list(range(len(c1["step_reward/expert_by_step"])))
    assert [row[1] for row in table["data"]] == c1["step_reward/expert_by_step"]
    assert [row[2] for row in table["data"]] == c1["step_reward/agent_by_step"]
    assert "step_reward/cycle_1" in wb["config"]["_wandb"]["visualize"]
    assert h1["agreement/cycle_1_values"]["columns"] == ["step_index", "inspection", "heldout"]

    # evaluation tables: one row per episode with its reward, a summary per eval tag, the results table
    for tag in ("eval_sft", "eval_cycle_1"):
        episodes = json.loads((run_dir / f"{tag}.json").read_text())["episodes"]
        (ep,) = [h[f"{tag}/episodes"] for h in hist if f"{tag}/episodes" in h]
        assert ep["columns"] == ["task_type", "variation", "reward", "success", "steps", "crashed"]
        assert len(ep["data"]) == len(episodes) == 2
        assert [(e[0], e[1], e[2], e[4]) for e in ep["data"]] == [
            (e["task_type"], e["id"].rsplit("/", 1)[1], e["reward"], e["steps"]) for e in episodes]
        (summary,) = [h[f"{tag}/summary"] for h in hist if f"{tag}/summary" in h]
        assert summary["data"][-1][:3] == ["all", 2, results["summaries"]["sft" if tag == "eval_sft" else "cycle 1"]
                                           ["overall"]["reward_x100"]]
    (res,) = [h["results"] for h in hist if "results" in h]
    assert [row[:2] for row in res["data"]] == [["sft", "find-animal"], ["sft", "all"],
                                                ["cycle 1", "find-animal"], ["cycle 1", "all"]]
