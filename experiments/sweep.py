#!/usr/bin/env python
"""Run a sweep file: one line of Hydra overrides per run.

    python experiments/sweep.py experiments/sweeps/ablation_mini.txt            # every line, in turn
    python experiments/sweep.py experiments/sweeps/ablation_mini.txt --index 4  # one line (0-based)
    python experiments/sweep.py SWEEP --index $SLURM_ARRAY_TASK_ID               # a SLURM array task
    python experiments/sweep.py SWEEP --list                                    # index, run dir, status
    python experiments/sweep.py SWEEP --count                                   # number of run lines
    python experiments/sweep.py SWEEP --index 2 --dry-run                       # print the command only
    python experiments/sweep.py SWEEP --index 2 --torchrun 4 deepspeed=zero2    # 4 ranks, extra override

Blank lines and ``#`` comments are skipped; the index counts run lines only. Overrides
given after the sweep file are appended to every line. A run whose directory already
holds ``results.json`` is skipped, so re-running the command after a crash or a time-out
finishes what is left (unfinished runs continue with ``resume=auto``, which the SLURM
templates append). Each run is its own ``python run.py`` process (``--torchrun N``: under
``torchrun --standalone --nproc_per_node N``): one failing run does not stop the others,
and the sweep exits non-zero at the end if any failed. SIGUSR1 or SIGTERM sent to the
sweep is passed on to the running run (SLURM's pre-time-out signal: it stops at its next
safe point and exits) and no further line is started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]


def read_sweep(path: Path) -> List[List[str]]:
    """The run lines of a sweep file, each split into its overrides."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(shlex.split(line))
    if not lines:
        raise SystemExit(f"{path}: no run lines")
    return lines


def run_dir_of(overrides: List[str]) -> Path:
    """The run directory Hydra will use for these overrides (composed, not run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    os.environ.setdefault("STEPAGENT_ROOT", str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    if "${now:" in raw:
        raise SystemExit(f"run dir {raw!r} depends on the time: an experiment config must set hydra.run.dir")
    d = Path(str(cfg.hydra.run.dir))
    return d if d.is_absolute() else Path.cwd() / d


def launch_command(overrides: List[str], python: str, torchrun: int = 0) -> List[str]:
    """``python run.py OVERRIDES``, or the same under ``torchrun --standalone`` with N ranks."""
    launcher = [python]
    if torchrun:
        launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    return [*launcher, str(ROOT / "run.py"), *overrides]


# Signals passed on to the running run; the first one also stops the sweep after that run.
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def call_forwarding_signals(cmd: List[str], env: dict, received: List[int]) -> int:
    """Run ``cmd``; SIGUSR1/SIGTERM sent to this process go on to it (and are noted in ``received``)."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        received.append(signum)
        print(f"sweep: got {signal.Signals(signum).name}, passing it on to pid {proc.pid}", flush=True)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides appended to every line")
    ap.add_argument("--index", type=int, default=None, help="run only this line (0-based)")
    ap.add_argument("--list", action="store_true", help="print the lines, their run dirs and status")
    ap.add_argument("--count", action="store_true", help="print the number of run lines and exit")
    ap.add_argument("--dry-run", action="store_true", help="print each command instead of running it")
    ap.add_argument("--torchrun", type=int, default=0, metavar="N",
                    help="run each line under torchrun --standalone --nproc_per_node N (0: plain python)")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_intermixed_args(argv)

    lines = read_sweep(args.sweep)
    if args.count:
        print(len(lines))
        return 0
    if args.index is not None:
        if not 0 <= args.index < len(lines):
            raise SystemExit(f"--index {args.index}: {args.sweep} has {len(lines)} run lines (0..{len(lines) - 1})")
        todo = [(args.index, lines[args.index])]
    else:
        todo = list(enumerate(lines))

    env = dict(os.environ)
    if args.torchrun:
        # torchrun passes these signals on to its ranks (SIGUSR1: SLURM's pre-time-out signal) and
        # waits this long for them to stop before it kills them
        env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    failed, received = [], []
    for i, line in todo:
        overrides = [*line, *args.overrides]
        try:
            run_dir = run_dir_of(overrides)
        except HydraException as e:  # a bad override fails here, before any run starts
            raise SystemExit(f"[{i}] {' '.join(overrides)}: {e}") from None
        done = (run_dir / "results.json").exists()
        if args.list:
            print(f"{i:3d}  {'done' if done else 'todo':4s}  {run_dir}  {' '.join(overrides)}")
            continue
        if done:
            print(f"[{i}] done already: {run_dir}", flush=True)
            continue
        cmd = launch_command(overrides, args.python, args.torchrun)
        print(f"[{i}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        rc = call_forwarding_signals(cmd, env, received)
        print(f"[{i}] exit {rc} after {time.time() - t0:.0f} s: {run_dir}", flush=True)
        if rc != 0:
            failed.append(i)
        if received:
            print(f"sweep: stopped by {signal.Signals(received[0]).name} after line {i}", file=sys.stderr)
            return 128 + received[0]
    if failed:
        print(f"failed lines: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
