"""experiments/sweep.py + experiments/report.py on run directories made by short real jobs."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_RUN
from test_sweep_summaries import load, write_run

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sweep_then_report(tmp_path):
    runs = tmp_path / "runs"
    common = " ".join(SMALL_RUN) + f" cache_dir={tmp_path}/cache eval.before_sft=false task.num_workers=1" \
        + f" hydra.run.dir={runs}/" + "${arm}_s${seed}"
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(
        "# two SFT seeds and one implicit run\n\n"
        f"arm=sft seed=0 {common}\n"
        f"arm=sft seed=1 {common}   # a trailing comment\n"
        f"arm=implicit seed=0 cycles=1 inspection.trajectories=3 inspection.heldout_trajectories=2 {common}\n"
    )
    listed = subprocess.run([sys.executable, "experiments/sweep.py", str(sweep), "--list"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert listed.count("todo") == 3 and f"{runs}/sft_s1" in listed

    r = subprocess.run([sys.executable, "experiments/sweep.py", str(sweep)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert {p.name for p in runs.iterdir()} == {"sft_s0", "sft_s1", "implicit_s0"}
    # a second pass skips finished runs
    again = subprocess.run([sys.executable, "experiments/sweep.py", str(sweep)], cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=True).stdout
    assert again.count("done already") == 3

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "experiments/report.py", str(runs), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]

    results = {p.name: json.loads((p / "results.json").read_text()) for p in runs.iterdir()}
    final = {name: r["summaries"] for name, r in results.items()}
    sft = [final[f"sft_s{s}"]["sft"]["overall"]["reward_x100"] for s in (0, 1)]
    implicit = final["implicit_s0"]["cycle 1"]["overall"]["reward_x100"]
    # the final policy on both splits (eval.final_splits' default), dev's being the last stage's evaluation
    for r in results.values():
        assert list(r["final"]["splits"]) == ["dev", "test"] and r["final"]["policy"] == list(r["summaries"])[-1]
        assert r["final"]["splits"]["dev"] == r["summaries"][r["final"]["policy"]]
        assert r["final"]["splits"]["test"]["overall"]["episodes"] == 2
        assert r["protocol"]["score"] == "max" and r["protocol"]["split_names"] == {"dev": "seen", "test": "unseen"}
    unseen = [results[f"sft_s{s}"]["final"]["splits"]["test"]["overall"]["reward_x100"] for s in (0, 1)]

    with open(out / "table.csv") as f:
        rows = {(row["column"], row["method"]): row for row in csv.DictReader(f)}
    col = "scienceworld (seen)"
    # the mean over seeds x episodes (equal episode counts: the mean of the seeds' means)
    assert float(rows[col, "SFT"]["reward_x100"]) == pytest.approx(statistics.mean(sft), abs=1e-3)
    assert float(rows["scienceworld (unseen)", "SFT"]["reward_x100"]) == pytest.approx(statistics.mean(unseen),
                                                                                       abs=1e-3)
    assert rows[col, "SFT"]["seeds"] == "0,1" and rows[col, "SFT"]["episodes_per_seed"] == "2"
    assert float(rows[col, "StepAgent-implicit"]["reward_x100"]) == pytest.approx(implicit, abs=1e-3)
    assert rows[col, "StepAgent-implicit"]["per_episode"] == "True"
    # implicit ran seed 0 only: its paired difference from SFT uses seed 0 (same dev episodes)
    assert rows[col, "StepAgent-implicit"]["diff_sft"] != ""
    md = (out / "table.md").read_text().splitlines()
    assert f"| method | {col} | scienceworld (unseen) | seeds |" in md
    caption = md[: md.index(f"| method | {col} | scienceworld (unseen) | seeds |")]
    assert any(line.startswith("95% intervals [lo, hi]: hierarchical percentile bootstrap") for line in caption)
    assert "Episodes per seed: scienceworld (seen) 2, scienceworld (unseen) 2. Seeds: 0, 1 (2)." in caption
    assert any(line.startswith("scienceworld: score: max — ETO's rule") for line in caption)
    stages_md = (out / "stages.md").read_text()
    assert "Episodes per evaluation: scienceworld (seen) 2." in stages_md and "score: max" in stages_md

    with open(out / "runs.csv") as f:
        raw = list(csv.DictReader(f))
    # dev: sft one stage per run, implicit sft + cycle 1; test: the final policy of each run
    assert len(raw) == 2 + 2 + 3
    assert {(r["arm"], r["split"], r["stage"]) for r in raw} >= {
        ("implicit", "dev", "cycle 1"), ("sft", "dev", "sft"), ("implicit", "test", "cycle 1"), ("sft", "test", "sft")}
    assert {(r["episodes"], r["score"]) for r in raw} == {("2", "max")}

    for png in ("eval_reward_by_cycle.png", "step_reward_curves.png", "agreement.png", "paired_differences.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and 5_000 < len(data) < 400_000, png
    assert not (out / "disc_accuracy.png").exists()  # no inverse arm in this sweep


def _fake_run(root: Path, name: str, arm: str, seed: int, reward: dict, score=None, new: bool = True) -> None:
    """A finished run directory: results.json in today's layout (``new``) or in the one before
    eval.final_splits and task.score existed."""
    d = root / name
    d.mkdir(parents=True)
    task = "  name: scienceworld\n" + (f"  score: {score}\n" if score else "")
    (d / "config.resolved.yaml").write_text(f"seed: {seed}\narm: {arm}\ntask:\n{task}eval:\n  split: dev\n")

    def summary(r, n=20):
        return {"overall": {"episodes": n, "reward_x100": r, "success_rate": 0.0, "avg_steps": 10.0, "crashed": 0},
                "per_type": {}}

    res = {"summaries": {"sft": summary(reward["dev"])}, "sft": {}, "cycles": []}
    if new:
        res["final"] = {"policy": "sft", "splits": {"dev": summary(reward["dev"]), "test": summary(reward["test"], 21)}}
        res["protocol"] = {"task": "scienceworld", "split": "dev", "final_splits": ["dev", "test"], "score": score}
    (d / "results.json").write_text(json.dumps(res))


def test_report_names_split_metric_episodes_and_score_rule(tmp_path):
    """Runs from before eval.final_splits/task.score (scored by the final score, dev only) and today's
    (both splits, ETO's max rule): one column per split and score rule, never mixed."""
    runs = tmp_path / "runs"
    _fake_run(runs, "old_s0", "sft", 0, {"dev": 10.0}, new=False)
    _fake_run(runs, "old_s1", "sft", 1, {"dev": 20.0}, new=False)
    _fake_run(runs, "new_s0", "sft", 0, {"dev": 30.0, "test": 25.0}, score="max")
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "experiments/report.py", str(runs), "--out", str(out), "--no-plots"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-3000:]
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["column"], r["method"], r["reward_x100"], r["seeds"], r["episodes_per_seed"], r["per_episode"])
            for r in rows] == [("scienceworld (seen), score final", "SFT", "15.0", "0,1", "20", "False"),
                               ("scienceworld (seen), score max", "SFT", "30.0", "0", "20", "False"),
                               ("scienceworld (unseen), score max", "SFT", "25.0", "0", "21", "False")]
    md = (out / "table.md").read_text()
    # no per-episode rows kept: the intervals resample the seeds' means (10 and 20)
    assert ("| SFT | 15.0 [10.0, 20.0] | 30.0 [30.0, 30.0] | 25.0 [25.0, 25.0] | 0,1 |") in md
    assert ("Episodes per seed: scienceworld (seen), score final 20, scienceworld (seen), score max 20, "
            "scienceworld (unseen), score max 21.") in md
    assert "† some run kept no per-episode rewards" in md
    assert "scienceworld: score: final — the score when the episode ends" in md
    assert "scienceworld: score: max — ETO's rule, the highest score reached" in md
    stages = (out / "stages.md").read_text()
    assert "### scienceworld (seen), score final\n" in stages and "### scienceworld (seen), score max\n" in stages


# ----------------------------------------------------------------------------- paired intervals, summaries
def _report(roots, out, *extra):
    """experiments/report.py in this process (fast: a few hundred resamples)."""
    return load("report").main([*map(str, roots), "--out", str(out), "--n-boot", "300", *extra])


def _table(out: Path):
    with open(out / "table.csv") as f:
        return {(r["column"], r["arm"]): r for r in csv.DictReader(f)}


SFT = {0: [0.25, 0.5, 0.0, 1.0], 1: [0.5, 0.5, 0.25, 0.0]}
TEST = {0: [0.0, 0.5], 1: [0.25, 0.25]}


def _ablation(root: Path, shift: float = 0.25, ids=None, inverse: bool = False) -> None:
    """sft, outcome (= sft) and implicit (= sft + ``shift`` on every episode) for seeds 0 and 1."""
    for seed in (0, 1):
        write_run(root, "sft", seed, {"dev": SFT[seed], "test": TEST[seed]})
        write_run(root, "outcome", seed, {"dev": SFT[seed], "test": TEST[seed]})
        write_run(root, "implicit", seed, {"dev": [r + shift for r in SFT[seed]], "test": TEST[seed]},
                  ids=(ids or {}).get(seed))
        if inverse:
            write_run(root, "inverse", seed, {"dev": SFT[seed], "test": TEST[seed]}, disc=True)


def test_paired_difference_of_a_constant_shift_is_a_point_interval(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    _ablation(runs, inverse=True)
    assert _report([runs], out) == 0
    t = _table(out)
    seen, unseen = "scienceworld (seen)", "scienceworld (unseen)"
    imp = t[seen, "implicit"]
    # every episode +25 over SFT (and over outcome, which equals SFT): the interval is the point +25
    for base in ("sft", "outcome"):
        assert (imp[f"diff_{base}"], imp[f"diff_{base}_lo"], imp[f"diff_{base}_hi"]) == ("25.0", "25.0", "25.0")
        assert imp[f"diff_{base}_excludes_0"] == "True"
    assert t[unseen, "implicit"]["diff_sft"] == "0.0" and t[unseen, "implicit"]["diff_sft_excludes_0"] == "False"
    # the level: the mean over seeds x episodes, x100, inside its interval
    sft = t[seen, "sft"]
    assert float(sft["reward_x100"]) == pytest.approx(100 * sum(SFT[0] + SFT[1]) / 8)
    assert float(sft["reward_lo"]) <= float(sft["reward_x100"]) <= float(sft["reward_hi"])
    assert float(sft["success_pct"]) == pytest.approx(100 / 8)  # one episode of eight won
    assert (sft["seeds"], sft["n_seeds"], sft["episodes_per_seed"], sft["diff_sft"]) == ("0,1", "2", "4", "")
    assert t[seen, "outcome"]["diff_outcome"] == "" and t[seen, "outcome"]["diff_sft"] == "0.0"

    md = (out / "table.md").read_text()
    assert "| StepAgent-implicit | 62.5 [" in md  # the paper table: SFT's 37.5 + 25
    assert "| +25.0 [+25.0, +25.0] * | +25.0 [+25.0, +25.0] * | 4 | 0,1 |" in md
    assert "Columns: scienceworld (seen) = split dev, scienceworld (unseen) = split test." in md
    assert "Episodes per seed: scienceworld (seen) 4, scienceworld (unseen) 2. Seeds: 0, 1 (2)." in md
    assert "## Notes" not in md and "†" not in md
    for png in ("paired_differences.png", "disc_accuracy.png", "agreement.png", "eval_reward_by_cycle.png",
                "step_reward_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, png


def test_mismatched_episodes_are_not_paired(tmp_path, capsys):
    """implicit's seed 1 played other dev episodes: it is left out of the paired differences, with a note;
    when no seed is left the difference is "unpaired"."""
    runs, out = tmp_path / "runs", tmp_path / "report"
    other = ["find-animal-dev-0", "find-animal-dev-2", "find-animal-dev-1", "find-animal-dev-3"]
    _ablation(runs, ids={1: {"dev": other}})
    assert _report([runs], out, "--no-plots") == 0
    err = capsys.readouterr().err
    note = ("scienceworld (seen): StepAgent-implicit vs SFT, seed 1: not the same episodes "
            "(episode 1 is 'find-animal-dev-2' vs 'find-animal-dev-1'); left out")
    assert f"note: {note}" in err and note in (out / "table.md").read_text()
    imp = _table(out)["scienceworld (seen)", "implicit"]
    assert imp["diff_sft"] == "25.0" and imp["seeds"] == "0,1"  # seed 0 still paired; the level keeps both seeds

    runs2, out2 = tmp_path / "runs2", tmp_path / "report2"
    _ablation(runs2, ids={0: {"dev": other}, 1: {"dev": other}})
    assert _report([runs2], out2, "--no-plots") == 0
    imp = _table(out2)["scienceworld (seen)", "implicit"]
    assert imp["diff_sft"] == "" and "| unpaired |" in (out2 / "table.md").read_text()
    assert "StepAgent-implicit vs SFT: no seed with the same episodes; no paired difference" in capsys.readouterr().err

    rep = load("report")
    with pytest.raises(ValueError, match="3 vs 2 episodes"):
        rep.check_same_episodes([{"id": "a"}, {"id": "b"}, {"id": "c"}], [{"id": "a"}, {"id": "b"}])


def test_report_from_summaries_alone_equals_the_report_from_run_dirs(tmp_path):
    """What a fresh machine has: the committed summaries, no run directories."""
    rs = load("run_summary")
    runs, summaries = tmp_path / "runs", tmp_path / "summaries"
    _ablation(runs, shift=0.125, inverse=True)
    for d in sorted(runs.glob("*/*/*/*")):
        rs.write_summary(rs.summarize_run(d), summaries)
    assert len(list(summaries.glob("*.json"))) == 8
    assert _report([runs], tmp_path / "a", "--no-plots") == 0
    subprocess.run(["rm", "-rf", str(runs)], check=True)
    assert _report([summaries], tmp_path / "b") == 0  # default --out would be summaries/report
    for name in ("table.csv", "stages.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    assert (tmp_path / "b" / "disc_accuracy.png").exists()
    # a summary file given on its own, and the CLI as a script
    r = subprocess.run([sys.executable, "experiments/report.py", str(summaries / "scienceworld_dev_sft_s0.json"),
                        "--out", str(tmp_path / "c"), "--no-plots", "--n-boot", "50"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| SFT | 43.8 [" in (tmp_path / "c" / "table.md").read_text()  # seed 0: 1.75 / 4
