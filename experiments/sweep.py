#!/usr/bin/env python
"""Run a sweep file: one line of Hydra overrides per run.

    python experiments/sweep.py experiments/sweeps/ablation_mini.txt            # every line, in turn
    python experiments/sweep.py experiments/sweeps/ablation_mini.txt --index 4  # one line (0-based)
    python experiments/sweep.py SWEEP --index $SLURM_ARRAY_TASK_ID               # a SLURM array task
    python experiments/sweep.py SWEEP --list                                    # index, run dir, status

Blank lines and ``#`` comments are skipped; the index counts run lines only. A run whose
directory already holds ``results.json`` is skipped, so re-running the command after a
crash or a time-out finishes what is left (unfinished runs continue with ``resume=auto``).
Each run is its own ``python run.py`` process: one failing run does not stop the others,
and the sweep exits non-zero at the end if any failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--index", type=int, default=None, help="run only this line (0-based)")
    ap.add_argument("--list", action="store_true", help="print the lines, their run dirs and status")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)

    lines = read_sweep(args.sweep)
    if args.index is not None:
        if not 0 <= args.index < len(lines):
            raise SystemExit(f"--index {args.index}: {args.sweep} has {len(lines)} run lines (0..{len(lines) - 1})")
        todo = [(args.index, lines[args.index])]
    else:
        todo = list(enumerate(lines))

    failed = []
    for i, overrides in todo:
        run_dir = run_dir_of(overrides)
        done = (run_dir / "results.json").exists()
        if args.list:
            print(f"{i:3d}  {'done' if done else 'todo':4s}  {run_dir}  {' '.join(overrides)}")
            continue
        if done:
            print(f"[{i}] done already: {run_dir}", flush=True)
            continue
        cmd = [args.python, str(ROOT / "run.py"), *overrides]
        print(f"[{i}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        print(f"[{i}] exit {rc} after {time.time() - t0:.0f} s: {run_dir}", flush=True)
        if rc != 0:
            failed.append(i)
    if failed:
        print(f"failed lines: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
