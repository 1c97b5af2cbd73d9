"""Wall time of the same short run in one process and on 2 CPU ranks under ZeRO-2 / ZeRO-3.

The runs are the ones tests/test_deepspeed.py launches (tiny policy, 6 expert trajectories,
1 SFT epoch, one cycle, 2 dev episodes, ``task.num_workers=1``), timed end to end as a user
would see them (interpreter start, DeepSpeed initialisation and environment start-up
included). Each configuration runs ``--repeats`` times after one warm-up run that fills the
cache (experts, tokenizer, initial model).

    .venv/bin/python benchmarks/deepspeed_walltime.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SMALL_RUN  # noqa: E402  (the same small run the tests use)

FAST = [*(o for o in SMALL_RUN if not o.startswith("sft.epochs=")), "task.num_workers=1", "sft.epochs=1",
        "eval.before_sft=false", "cycles=1", "inspection.trajectories=2", "inspection.heldout_trajectories=0",
        "deepspeed.stage3_param_persistence_threshold=0"]
ARMS = {"implicit": ["reward=implicit"], "inverse": ["reward=inverse", "reward.disc_hidden_size=32"]}
LAUNCH = {
    "1 process": ([sys.executable], "none"),
    "2 ranks, ZeRO-2": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "zero2"),
    "2 ranks, ZeRO-3": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "zero3"),
}


def one_run(prefix, zero, arm, cache, out) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}
    cmd = [*prefix, str(ROOT / "run.py"), *FAST, *ARMS[arm], f"deepspeed={zero}", f"cache_dir={cache}",
           f"hydra.run.dir={out}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        one_run(*LAUNCH["1 process"], "implicit", cache, Path(tmp) / "warmup")
        rows = []
        for arm in ARMS:
            for name, (prefix, zero) in LAUNCH.items():
                times = [one_run(prefix, zero, arm, cache, Path(tmp) / f"{arm}-{zero}-{i}") for i in range(args.repeats)]
                rows.append((arm, name, times))
                print(f"{arm:9s} {name:16s} " + " ".join(f"{t:.1f}" for t in times), flush=True)
    print("\n| run | launch | wall time (s), each repeat | vs 1 process |")
    print("|---|---|---|---:|")
    base = {arm: min(t) for arm, name, t in rows if name == "1 process"}
    for arm, name, t in rows:
        print(f"| SFT + one {arm} cycle | {name} | {' / '.join(f'{x:.1f}' for x in t)} | {min(t) / base[arm]:.2f}x |")


if __name__ == "__main__":
    main()
