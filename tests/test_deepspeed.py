"""DeepSpeed data parallelism with 2 CPU ranks: real ``torchrun --nproc_per_node 2``, real
DeepSpeed (DS_ACCELERATOR=cpu, gloo), real ScienceWorld, the tiny policy.

* run.py end to end under ZeRO-2 and ZeRO-3 (SFT steps, one implicit cycle; one inverse
  cycle: discriminator + PPO update) — one run directory, rank 0 writes metrics/results/W&B,
  one log file per rank, evaluation episodes split across ranks and gathered;
* ZeRO-3 with every parameter partitioned: ranks that generate different lengths and make
  different numbers of generation calls do not deadlock; π_ref through swapped shards;
* float32 ZeRO stage 0 and stage 2 give the same losses step for step;
* a sharded checkpoint resumes exactly.
Slow: a resumed 2-rank run == the uninterrupted one; SIGTERM stops both ranks at the same
point; ETO / outcome with GAE / LOOP on 2 ranks; an HF policy with LoRA under ZeRO-3.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STEPAGENT_RUN_DATE",
           "STEPAGENT_RUN_TIME"):
    ENV.pop(_k, None)
# every parameter partitioned under ZeRO-3 (DeepSpeed keeps params < 1e5 elements whole by default)
FAST = [*(o for o in SMALL_RUN if not o.startswith("sft.epochs=")), "task.num_workers=1", "sft.epochs=1", "eval.before_sft=false", "cycles=1",
        "inspection.trajectories=2", "inspection.heldout_trajectories=0",
        "deepspeed.stage3_param_persistence_threshold=0"]


def _torchrun(args, cwd, timeout):
    r = subprocess.run([*TORCHRUN, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ds-cache")


def _run_dir(cwd: Path) -> Path:
    runs = list((cwd / "outputs").glob("*/*"))
    assert len(runs) == 1, f"one run directory per job, got {runs}"  # every rank used rank 0's start time
    return runs[0]


def _weights_changed(run_dir: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    sft = load_file(run_dir / "checkpoints/sft/model.safetensors")
    cyc = load_file(run_dir / "checkpoints/cycle_1/model.safetensors")
    # full tensors (gathered under ZeRO-3), not the empty per-rank shards
    assert sft["model.embed_tokens.weight"].shape[1] == 64 and all(v.numel() > 0 for v in sft.values())
    return any(not torch.equal(sft[k], cyc[k]) for k in sft)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_implicit_cycle_on_two_ranks(zero, tmp_path, shared_cache):
    """SFT + one implicit-reward cycle + evaluation, 2 ranks: one run dir, one logger."""
    r = _torchrun([str(REPO / "run.py"), *FAST, "reward=implicit", f"deepspeed={zero}", "logger=wandb",
                   f"cache_dir={shared_cache}"], tmp_path, timeout=600)
    run_dir = _run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    (cycle,) = results["cycles"]
    assert cycle["dpo/steps"] >= 1 and cycle["dpo/pairs"] > 0
    assert _weights_changed(run_dir)
    # the 2 dev episodes were split across the ranks (one each) and gathered: both are recorded
    ev = json.loads((run_dir / "eval_cycle_1.json").read_text())
    assert sorted(e["id"] for e in ev["episodes"]) == sorted({e["id"] for e in ev["episodes"]})
    assert len(ev["episodes"]) == 2 and results["summaries"]["cycle 1"]["overall"]["episodes"] == 2
    # inspection: all segments of both trajectories, K=2 actions each, whichever rank made them
    contrast = [json.loads(x) for x in (run_dir / "cycles/cycle_1/contrast.jsonl").read_text().splitlines()]
    assert len({c["traj_id"] for c in contrast}) == 2 and all(len(c["agent_actions"]) == 2 for c in contrast)
    # one logger: rank 0's metrics only (SFT on 6 sequences, batch 4: exactly 2 step rows)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("sft/loss" in row for row in rows) == 2
    assert sum(row.get("cycle") == 1 and "dpo/loss" in row for row in rows) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # every rank its own log file; rank 1 does not write Hydra's job log
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("rank*.log")}
    assert set(logs) == {"rank0.log", "rank1.log"}
    assert "[rank 1]" in logs["rank1.log"] and "[rank 1]" not in (run_dir / "run.log").read_text()
    assert f"ZeRO stage {2 if zero == 'zero2' else 3} engine for LlamaForCausalLM (2 ranks)" in logs["rank0.log"]
    assert r.stdout.count("Run directory:") == 1  # rank 0 prints the results


@pytest.mark.parametrize("zero,advantage", [("zero2", "loo"), ("zero3", "gae")])
def test_inverse_cycle_on_two_ranks(zero, advantage, tmp_path, shared_cache):
    """SFT + one inverse-reward cycle: the discriminator (its own DeepSpeed engine) and a PPO update
    (with gae: the value head trained beside the policy's engine, replicated on both ranks)."""
    _torchrun([str(REPO / "run.py"), *FAST, "reward=inverse", "reward.disc_hidden_size=32",
               "reward.disc_num_layers=1", "ppo.epochs=1", f"ppo.advantage={advantage}", f"deepspeed={zero}",
               f"cache_dir={shared_cache}"], tmp_path, timeout=600)
    run_dir = _run_dir(tmp_path)
    (cycle,) = json.loads((run_dir / "results.json").read_text())["cycles"]
    assert cycle["ppo/steps"] >= 1 and cycle["disc/steps_train"] >= 1
    assert 0.0 <= cycle["disc/acc_train"] <= 1.0
    assert _weights_changed(run_dir)
    if advantage == "gae":
        import torch

        assert cycle["ppo/value_loss"] > 0
        # the head's state is in the checkpoint; its per-rank optimizer part beside the engine's
        head = torch.load(run_dir / "checkpoints/cycle_1/train_state.pt", weights_only=False)["value_head"]
        assert head["proj.weight"].abs().sum() > 0
        opt = torch.load(run_dir / "checkpoints/cycle_1/policy_optimizer.rank1.pt", weights_only=False)
        assert set(opt) == {"engine", "extra"}
    logs = (run_dir / "logs/rank0.log").read_text()
    assert "engine for Discriminator (2 ranks)" in logs


def _worker(what: str, tmp_path: Path, timeout: int):
    out = tmp_path / f"{what}.json"
    _torchrun([str(REPO / "tests/deepspeed_worker.py"), what, str(out)], tmp_path, timeout=timeout)
    return [json.loads(Path(f"{out}.rank{k}").read_text()) for k in range(2)]


def test_zero3_ranks_generating_different_lengths_do_not_deadlock(tmp_path):
    """Regression: under ZeRO-3 every forward is a collective; rank 0 makes 3 generation calls
    of 4 tokens and rank 1 one call of 24 (and inspection batches 3 vs 2). Finishing within the
    timeout is the test; the results must also be right."""
    r0, r1 = _worker("generation", tmp_path, timeout=240)
    assert r0["partitioned"] and r1["partitioned"] and r0["world"] == 2
    assert r0["lengths"] == [4, 4, 4] and r1["lengths"] == [24]
    assert (r0["synced_len"], r1["synced_len"]) == (3, 17)
    # inspection: both ranks return all 9 segments, identical
    assert r0["segments"] == r1["segments"] and sum(len(v) for v in r0["segments"].values()) == 9
    for r in (r0, r1):
        assert r["dpo_steps"] == 2 and r["changed"] > 1e-3
        assert r["ref_err"] == 0.0  # the SFT snapshot of the shards swapped in: exactly π_ref's log-probs
        assert r["restore_err"] == 0.0
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved["model.embed_tokens.weight"].shape[1] == 64  # the full weights, gathered


def test_stage0_and_stage2_give_the_same_losses(tmp_path):
    """float32, 2 ranks: ZeRO-2's sharded optimizer computes what plain data parallelism does —
    SFT loss, gradient norm and lr step for step, then step DPO on the same engine after a new
    stage (new lr, AdamW moments reset), then PPO with a GAE value head beside the engine."""
    r0, r1 = _worker("parity", tmp_path, timeout=240)
    for r in (r0, r1):
        a, b = r["stage0"], r["stage2"]
        assert len(a["sft"]) == len(b["sft"]) == 6 and a["dpo_steps"] == b["dpo_steps"] >= 3
        for (la, ga, lra), (lb, gb, lrb) in zip(a["sft"], b["sft"]):
            assert abs(la - lb) < 1e-5 and abs(ga - gb) < 1e-4 * max(1.0, ga) and lra == lrb
        assert a["sft"][-1][0] < a["sft"][0][0]  # it trained
        assert abs(a["dpo_loss"] - b["dpo_loss"]) < 1e-5
        assert max(abs(x - y) for x, y in zip(a["after"], b["after"])) < 1e-4
        # PPO with ppo.advantage=gae: the policy's and the value head's gradients, each clipped on
        # its own (max_grad_norm 0.05 clips both), give the same losses, norm and head
        pa, pb = a["ppo"], b["ppo"]
        assert pa["ppo/steps"] == pb["ppo/steps"] >= 2 and pa["ppo/value_loss"] > 0
        for k in ("ppo/loss", "ppo/value_loss", "ppo/grad_norm"):
            assert abs(pa[k] - pb[k]) < 1e-4 * max(1.0, abs(pa[k])), (k, pa[k], pb[k])
        assert pa["ppo/grad_norm"] > 0.05  # clipping was active
        assert max(abs(x - y) for x, y in zip(pa["head"], pb["head"])) < 1e-5


def test_config_validation():
    from types import SimpleNamespace as NS

    from stepagent.config import ConfigError, validate_deepspeed_config

    none = NS(name="none", stage=0, offload_optimizer=None, offload_param=None)
    validate_deepspeed_config(none, 1)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N run.py deepspeed=zero2"):
        validate_deepspeed_config(none, 2)
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        validate_deepspeed_config(NS(name="zero2", stage=2, offload_optimizer=None, offload_param="cpu"), 2)
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        validate_deepspeed_config(NS(name="zero2", stage=4, offload_optimizer=None, offload_param=None), 2)


def test_sharding_helpers(monkeypatch):
    from stepagent import distributed as dist

    # one process: the identity
    assert dist.world_size() == 1 and dist.is_main()
    assert dist.shard_batch([3, 1, 2]) == [3, 1, 2] and dist.shard_indices(3) == [0, 1, 2]
    assert dist.gather_sharded(["a", "b"], 2) == ["a", "b"]
    assert dist.mean_over_ranks({"x": 2.0}) == {"x": 2.0}
    # 2 ranks: strided inference shards without padding; training shards of equal length
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    for r, shard, batch in ((0, [0, 2, 4], [3, 2]), (1, [1, 3], [1, 3])):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        assert dist.shard_indices(5) == shard
        assert dist.shard_batch([3, 1, 2]) == batch  # padded with the batch's first item
    assert dist.shard_batch([7]) == [7]  # rank 1 repeats the only item: same number of steps


def test_checkpoint_of_sharded_optimizer_resumes_exactly(tmp_path):
    """A run checkpoint under ZeRO-2 / ZeRO-3: every rank's optimizer part, RNG state and (ZeRO-3)
    π_ref shard go into the one atomic folder; a new model + engine loaded from it continues
    with bit-identical losses."""
    for r in _worker("resume", tmp_path, timeout=240):
        for zero in ("zero2", "zero3"):
            res = r[zero]
            assert res["resumed"] == res["original"] and res["ref_equal"]
            assert {"policy_optimizer.rank0.pt", "policy_optimizer.rank1.pt", "rng.rank1.pt", "COMPLETE"} <= set(res["files"])
        assert {"reference.rank0.safetensors", "reference.rank1.safetensors"} <= set(r["zero3"]["files"])
    assert not list((tmp_path / "run3" / "checkpoints").glob("*.ranks"))  # the staging folder is gone


@pytest.mark.slow
def test_resumed_two_rank_run_matches_the_uninterrupted_one(tmp_path, shared_cache):
    """run.py under ZeRO-3 on 2 ranks: cycles=2 straight vs cycles=1, then resume=<that run> with
    cycles=2 in a new run directory: the same cycle-2 results and weights."""
    from safetensors.torch import load_file

    base = [str(REPO / "run.py"), *FAST, "reward=implicit", "reward.reference=sft", "deepspeed=zero3",
            f"cache_dir={shared_cache}"]
    _torchrun([*base, "cycles=2", f"hydra.run.dir={tmp_path}/straight"], tmp_path, timeout=600)
    _torchrun([*base, "cycles=1", f"hydra.run.dir={tmp_path}/first"], tmp_path, timeout=600)
    _torchrun([*base, "cycles=2", f"resume={tmp_path}/first", f"hydra.run.dir={tmp_path}/resumed"], tmp_path,
              timeout=600)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "resumed"))
    clock = ("/seconds", "/sync_seconds", "/tokens_per_s")  # wall-clock generation counters differ run to run
    same = [[{k: v for k, v in c.items() if not k.endswith(clock)} for c in r["cycles"]] for r in (a, b)]
    assert same[0] == same[1] and a["summaries"] == b["summaries"]
    wa, wb = (load_file(tmp_path / d / "checkpoints/cycle_2/model.safetensors") for d in ("straight", "resumed"))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("arm", [
    ["algo=eto", "deepspeed=zero3", "algo.tasks_per_iteration=2", "algo.reference=sft", "algo.micro_batch_size=1"],
    ["reward=outcome", "deepspeed=zero2", "ppo.epochs=1", "ppo.advantage=gae"],
    ["algo=loop", "deepspeed=zero3", "ppo.epochs=1", "inspection.samples_per_state=2"],
], ids=["eto-zero3", "outcome-gae-zero2", "loop-zero3"])
def test_other_arms_on_two_ranks(arm, tmp_path, shared_cache):
    """ETO (micro-batches: gradient accumulation across engine.backward calls), outcome PPO with
    GAE and LOOP on rollouts split across the ranks' environment pools."""
    _torchrun([str(REPO / "run.py"), *FAST, *arm, "task.max_steps=6", f"cache_dir={shared_cache}"], tmp_path,
              timeout=600)
    (cycle,) = json.loads((_run_dir(tmp_path) / "results.json").read_text())["cycles"]
    if arm[0] == "algo=eto":
        assert cycle["eto/episodes"] == 2 and (cycle["eto/pairs"] == 0 or cycle["dpo/steps"] >= 1)
    else:
        assert cycle["rollout/episodes"] == 2 * 2 and cycle["rollout/crashed"] == 0


@pytest.mark.slow
def test_sigterm_stops_both_ranks_at_the_same_point_and_resume_finishes(tmp_path, shared_cache):
    """SIGTERM to the torchrun job after the SFT checkpoint: both ranks stop at the same safe point
    (the preemption check is collective), and resume=auto finishes the run from the checkpoint."""
    import signal
    import time

    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, str(REPO / "run.py"), *FAST, "reward=implicit", "cycles=2", "deepspeed=zero3",
           f"cache_dir={shared_cache}", f"hydra.run.dir={run_dir}", "resume=auto"]
    with open(tmp_path / "first.log", "w") as out:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not (run_dir / "checkpoints/sft/COMPLETE").exists():
            assert p.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(timeout=300) != 0
    stops = [line for k in (0, 1) for line in (run_dir / f"logs/rank{k}.log").read_text().splitlines()
             if "SIGTERM received; stopped" in line]
    assert len(stops) == 2 and len({s.split("stopped", 1)[1] for s in stops}) == 1, stops
    _torchrun(cmd[len(TORCHRUN):], tmp_path, timeout=600)
    results = json.loads((run_dir / "results.json").read_text())
    assert [c["cycle"] for c in results["cycles"]] == [1, 2]
    assert "resuming from" in (run_dir / "logs/rank1.log").read_text()


@pytest.mark.slow
def test_hf_lora_policy_on_two_ranks_zero3(tmp_path, shared_cache, tiny_tokenizer):
    """policy=hf from a local directory with a LoRA adapter (and gradient checkpointing) under ZeRO-3:
    the frozen base is partitioned too; π_ref = SFT through the adapter's swapped shards; the
    checkpoints hold the whole adapter."""
    from safetensors.torch import load_file

    from conftest import make_tiny_model

    model_dir = tmp_path / "hf"
    make_tiny_model(tiny_tokenizer, layers=2, hidden=64).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    small = [o for o in FAST if not o.startswith("policy.")]
    _torchrun([str(REPO / "run.py"), *small, "policy=hf", f"policy.name_or_path={model_dir}", "policy.dtype=float32",
               "policy.max_seq_len=1024", "policy.max_new_tokens=12", "policy.use_task_preamble=false",
               "reward=implicit", "reward.reference=sft", "deepspeed=zero3", f"cache_dir={shared_cache}"],
              tmp_path, timeout=600)
    run_dir = _run_dir(tmp_path)
    (cycle,) = json.loads((run_dir / "results.json").read_text())["cycles"]
    assert cycle["dpo/steps"] >= 1
    sft, cyc = (load_file(run_dir / f"checkpoints/{t}/adapter_model.safetensors") for t in ("sft", "cycle_1"))
    assert all(v.numel() > 0 for v in sft.values()) and any((sft[k] != cyc[k]).any() for k in sft)
    assert {"reference.rank0.safetensors", "reference.rank1.safetensors"} <= {
        p.name for p in (run_dir / "checkpoints/cycle_1").iterdir()}
