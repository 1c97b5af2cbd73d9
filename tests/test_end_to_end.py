"""run.py end to end on real ScienceWorld: experts -> tiny policy -> SFT -> evaluation."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from conftest import SMALL_RUN as SMALL


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """Expert trajectories, tokenizer and initial model built once for this module's runs."""
    return tmp_path_factory.mktemp("stepagent-cache")


@pytest.fixture
def run_py(tmp_path, shared_cache):
    def run(tmp_path, *overrides, timeout=600):
        return _run_py(tmp_path, shared_cache, *overrides, timeout=timeout)

    return run


def _run_py(tmp_path, cache, *overrides, timeout=600):
    cmd = [sys.executable, str(REPO / "run.py"), *SMALL, *overrides,
           f"hydra.run.dir={tmp_path}/run", f"cache_dir={cache}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r, tmp_path / "run"


def test_sft_and_eval_on_scienceworld(tmp_path, run_py):
    r, run_dir = run_py(tmp_path, "logger=wandb", "eval.before_sft=true")
    results = json.loads((run_dir / "results.json").read_text())
    sft = results["summaries"]["sft"]["overall"]
    assert sft["episodes"] == 2 and sft["crashed"] == 0
    assert 0.0 <= sft["reward_x100"] <= 100.0
    assert results["sft"]["sft/last_epoch_loss"] < results["sft"]["sft/first_epoch_loss"]
    # the printed table: seen (dev) and unseen (test) side by side, under a caption naming the score rule
    assert "seen (dev) episodes" in r.stdout and "unseen (test) episodes" in r.stdout
    assert "score: max" in r.stdout
    assert re.search(r"\| sft \| 2 \| -?[\d.]+ \| [\d.]+ \| 2 \| -?[\d.]+ \| [\d.]+ \|", r.stdout), r.stdout
    assert results["final"]["policy"] == "sft" and set(results["final"]["splits"]) == {"dev", "test"}
    assert "| sft | find-animal | 2 |" in (run_dir / "results.md").read_text()  # per task type
    # per-episode records and both tables are in the run directory
    ev = json.loads((run_dir / "eval_sft.json").read_text())
    assert len(ev["episodes"]) == 2 and all(e["steps"] >= 1 for e in ev["episodes"])
    assert (run_dir / "eval_init.md").exists() and (run_dir / "results.md").exists()
    # metrics.jsonl always; W&B offline files inside the run directory
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("sft/loss" in row for row in rows)
    assert any("eval_sft/reward_x100" in row for row in rows)
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert (run_dir / "checkpoints" / "sft" / "config.json").exists()
    # the second run reuses the cached expert trajectories, tokenizer and initial model
    r2, _ = run_py(tmp_path, "eval.before_sft=false", "logger=none", "hydra.run.dir=" + str(tmp_path / "run2"))
    assert "6 instances, 6 from cache, 0 built now" in r2.stdout + r2.stderr
    assert "loading cached tokenizer" in r2.stdout + r2.stderr
    assert "training a" not in r2.stdout + r2.stderr  # tokenizer loaded from the cache


def test_implicit_cycle_on_scienceworld(tmp_path, run_py):
    """SFT -> one StepAgent cycle (inspection + step DPO) -> evaluation; parameters change."""
    import torch
    from safetensors.torch import load_file

    r, run_dir = run_py(
        tmp_path, "reward=implicit", "cycles=1", "eval.before_sft=false",
        "inspection.trajectories=4", "inspection.samples_per_state=2", "inspection.heldout_trajectories=2",
    )
    results = json.loads((run_dir / "results.json").read_text())
    (cycle,) = results["cycles"]
    assert cycle["cycle"] == 1
    assert cycle["dpo/pairs"] > 0 and cycle["dpo/steps"] >= 1
    assert 0.0 <= cycle["agreement/inspection"] <= 1.0
    assert len(cycle["step_reward/expert_by_step"]) >= 5  # find-animal expert paths have >= 5 steps
    assert "cycle 1" in results["summaries"]
    contrast = [json.loads(x) for x in (run_dir / "cycles/cycle_1/contrast.jsonl").read_text().splitlines()]
    assert contrast and all(len(c["agent_actions"]) == 2 for c in contrast)
    sft = load_file(run_dir / "checkpoints/sft/model.safetensors")
    cyc = load_file(run_dir / "checkpoints/cycle_1/model.safetensors")
    assert any(not torch.equal(sft[k], cyc[k]) for k in sft)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("cycle") == 1 and "dpo/loss" in row for row in rows)


ARMS = {
    "inverse": ["reward=inverse", "reward.disc_backbone=encoder", "reward.disc_hidden_size=32", "reward.disc_num_layers=1",
                "ppo.epochs=1"],
    "outcome": ["reward=outcome", "ppo.epochs=1"],
    "outcome_gae": ["reward=outcome", "ppo.advantage=gae", "ppo.epochs=1"],
    "inverse_gae": ["reward=inverse", "reward.disc_backbone=encoder", "reward.disc_hidden_size=32",
                    "reward.disc_num_layers=1", "ppo.epochs=1", "ppo.advantage=gae"],
    # the default for the tiny policy: auto = D on a copy of the SFT policy's decoder
    "inverse_policy_disc": ["reward=inverse", "ppo.epochs=1"],
    "loop": ["algo=loop", "inspection.samples_per_state=2", "ppo.epochs=1"],
    "eto": ["algo=eto"],
}


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_reflection_arms_on_scienceworld(arm, tmp_path, run_py):
    """One short cycle of each remaining arm on real ScienceWorld: it trains and writes metrics."""
    import torch
    from safetensors.torch import load_file

    r, run_dir = run_py(
        # SFT long enough (60 epochs of 2 steps, ~10 s) that K=2 rollouts at temperature 1 score
        # differently: outcome/LOOP get non-zero leave-one-out advantages to train on
        tmp_path, *ARMS[arm], "cycles=1", "eval.before_sft=false", "task.eval_per_type=1", "task.max_steps=6",
        "sft.epochs=60", "sft.lr=3e-3", "inspection.trajectories=3", "inspection.heldout_trajectories=1",
    )
    results = json.loads((run_dir / "results.json").read_text())
    (cycle,) = results["cycles"]
    assert cycle["cycle"] == 1 and "eval/reward_x100" in cycle
    if arm in ("inverse", "inverse_gae", "inverse_policy_disc"):
        assert cycle["ppo/steps"] >= 1 and cycle["disc/steps_train"] >= 1
        assert 0.0 <= cycle["disc/acc_train"] <= 1.0
        # D measured on the held-out expert prefixes against the updated policy's greedy actions
        assert cycle["disc/heldout_pairs"] == 0 or 0.0 <= cycle["disc/acc_heldout"] <= 1.0
        assert len(cycle["step_reward/agent_by_step"]) >= 5
    elif arm in ("outcome", "outcome_gae", "loop"):
        assert cycle["rollout/episodes"] == 3 * 2
        assert (run_dir / "cycles/cycle_1/rollouts.jsonl").exists()
    else:
        assert (run_dir / "cycles/cycle_1/exploration.jsonl").exists()
    if arm.endswith("_gae"):
        # the critic trains in the same PPO steps as the policy
        assert cycle["ppo/steps"] >= 1 and cycle["ppo/value_loss"] > 0 and "ppo/explained_variance" in cycle
    if arm == "outcome_gae":
        assert cycle["ppo/samples"] > 0 and cycle["rollout/dropped_small_advantage"] == 0  # no loo dropping
    sft = load_file(run_dir / "checkpoints/sft/model.safetensors")
    cyc = load_file(run_dir / "checkpoints/cycle_1/model.safetensors")
    # every arm took optimizer steps in this cycle (outcome/LOOP: on rollouts with differing rewards;
    # ETO: on failed explorations, 6 steps cannot solve find-animal), and they changed the policy
    steps = cycle.get("ppo/steps", cycle.get("dpo/steps", 0))
    assert steps >= 1, cycle
    if arm in ("outcome", "loop"):
        rollouts = [json.loads(x) for x in (run_dir / "cycles/cycle_1/rollouts.jsonl").read_text().splitlines()]
        assert any(abs(r["advantage"]) > 0.01 for r in rollouts), rollouts
    assert any(not torch.equal(sft[k], cyc[k]) for k in sft)
