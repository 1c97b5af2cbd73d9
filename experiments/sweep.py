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

Summaries (``--summaries DIR``): as each run finishes, its small summary JSON
(experiments/run_summary.py: the numbers the report needs, per-episode rewards included) is
written to ``DIR/<task>_<split>_<arm>_s<seed>.json``; ``--commit`` also commits that one file
(``git commit -- FILE``: nothing else that is staged goes with it), so a session that ends
early loses no finished run. A line whose summary is already in DIR counts as done even when
its run directory is gone: a session on a fresh machine continues from the committed
summaries. A run directory that holds ``results.json`` but has no summary yet gets one
without being run again.

    python experiments/sweep.py SWEEP --summaries results/ablation_mini --commit
    python experiments/sweep.py SWEEP --summaries results/ablation_mini --list  # done | ran | todo
    python experiments/report.py results/ablation_mini --out results/ablation_mini/report
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
from typing import Any, Dict, List, Optional, Tuple

from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/: run_summary
from run_summary import identity, read_json, summarize_run, summary_name, write_summary  # noqa: E402


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


def plan(overrides: List[str]) -> Tuple[Path, Dict[str, Any]]:
    """The run directory Hydra will use for these overrides and the run's identity (task, eval
    split, arm, seed: what names its summary), from the composed config (composed, not run)."""
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
    return (d if d.is_absolute() else Path.cwd() / d), identity(cfg)


def run_dir_of(overrides: List[str]) -> Path:
    """The run directory Hydra will use for these overrides (composed, not run)."""
    return plan(overrides)[0]


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


# ----------------------------------------------------------------------------- summaries + git
def git(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def code_version() -> Optional[Dict[str, Any]]:
    """HEAD of the repository that runs run.py, as a run starts (what its summary records), and
    whether tracked files differed from it; None outside a git checkout."""
    head = git(["rev-parse", "HEAD"], ROOT)
    if head.returncode != 0:
        return None
    dirty = git(["diff", "--quiet", "HEAD", "--"], ROOT).returncode != 0
    return {"commit": head.stdout.strip(), "dirty": dirty, "source": "sweep: HEAD when the run started"}


def commit_message(summary: Dict[str, Any]) -> str:
    """``ablation: scienceworld_dev_implicit_s0 (reward x100 seen 31.2, unseen 28.0)``"""
    from stepagent.eval.protocol import split_name

    rewards = ", ".join(f"{split_name(summary['task'], sp)} {f['overall']['reward_x100']:.1f}"
                        for sp, f in summary["finals"].items())
    return f"ablation: {Path(summary_name(summary)).stem} (reward x100 {rewards})"


def commit_file(path: Path, message: str, attempts: int = 5) -> bool:
    """``git add`` + ``git commit -- path`` in the repository holding ``path``: only this file is
    committed, whatever else is staged. Retried while another git command holds the index lock
    (someone else committing in the same checkout); any other failure is a warning, not an error:
    the summary is on disk and the next sweep commits it."""
    repo, name = path.parent, path.name
    for attempt in range(attempts):
        r = git(["add", "--", name], repo)
        if r.returncode == 0:
            r = git(["commit", "-q", "-m", message, "--", name], repo)
        if r.returncode == 0:
            print(f"sweep: committed {path}", flush=True)
            return True
        if "index.lock" not in r.stderr or attempt == attempts - 1:
            break
        time.sleep(2.0)
    print(f"sweep: warning: could not commit {path}: {(r.stderr or r.stdout).strip()}", file=sys.stderr, flush=True)
    return False


def uncommitted(path: Path) -> bool:
    """Whether ``path`` differs from HEAD (untracked, changed or staged); False when git cannot tell."""
    r = git(["status", "--porcelain", "--", path.name], path.parent)
    return r.returncode == 0 and bool(r.stdout.strip())


def record_summary(run_dir: Path, out_dir: Path, expected: str, extra: Dict[str, Any], commit: bool,
                   version: Optional[Dict[str, Any]] = None) -> bool:
    """Write (and with ``commit``, commit) the summary of the finished run in ``run_dir``; False
    when it could not be written."""
    try:
        summary = summarize_run(run_dir, git=version)
    except Exception as e:  # a finished run whose files cannot be read: say so, keep sweeping
        print(f"sweep: error: no summary for {run_dir}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return False
    summary["sweep"] = extra
    path = write_summary(summary, out_dir)
    if path.name != expected:
        print(f"sweep: warning: {run_dir}'s summary is {path.name}, not {expected} as composed: "
              "a later sweep will not find it", file=sys.stderr, flush=True)
    print(f"sweep: wrote {path}", flush=True)
    if commit:
        commit_file(path, commit_message(summary))
    return True


def status(run_dir: Path, summary: Optional[Path]) -> str:
    """done: the summary exists (or, without --summaries, results.json); ran: results.json but no
    summary yet; todo: neither."""
    if summary is not None and summary.exists():
        return "done"
    if (run_dir / "results.json").exists():
        return "ran" if summary is not None else "done"
    return "todo"


def init_from_of(overrides: List[str]) -> Optional[Path]:
    """The ``sft.init_from=PATH`` of a line, absolute (relative to the working directory), or None."""
    for o in overrides:
        if o.startswith("sft.init_from="):
            path = Path(o.split("=", 1)[1])
            return path if path.is_absolute() else Path.cwd() / path
    return None


def has_sft_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete SFT-stage checkpoint (what ``sft.init_from`` reads)."""
    from stepagent.checkpoint import complete_checkpoints

    for _, ckpt in complete_checkpoints(run_dir) if run_dir.is_dir() else []:
        state = read_json(ckpt / "state.json") or {}
        if state.get("stage") == "sft" and int(state.get("cycle", 0)) == 0:
            return True
    return False


def sft_lines_to_rerun(planned: Dict[int, Tuple[Path, bool]], overrides: Dict[int, List[str]]) -> Dict[int, List[int]]:
    """Lines to run again although their summary exists: the SFT runs whose checkpoint a line still to
    run starts from (``sft.init_from``) but which this machine does not have (a later session on a
    fresh machine). -> {SFT line: the lines waiting for it}. ``planned``: line -> (run dir, done)."""
    by_dir = {d.resolve(): i for i, (d, _) in planned.items()}
    out: Dict[int, List[int]] = {}
    for i, (_, done) in planned.items():
        src = init_from_of(overrides[i])
        if done or src is None or has_sft_checkpoint(src):
            continue
        j = by_dir.get(src.resolve())
        if j is not None and j != i:
            out.setdefault(j, []).append(i)
    return out


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
    ap.add_argument("--summaries", type=Path, default=None, metavar="DIR",
                    help="write each finished run's summary JSON here; a line whose summary exists is done")
    ap.add_argument("--commit", action="store_true", help="with --summaries: git-commit each summary as it is written")
    args = ap.parse_intermixed_args(argv)
    if args.commit and args.summaries is None:
        ap.error("--commit needs --summaries DIR")

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
    planned: Dict[int, Tuple[Path, Dict[str, Any]]] = {}
    for i, line in enumerate(lines):
        try:
            planned[i] = plan([*line, *args.overrides])
        except HydraException as e:  # a bad override fails here, before any run starts
            raise SystemExit(f"[{i}] {' '.join([*line, *args.overrides])}: {e}") from None

    def summary_of(i: int) -> Optional[Path]:
        return args.summaries / summary_name(planned[i][1]) if args.summaries is not None else None

    rerun = sft_lines_to_rerun({i: (d, status(d, summary_of(i)) == "done") for i, (d, _) in planned.items()},
                               {i: [*line, *args.overrides] for i, line in enumerate(lines)})
    for i, line in todo:
        overrides = [*line, *args.overrides]
        run_dir, ident = planned[i]
        summary = summary_of(i)
        state = status(run_dir, summary)
        if state == "done" and i in rerun and not args.list:
            # its summary was committed by an earlier session, but lines still to run start from its
            # checkpoint: run it again (its summary is rewritten, so the arms pair with this SFT)
            print(f"[{i}] summarised already, but lines {rerun[i]} start from its SFT checkpoint, which is not "
                  f"on this machine ({run_dir}): running it again", flush=True)
            state = "todo"
        extra = {"file": str(args.sweep), "line": i, "overrides": overrides}
        if args.list:
            print(f"{i:3d}  {state:4s}  {run_dir}  {' '.join(overrides)}")
            continue
        if state == "done":
            print(f"[{i}] done already: {summary or run_dir}", flush=True)
            if args.commit and not args.dry_run and uncommitted(summary):  # written by a sweep that stopped
                commit_file(summary, commit_message(read_json(summary)))
            continue
        if state == "ran":
            print(f"[{i}] finished already, writing its summary: {run_dir}", flush=True)
            if not args.dry_run and not record_summary(run_dir, args.summaries, summary.name, extra, args.commit):
                failed.append(i)
            continue
        cmd = launch_command(overrides, args.python, args.torchrun)
        print(f"[{i}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        if args.dry_run:
            continue
        version = code_version() if summary is not None else None
        t0 = time.time()
        rc = call_forwarding_signals(cmd, env, received)
        seconds = time.time() - t0
        print(f"[{i}] exit {rc} after {seconds:.0f} s: {run_dir}", flush=True)
        if rc != 0:
            failed.append(i)
        elif summary is not None:
            if not (run_dir / "results.json").exists():
                print(f"sweep: error: [{i}] exited 0 without {run_dir / 'results.json'}: no summary",
                      file=sys.stderr, flush=True)
                failed.append(i)
            elif not record_summary(run_dir, args.summaries, summary.name, {**extra, "seconds": round(seconds, 1)},
                                    args.commit, version):
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
