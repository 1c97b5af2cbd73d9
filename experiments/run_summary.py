#!/usr/bin/env python
"""A finished run's small summary: the numbers the ablation report needs, in one JSON file.

    python experiments/run_summary.py outputs/ablation_mini/scienceworld/implicit_s0          # print it
    python experiments/run_summary.py RUN_DIR --out results/ablation_mini                     # write it there

A run directory holds checkpoints, contrast data and every episode's actions: far too much to
keep in git, and gone when the machine is. The summary (a few kB) is what survives: written by
``experiments/sweep.py --summaries DIR`` as each run finishes (and committed with ``--commit``),
it lets a later session on a fresh machine skip the runs already done and build the report
(``experiments/report.py DIR``) without the run directories. It keeps the per-episode rewards of
the final policy, in episode order, because the report's intervals pair arms on the same
episodes (same seed, same episode ids, same order).

Where each piece comes from (stepagent/pipeline.py, stepagent/algos/cycle.py):
  config.resolved.yaml          arm, variant, seed, task, experiment, eval.split, reward, cycles, task.score,
                                the settings a grid varies (GRID_KEYS)
  .hydra/overrides.yaml         the command-line overrides (Hydra writes it)
  results.json                  "summaries": every stage on eval.split; "final": the final policy on
                                each split; "protocol": the score rule; "cycles": the cycle rows
  eval_<tag>.json               per-episode rows of an evaluation (tag: eval_sft, eval_cycle_2, ...;
                                eval_final_<split> for the final policy on the other splits)
  metrics.jsonl                 the cycle-0 rows (the SFT policy's held-out agreement and evaluation)
                                and the logging times (wall time)
  cycles/cycle_<n>/metrics.json the cycle rows, when results.json has none (an older run)
  wandb/run-*/files/wandb-metadata.json   the git commit W&B recorded, if any
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for stepagent without an install
from stepagent.eval.protocol import score_rule  # noqa: E402

KIND = "stepagent/run-summary"
SCHEMA = 1


# The settings a settings grid (experiments/sweeps/*_grid.txt, ``variant=...``) varies: kept in the
# summary's ``config`` (those the run's config has), the columns of the report's grid table.
GRID_KEYS = ("reward.beta", "reward.lr", "reward.nll_weight", "ppo.lr", "reward.disc_lr", "reward.disc_epochs",
             "reward.disc_backbone", "algo.lr", "algo.beta")


# ----------------------------------------------------------------------------- config
def arm_of(cfg: Mapping[str, Any]) -> str:
    """The ablation arm: ``arm`` when set, otherwise derived from algo and reward (a run from
    before conf/arm existed)."""
    if cfg.get("arm"):
        return str(cfg["arm"])
    algo = (cfg.get("algo") or {}).get("name", "stepagent")
    reward = (cfg.get("reward") or {}).get("name", "none")
    if algo == "stepagent":
        return "sft" if reward == "none" else str(reward)
    return str(algo)


def variant_of(cfg: Mapping[str, Any]) -> Optional[str]:
    """The settings-grid label (root key ``variant``), None when unset or absent (a run from before
    the key existed)."""
    v = cfg.get("variant")
    return None if v is None or str(v) == "" else str(v)


def identity(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What names a run: task, eval split, arm, variant, seed (and the experiment). Works on a plain
    dict and on a composed (unresolved) Hydra config alike, reading only these keys."""
    return {"experiment": cfg.get("experiment"), "task": str((cfg.get("task") or {}).get("name")),
            "split": str((cfg.get("eval") or {}).get("split", "dev")), "arm": arm_of(cfg),
            "variant": variant_of(cfg), "seed": int(cfg.get("seed", 0))}


def summary_name(summary: Mapping[str, Any]) -> str:
    """The summary's file name, e.g. ``scienceworld_dev_implicit_s0.json``, or with a variant (one
    point of a settings grid) ``scienceworld_dev_implicit-b0.5_lr3e-5_s0.json``. The eval split is part
    of it: a sweep may run the same arm and seed once per split (experiments/experiment/ablation_paper.yaml).
    A summary without a variant (null, or one from before the key) keeps the name it always had."""
    arm = str(summary["arm"])
    variant = summary.get("variant")
    if variant is not None:
        arm += "-" + str(variant).replace("/", "_").replace(" ", "_")
    return f"{summary['task']}_{summary['split']}_{arm}_s{summary['seed']}.json"


def config_bits(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The config values an ablation row depends on (the full config stays in the run directory)."""
    def get(path: str) -> Any:
        node: Any = cfg
        for k in path.split("."):
            node = node.get(k) if isinstance(node, Mapping) else None
        return node

    keys = ("arm", "variant", "seed", "cycles", "algo.name", "reward.name", "policy.name", "task.score",
            "eval.split", "eval.final_splits", "eval.max_episodes", "eval.temperature", "inspection.trajectories",
            "inspection.samples_per_state", "sft.init_from", "resume") + GRID_KEYS
    return {k: get(k) for k in keys if get(k) is not None}


# ----------------------------------------------------------------------------- files
def read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.exists() else None


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_tag(label: str) -> str:
    """The evaluation file tag of a results label (cycle 2 -> eval_cycle_2): pipeline.eval_label reversed."""
    return {"init": "eval_init", "sft": "eval_sft", "policy": "eval"}.get(label) or "eval_" + label.replace(" ", "_")


def episode_rows(run_dir: Path, tag: str) -> Optional[List[Dict[str, Any]]]:
    """The per-episode rows of evaluation ``tag``, reduced to what pairing needs (id, reward, won),
    in the order they were played; None when the file is missing."""
    data = read_json(run_dir / f"{tag}.json")
    if data is None:
        return None
    return [{"id": str(e["id"]), "reward": float(e["reward"]), "won": bool(e["won"])} for e in data["episodes"]]


def overall(summary: Mapping[str, Any]) -> Dict[str, Any]:
    o = summary["overall"]
    return {"reward_x100": o["reward_x100"], "success_rate": o["success_rate"], "episodes": o.get("episodes")}


# ----------------------------------------------------------------------------- metrics rows
def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int)) or (isinstance(v, float) and math.isfinite(v))


def slim_row(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A cycle row without what makes it large: scalars and the ``*_by_step`` curves stay; logging
    fields (``_time``, ``_step``) and anything else go. NaN/inf become None (strict JSON)."""
    out = {}
    for k, v in row.items():
        if k.startswith("_"):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        elif _scalar(v):
            out[k] = v
        elif k.endswith("_by_step") and isinstance(v, list):
            out[k] = [x if _scalar(x) else None for x in v]
    return out


def cycle_rows(run_dir: Path, results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The per-cycle rows (cycle 1..n): results.json's, else cycles/cycle_<n>/metrics.json."""
    rows = list(results.get("cycles") or [])
    if not rows:
        files = sorted((run_dir / "cycles").glob("cycle_*/metrics.json"), key=lambda p: int(p.parent.name[6:]))
        rows = [json.loads(p.read_text()) for p in files]
    return [slim_row(r) for r in sorted(rows, key=lambda r: r.get("cycle", 0))]


def start_row(metrics: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The cycle-0 rows merged: the SFT policy's evaluation and held-out agreement, where the cycles start."""
    row: Dict[str, Any] = {}
    for r in metrics:
        if r.get("cycle") == 0:
            row.update(r)
    return slim_row(row)


def wall_seconds(metrics: List[Dict[str, Any]]) -> Optional[float]:
    """Seconds from the first to the last logged row of metrics.jsonl. A resumed run: including the
    time it was stopped; a run with ``sft.init_from``: from the start of the SFT run whose rows it copied."""
    times = [r["_time"] for r in metrics if isinstance(r.get("_time"), (int, float))]
    return round(max(times) - min(times), 1) if len(times) > 1 else None


def git_of(run_dir: Path, cfg: Mapping[str, Any],
           given: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The code version: a ``git_commit`` config key, else W&B's record of the run, else ``given``
    (experiments/sweep.py passes HEAD as it was when the run started). Never ``git rev-parse``
    here: HEAD when summarizing is not necessarily the code that ran."""
    git = cfg.get("git")
    commit = cfg.get("git_commit") or (git.get("commit") if isinstance(git, Mapping) else None)
    if commit:
        return {"commit": str(commit), "source": "config"}
    for meta in sorted(run_dir.glob("wandb/*run-*/files/wandb-metadata.json"), key=lambda p: p.stat().st_mtime,
                       reverse=True):
        recorded = (read_json(meta) or {}).get("git") or {}
        if recorded.get("commit"):
            return {"commit": recorded["commit"], "source": "wandb"}
    return dict(given) if given else None


# ----------------------------------------------------------------------------- the summary
def finals_of(run_dir: Path, results: Mapping[str, Any], split: str, final_label: str) -> Dict[str, Any]:
    """The final policy on every split it was evaluated on: overall numbers and per-episode rows."""
    final = results.get("final") or {}
    splits = final.get("splits") or {split: results["summaries"][final_label]}  # a run from before final_splits
    out = {}
    for sp, summary in splits.items():
        tag = eval_tag(final_label) if sp == split else f"eval_final_{sp}"
        out[sp] = {"overall": overall(summary), "episodes": episode_rows(run_dir, tag)}
    return out


def summarize_run(run_dir: Path, git: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The summary of a finished run (``results.json`` present); ``git``: the commit to record when
    neither the config nor W&B has one (see ``git_of``)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        raise FileNotFoundError(f"{run_dir}: no results.json (the run has not finished)")
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.resolved.yaml"), resolve=False)
    results = json.loads((run_dir / "results.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    ident = identity(cfg)
    protocol = results.get("protocol") or {}
    rule = protocol["score"] if "score" in protocol else score_rule(ident["task"], cfg.get("task"), legacy=True)
    labels = list(results["summaries"])
    final_label = (results.get("final") or {}).get("policy") or labels[-1]
    cycles = cycle_rows(run_dir, results)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    return {
        "kind": KIND,
        "schema": SCHEMA,
        **ident,
        "score": rule,
        "config": config_bits(cfg),
        "overrides": list(OmegaConf.load(overrides)) if overrides.exists() else None,
        "git": git_of(run_dir, cfg, git),
        "wall_s": wall_seconds(metrics),
        "run_dir": str(run_dir),
        "final_policy": final_label,
        "stages": {label: overall(results["summaries"][label]) for label in labels},
        "finals": finals_of(run_dir, results, ident["split"], final_label),
        "start": start_row(metrics),
        "cycles_run": len(cycles),  # 0 for SFT alone (config.cycles is the experiment's, unused by it)
        "cycles": cycles,
    }


def is_summary(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND


def write_summary(summary: Mapping[str, Any], out_dir: Path) -> Path:
    """``out_dir/summary_name(summary)``, written whole (a temporary file, then a rename): a stopped
    sweep never leaves half a summary that a later one would take for a finished run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / summary_name(summary)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write DIR/<summary name> instead of printing")
    args = ap.parse_args(argv)
    for d in args.run_dirs:
        s = summarize_run(d)
        if args.out:
            print(write_summary(s, args.out))
        else:
            print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
