"""Preemption and resume: atomic checkpoints, signals, and a killed run that resumes to exactly
the result of an uninterrupted one (real ScienceWorld, real training, real W&B offline)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stepagent import checkpoint as ck
from stepagent.checkpoint import (COMPLETE, EXIT_PREEMPTED, Checkpoint, Checkpointer, Preempted, check_preemption,
                                  latest_checkpoint, preemption_signals, stop_requested)
from stepagent.tracking import RunLogger

from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _policy(tok, seed=0):
    return SimpleNamespace(model=make_tiny_model(tok, seed=seed, layers=1, hidden=32), tokenizer=tok)


def _adam_step(params, opt):
    """One real optimizer step, so the optimizer has state (exp_avg, exp_avg_sq, step)."""
    loss = sum((p.float() ** 2).sum() for p in params)
    opt.zero_grad()
    loss.backward()
    opt.step()


# ----------------------------------------------------------------------------- atomicity
def test_save_interrupted_before_marker_leaves_previous_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    pol = _policy(tiny_tokenizer)
    ckpt = Checkpointer(tmp_path, None, RunLogger(tmp_path), pol)
    first = ckpt.save_cycle(1, [{"cycle": 1}])
    assert latest_checkpoint(tmp_path) == first == tmp_path / "checkpoints" / "cycle_1"

    real = ck._write_json

    def crash_at_marker(path, obj):
        if path.name == COMPLETE:
            raise OSError("disk full (simulated) while writing the marker")
        real(path, obj)

    monkeypatch.setattr(ck, "_write_json", crash_at_marker)
    with pytest.raises(OSError):
        ckpt.save_cycle(2, [{"cycle": 1}, {"cycle": 2}])
    # everything but the marker was written, under the temporary name only
    assert (tmp_path / "checkpoints/cycle_2.tmp/model.safetensors").exists()
    assert not (tmp_path / "checkpoints/cycle_2").exists()
    assert latest_checkpoint(tmp_path) == first

    monkeypatch.setattr(ck, "_write_json", real)
    second = ckpt.save_cycle(2, [{"cycle": 1}, {"cycle": 2}])  # the stale .tmp is replaced
    assert latest_checkpoint(tmp_path) == second and not (tmp_path / "checkpoints/cycle_2.tmp").exists()
    assert Checkpoint(second).meta["history"] == [{"cycle": 1}, {"cycle": 2}]

    # a file that changed size after the manifest was written (e.g. torn by a crash) invalidates it
    with open(second / "rng.pt", "ab") as f:
        f.write(b"x")
    assert latest_checkpoint(tmp_path) == first


SAVER = """
import sys, torch
from pathlib import Path
from types import SimpleNamespace
from stepagent.checkpoint import Checkpointer
run_dir = Path(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
model.save_pretrained = lambda d: torch.save(model.state_dict(), Path(d) / "weights.pt")
opt = torch.optim.AdamW(model.parameters())
ckpt = Checkpointer(run_dir, None, None, SimpleNamespace(model=model))
for seq in range(1, 100000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(seq)
    ckpt.save_cycle(seq, [{"cycle": seq}], {"policy_optimizer": opt})
    print(seq, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_broken_newest_checkpoint(tmp_path):
    """A process saving checkpoints in a loop is SIGKILLed at an arbitrary moment (mid-save):
    the newest complete checkpoint loads, and its contents are those of its own step."""
    p = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    for _ in range(5):  # a few saves done, then kill in the middle of later ones
        assert p.stdout.readline(), "the saver died"
    time.sleep(0.37)
    p.kill()
    p.wait()
    path = latest_checkpoint(tmp_path)
    c = Checkpoint(path)
    seq = c.cycle
    assert seq >= 5 and c.meta["history"] == [{"cycle": seq}]
    weights = torch.load(path / "weights.pt")
    assert all(torch.all(v == seq) for v in weights.values())
    opt = torch.optim.AdamW(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).parameters())
    opt.load_state_dict(torch.load(path / "train_state.pt", weights_only=False)["policy_optimizer"])
    # only complete checkpoints count; the one being written when killed (if any) is a .tmp
    others = [d.name for d in (tmp_path / "checkpoints").iterdir() if d.name.endswith(".tmp")]
    assert all(d == f"cycle_{seq + 1}.tmp" for d in others)


def test_keep_last_prunes_resume_state_only_after_a_newer_checkpoint_is_complete(tmp_path, tiny_tokenizer):
    pol = _policy(tiny_tokenizer)
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(keep_last=2, keep_weights=True))
    ckpt = Checkpointer(tmp_path, cfg, RunLogger(tmp_path), pol)
    for c in (1, 2, 3):
        ckpt.save_cycle(c, [{"cycle": i} for i in range(1, c + 1)])
    root = tmp_path / "checkpoints"
    assert [p for _, p in ck.complete_checkpoints(tmp_path)] == [root / "cycle_2", root / "cycle_3"]
    assert (root / "cycle_1/model.safetensors").exists()  # the per-cycle policy stays
    assert not (root / "cycle_1" / COMPLETE).exists() and not (root / "cycle_1/rng.pt").exists()
    ckpt.keep_weights = False
    ckpt.keep_last = 1
    ckpt.save_cycle(4, [])
    assert sorted(p.name for p in root.iterdir()) == ["cycle_1", "cycle_4"]


# ----------------------------------------------------------------------------- restoring state
def test_inverse_reward_state_roundtrip_restores_discriminator_optimizers_rng_reference(tmp_path, tiny_tokenizer):
    """What reward=inverse trains across cycles — policy optimizer, discriminator and its optimizer
    — plus π_ref, the RNG and the cycle rows come back exactly in a fresh process state."""
    from stepagent.algos.discriminator import Discriminator, DiscriminatorConfig
    from stepagent.train.reference import trainable_snapshot

    dcfg = DiscriminatorConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_len=64)

    def objects(seed):
        pol = _policy(tiny_tokenizer, seed=seed)
        torch.manual_seed(seed)
        disc = Discriminator.for_tokenizer(tiny_tokenizer, dcfg)
        opt = torch.optim.AdamW(pol.model.parameters(), lr=1e-3)
        dopt = torch.optim.AdamW(disc.parameters(), lr=3e-4)
        return pol, {"policy_optimizer": opt, "discriminator": disc, "discriminator_optimizer": dopt}

    pol, train = objects(seed=0)
    reference = trainable_snapshot(pol.model)  # "SFT"
    for _ in range(2):
        _adam_step(list(pol.model.parameters()), train["policy_optimizer"])
        _adam_step(list(train["discriminator"].parameters()), train["discriminator_optimizer"])
    rows = [{"cycle": 1, "disc/acc_train": 0.75, "eval/reward_x100": 12.5}]
    logger = RunLogger(tmp_path)
    logger.log(rows[0])
    saver = Checkpointer(tmp_path, None, logger, pol)
    saver.summaries["cycle 1"] = {"overall": {"reward_x100": 12.5}}
    torch.manual_seed(123)
    path = saver.save_cycle(1, rows, train, reference=reference)
    expected_draw = torch.rand(5)  # what the uninterrupted run draws next

    pol2, train2 = objects(seed=1)  # other initial values everywhere
    torch.manual_seed(999)
    resumed = Checkpoint(path)
    assert resumed.meta["logger"]["metrics_bytes"] == (tmp_path / "metrics.jsonl").stat().st_size
    resumer = Checkpointer(tmp_path, None, RunLogger(tmp_path), pol2, resumed)
    resumed.load(pol2.model)
    ref2 = resumer.reference_snapshot()
    history, first = resumer.resume_cycles(train2)
    assert first == 2 and history == rows and resumer.summaries == saver.summaries
    assert torch.equal(torch.rand(5), expected_draw)
    assert ref2.keys() == reference.keys() and all(torch.equal(ref2[k], reference[k]) for k in reference)
    for a, b in [(pol.model, pol2.model), (train["discriminator"], train2["discriminator"])]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for name in ("policy_optimizer", "discriminator_optimizer"):
        sa, sb = train[name].state_dict()["state"], train2[name].state_dict()["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    # one more identical step from both gives identical discriminators: nothing else was missing
    for t in (train, train2):
        _adam_step(list(t["discriminator"].parameters()), t["discriminator_optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(train["discriminator"].parameters(),
                                                 train2["discriminator"].parameters()))
    # a run whose config trains something else fails loudly instead of resuming half the state
    with pytest.raises(ValueError, match="discriminator"):
        resumer.resume_cycles({"policy_optimizer": train2["policy_optimizer"]})


# ----------------------------------------------------------------------------- signals
def test_preemption_signals_only_set_a_flag_until_a_safe_point():
    before = signal.getsignal(signal.SIGTERM)
    with preemption_signals():
        check_preemption()  # nothing yet
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the process is still alive: only the flag is set
        assert stop_requested() == signal.SIGTERM
        with pytest.raises(Preempted) as e:
            check_preemption("between optimizer steps")
        assert e.value.exit_code == EXIT_PREEMPTED == 143 and "between optimizer steps" in str(e.value)
        assert not isinstance(e.value, Exception)  # `except Exception` on the way up cannot swallow it
    assert signal.getsignal(signal.SIGTERM) is before and stop_requested() is None


# ----------------------------------------------------------------------------- kill a real run, resume
FAST = [
    "reward=implicit", "cycles=2", "task.task_types=[find-animal]", "task.train_per_type=6", "task.eval_per_type=2",
    "task.num_workers=1", "task.max_steps=6", "policy.hidden_size=64", "policy.intermediate_size=128",
    "policy.num_layers=2", "policy.vocab_size=1024", "policy.max_new_tokens=12", "sft.epochs=1", "sft.batch_size=4",
    "eval.before_sft=false", "inspection.trajectories=3", "inspection.heldout_trajectories=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _cmd(run_dir: Path, cache: Path, *extra: str):
    return [sys.executable, str(REPO / "run.py"), *FAST, f"hydra.run.dir={run_dir}", f"cache_dir={cache}", *extra]


def _start(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(str(run_dir) + ".log", "a")
    # its own process group: the signal goes to every process of the run, as SLURM sends it
    return subprocess.Popen(_cmd(run_dir, cache, *extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=ENV, start_new_session=True)


def _log(run_dir: Path) -> str:
    return Path(str(run_dir) + ".log").read_text()


def _kill_when(p: subprocess.Popen, marker: Path, sig: int, run_dir: Path, timeout: float = 600) -> int:
    """Send ``sig`` to the run's process group as soon as ``marker`` exists; return the exit code."""
    deadline = time.time() + timeout
    while not marker.exists():
        assert p.poll() is None, f"exited ({p.returncode}) before {marker} appeared:\n{_log(run_dir)[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(p.pid, sig)
    return p.wait(timeout=300)


def _finish(p: subprocess.Popen, run_dir: Path) -> None:
    assert p.wait(timeout=600) == 0, _log(run_dir)[-4000:]


# wall-clock measurements: never equal across runs (generation counters beside them are)
_CLOCK = ("_time", "resources/peak_rss_mb")
_CLOCK_SUFFIXES = ("/seconds", "/sync_seconds", "/tokens_per_s")


def _deterministic(row):
    return {k: v for k, v in row.items() if k not in _CLOCK and not k.endswith(_CLOCK_SUFFIXES)}


def _metrics(run_dir: Path):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [_deterministic(r) for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("summaries", "sft"):
        assert ra[key] == rb[key], key
    assert [_deterministic(c) for c in ra["cycles"]] == [_deterministic(c) for c in rb["cycles"]]
    assert any(k.endswith("/seconds") for k in ra["cycles"][0])  # the clock keys left out exist
    assert list(ra["summaries"]) == ["sft", "cycle 1", "cycle 2"]
    assert _metrics(a) == _metrics(b)  # no row lost, none twice
    wa, wb = (load_file(d / "checkpoints/cycle_2/model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    cache = tmp_path / "cache"
    ref = tmp_path / "uninterrupted"
    from safetensors.torch import load_file

    _finish(_start(ref, cache), ref)  # also builds the expert cache the others read
    sft, cyc = (load_file(ref / "checkpoints" / n / "model.safetensors") for n in ("sft", "cycle_1"))
    assert any(not torch.equal(sft[k], cyc[k]) for k in sft)  # the cycles train: the comparison means something

    # SIGTERM (like SLURM's, to every process of the run) once cycle 1's checkpoint is complete,
    # W&B on; and at the same time another run SIGKILLed (a crash, no handler) after SFT's.
    term, crash = tmp_path / "term", tmp_path / "crash"
    p_term = _start(term, cache, "logger=wandb", "resume=auto")
    p_crash = _start(crash, cache, "resume=auto")
    rc_crash = _kill_when(p_crash, crash / "checkpoints/sft" / COMPLETE, signal.SIGKILL, crash)
    rc_term = _kill_when(p_term, term / "checkpoints/cycle_1" / COMPLETE, signal.SIGTERM, term)
    assert rc_crash == -signal.SIGKILL
    assert rc_term == EXIT_PREEMPTED, _log(term)[-3000:]
    assert "SIGTERM received" in _log(term) and "Newest complete checkpoint" in _log(term)
    assert "environment crashed" not in _log(term)  # the env workers ignored the signal
    assert latest_checkpoint(term).name == "cycle_1" and not (term / "results.json").exists()

    # the same commands again (resume=auto): both continue from their newest complete checkpoint
    p_term, p_crash = _start(term, cache, "logger=wandb", "resume=auto"), _start(crash, cache, "resume=auto")
    _finish(p_term, term)
    _finish(p_crash, crash)
    assert "resuming from" in _log(term) and "after cycle 1" in _log(term)
    assert "resuming from" in _log(crash)
    _assert_same_run(ref, term)
    _assert_same_run(ref, crash)

    # W&B: the resumed attempt continued the same run id, at the checkpoint's step
    from stepagent.tracking import read_offline_run

    runs = sorted((term / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    first_row = read_offline_run(runs[1], wait_s=30)["history"][0]
    assert first_row["resumed_from_cycle"] == 1
    assert first_row["_step"] == Checkpoint(term / "checkpoints/cycle_1").meta["logger"]["wandb_step"] > 0

    # a finished run with resume=auto only prints its results
    before = (term / "results.json").stat().st_mtime_ns
    r = subprocess.run(_cmd(term, cache, "logger=wandb", "resume=auto"), cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "This run has finished" in r.stdout and "| cycle 2 |" in r.stdout
    assert (term / "results.json").stat().st_mtime_ns == before
    assert len(sorted((term / "wandb").glob("offline-run-*"))) == 2


def test_sft_init_from_starts_an_arm_from_another_runs_sft_as_if_it_had_trained_it(tmp_path):
    """An ablation trains SFT once per seed: the implicit arm started from an SFT-only run's checkpoint
    (sft.init_from) ends bit-for-bit where the same arm trained from scratch ends."""
    cache = tmp_path / "cache"
    ref, sft_only, from_sft = tmp_path / "uninterrupted", tmp_path / "sft_only", tmp_path / "from_sft"
    _finish(_start(ref, cache), ref)
    _finish(_start(sft_only, cache, "reward=none"), sft_only)
    _finish(_start(from_sft, cache, f"sft.init_from={sft_only}"), from_sft)
    assert "sft.init_from: starting from the SFT checkpoint" in _log(from_sft)
    _assert_same_run(ref, from_sft)
    # other evaluation settings: the SFT weights are taken, the SFT policy is evaluated again on this run's split
    reeval = tmp_path / "reeval"
    _finish(_start(reeval, cache, f"sft.init_from={sft_only}", "reward=none", "task.eval_per_type=1"), reeval)
    assert "evaluating the SFT policy again (this run differs in task.eval_per_type)" in _log(reeval)
    sft_results = json.loads((sft_only / "results.json").read_text())["summaries"]["sft"]["overall"]
    assert json.loads((reeval / "results.json").read_text())["summaries"]["sft"]["overall"]["episodes"] == 1
    assert sft_results["episodes"] == 2
    # a key newer than the SFT run (absent from its saved config) counts as unchanged only at its schema
    # default: an SFT trained without the goal reminder does not start an arm that prompts with it
    state = sft_only / "checkpoints" / "sft" / "state.json"
    meta = json.loads(state.read_text())
    del meta["config"]["policy"]["goal_reminder"]
    state.write_text(json.dumps(meta))
    manifest = json.loads((state.parent / COMPLETE).read_text())  # the checkpoint stays complete
    manifest["files"]["state.json"] = state.stat().st_size
    (state.parent / COMPLETE).write_text(json.dumps(manifest))
    r = subprocess.run(_cmd(tmp_path / "refused", cache, f"sft.init_from={sft_only}", "policy.goal_reminder=true"),
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "policy.goal_reminder" in r.stderr + r.stdout, r.stderr[-2000:]
    # an SFT run with other SFT settings, or a later checkpoint than SFT's, is refused at start
    for extra, said in ((f"sft.init_from={sft_only}", "sft.lr"), (f"sft.init_from={ref}/checkpoints/cycle_1", "cycle 1")):
        r = subprocess.run(_cmd(tmp_path / "refused", cache, extra, "sft.lr=0.01" if said == "sft.lr" else "seed=0"),
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and said in r.stderr + r.stdout, r.stderr[-2000:]
        assert not (tmp_path / "refused" / "results.json").exists()
