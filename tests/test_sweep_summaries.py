"""experiments/run_summary.py and experiments/sweep.py --summaries/--commit on synthetic run
directories (the files stepagent/pipeline.py and algos/cycle.py write, in their formats; no training)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
# experiments/experiment/ablation_mini.yaml's hydra.run.dir
RUN_DIR = "outputs/ablation_mini/scienceworld/{arm}_s{seed}"
CYCLE_ARMS = {"implicit", "inverse", "outcome", "loop", "eto"}


def load(name: str):
    """An experiments/ script as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- synthetic runs
def _summary(rows: Sequence[dict]) -> dict:
    """stepagent.eval.evaluate.summarize's shape."""
    def agg(rs):
        n = len(rs)
        return {"episodes": n, "reward_x100": 100.0 * sum(r["reward"] for r in rs) / max(n, 1),
                "success_rate": sum(r["won"] for r in rs) / max(n, 1),
                "avg_steps": sum(r["steps"] for r in rs) / max(n, 1), "crashed": sum(r["crashed"] for r in rs)}

    types = sorted({r["task_type"] for r in rows})
    return {"overall": agg(rows), "per_type": {t: agg([r for r in rows if r["task_type"] == t]) for t in types}}


def _episodes(rewards: Sequence[float], ids: Sequence[str]) -> List[dict]:
    """Episode.result() rows."""
    return [{"id": i, "task_type": i.split("-")[0], "reward": r, "won": r >= 1.0 - 1e-9, "steps": 3, "crashed": False,
             "actions": ["look around", "go to kitchen", "focus on dove"]} for r, i in zip(rewards, ids)]


def _write_eval(d: Path, tag: str, split: str, rows: List[dict]) -> dict:
    s = _summary(rows)
    (d / f"{tag}.json").write_text(json.dumps({"summary": s, "split": split, "score": "max", "episodes": rows}))
    return s


def default_ids(split: str, n: int) -> List[str]:
    return [f"find-animal-{split}-{i}" for i in range(n)]


def write_run(root: Path, arm: str, seed: int, rewards: Dict[str, Sequence[float]], cycles: Optional[int] = None,
              ids: Optional[Dict[str, Sequence[str]]] = None, disc: bool = False, t0: float = 1000.0,
              variant: Optional[str] = None, settings: Optional[Dict[str, object]] = None) -> Path:
    """A finished run directory of ``arm`` (``rewards``: the final policy's per-episode rewards per split,
    eval.split = dev), with ``cycles`` cycles (default: 2, none for sft) whose earlier stages score lower;
    ``variant``: a settings-grid label, ``settings``: config values ("reward.beta": 0.5, "ppo.lr": 1e-5)."""
    d = root / RUN_DIR.format(arm=arm if variant is None else f"{arm}-{variant}", seed=seed)
    d.mkdir(parents=True)
    extra = {"reward": "", "ppo": ""}
    for key, value in (settings or {}).items():
        block, name = key.split(".", 1)
        extra[block] += f"  {name}: {value!r}\n"
    cycles = (2 if arm in CYCLE_ARMS else 0) if cycles is None else cycles
    ids = {sp: list(ids[sp]) if ids and sp in ids else default_ids(sp, len(r)) for sp, r in rewards.items()}
    reward_name = {"sft": "none", "loop": "outcome", "eto": "none"}.get(arm, arm)
    (d / "config.resolved.yaml").write_text(
        f"seed: {seed}\narm: {arm}\n" + ("" if variant is None else f"variant: {variant}\n")
        + "experiment: ablation_mini\ncycles: 2\n"
        f"algo:\n  name: {'sft' if arm == 'sft' else 'stepagent'}\nreward:\n  name: {reward_name}\n{extra['reward']}"
        + (f"ppo:\n{extra['ppo']}" if extra["ppo"] else "")
        + "task:\n  name: scienceworld\n  score: max\npolicy:\n  name: tiny\n"
        "eval:\n  split: dev\n  final_splits:\n  - dev\n  - test\n  max_episodes: null\n")
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=ablation_mini\n- arm={arm}\n" + ("" if variant is None else f"- variant={variant}\n")
        + f"- seed={seed}\n")
    final = list(rewards["dev"])
    labels = ["sft"] + [f"cycle {c}" for c in range(1, cycles + 1)]
    summaries = {}
    for j, label in enumerate(labels):  # earlier stages: 0.1 lower per stage before the last
        lower = 0.1 * (len(labels) - 1 - j)
        rows = _episodes([max(0.0, r - lower) for r in final], ids["dev"])
        tag = "eval_sft" if label == "sft" else "eval_" + label.replace(" ", "_")
        summaries[label] = _write_eval(d, tag, "dev", rows)
    finals = {"dev": summaries[labels[-1]]}
    for sp in rewards:
        if sp != "dev":
            finals[sp] = _write_eval(d, f"eval_final_{sp}", sp, _episodes(rewards[sp], ids[sp]))
    metrics = [{"sft/loss": 1.2, "_time": t0},
               {"cycle": 0, "eval/reward_x100": summaries["sft"]["overall"]["reward_x100"],
                "eval/success_rate": summaries["sft"]["overall"]["success_rate"], "_time": t0 + 10}]
    rows = []
    if cycles:
        metrics.append({"cycle": 0, "agreement/heldout": 0.40, "agreement/heldout_by_step": [0.5, 0.3],
                        "_time": t0 + 20})
        for c in range(1, cycles + 1):
            row = {"cycle": c, "agreement/inspection": 0.5, "agreement/inspection_by_step": [0.6, 0.4],
                   "contrast/segments": 40, "step_reward/expert_by_step": [0.2, 0.1, None],
                   "step_reward/agent_by_step": [-0.1, -0.2, None], "dpo/loss": 0.6, "dpo/steps": 8,
                   "generation/train/tokens_per_s": 1234.5, "agreement/heldout": 0.40 + 0.05 * c,
                   "agreement/heldout_by_step": [0.5 + 0.05 * c, 0.3],
                   "eval/reward_x100": summaries[f"cycle {c}"]["overall"]["reward_x100"],
                   "eval/success_rate": summaries[f"cycle {c}"]["overall"]["success_rate"],
                   "debug/table": {"not": "kept"}, "debug/list": [1, 2]}
            if disc:
                row.update({"disc/acc_heldout": 0.55 + 0.05 * c + 0.01 * seed, "disc/acc_fresh": 0.6 + 0.05 * c,
                            "disc/acc_train": 0.7 + 0.05 * c, "disc/loss_train": 0.6, "ppo/steps": 4,
                            "ppo/kl": float("nan")})
            rows.append(row)
            (d / "cycles" / f"cycle_{c}").mkdir(parents=True)
            (d / "cycles" / f"cycle_{c}" / "metrics.json").write_text(json.dumps(row))
            metrics.append({**row, "_time": t0 + 100 * c})
    metrics.append({"resources/peak_rss_mb": 900.0, "_time": t0 + 100 * cycles + 50})
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    protocol = {"task": "scienceworld", "split": "dev", "final_splits": list(finals),
                "split_names": {"dev": "seen", "test": "unseen"}, "score": "max", "caption": "..."}
    (d / "results.json").write_text(json.dumps(
        {"summaries": summaries, "final": {"policy": labels[-1], "splits": finals}, "protocol": protocol,
         "sft": {"sft/loss": 1.2}, "cycles": rows, "resources": {"peak_rss_mb": 900.0}}))
    return d


# ----------------------------------------------------------------------------- run_summary
def test_summary_of_a_cycle_run(tmp_path):
    rs = load("run_summary")
    d = write_run(tmp_path, "inverse", 1, {"dev": [1.0, 0.5, 0.25], "test": [0.0, 1.0]}, disc=True)
    s = rs.summarize_run(d, git={"commit": "abc", "source": "test"})
    json.dumps(s, allow_nan=False)  # strict JSON
    assert rs.summary_name(s) == "scienceworld_dev_inverse_s1.json"
    assert (s["kind"], s["schema"], s["experiment"], s["task"], s["split"], s["arm"], s["seed"], s["score"]) == \
        ("stepagent/run-summary", 1, "ablation_mini", "scienceworld", "dev", "inverse", 1, "max")
    assert s["config"]["reward.name"] == "inverse" and s["config"]["cycles"] == 2
    assert s["overrides"] == ["experiment=ablation_mini", "arm=inverse", "seed=1"]
    assert s["git"] == {"commit": "abc", "source": "test"}
    assert s["wall_s"] == 250.0  # first to last logged row
    assert s["final_policy"] == "cycle 2" and list(s["stages"]) == ["sft", "cycle 1", "cycle 2"]
    assert s["cycles_run"] == 2
    assert s["stages"]["cycle 2"] == {"reward_x100": pytest.approx(175 / 3), "success_rate": pytest.approx(1 / 3),
                                      "episodes": 3}
    # the final policy: dev from the last stage's evaluation, test from eval_final_test; episodes in order
    assert s["finals"]["dev"]["episodes"] == [{"id": "find-animal-dev-0", "reward": 1.0, "won": True},
                                              {"id": "find-animal-dev-1", "reward": 0.5, "won": False},
                                              {"id": "find-animal-dev-2", "reward": 0.25, "won": False}]
    assert s["finals"]["test"]["overall"] == {"reward_x100": 50.0, "success_rate": 0.5, "episodes": 2}
    assert [e["id"] for e in s["finals"]["test"]["episodes"]] == ["find-animal-test-0", "find-animal-test-1"]
    assert "actions" not in json.dumps(s)
    # cycle 0: the SFT policy's evaluation and agreement rows merged
    assert s["start"]["cycle"] == 0 and s["start"]["agreement/heldout"] == 0.40 and "eval/reward_x100" in s["start"]
    c1 = s["cycles"][0]
    assert c1["cycle"] == 1 and c1["disc/acc_heldout"] == pytest.approx(0.61) and c1["ppo/kl"] is None
    assert c1["step_reward/expert_by_step"] == [0.2, 0.1, None] and c1["agreement/heldout_by_step"] == [0.55, 0.3]
    assert c1["dpo/loss"] == 0.6 and c1["generation/train/tokens_per_s"] == 1234.5
    assert "debug/table" not in c1 and "debug/list" not in c1 and "_time" not in s["start"]


def test_summary_of_an_sft_run_and_the_commit_wandb_recorded(tmp_path):
    rs = load("run_summary")
    d = write_run(tmp_path, "sft", 0, {"dev": [0.5, 0.5], "test": [1.0]})
    meta = d / "wandb" / "offline-run-20250101_000000-x1" / "files" / "wandb-metadata.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"git": {"commit": "0123abc", "remote": "x"}}))
    s = rs.summarize_run(d, git={"commit": "not this one"})
    assert s["cycles"] == [] and s["cycles_run"] == 0 and s["final_policy"] == "sft" and list(s["stages"]) == ["sft"]
    assert s["git"] == {"commit": "0123abc", "source": "wandb"}
    assert s["finals"]["dev"]["overall"]["reward_x100"] == 50.0
    assert [e["reward"] for e in s["finals"]["dev"]["episodes"]] == [0.5, 0.5]
    assert "agreement/heldout" not in s["start"] and s["start"]["eval/reward_x100"] == 50.0


def test_summary_of_a_run_from_before_final_splits(tmp_path):
    """results.json without "final"/"protocol" and no cycle rows in it: the last stage is the final
    policy on eval.split, the score rule is the legacy one, cycle rows come from cycles/*/metrics.json."""
    rs = load("run_summary")
    d = write_run(tmp_path, "implicit", 0, {"dev": [0.5, 1.0]})
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps({"summaries": res["summaries"], "sft": {}, "cycles": []}))
    cfg = (d / "config.resolved.yaml").read_text().replace("  score: max\n", "")
    (d / "config.resolved.yaml").write_text(cfg)
    s = rs.summarize_run(d)
    assert s["score"] == "final" and list(s["finals"]) == ["dev"] and s["git"] is None
    assert [e["reward"] for e in s["finals"]["dev"]["episodes"]] == [0.5, 1.0]
    assert [c["cycle"] for c in s["cycles"]] == [1, 2]
    with pytest.raises(FileNotFoundError, match="no results.json"):
        rs.summarize_run(tmp_path)


IMPLICIT_GRID = {"b0.5_lr3e-5": {"reward.beta": 0.5, "reward.lr": 3e-05},
                 "b1.0_lr1e-4": {"reward.beta": 1.0, "reward.lr": 1e-04}}


def test_summary_of_a_grid_variant(tmp_path):
    """A run with config ``variant``: the variant in its summary and name; the settings a grid varies in
    its config. Without a variant (null, or a run from before the key) the name is the one it always had."""
    rs = load("run_summary")
    d = write_run(tmp_path, "implicit", 0, {"dev": [0.5, 1.0]}, variant="b0.5_lr3e-5",
                  settings={"reward.beta": 0.5, "reward.lr": 3e-05, "reward.nll_weight": 0.0, "ppo.lr": 1e-05})
    s = rs.summarize_run(d)
    assert (s["arm"], s["variant"], s["seed"]) == ("implicit", "b0.5_lr3e-5", 0)
    assert rs.summary_name(s) == "scienceworld_dev_implicit-b0.5_lr3e-5_s0.json"
    assert {k: s["config"][k] for k in ("reward.beta", "reward.lr", "reward.nll_weight", "ppo.lr")} == \
        {"reward.beta": 0.5, "reward.lr": 3e-05, "reward.nll_weight": 0.0, "ppo.lr": 1e-05}
    assert "reward.disc_lr" not in s["config"]  # only the settings the run's config has
    assert s["overrides"] == ["experiment=ablation_mini", "arm=implicit", "variant=b0.5_lr3e-5", "seed=0"]
    assert rs.write_summary(s, tmp_path / "out").name == "scienceworld_dev_implicit-b0.5_lr3e-5_s0.json"

    sft = rs.summarize_run(write_run(tmp_path, "sft", 0, {"dev": [0.5]}, variant="base"))
    assert rs.summary_name(sft) == "scienceworld_dev_sft-base_s0.json"
    plain = rs.summarize_run(write_run(tmp_path, "implicit", 1, {"dev": [0.5]}))
    assert plain["variant"] is None and rs.summary_name(plain) == "scienceworld_dev_implicit_s1.json"
    assert rs.identity({"arm": "sft", "task": {"name": "alfworld"}})["variant"] is None

    # the composed (unresolved) Hydra config, as experiments/sweep.py plans a line: the same name
    sweep = load("sweep")
    ident = sweep.plan(["experiment=ablation_mini", "arm=implicit", "seed=0", "variant=b0.5_lr3e-5",
                        "reward.beta=0.5", "reward.lr=3e-5"])[1]
    assert ident["variant"] == "b0.5_lr3e-5" and rs.summary_name(ident) == rs.summary_name(s)
    ident = sweep.plan(["experiment=ablation_mini", "arm=implicit", "seed=1"])[1]
    assert ident["variant"] is None and rs.summary_name(ident) == rs.summary_name(plain)


# ----------------------------------------------------------------------------- report of a settings grid
GRID_SFT = {0: [0.25, 0.5, 0.0, 1.0], 1: [0.5, 0.5, 0.25, 0.0]}  # seed means 43.75, 31.25: mean 37.5


def _grid_runs(root: Path) -> None:
    """Seeds 0, 1 of: sft (variant base, as a grid sweep runs it); implicit at its default settings (+0.25 on
    every dev episode over SFT) and two grid variants (+0.125, +0.5); outcome (= SFT) and an outcome variant
    (+0.25). Test episodes: SFT's for all."""
    test = {0: [0.0, 0.5], 1: [0.25, 0.25]}
    implicit = {None: (0.25, {"reward.beta": 0.1, "reward.lr": 1e-04}),
                "b0.5_lr3e-5": (0.125, IMPLICIT_GRID["b0.5_lr3e-5"]), "b1.0_lr1e-4": (0.5, IMPLICIT_GRID["b1.0_lr1e-4"])}
    for seed in (0, 1):
        dev = GRID_SFT[seed]
        write_run(root, "sft", seed, {"dev": dev, "test": test[seed]}, variant="base", settings={"ppo.lr": 1e-05})
        for variant, (shift, settings) in implicit.items():
            write_run(root, "implicit", seed, {"dev": [r + shift for r in dev], "test": test[seed]}, variant=variant,
                      settings={**settings, "reward.nll_weight": 0.0, "ppo.lr": 1e-05})
        write_run(root, "outcome", seed, {"dev": dev, "test": test[seed]}, settings={"ppo.lr": 1e-05})
        write_run(root, "outcome", seed, {"dev": [r + 0.25 for r in dev], "test": test[seed]}, variant="plr3e-5",
                  settings={"ppo.lr": 3e-05})


def _csv(path: Path, *key: str) -> Dict[tuple, dict]:
    import csv

    with open(path) as f:
        return {tuple(r[k] for k in key): r for r in csv.DictReader(f)}


def _md_table(text: str, header_start: str) -> List[str]:
    """The rows of the first Markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return [lines[i]] + rows


def test_report_groups_runs_by_arm_and_variant(tmp_path):
    rs, report = load("run_summary"), load("report")
    runs, summaries, out = tmp_path / "runs", tmp_path / "summaries", tmp_path / "report"
    _grid_runs(runs)
    for d in sorted(runs.glob("*/*/*/*")):
        rs.write_summary(rs.summarize_run(d), summaries)
    names = sorted(p.name for p in summaries.glob("*.json"))
    assert len(names) == 12 and "scienceworld_dev_sft-base_s0.json" in names
    assert "scienceworld_dev_implicit_s1.json" in names and "scienceworld_dev_outcome-plr3e-5_s1.json" in names
    assert report.main([str(summaries), "--out", str(out), "--n-boot", "300"]) == 0  # the grid: automatic

    t = _csv(out / "table.csv", "column", "arm", "variant")
    seen = "scienceworld (seen)"
    # constant shifts over SFT (and outcome = SFT): point intervals; the baselines are SFT (variant base) of
    # the same seed and outcome at its default settings
    for (arm, variant), d in {("implicit", ""): "25.0", ("implicit", "b0.5_lr3e-5"): "12.5",
                              ("implicit", "b1.0_lr1e-4"): "50.0", ("outcome", "plr3e-5"): "25.0"}.items():
        row = t[seen, arm, variant]
        for base in ("sft", "outcome"):
            assert (row[f"diff_{base}"], row[f"diff_{base}_lo"], row[f"diff_{base}_hi"]) == (d, d, d), (arm, variant)
        assert row["seeds"] == "0,1" and row["per_episode"] == "True"
    assert t[seen, "implicit", "b0.5_lr3e-5"]["method"] == "StepAgent-implicit [b0.5_lr3e-5]"
    assert float(t[seen, "implicit", "b0.5_lr3e-5"]["reward_x100"]) == pytest.approx(50.0)
    assert (t[seen, "sft", ""]["method"], t[seen, "sft", ""]["diff_sft"]) == ("SFT", "")  # base: no suffix
    assert t[seen, "outcome", ""]["diff_sft"] == "0.0" and t[seen, "outcome", ""]["diff_outcome"] == ""
    assert t["scienceworld (unseen)", "implicit", "b1.0_lr1e-4"]["diff_sft"] == "0.0"

    md = (out / "table.md").read_text()
    rows = _md_table(md, f"| method | {seen} |")[1:]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "SFT", "StepAgent w/o step reward (outcome)", "StepAgent w/o step reward (outcome) [plr3e-5]",
        "StepAgent-implicit", "StepAgent-implicit [b0.5_lr3e-5]", "StepAgent-implicit [b1.0_lr1e-4]"]
    assert "| StepAgent-implicit [b1.0_lr1e-4] | 87.5 [" in md and "## Notes" not in md
    stages = (out / "stages.md").read_text()
    assert "| StepAgent-implicit [b0.5_lr3e-5] | – | 31.9 ± 8.8 | 40.0 ± 8.8 | 50.0 ± 8.8 |" in stages \
        or "| StepAgent-implicit [b0.5_lr3e-5] | 31.9 ± 8.8 | 40.0 ± 8.8 | 50.0 ± 8.8 |" in stages

    # grid.md: per (arm, variant) the settings varied within its arm (beta, lr for implicit; ppo.lr for outcome)
    grid = _md_table((out / "grid.md").read_text(), "| method |")
    assert grid[0] == ("| method | beta | lr | ppo.lr | reward x100 [95%] | success % [95%] | Δ vs SFT [95%] | sft "
                       "| cycle 1 | cycle 2 | seeds |")
    by_label = {r.split(" | ")[0][2:]: r.split(" | ") for r in grid[1:]}
    assert list(by_label) == [r.split(" | ")[0][2:] for r in rows]
    imp = by_label["StepAgent-implicit [b0.5_lr3e-5]"]
    assert imp[1:4] == ["0.5", "3e-05", ""] and imp[4].startswith("50.0 [") and imp[6] == "+12.5 [+12.5, +12.5] *"
    # stages: sft r+0.125-0.2 (at least 0), cycle 1 r+0.025, cycle 2 r+0.125; mean ± std over the seeds
    assert imp[7:] == ["31.9 ± 8.8", "40.0 ± 8.8", "50.0 ± 8.8", "0,1 |"]
    assert by_label["StepAgent-implicit"][1:4] == ["0.1", "0.0001", ""]
    assert by_label["StepAgent w/o step reward (outcome) [plr3e-5]"][1:4] == ["", "", "3e-05"]
    assert by_label["StepAgent w/o step reward (outcome) [plr3e-5]"][6] == "+25.0 [+25.0, +25.0] *"
    sft = by_label["SFT"]
    assert sft[1:4] == ["", "", ""] and sft[4].startswith("37.5 [") and sft[6:] == ["–", "37.5 ± 8.8", "–", "–",
                                                                                    "0,1 |"]
    g = _csv(out / "grid.csv", "arm", "variant")
    assert len(g) == 6 and (g["implicit", "b1.0_lr1e-4"]["reward.beta"], g["implicit", "b1.0_lr1e-4"]["reward.lr"]) \
        == ("1", "0.0001")
    assert g["implicit", "b1.0_lr1e-4"]["reward.nll_weight"] == "0" and g["sft", ""]["reward.beta"] == ""
    assert (g["implicit", "b1.0_lr1e-4"]["diff_sft"], g["implicit", "b1.0_lr1e-4"]["cycle_2"]) == ("50.0", "87.5")
    assert g["implicit", "b0.5_lr3e-5"]["sft"] == "31.875" and g["implicit", "b0.5_lr3e-5"]["column"] == seen
    for png in ("grid.png", "paired_differences.png", "eval_reward_by_cycle.png", "agreement.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png
    runs_csv = _csv(out / "runs.csv", "arm", "variant", "seed", "split", "stage")
    assert runs_csv["sft", "base", "0", "dev", "sft"]["reward_x100"] == "43.75"


def test_grid_table_only_with_variants_or_grid_flag(tmp_path):
    report = load("report")
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "sft", seed, {"dev": GRID_SFT[seed]})
        write_run(runs, "implicit", seed, {"dev": [r + 0.25 for r in GRID_SFT[seed]]}, settings={"reward.beta": 0.1})
    assert report.main([str(runs), "--out", str(tmp_path / "a"), "--n-boot", "50", "--no-plots"]) == 0
    assert not (tmp_path / "a" / "grid.md").exists() and not (tmp_path / "a" / "grid.csv").exists()
    assert report.main([str(runs), "--out", str(tmp_path / "b"), "--n-boot", "50", "--no-plots", "--grid"]) == 0
    grid = _md_table((tmp_path / "b" / "grid.md").read_text(), "| method |")
    assert grid[0] == ("| method | reward x100 [95%] | success % [95%] | Δ vs SFT [95%] | sft | cycle 1 | cycle 2 "
                       "| seeds |")  # nothing varied: no settings columns
    assert [r.split(" | ")[0][2:] for r in grid[1:]] == ["SFT", "StepAgent-implicit"]
    assert grid[2].split(" | ")[3] == "+25.0 [+25.0, +25.0] *"
    assert _csv(tmp_path / "b" / "grid.csv", "arm")["implicit", ]["reward.beta"] == "0.1"


# ----------------------------------------------------------------------------- sweep
FAKE_PYTHON = """#!{python}
# sweep.py --python: in place of `python run.py OVERRIDES`, writes a finished synthetic run
import json, sys
sys.path.insert(0, {tests!r})
from test_sweep_summaries import write_run

over = dict(a.split("=", 1) for a in sys.argv[2:])
with open("calls.log", "a") as f:
    f.write(" ".join(sys.argv[2:]) + "\\n")
if over.get("arm") == "loop":
    sys.exit(3)  # a failing run
write_run(__import__("pathlib").Path("."), over["arm"], int(over["seed"]), {{"dev": [0.5, 1.0], "test": [0.25]}})
"""


@pytest.fixture
def sweep_env(tmp_path, monkeypatch):
    """cwd tmp_path (the run dirs are relative to it), a fake python, a sweep file, git identity."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, tests=str(Path(__file__).parent)))
    fake.chmod(0o755)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two lines\nexperiment=ablation_mini arm=sft seed=0\n\n"
                     "experiment=ablation_mini arm=implicit seed=0\n")
    monkeypatch.chdir(tmp_path)
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("")
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": str(gitconfig),
                 "GIT_CONFIG_NOSYSTEM": "1"}.items():
        monkeypatch.setenv(k, v)
    return load("sweep"), fake, sweep


def calls(tmp_path) -> List[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_sweep_writes_summaries_and_skips_by_them(tmp_path, sweep_env, capsys):
    sweep, fake, sweep_file = sweep_env
    out = tmp_path / "summaries"
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scienceworld_dev_implicit_s0.json",
                                                     "scienceworld_dev_sft_s0.json"]
    s = json.loads((out / "scienceworld_dev_implicit_s0.json").read_text())
    assert s["sweep"]["line"] == 1 and s["sweep"]["overrides"] == ["experiment=ablation_mini", "arm=implicit", "seed=0"]
    assert s["sweep"]["seconds"] >= 0 and s["finals"]["test"]["overall"]["reward_x100"] == 25.0
    assert len(calls(tmp_path)) == 2

    # a fresh machine: no run directories, only the (committed) summaries -> nothing runs again
    subprocess.run(["rm", "-rf", str(tmp_path / "outputs")], check=True)
    capsys.readouterr()
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed] == [["0", "done"], ["1", "done"]]
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out)]) == 0
    assert capsys.readouterr().out.count("done already") == 2 and len(calls(tmp_path)) == 2

    # without --summaries, the run directories decide: both lines run again
    assert sweep.main([str(sweep_file), "--python", str(fake), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("run.py") == 2


def test_sweep_summarizes_a_finished_run_without_running_it_and_reports_failures(tmp_path, sweep_env, capsys):
    sweep, fake, sweep_file = sweep_env
    write_run(tmp_path, "sft", 0, {"dev": [1.0, 1.0], "test": [1.0]})  # finished before summaries existed
    sweep_file.write_text(sweep_file.read_text() + "experiment=ablation_mini arm=loop seed=0\n")
    out = tmp_path / "summaries"
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out), "--list"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["ran", "todo", "todo"]
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out)]) == 1  # loop fails
    captured = capsys.readouterr()
    assert "finished already, writing its summary" in captured.out and "failed lines: [2]" in captured.err
    assert [c.split()[1] for c in calls(tmp_path)] == ["arm=implicit", "arm=loop"]  # sft was not run again
    assert json.loads((out / "scienceworld_dev_sft_s0.json").read_text())["finals"]["dev"]["overall"][
        "reward_x100"] == 100.0
    assert not (out / "scienceworld_dev_loop_s0.json").exists()


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_sweep_commit_commits_only_the_summary(tmp_path, sweep_env):
    sweep, fake, sweep_file = sweep_env
    _git(tmp_path, "init", "-q")
    (tmp_path / "README").write_text("x\n")
    _git(tmp_path, "add", "README")
    _git(tmp_path, "commit", "-q", "-m", "init")
    (tmp_path / "README").write_text("someone else's staged work\n")
    (tmp_path / "other.txt").write_text("staged, not to be committed\n")
    _git(tmp_path, "add", "README", "other.txt")
    out = tmp_path / "results" / "ablation_mini"
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out), "--commit"]) == 0

    log = _git(tmp_path, "log", "--format=%s").splitlines()
    assert log == ["ablation: scienceworld_dev_implicit_s0 (reward x100 seen 75.0, unseen 25.0)",
                   "ablation: scienceworld_dev_sft_s0 (reward x100 seen 75.0, unseen 25.0)", "init"]
    for rev, name in (("HEAD", "implicit"), ("HEAD~1", "sft")):
        files = _git(tmp_path, "show", "--name-only", "--format=", rev).split()
        assert files == [f"results/ablation_mini/scienceworld_dev_{name}_s0.json"]
    # the other staged work is still staged, uncommitted
    assert sorted(_git(tmp_path, "diff", "--cached", "--name-only").split()) == ["README", "other.txt"]
    assert _git(tmp_path, "show", "HEAD:README") == "x\n"

    # a summary left uncommitted (a sweep stopped between writing and committing) is committed by the next one
    _git(tmp_path, "reset", "-q", "--soft", "HEAD~1")
    _git(tmp_path, "reset", "-q", "--", "results")
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(out), "--commit"]) == 0
    assert _git(tmp_path, "log", "-1", "--format=%s").startswith("ablation: scienceworld_dev_implicit_s0")
    assert len(calls(tmp_path)) == 2


def test_sweep_commit_outside_git_warns_and_continues(tmp_path, sweep_env, capsys, monkeypatch):
    sweep, fake, sweep_file = sweep_env
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path either
    assert sweep.main([str(sweep_file), "--python", str(fake), "--summaries", str(tmp_path / "s"), "--commit"]) == 0
    assert capsys.readouterr().err.count("could not commit") == 2
    assert len(list((tmp_path / "s").glob("*.json"))) == 2


def test_a_summarised_sft_line_runs_again_when_arms_still_to_run_need_its_missing_checkpoint(tmp_path):
    """A later session on a fresh machine: SFT's summary is committed but its run dir is gone, and the
    arms of that seed still to run start from it (sft.init_from): the SFT line is run again."""
    sft_lines_to_rerun = load("sweep").sft_lines_to_rerun

    sft, arm, done_arm = tmp_path / "sft_s2", tmp_path / "implicit_s2", tmp_path / "loop_s2"
    planned = {0: (sft, True), 1: (arm, False), 2: (done_arm, True)}
    overrides = {0: ["arm=sft"], 1: [f"sft.init_from={sft}"], 2: [f"sft.init_from={sft}"]}
    assert sft_lines_to_rerun(planned, overrides) == {0: [1]}
    assert sft_lines_to_rerun({**planned, 1: (arm, True)}, overrides) == {}  # nothing left that needs it
