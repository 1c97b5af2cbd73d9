"""EnvPool on real ScienceWorld: parallel batches, crash recovery, timeouts, clean shutdown."""

import os
import signal
import threading
import time

import psutil
import pytest

from stepagent.data.trajectory import Trajectory
from stepagent.envs.base import ExpertFailure, TaskInstance
from stepagent.envs.pool import EnvPool
from stepagent.envs.scienceworld import ScienceWorldTextEnv

ANIMAL = TaskInstance("scienceworld", "find-animal", "0", "train", max_steps=30)
PLANT = TaskInstance("scienceworld", "find-plant", "70", "train", max_steps=30)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def pool():
    with EnvPool(ScienceWorldTextEnv, num_workers=2, step_timeout_s=60) as p:
        yield p


@pytest.fixture(scope="module")
def gold(pool):
    """Expert actions of ANIMAL and PLANT, built through map_experts."""
    out = {inst.id: traj for inst, traj in pool.map_experts([ANIMAL, PLANT], progress=False)}
    assert all(isinstance(t, Trajectory) for t in out.values()), out
    return {i: [s.action for s in t.steps] for i, t in out.items()}


def play(pool, slot, inst, actions):
    """Play a whole episode in one slot; the last StepResult."""
    start = pool.reset_batch([(slot, inst)])[0]
    assert not start.crashed and start.observation.startswith("Your task is")
    for a in actions:
        res = pool.step_batch([(slot, a)])[0]
    return res


def test_batches_run_both_slots(pool, gold):
    starts = pool.reset_batch([(0, ANIMAL), (1, PLANT)])
    assert [s.done for s in starts] == [False, False] and "animal" in starts[0].observation
    acts = {0: gold[ANIMAL.id], 1: gold[PLANT.id]}
    final = {}
    for t in range(max(map(len, acts.values()))):
        items = [(s, a[t]) for s, a in acts.items() if t < len(a)]
        for (slot, _), res in zip(items, pool.step_batch(items)):
            final[slot] = res
    assert all(r.score == 1.0 and r.done and not r.crashed for r in final.values())
    with pytest.raises(ValueError, match="twice"):
        pool.step_batch([(0, "look around"), (0, "look around")])


def test_invalid_action_does_not_crash(pool):
    pool.reset_batch([(0, ANIMAL)])
    res = pool.step_batch([(0, "sing a song to the dove")])[0]
    assert res.observation == "No known action matches that input."
    assert not res.crashed and not res.done and res.info["valid"] is False


def test_killed_jvm_gives_crashed_step_then_slot_recovers(pool, gold):
    pool.reset_batch([(0, ANIMAL)])
    pool.step_batch([(0, gold[ANIMAL.id][0])])
    jvm = pool.jvm_pids()[0]
    os.kill(jvm, signal.SIGKILL)
    assert wait_gone([jvm])
    res = pool.step_batch([(0, gold[ANIMAL.id][1])])[0]
    assert res.crashed and res.done and res.score == 0.0
    assert res.observation.startswith("[environment crashed:") and "Traceback" in res.info["error"]
    res = play(pool, 0, ANIMAL, gold[ANIMAL.id])  # same slot, new JVM
    assert res.score == 1.0 and res.done and not res.crashed
    assert pool.jvm_pids()[0] != jvm


def test_killed_worker_gives_crashed_step_then_slot_recovers(pool, gold):
    pool.reset_batch([(1, PLANT)])
    worker, jvm = pool.worker_pids()[1], pool.jvm_pids()[1]
    os.kill(worker, signal.SIGKILL)
    assert wait_gone([worker])
    res = pool.step_batch([(1, gold[PLANT.id][0])])[0]
    assert res.crashed and res.done
    assert pool.worker_pids()[1] != worker
    assert wait_gone([jvm])  # the dead worker's JVM does not linger
    res = play(pool, 1, PLANT, gold[PLANT.id])
    assert res.score == 1.0 and res.done and not res.crashed


def test_silent_worker_times_out_and_is_replaced():
    # Start and query the worker with a generous limit (a loaded machine can take over 4 s to
    # answer), then shorten it for the silent step only.
    with EnvPool(ScienceWorldTextEnv, num_workers=1, step_timeout_s=120) as pool:
        pool.reset_batch([(0, ANIMAL)])
        worker, jvm = pool.worker_pids()[0], pool.jvm_pids()[0]
        assert jvm is not None
        pool.step_timeout_s = 4
        os.kill(worker, signal.SIGSTOP)  # alive but silent
        t0 = time.monotonic()
        res = pool.step_batch([(0, "look around")])[0]
        assert res.crashed and res.done and "no answer" in res.observation
        assert 3.5 < time.monotonic() - t0 < 15
        assert wait_gone([worker, jvm])
        # The replacement starts a fresh JVM on its first reset, which can take longer than
        # 4 s on a loaded machine: the short limit was only for the silent worker.
        pool.step_timeout_s = 120
        assert not pool.reset_batch([(0, ANIMAL)])[0].crashed


def test_map_experts_survives_a_worker_crash():
    with EnvPool(ScienceWorldTextEnv, num_workers=1, step_timeout_s=60) as pool:
        # The fresh worker needs ~1 s to start its JVM: kill it while it works on ANIMAL.
        victim = pool.worker_pids()[0]
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        results = dict((inst.id, r) for inst, r in pool.map_experts([ANIMAL, PLANT], progress=False))
    assert isinstance(results[ANIMAL.id], ExpertFailure) and results[ANIMAL.id].reason == "simulator_crash"
    assert isinstance(results[PLANT.id], Trajectory) and results[PLANT.id].reward == 1.0


def test_close_leaves_no_processes():
    pool = EnvPool(ScienceWorldTextEnv, num_workers=2)
    pool.reset_batch([(0, ANIMAL), (1, PLANT)])
    workers, jvms = pool.worker_pids(), pool.jvm_pids()
    assert all(jvms) and all(psutil.Process(p).name() == "java" for p in jvms)
    pool.close()
    assert wait_gone(workers + jvms, timeout=2.0)
    with pytest.raises(RuntimeError, match="closed"):
        pool.step_batch([(0, "look around")])
    pool.close()  # idempotent
