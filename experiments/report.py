#!/usr/bin/env python
"""Paper-style ablation report: Markdown + CSV tables with paired bootstrap intervals, and PNG plots.

    python experiments/report.py results/ablation_mini                   # summaries -> results/ablation_mini/report/
    python experiments/report.py outputs/ablation_mini --out docs/ablation_mini   # run directories
    python experiments/report.py --wandb ENTITY/stepagent --group ablation_mini --out report/   # online

Inputs: directories (searched recursively) holding run summaries (experiments/run_summary.py:
``experiments/sweep.py --summaries DIR`` writes one as each run finishes, and commits it with
``--commit``) and/or run directories (``results.json`` + ``config.resolved.yaml``, summarized
here the same way); unfinished runs are listed and skipped. The summaries are enough: the
report needs no run directory, so it can be rebuilt on any machine from the committed files.

Every arm of an ablation plays the same evaluation episodes with the same seeds, so arms are
compared per (seed, episode): d = score(arm) - score(baseline), with a 95% interval from a
hierarchical bootstrap (stepagent/eval/stats.py: seeds resampled, then episodes within each
seed). A pair whose episode ids differ (another split, another max_episodes, another order)
is not compared: the report says which and leaves it out.

Outputs in ``--out``:
  table.md / table.csv      per (task, split) column and arm, for the final policy: reward x100 and success %
                            with 95% intervals, the paired difference in reward x100 from SFT and from the
                            outcome arm ("+2.1 [-0.4, +4.6]", * when the interval excludes 0), episodes per
                            seed and seeds. ScienceWorld's dev and test are "seen" and "unseen" (ETO's names).
                            table.md: the paper's table (arm × column) then the details per column; table.csv:
                            one row per (column, arm) with the numbers as numbers
  stages.md / stages.csv    arm × stage (init, SFT, cycle k) on eval.split: mean ± std over seeds, per (task, split)
  runs.csv                  one row per (run, split, stage): the raw numbers behind the tables
Every Markdown table carries a caption: the metric, the episodes per seed, the seeds, the score rule
(``task.score``; a ScienceWorld run from before the key existed was scored by the final score), the
bootstrap and which split each column is.
  paired_differences.png    forest plot: per arm the mean paired difference from SFT and from outcome, 95% whiskers
  eval_reward_by_cycle.png  evaluation reward per cycle per arm (mean ± std band)
  step_reward_curves.png    mean step reward by step index, expert vs agent actions, per arm and cycle
  disc_accuracy.png         discriminator accuracy by cycle (inverse arm): held-out, fresh, train; per seed and mean
  agreement.png             held-out agreement rate with the expert per cycle per arm (cycle 0: the SFT policy)
With a settings grid (runs with config ``variant``: one arm at several settings, experiments/sweeps/*_grid.txt),
every table row and plot line is an (arm, variant): "StepAgent-implicit [b0.5_lr3e-5]" (variant null or base:
the arm's default settings, no suffix). Δ vs SFT pairs with the sft run of the same seed (whatever its
variant), Δ vs outcome with the outcome run at its default settings. Then also (or with ``--grid``):
  grid.md / grid.csv        per (task, eval.split): one row per (arm, variant) with the settings the grid varies
                            (reward.beta, reward.lr, ppo.lr, ...: the summary's config), reward x100 and success %
                            with 95% intervals, Δ vs SFT with its interval, and every stage's reward x100
  grid.png                  per arm, the mean Δ vs SFT with its 95% interval, one bar per variant
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for stepagent without an install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/: run_summary
from run_summary import GRID_KEYS, arm_of, config_bits, is_summary, summarize_run, variant_of  # noqa: E402
from stepagent.eval.protocol import score_caption, score_rule, split_name  # noqa: E402
from stepagent.eval.stats import Interval, hierarchical_bootstrap, paired_differences  # noqa: E402

# Arms in the paper's row order, with their table labels.
ARMS: List[Tuple[str, str]] = [
    ("sft", "SFT"),
    ("loop", "LOOP"),
    ("eto", "ETO"),
    ("outcome", "StepAgent w/o step reward (outcome)"),
    ("implicit", "StepAgent-implicit"),
    ("inverse", "StepAgent-inverse"),
]
ARM_LABEL = dict(ARMS)
SPLIT_ORDER = {"train": 0, "dev": 1, "test": 2}
BASELINES = ("sft", "outcome")  # the paired differences of every arm are from these
N_BOOT = 10000


@dataclass
class Run:
    """What the report needs from one finished run."""

    path: str
    arm: str
    seed: int
    task: str
    split: str  # eval.split: every stage's evaluation
    stages: Dict[str, Dict[str, float]]  # stage -> {"reward_x100", "success_rate", "episodes"?}
    cycles: List[Dict[str, Any]] = field(default_factory=list)  # per-cycle metric rows
    start: Dict[str, Any] = field(default_factory=dict)  # the cycle-0 row (after SFT), if logged
    # the final policy on each split (eval.final_splits; eval.split's is its last stage)
    finals: Dict[str, Dict[str, float]] = field(default_factory=dict)
    score: Optional[str] = None  # task.score (ScienceWorld: max | final)
    # the final policy's episodes per split, in the order played: [{"id", "reward", "won"}]; None: not kept
    episodes: Dict[str, Optional[List[Dict[str, Any]]]] = field(default_factory=dict)
    variant: Optional[str] = None  # the settings-grid label (config ``variant``); None: none
    config: Dict[str, Any] = field(default_factory=dict)  # the summary's config bits (run_summary.config_bits)

    def __post_init__(self) -> None:
        if not self.finals and self.stages:
            self.finals = {self.split: self.final}

    @property
    def column(self) -> str:
        return column_name(self.task, self.split)

    @property
    def group(self) -> "Group":
        """The report's row: (arm, variant), variant None for null and "base"."""
        return (self.arm, norm_variant(self.variant))

    @property
    def final_stage(self) -> str:
        return ordered_stages(self.stages)[-1]

    @property
    def final(self) -> Dict[str, float]:
        return self.stages[ordered_stages(self.stages)[-1]]


Group = Tuple[str, Optional[str]]  # a row of the tables: (arm, variant); variant None: null or "base"
BASE_VARIANTS = (None, "", "base")  # the arm at its default settings (SFT's variant in a grid sweep: base)


def norm_variant(variant: Optional[str]) -> Optional[str]:
    return None if variant in BASE_VARIANTS else str(variant)


def group_label(group: Group) -> str:
    """"StepAgent-implicit [b0.5_lr3e-5]"; the arm's label alone for its default settings."""
    arm, variant = group
    return ARM_LABEL.get(arm, arm) + (f" [{variant}]" if variant is not None else "")


def column_name(task: str, split: str) -> str:
    """"scienceworld (seen)": ETO's names for ScienceWorld's dev/test, else the split."""
    return f"{task} ({split_name(task, split)})"


def stage_key(stage: str) -> Tuple[int, int]:
    if stage == "init":
        return (0, 0)
    if stage in ("sft", "policy"):
        return (1, 0)
    if stage.startswith("cycle "):
        return (2, int(stage.split()[1]))
    return (3, 0)


def ordered_stages(stages) -> List[str]:
    return sorted(stages, key=stage_key)


def run_from_summary(s: Dict[str, Any], path: str) -> Run:
    """A Run from a run summary (experiments/run_summary.py)."""
    finals = {sp: f["overall"] for sp, f in s["finals"].items()}
    episodes = {sp: f.get("episodes") for sp, f in s["finals"].items()}
    return Run(path, s["arm"], int(s["seed"]), s["task"], s["split"], dict(s["stages"]), list(s.get("cycles") or []),
               dict(s.get("start") or {}), finals, s.get("score"), episodes, s.get("variant"),
               dict(s.get("config") or {}))


def load_run(run_dir: Path) -> Run:
    return run_from_summary(summarize_run(run_dir), str(run_dir))


def load_summary(path: Path) -> Optional[Run]:
    """The run of a summary file; None for any other JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return run_from_summary(data, str(path)) if is_summary(data) else None


def find_runs(roots: Sequence[Path]) -> Tuple[List[Run], List[Path]]:
    """The finished runs under ``roots``: run summaries and run directories (summarized here),
    and the run directories without results.json yet. JSON files inside run directories (their
    evaluations, cycle metrics) are not read."""
    runs, unfinished = [], []
    for root in map(Path, roots):
        if root.is_file():
            run = load_summary(root)
            if run is None:
                raise SystemExit(f"{root}: not a run summary")
            runs.append(run)
            continue
        run_dirs = sorted(p.parent for p in root.rglob("config.resolved.yaml"))
        for d in run_dirs:
            if (d / "results.json").exists():
                runs.append(load_run(d))
            else:
                unfinished.append(d)
        for p in sorted(root.rglob("*.json")):
            if not any(d == p.parent or d in p.parents for d in run_dirs):
                run = load_summary(p)
                if run is not None:
                    runs.append(run)
    return runs, unfinished


def load_wandb_runs(path: str, group: Optional[str]) -> List[Run]:
    """Runs of a W&B project (``entity/project``), optionally one group, via the public API."""
    import wandb

    api = wandb.Api()
    out = []
    for r in api.runs(path, filters={"group": group} if group else None):
        if r.state != "finished":
            continue
        cfg = dict(r.config)
        hist = [row for row in r.scan_history() if row.get("cycle") is not None]
        stages = {}
        for tag, stage in (("eval_init", "init"), ("eval_sft", "sft"), ("eval", "policy")):
            if f"{tag}/reward_x100" in r.summary:
                stages[stage] = {"reward_x100": r.summary[f"{tag}/reward_x100"],
                                 "success_rate": r.summary.get(f"{tag}/success_rate", float("nan"))}
        cycles = [row for row in hist if row["cycle"] >= 1 and "eval/reward_x100" in row]
        for row in cycles:
            stages[f"cycle {int(row['cycle'])}"] = {"reward_x100": row["eval/reward_x100"],
                                                   "success_rate": row.get("eval/success_rate", float("nan"))}
        if stages:
            split = cfg.get("eval", {}).get("split", "dev")
            finals = {split: stages[ordered_stages(stages)[-1]]}
            for sp in ("train", "dev", "test"):  # the final policy on the other splits (eval.final_splits)
                if f"eval_final_{sp}/reward_x100" in r.summary:
                    finals[sp] = {"reward_x100": r.summary[f"eval_final_{sp}/reward_x100"],
                                  "success_rate": r.summary.get(f"eval_final_{sp}/success_rate", float("nan"))}
            finals = dict(sorted(finals.items(), key=lambda kv: SPLIT_ORDER.get(kv[0], 9)))
            out.append(Run(r.url, arm_of(cfg), int(cfg.get("seed", 0)), cfg["task"]["name"], split, stages, cycles,
                           finals=finals, score=score_rule(cfg["task"]["name"], cfg.get("task"), legacy=True),
                           variant=variant_of(cfg), config=config_bits(cfg)))
    return out


# ----------------------------------------------------------------------------- paired intervals
Key = Tuple[str, str, Optional[str]]  # (task, split, score rule)


def final_columns(runs: Sequence[Run]) -> Dict[Key, str]:
    """The final table's columns, (task, split, score rule) -> label, in task then split order. A task
    whose runs were scored by different rules gets one column per rule: their numbers differ."""
    keys = sorted({(r.task, sp, r.score) for r in runs for sp in r.finals},
                  key=lambda k: (k[0], SPLIT_ORDER.get(k[1], 9), k[1], str(k[2])))
    rules: Dict[str, set] = {}
    for task, _, rule in keys:
        rules.setdefault(task, set()).add(rule)
    return {k: column_name(k[0], k[1]) + (f", score {k[2]}" if len(rules[k[0]]) > 1 else "") for k in keys}


def column_runs(runs: Sequence[Run], key: Key, group: Group, notes: List[str]) -> Dict[int, Run]:
    """seed -> the run of ``group`` (arm, variant) in column ``key``; a second run of the same seed is
    left out (noted)."""
    task, split, rule = key
    out: Dict[int, Run] = {}
    for r in runs:
        if r.group == group and (r.task, r.score) == (task, rule) and split in r.finals:
            if r.seed in out:
                name = group[0] + (f" [{group[1]}]" if group[1] is not None else "")
                notes.append(f"{column_name(task, split)}: {name} seed {r.seed} twice; kept {out[r.seed].path}, "
                             f"left out {r.path}")
                continue
            out[r.seed] = r
    return out


def has_episodes(runs: Dict[int, Run], split: str) -> bool:
    return all(r.episodes.get(split) for r in runs.values())


def seed_values(runs: Dict[int, Run], split: str, field_: str = "reward") -> Dict[int, List[float]]:
    """seed -> the values the bootstrap resamples, ×100: every episode's reward (or won) when all
    runs kept their episodes; otherwise one value per seed, its overall number (a run from before
    the summaries kept episodes, or from W&B)."""
    if has_episodes(runs, split):
        return {s: [100.0 * float(e[field_]) for e in r.episodes[split]] for s, r in sorted(runs.items())}
    overall = {"reward": "reward_x100", "won": "success_rate"}[field_]
    scale = 1.0 if field_ == "reward" else 100.0
    return {s: [scale * float(r.finals[split][overall])] for s, r in sorted(runs.items())}


def check_same_episodes(a: Sequence[Dict[str, Any]], b: Sequence[Dict[str, Any]]) -> None:
    """A paired comparison needs the same episodes in the same order; ValueError says where they differ."""
    ids_a, ids_b = [str(e["id"]) for e in a], [str(e["id"]) for e in b]
    if ids_a == ids_b:
        return
    if len(ids_a) != len(ids_b):
        raise ValueError(f"{len(ids_a)} vs {len(ids_b)} episodes")
    i = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    raise ValueError(f"episode {i} is {ids_a[i]!r} vs {ids_b[i]!r}")


def paired_values(arm: Dict[int, Run], base: Dict[int, Run], split: str, what: str
                  ) -> Tuple[Dict[int, List[float]], Dict[int, List[float]], List[str]]:
    """The reward ×100 values of the seeds ``arm`` and ``base`` can be compared on (both ran the seed,
    on the same episodes), and a note for each seed left out. ``what``: "implicit vs SFT", for the notes."""
    notes = []
    common = sorted(set(arm) & set(base))
    for s in sorted(set(arm) ^ set(base)):
        notes.append(f"{what}, seed {s}: run by one of the two arms only; left out")
    per_episode = has_episodes({s: arm[s] for s in common}, split) and has_episodes({s: base[s] for s in common}, split)
    keep = []
    for s in common:
        if per_episode:
            try:
                check_same_episodes(arm[s].episodes[split], base[s].episodes[split])
            except ValueError as e:
                notes.append(f"{what}, seed {s}: not the same episodes ({e}); left out")
                continue
        keep.append(s)
    a, b = {s: arm[s] for s in keep}, {s: base[s] for s in keep}
    return seed_values(a, split), seed_values(b, split), notes


def paired_interval(arm: Dict[int, Run], base: Dict[int, Run], split: str, what: str, n_boot: int = N_BOOT
                    ) -> Tuple[Optional[Interval], List[str]]:
    """The mean paired difference arm - base in reward ×100 and its hierarchical bootstrap interval;
    None (with the reason in the notes) when no seed can be paired."""
    a, b, notes = paired_values(arm, base, split, what)
    if not a:
        return None, notes + [f"{what}: no seed with the same episodes; no paired difference"]
    return hierarchical_bootstrap(paired_differences(a, b), n_boot=n_boot), notes


def excludes_zero(iv: Optional[Interval]) -> bool:
    return iv is not None and (iv.lo > 0 or iv.hi < 0)


@dataclass
class Cell:
    """One arm in one column of the final table."""

    key: Key
    column: str
    arm: str
    seeds: List[int]
    episodes: str  # per seed, "20" or "20–21"
    per_episode: bool  # False: the intervals resample seed means only (no per-episode rows kept)
    reward: Interval
    success: Interval
    diffs: Dict[str, Optional[Interval]]  # baseline arm -> paired difference in reward ×100 (None: not paired)
    variant: Optional[str] = None  # None: the arm's default settings (variant null or base)

    @property
    def group(self) -> Group:
        return (self.arm, self.variant)


def baseline_runs(by_group: Dict[Group, Dict[int, Run]], base: str) -> Dict[int, Run]:
    """seed -> the baseline run of arm ``base``: for SFT the sft run of the seed, whatever its variant
    (the default settings' first); for another arm (outcome) its run at the default settings."""
    if base != "sft":
        return by_group.get((base, None)) or {}
    out: Dict[int, Run] = {}
    for group, sel in by_group.items():  # group order: the default settings first
        if group[0] == "sft":
            for seed, run in sel.items():
                out.setdefault(seed, run)
    return out


def _episode_counts(runs: Dict[int, Run], split: str) -> str:
    return _episodes([r.finals[split].get("episodes") for r in runs.values()])


def final_cells(runs: Sequence[Run], n_boot: int = N_BOOT) -> Tuple[List[Cell], List[str]]:
    """Every (column, arm) of the final table with its intervals, and the notes on what was left out."""
    cells, notes = [], []
    for key, col in final_columns(runs).items():
        split = key[1]
        by_group = {g: column_runs(runs, key, g, notes) for g in group_order(runs)}
        by_group = {g: sel for g, sel in by_group.items() if sel}
        bases = {base: baseline_runs(by_group, base) for base in BASELINES}
        for group, sel in by_group.items():
            arm, variant = group
            diffs: Dict[str, Optional[Interval]] = {}
            for base in BASELINES:
                # SFT is every arm's baseline, compared with none; a baseline is not compared with itself
                if arm == "sft" or group == (base, None) or not bases[base]:
                    continue
                what = f"{col}: {group_label(group)} vs {ARM_LABEL.get(base, base)}"
                diffs[base], why = paired_interval(sel, bases[base], split, what, n_boot)
                notes += why
            cells.append(Cell(key, col, arm, sorted(sel), _episode_counts(sel, split), has_episodes(sel, split),
                              hierarchical_bootstrap(seed_values(sel, split, "reward"), n_boot=n_boot),
                              hierarchical_bootstrap(seed_values(sel, split, "won"), n_boot=n_boot), diffs, variant))
    return cells, notes


# ----------------------------------------------------------------------------- tables
def mean_std(xs: Sequence[float]) -> Tuple[float, float, int]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(m: float, s: float, n: int) -> str:
    if n == 0:
        return "–"
    return f"{m:.1f} ± {s:.1f}" if n > 1 else f"{m:.1f}"


def arm_color(arm: str):
    """One colour per arm in every plot."""
    import matplotlib.pyplot as plt

    names = [a for a, _ in ARMS]
    i = names.index(arm) if arm in names else len(names) + sum(map(ord, arm)) % 4
    return plt.get_cmap("tab10")(i)


def arm_order(runs: Sequence[Run]) -> List[str]:
    present = {r.arm for r in runs}
    return [a for a, _ in ARMS if a in present] + sorted(present - set(ARM_LABEL))


def group_order(runs: Sequence[Run]) -> List[Group]:
    """The rows: arms in the paper's order; within an arm its default settings first, then its variants sorted."""
    present = {r.group for r in runs}
    return [g for arm in arm_order(runs)
            for g in sorted((g for g in present if g[0] == arm), key=lambda g: (g[1] is not None, g[1] or ""))]


def group_styles(groups: Sequence[Group]) -> Dict[Group, Dict[str, Any]]:
    """Plot styles: the arm's colour; the variants of an arm told apart by line style and marker."""
    lines, markers = ["-", "--", "-.", ":"], ["o", "s", "^", "D", "v", "P"]
    out, seen = {}, {}
    for g in groups:
        i = seen[g[0]] = seen.get(g[0], -1) + 1
        out[g] = {"color": arm_color(g[0]), "ls": lines[i % len(lines)], "marker": markers[i % len(markers)]}
    return out


def _episodes(values: Sequence[Any]) -> str:
    ns = sorted({int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return "?" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def stage_columns(runs: Sequence[Run]) -> Dict[str, List[Run]]:
    """The runs of each per-stage table or plot panel: one per (task, eval.split), and per score rule
    where a task's runs were scored by different rules."""
    rules: Dict[str, set] = {}
    for r in runs:
        rules.setdefault(r.task, set()).add(r.score)
    out: Dict[str, List[Run]] = {}
    for r in sorted(runs, key=lambda r: (r.task, SPLIT_ORDER.get(r.split, 9), r.split, str(r.score))):
        label = r.column + (f", score {r.score}" if len(rules[r.task]) > 1 else "")
        out.setdefault(label, []).append(r)
    return out


def stage_table(sel: Sequence[Run]) -> Tuple[List[str], List[List[str]]]:
    """Rows: (arm, variant); columns: stage; the runs ``sel`` of one ``stage_columns`` entry."""
    stages = sorted({s for r in sel for s in r.stages}, key=stage_key)
    header = ["method"] + stages
    rows = []
    for group in group_order(sel):
        cells = [fmt(*mean_std([r.stages[s]["reward_x100"] for r in sel if r.group == group and s in r.stages]))
                 for s in stages]
        rows.append([group_label(group)] + cells)
    return header, rows


def markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: List[str], rows: List[List[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def fmt_level(iv: Interval) -> str:
    """"31.2 [28.0, 34.1]": a mean and its 95% interval."""
    return f"{iv.mean:.1f} [{iv.lo:.1f}, {iv.hi:.1f}]"


def fmt_diff(iv: Optional[Interval]) -> str:
    """"+2.1 [-0.4, +4.6]", with " *" when the interval excludes 0; "unpaired" when there is none."""
    if iv is None:
        return "unpaired"
    return str(iv) + (" *" if excludes_zero(iv) else "")


def cell_label(cell: Cell) -> str:
    return group_label(cell.group) + ("" if cell.per_episode else " †")


def final_caption(runs: Sequence[Run], cells: Sequence[Cell], n_boot: int) -> str:
    """What the numbers are: metric, episodes per seed, seeds, score rule(s), bootstrap, which split is which."""
    columns = final_columns(runs)
    episodes = {col: _episodes([r.finals[k[1]].get("episodes") for r in runs
                                if (r.task, r.score) == (k[0], k[2]) and k[1] in r.finals])
                for k, col in columns.items()}
    seeds = sorted({s for c in cells for s in c.seeds})
    lines = ["The final policy of each run. reward x100: the mean episode reward ×100 over all seeds × episodes; "
             "success %: the share of episodes solved (reward 1).",
             f"95% intervals [lo, hi]: hierarchical percentile bootstrap ({n_boot} resamples): the seeds resampled "
             "with replacement, then the episodes within each drawn seed.",
             "Δ vs SFT, Δ vs outcome: the paired difference in reward x100 from that arm, "
             "d = arm − baseline on the same seed and the same episode (same ids, same order), mean over all d "
             "with the same bootstrap; * the interval excludes 0.",
             *(["[variant]: a point of a settings grid (config `variant`); no suffix: the arm's default settings. "
                "The baselines: the SFT run of the same seed, the outcome run at its default settings."]
               if any(c.variant is not None for c in cells) else []),
             "Episodes per seed: " + ", ".join(f"{c} {n}" for c, n in episodes.items()) + ". "
             f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}).",
             "Columns: " + ", ".join(f"{col} = split {k[1]}" for k, col in columns.items()) + "."]
    rules = sorted({(r.task, r.score) for r in runs}, key=lambda k: (k[0], str(k[1])))
    lines += [f"{task}: {score_caption(task, rule)}." for task, rule in rules]
    if any(r.task == "scienceworld" for r in runs):
        lines.append("ScienceWorld's seen = dev, unseen = test (ETO's names).")
    if any(not c.per_episode for c in cells):
        lines.append("† some run kept no per-episode rewards: its intervals resample the seeds' means only.")
    return "\n".join(lines)


def main_table(cells: Sequence[Cell], runs: Sequence[Run]) -> Tuple[List[str], List[List[str]]]:
    """The paper's table: rows arm, columns (task, split); cells reward ×100 [95% interval]."""
    columns = list(final_columns(runs).values())
    header = ["method"] + columns + ["seeds"]
    rows = []
    for group in group_order(runs):
        mine = {c.column: c for c in cells if c.group == group}
        if not mine:
            continue
        row = [group_label(group)] + [fmt_level(mine[col].reward) if col in mine else "–" for col in columns]
        rows.append(row + [",".join(map(str, sorted({s for c in mine.values() for s in c.seeds})))])
    return header, rows


DETAIL_HEADER = ["method", "reward x100 [95%]", "success % [95%]", "Δ vs SFT [95%]", "Δ vs outcome [95%]",
                 "episodes/seed", "seeds"]


def detail_row(cell: Cell) -> List[str]:
    diff = ["–" if base not in cell.diffs else fmt_diff(cell.diffs[base]) for base in BASELINES]
    return [cell_label(cell), fmt_level(cell.reward), fmt_level(cell.success), *diff, cell.episodes,
            ",".join(map(str, cell.seeds))]


CSV_HEADER = ["column", "task", "split", "split_name", "score", "arm", "variant", "method", "seeds", "n_seeds",
              "episodes_per_seed", "per_episode", "reward_x100", "reward_lo", "reward_hi", "success_pct",
              "success_lo", "success_hi"] + [f"diff_{b}{s}" for b in BASELINES
                                             for s in ("", "_lo", "_hi", "_excludes_0")]


def csv_row(cell: Cell) -> List[Any]:
    task, split, rule = cell.key
    row: List[Any] = [cell.column, task, split, split_name(task, split), rule, cell.arm, cell.variant or "",
                      group_label(cell.group), ",".join(map(str, cell.seeds)), len(cell.seeds), cell.episodes,
                      cell.per_episode]
    for iv in (cell.reward, cell.success):
        row += [round(iv.mean, 3), round(iv.lo, 3), round(iv.hi, 3)]
    for base in BASELINES:
        iv = cell.diffs.get(base)
        row += ["", "", "", ""] if iv is None else [round(iv.mean, 3), round(iv.lo, 3), round(iv.hi, 3),
                                                    excludes_zero(iv)]
    return row


def final_markdown(cells: Sequence[Cell], runs: Sequence[Run], notes: Sequence[str], n_boot: int) -> str:
    parts = ["# The final policy: reward x100 with 95% intervals", final_caption(runs, cells, n_boot),
             markdown(*main_table(cells, runs))]
    for col in final_columns(runs).values():
        parts += [f"## {col}", markdown(DETAIL_HEADER, [detail_row(c) for c in cells if c.column == col])]
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def stage_caption(runs: Sequence[Run], episodes: Dict[str, str]) -> str:
    """Every stage's evaluation: the metric, the episodes per evaluation, the score rule(s)."""
    rules = sorted({(r.task, r.score) for r in runs}, key=lambda k: (k[0], str(k[1])))
    lines = ["Every stage: reward x100 (the mean episode reward ×100), mean ± std over seeds.",
             "Episodes per evaluation: " + ", ".join(f"{c} {n}" for c, n in episodes.items()) + "."]
    lines += [f"{task}: {score_caption(task, rule)}." for task, rule in rules]
    if any(r.task == "scienceworld" for r in runs):
        lines.append("ScienceWorld's seen = dev, unseen = test (ETO's names).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _curve_mean(curves: List[List[Optional[float]]]) -> List[float]:
    n = max((len(c) for c in curves), default=0)
    out = []
    for t in range(n):
        vals = [c[t] for c in curves if t < len(c) and c[t] is not None]
        out.append(statistics.mean(vals) if vals else float("nan"))
    return out


def save_figure(fig, path: Path) -> None:
    """Every plot ends the same way: tight layout, PNG at 90 dpi, the figure closed (Agg keeps them open)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_eval_by_cycle(runs: Sequence[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    columns = stage_columns(runs)
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 3.8), squeeze=False)
    for ax, (col, sel) in zip(axes[0], columns.items()):
        last = max(stage_key(s)[1] for r in sel for s in r.stages)
        styles = group_styles(group_order(sel))
        for group, gs in styles.items():
            ar = [r for r in sel if r.group == group]
            stages = [s for s in sorted({s for r in ar for s in r.stages}, key=stage_key) if s != "init"]
            xs = [0 if s in ("sft", "policy") else stage_key(s)[1] for s in stages]
            stats = [mean_std([r.stages[s]["reward_x100"] for r in ar if s in r.stages]) for s in stages]
            m = [x[0] for x in stats]
            sd = [x[1] for x in stats]
            if len(xs) == 1 and last > 0:  # SFT alone: a level to compare the cycles against
                xs, m, sd = [0, last], m * 2, sd * 2
                style = dict(ls="--", marker=None)
            else:
                style = dict(ls=gs["ls"], marker=gs["marker"])
            c = gs["color"]
            ax.plot(xs, m, color=c, label=group_label(group), **style)
            ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=c, alpha=0.10)
        ax.set_xticks(range(last + 1))
        ax.set_xlabel("cycle (0 = after SFT)")
        ax.set_ylabel("evaluation reward ×100")
        ax.set_title(col)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    save_figure(fig, path)


def plot_step_reward_curves(runs: Sequence[Run], path: Path) -> bool:
    import matplotlib.pyplot as plt

    groups = [g for g in group_order(runs)
              if any(c.get("step_reward/expert_by_step") for r in runs if r.group == g for c in r.cycles)]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        ar = [r for r in runs if r.group == group]
        n_cycles = max(len(r.cycles) for r in ar)
        cmap = plt.get_cmap("viridis")
        for k in range(n_cycles):
            rows = [r.cycles[k] for r in ar if k < len(r.cycles)]
            color = cmap(k / max(n_cycles - 1, 1))
            for key, style, who in (("step_reward/expert_by_step", "-", "expert"),
                                    ("step_reward/agent_by_step", "--", "agent")):
                m = _curve_mean([row.get(key) or [] for row in rows])
                ax.plot(range(len(m)), m, style, color=color, label=f"cycle {k + 1} {who}")
        ax.set_title(group_label(group))
        ax.set_xlabel("step index t")
        ax.set_ylabel("mean step reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)
    return True


def plot_cycle_metric(runs: Sequence[Run], keys: Sequence[Tuple[str, str]], path: Path, ylabel: str,
                      chance: Optional[float] = None) -> bool:
    """One line per (arm, variant, key) of a per-cycle scalar, mean ± std over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    drawn = False
    for group, gs in group_styles(group_order(runs)).items():
        ar = [r for r in runs if r.group == group]
        for key, label in keys:
            n = max(len(r.cycles) for r in ar)
            xs, m, sd = [], [], []
            mm, ss, cnt = mean_std([r.start[key] for r in ar if isinstance(r.start.get(key), (int, float))])
            if cnt:  # cycle 0: the SFT policy, where the cycles start from
                xs.append(0), m.append(mm), sd.append(ss)
            for k in range(n):
                vals = [r.cycles[k].get(key) for r in ar if k < len(r.cycles)]
                mm, ss, cnt = mean_std([v for v in vals if isinstance(v, (int, float))])
                if cnt:
                    xs.append(k + 1), m.append(mm), sd.append(ss)
            if xs:
                drawn = True
                ls = "-" if key == keys[0][0] else ":"
                ax.plot(xs, m, marker=gs["marker"], ls=ls, color=gs["color"],
                        label=f"{group_label(group)} {label}".strip())
                ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=gs["color"], alpha=0.10)
                ax.set_xticks(range(0 if xs[0] == 0 else 1, n + 1))
    if not drawn:
        plt.close(fig)
        return False
    if chance is not None:
        ax.axhline(chance, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("cycle (0 = after SFT)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def cycle_series(run: Run, key: str) -> List[Tuple[int, float]]:
    """(cycle, value) of a per-cycle scalar; cycle 0 (the SFT policy) from the start row when logged."""
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    pts = [(0, float(run.start[key]))] if num(run.start.get(key)) else []
    return pts + [(int(row.get("cycle", k + 1)), float(row[key])) for k, row in enumerate(run.cycles)
                  if num(row.get(key))]


def plot_paired_differences(cells: Sequence[Cell], path: Path) -> bool:
    """Forest plot, one panel per (task, split): per arm the mean paired difference in reward ×100 from
    SFT and from outcome with its 95% interval, and the zero line."""
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(c.column for c in cells))
    rows = {col: [c for c in cells if c.column == col and any(iv is not None for iv in c.diffs.values())]
            for col in columns}
    columns = [col for col in columns if rows[col]]
    if not columns:
        return False
    n = max(len(rows[col]) for col in columns)
    fig, axes = plt.subplots(1, len(columns), figsize=(6.5 * len(columns), 1.6 + 0.55 * n), squeeze=False)
    styles = {"sft": ("o", "tab:blue", +0.15), "outcome": ("s", "tab:orange", -0.15)}
    for ax, col in zip(axes[0], columns):
        labelled = set()
        for i, cell in enumerate(rows[col]):
            for base, iv in cell.diffs.items():
                if iv is None:
                    continue
                marker, color, dy = styles.get(base, ("^", "tab:gray", 0.0))
                ax.errorbar([iv.mean], [i - dy], xerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], fmt=marker,
                            color=color, capsize=3, ms=5,
                            label=None if base in labelled else f"vs {'SFT' if base == 'sft' else base}")
                labelled.add(base)
        ax.axvline(0.0, color="gray", lw=0.9)
        ax.set_yticks(range(len(rows[col])))
        ax.set_yticklabels([group_label(c.group) for c in rows[col]], fontsize=8)
        ax.set_ylim(len(rows[col]) - 0.5, -0.5)
        ax.set_xlabel("paired difference in reward ×100 (95% interval)")
        ax.set_title(col)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=2, frameon=False)
    save_figure(fig, path)
    return True


# The discriminator's accuracy (reward=inverse): on held-out expert/agent pairs, on the cycle's fresh
# agent actions before it trains on them, and on its training data.
DISC_KEYS = [("disc/acc_heldout", "held-out"), ("disc/acc_fresh", "fresh agent actions"), ("disc/acc_train", "train")]


def plot_disc_accuracy(runs: Sequence[Run], path: Path) -> bool:
    """Discriminator accuracy by cycle, one panel per arm that logs it: per key a thin line per seed
    and a thick mean; 0.5 is chance."""
    import matplotlib.pyplot as plt

    sel = [r for r in runs if any(cycle_series(r, k) for k, _ in DISC_KEYS)]
    if not sel:
        return False
    groups = group_order(sel)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.8), squeeze=False)
    for ax, group in zip(axes[0], groups):
        ar = sorted((r for r in sel if r.group == group), key=lambda r: r.seed)
        cycles: set = set()
        for j, (key, label) in enumerate(DISC_KEYS):
            series = {r.seed: cycle_series(r, key) for r in ar}
            series = {s: pts for s, pts in series.items() if pts}
            if not series:
                continue
            color = plt.get_cmap("tab10")(j)
            for pts in series.values():
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, alpha=0.35, lw=0.8)
            xs = sorted({x for pts in series.values() for x, _ in pts})
            mean = [statistics.mean(y for pts in series.values() for x2, y in pts if x2 == x) for x in xs]
            ax.plot(xs, mean, color=color, lw=2, marker="o", label=f"{label} (mean of {len(series)} seeds; thin: each)")
            cycles |= set(xs)
        ax.axhline(0.5, color="gray", lw=0.8, ls=":", label="chance")
        ax.set_xticks(sorted(cycles))
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("cycle")
        ax.set_ylabel("discriminator accuracy")
        ax.set_title(group_label(group))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- settings grid
def setting_label(key: str) -> str:
    """A grid key's column name: reward.beta -> beta, ppo.lr stays ppo.lr."""
    return key.split(".", 1)[1] if key.startswith("reward.") else key


def fmt_setting(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)


def group_settings(runs: Sequence[Run]) -> Dict[str, str]:
    """The grid settings (GRID_KEYS) of a group's runs, formatted; "a/b" when its seeds differ."""
    out = {}
    for key in GRID_KEYS:
        vals = list(dict.fromkeys(fmt_setting(r.config[key]) for r in runs if r.config.get(key) is not None))
        if vals:
            out[key] = "/".join(vals)
    return out


def varied_keys(settings: Dict[Group, Dict[str, str]]) -> Dict[str, set]:
    """arm -> the grid keys whose value differs between its (arm, variant) rows: the settings the grid varies."""
    out: Dict[str, set] = {}
    for arm in dict.fromkeys(g[0] for g in settings):
        rows = [v for g, v in settings.items() if g[0] == arm]
        out[arm] = {k for k in GRID_KEYS if len({r.get(k) for r in rows}) > 1}
    return out


def grid_tables(runs: Sequence[Run], cells: Sequence[Cell]) -> Tuple[str, List[str], List[List[Any]]]:
    """The sensitivity table of a settings grid, per (task, eval.split) column: one row per (arm, variant)
    with the settings the grid varies, the final policy's reward x100 and success % with 95% intervals,
    the paired difference from SFT, and every stage's reward x100 (mean ± std over seeds).
    Returns grid.md's text, grid.csv's header and rows."""
    parts = ["# Settings grid: the final policy per (arm, variant) on eval.split",
             "\n".join(["One row per arm and settings variant (config `variant`; the arm's default settings: "
                         "variant null or base, no suffix). Settings: the config values the grid varies within "
                         "the row's arm (blank: not varied for that arm; grid.csv has every one).",
                         "reward x100, success %: the final policy on eval.split, mean over seeds × episodes, "
                         "95% hierarchical bootstrap interval. Δ vs SFT: the paired difference in reward x100 "
                         "from the SFT run of the same seed, same episodes; * the interval excludes 0.",
                         "Stages: every stage's evaluation on eval.split, reward x100 mean ± std over seeds."])]
    present = [k for k in GRID_KEYS if any(r.config.get(k) is not None for r in runs)]
    columns = stage_columns(runs)
    all_stages = sorted({s for r in runs for s in r.stages}, key=stage_key)
    header = ["column", "task", "split", "score", "arm", "variant", "method", *present, "seeds", "n_seeds",
              "episodes_per_seed", "reward_x100", "reward_lo", "reward_hi", "success_pct", "success_lo", "success_hi",
              "diff_sft", "diff_sft_lo", "diff_sft_hi", "diff_sft_excludes_0"]
    header += [f"{s.replace(' ', '_')}{x}" for s in all_stages for x in ("", "_std")]
    csv_rows: List[List[Any]] = []
    for col, sel in columns.items():
        mine = {c.group: c for c in cells if c.column == col}
        groups = [g for g in group_order(sel) if g in mine]
        if not groups:
            continue
        settings = {g: group_settings([r for r in sel if r.group == g]) for g in groups}
        varied = varied_keys(settings)
        shown = [k for k in GRID_KEYS if any(k in v for v in varied.values())]
        stages = sorted({s for r in sel for s in r.stages}, key=stage_key)
        md_header = ["method", *map(setting_label, shown), "reward x100 [95%]", "success % [95%]", "Δ vs SFT [95%]",
                     *stages, "seeds"]
        md_rows = []
        for g in groups:
            cell, ar = mine[g], [r for r in sel if r.group == g]
            stage_stats = {s: mean_std([r.stages[s]["reward_x100"] for r in ar if s in r.stages]) for s in stages}
            diff = "–" if "sft" not in cell.diffs else fmt_diff(cell.diffs["sft"])
            md_rows.append([cell_label(cell)] + [settings[g].get(k, "") if k in varied[g[0]] else "" for k in shown]
                           + [fmt_level(cell.reward), fmt_level(cell.success), diff]
                           + [fmt(*stage_stats[s]) for s in stages] + [",".join(map(str, cell.seeds))])
            task, split, rule = cell.key
            row: List[Any] = [col, task, split, rule, g[0], g[1] or "", group_label(g)]
            row += [settings[g].get(k, "") for k in present]
            row += [",".join(map(str, cell.seeds)), len(cell.seeds), cell.episodes]
            for iv in (cell.reward, cell.success):
                row += [round(iv.mean, 3), round(iv.lo, 3), round(iv.hi, 3)]
            iv = cell.diffs.get("sft")
            row += ["", "", "", ""] if iv is None else [round(iv.mean, 3), round(iv.lo, 3), round(iv.hi, 3),
                                                        excludes_zero(iv)]
            for s in all_stages:
                m, sd, n = stage_stats.get(s, (float("nan"), float("nan"), 0))
                row += ["", ""] if n == 0 else [round(m, 3), round(sd, 3)]
            csv_rows.append(row)
        parts += [f"## {col}", markdown(md_header, md_rows)]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n", header, csv_rows


def plot_grid(cells: Sequence[Cell], runs: Sequence[Run], path: Path) -> bool:
    """Per (task, eval.split) column and arm, one panel: the mean paired difference from SFT in reward ×100
    with its 95% interval, one bar per variant."""
    import matplotlib.pyplot as plt

    panels = []
    for col in stage_columns(runs):
        mine = [c for c in cells if c.column == col and c.diffs.get("sft") is not None]
        for arm in dict.fromkeys(c.arm for c in sorted(mine, key=lambda c: group_order(runs).index(c.group))):
            panels.append((col, arm, [c for c in mine if c.arm == arm]))
    if not panels:
        return False
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    width = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(4.0, 1.1 * width + 2) * cols, 3.8 * nrows), squeeze=False)
    for ax, (col, arm, sel) in zip(axes.flat, panels):
        sel = sorted(sel, key=lambda c: group_order(runs).index(c.group))
        ivs = [c.diffs["sft"] for c in sel]
        xs = list(range(len(sel)))
        ax.bar(xs, [iv.mean for iv in ivs], yerr=[[iv.mean - iv.lo for iv in ivs], [iv.hi - iv.mean for iv in ivs]],
               color=arm_color(arm), alpha=0.8, capsize=4)
        ax.axhline(0.0, color="gray", lw=0.9)
        ax.set_xticks(xs)
        ax.set_xticklabels([c.variant or "default" for c in sel], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Δ reward ×100 vs SFT (95% interval)")
        ax.set_title(f"{ARM_LABEL.get(arm, arm)}: {col}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- main
def report(runs: Sequence[Run], out: Path, plots: bool = True, n_boot: int = N_BOOT,
           grid: Optional[bool] = None) -> Dict[str, Any]:
    """All outputs in ``out``; ``grid``: write grid.md/grid.csv (and grid.png), None: when some run has a
    variant other than null/base."""
    out.mkdir(parents=True, exist_ok=True)
    if grid is None:
        grid = any(r.group[1] is not None for r in runs)
    cells, notes = final_cells(runs, n_boot)
    (out / "table.md").write_text(final_markdown(cells, runs, notes, n_boot))
    write_csv(out / "table.csv", CSV_HEADER, [csv_row(c) for c in cells])
    stage_md, stage_csv_rows, stage_header = [], [], ["column", "method"]
    for col, sel in stage_columns(runs).items():
        h, rs = stage_table(sel)
        episodes = _episodes([st.get("episodes") for r in sel for st in r.stages.values()])
        stage_md.append(f"### {col}\n\n{stage_caption(sel, {col: episodes})}\n\n" + markdown(h, rs))
        stage_csv_rows += [[col] + r for r in rs]
        stage_header = ["column"] + h
    (out / "stages.md").write_text("\n".join(stage_md))
    write_csv(out / "stages.csv", stage_header, stage_csv_rows)
    raw = []
    for r in runs:
        v = r.variant or ""
        raw += [[r.path, r.arm, v, r.seed, r.task, r.split, s, r.stages[s]["reward_x100"], r.stages[s]["success_rate"],
                 r.stages[s].get("episodes"), r.score] for s in ordered_stages(r.stages)]
        raw += [[r.path, r.arm, v, r.seed, r.task, sp, r.final_stage, f["reward_x100"], f["success_rate"],
                 f.get("episodes"), r.score] for sp, f in r.finals.items() if sp != r.split]
    write_csv(out / "runs.csv", ["run", "arm", "variant", "seed", "task", "split", "stage", "reward_x100",
                                 "success_rate", "episodes", "score"], raw)
    tables = ["table.md", "table.csv", "stages.md", "stages.csv", "runs.csv"]
    if grid:
        grid_md, grid_header, grid_rows = grid_tables(runs, cells)
        (out / "grid.md").write_text(grid_md)
        write_csv(out / "grid.csv", grid_header, grid_rows)
        tables += ["grid.md", "grid.csv"]
    made = []
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        if plot_paired_differences(cells, out / "paired_differences.png"):
            made.append("paired_differences.png")
        plot_eval_by_cycle(runs, out / "eval_reward_by_cycle.png")
        made.append("eval_reward_by_cycle.png")
        if plot_step_reward_curves(runs, out / "step_reward_curves.png"):
            made.append("step_reward_curves.png")
        if plot_disc_accuracy(runs, out / "disc_accuracy.png"):
            made.append("disc_accuracy.png")
        if plot_cycle_metric(runs, [("agreement/heldout", "")], out / "agreement.png",
                             "held-out agreement with the expert"):
            made.append("agreement.png")
        if grid and plot_grid(cells, runs, out / "grid.png"):
            made.append("grid.png")
    return {"cells": cells, "notes": notes, "plots": made, "tables": tables}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*", type=Path,
                    help="directories searched for run summaries and finished run directories (or summary files)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <first root>/report)")
    ap.add_argument("--wandb", default=None, help="entity/project: read runs from the W&B API instead")
    ap.add_argument("--group", default=None, help="W&B group (with --wandb)")
    ap.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples per interval")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--grid", action="store_true",
                    help="write the settings-grid table grid.md/grid.csv (+ grid.png); automatic when some run has "
                         "a variant other than null/base")
    args = ap.parse_args(argv)
    if args.wandb:
        runs, unfinished = load_wandb_runs(args.wandb, args.group), []
    else:
        if not args.roots:
            ap.error("give run summary or run directories (or --wandb ENTITY/PROJECT)")
        runs, unfinished = find_runs(args.roots)
    for d in unfinished:
        print(f"skipped (no results.json yet): {d}", file=sys.stderr)
    if not runs:
        print("no finished runs found", file=sys.stderr)
        return 1
    out = args.out or (args.roots[0] / "report" if args.roots and args.roots[0].is_dir() else Path("report"))
    res = report(runs, out, plots=not args.no_plots, n_boot=args.n_boot, grid=True if args.grid else None)
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print((out / "table.md").read_text())
    print((out / "stages.md").read_text())
    if "grid.md" in res["tables"]:
        print((out / "grid.md").read_text())
    print(f"{len(runs)} runs; wrote {out}/" + ", ".join(res["tables"] + res["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
