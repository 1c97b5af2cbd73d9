"""ScienceWorld environment throughput through EnvPool: 1 worker vs several.

Replays the gold paths of a fixed set of find-* train variations, the way the
evaluator drives the pool: every live slot gets one ``step_batch`` call per turn and
a slot whose episode ended is ``reset`` onto the next variation. Timed: resets and
steps; not timed: building the gold paths, JVM start-up and JIT warm-up (``--warmup``).

    python benchmarks/env_throughput.py --workers 1 2 --instances 8 --repeats 5 --warmup 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import deque
from typing import Deque, Dict, List, Tuple

from omegaconf import OmegaConf

from stepagent.config import ScienceWorldTaskConfig
from stepagent.data.trajectory import Trajectory
from stepagent.envs import make_task
from stepagent.envs.base import TaskInstance
from stepagent.envs.pool import EnvPool

FIND_TYPES = ["find-animal", "find-living-thing", "find-non-living-thing", "find-plant"]


def pick_instances(n: int) -> Tuple[object, List[TaskInstance]]:
    """The first train variations of each find-* type, interleaved by type, n in all."""
    per_type = -(-n // len(FIND_TYPES))
    cfg = ScienceWorldTaskConfig(data_dir="data/scienceworld", task_types=FIND_TYPES, train_per_type=per_type,
                                 max_steps=100)  # replay whole gold paths, even past ETO's limit
    task = make_task(OmegaConf.structured(cfg))
    by_type: Dict[str, List[TaskInstance]] = {}
    for inst in task.instances("train"):
        by_type.setdefault(inst.task_type, []).append(inst)
    mixed = [lst[i] for i in range(per_type) for lst in by_type.values() if i < len(lst)]
    return task, mixed[:n]


def gold_actions(task, instances: List[TaskInstance], workers: int) -> Dict[str, List[str]]:
    with EnvPool(task.env_factory(), workers) as pool:
        out = {}
        for inst, res in pool.map_experts(instances, progress=False):
            if not isinstance(res, Trajectory):
                raise RuntimeError(f"no gold path for {inst.id}: {res}")
            out[inst.id] = res.actions
    return out


def replay(pool: EnvPool, queue: Deque[TaskInstance], gold: Dict[str, List[str]]) -> Tuple[int, int]:
    """Play every queued instance's gold path; returns (episodes, steps)."""
    live: Dict[int, Tuple[TaskInstance, int]] = {}  # slot -> (instance, next action index)
    episodes = steps = 0
    while queue or live:
        starts = [(slot, queue.popleft()) for slot in range(pool.num_workers) if slot not in live and queue]
        if starts:
            for (slot, inst), res in zip(starts, pool.reset_batch(starts)):
                assert not res.crashed, res.observation
                live[slot] = (inst, 0)
        items = [(slot, gold[inst.id][t]) for slot, (inst, t) in live.items()]
        for (slot, _), res in zip(items, pool.step_batch(items)):
            inst, t = live[slot]
            steps += 1
            if res.done or t + 1 == len(gold[inst.id]):
                assert res.score == 1.0 and not res.crashed, (inst.id, res)
                del live[slot]
                episodes += 1
            else:
                live[slot] = (inst, t + 1)
    return episodes, steps


def warm_up(pool: EnvPool, instances: List[TaskInstance], gold: Dict[str, List[str]], rounds: int) -> None:
    """Every slot plays every gold path ``rounds`` times, untimed.

    A fresh JVM spends its first few thousand steps compiling (the C2 JIT thread is then
    as busy as the simulator), so without this the table measures JIT warm-up, which
    scales worse with workers than the steady state a long training run sees.
    """
    slots = range(pool.num_workers)
    pool.reset_batch([(s, instances[0]) for s in slots])  # start the JVMs
    for _ in range(rounds):
        for inst in instances:
            pool.reset_batch([(s, inst) for s in slots])
            for action in gold[inst.id]:
                pool.step_batch([(s, action) for s in slots])


def measure(task, instances, gold, workers: int, repeats: int, warmup: int, trials: int) -> Dict[str, float]:
    """Median over ``trials`` timed replays (the machine may be shared: one run is noisy)."""
    walls = []
    with EnvPool(task.env_factory(), workers) as pool:
        warm_up(pool, instances, gold, warmup)
        for _ in range(trials):
            t0 = time.perf_counter()
            episodes, steps = replay(pool, deque(instances * repeats), gold)
            walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    return {"workers": workers, "episodes": episodes, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "min_s": min(walls), "max_s": max(walls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--instances", type=int, default=8, help="find-* train variations to replay")
    parser.add_argument("--repeats", type=int, default=5, help="times each variation is replayed (timed)")
    parser.add_argument("--trials", type=int, default=3, help="timed runs per worker count (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed replays of every variation per worker")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    task, instances = pick_instances(args.instances)
    gold = gold_actions(task, instances, max(args.workers))
    rows = [measure(task, instances, gold, w, args.repeats, args.warmup, args.trials) for w in args.workers]

    base = rows[0]["steps_per_s"]
    print(f"\nScienceWorld gold-path replay, {len(instances)} find-* variations x {args.repeats}, "
          f"timed; resets included; JVM start and {args.warmup} warm-up rounds per worker excluded\n")
    print(f"| workers | episodes | steps | wall (s), median of {args.trials} [min-max] | steps/s | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['episodes']} | {r['steps']} | {r['wall_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | "
              f"{r['steps_per_s']:.1f} | {r['steps_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
