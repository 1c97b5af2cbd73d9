"""experiments/sweep.py + experiments/report.py on run directories made by short real jobs."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from conftest import SMALL_RUN

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

    final = {p.name: json.loads((p / "results.json").read_text())["summaries"] for p in runs.iterdir()}
    sft = [final[f"sft_s{s}"]["sft"]["overall"]["reward_x100"] for s in (0, 1)]
    implicit = final["implicit_s0"]["cycle 1"]["overall"]["reward_x100"]

    with open(out / "table.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    col = "scienceworld (seen)"
    assert rows["SFT"][col] == f"{statistics.mean(sft):.1f} ± {statistics.stdev(sft):.1f}"
    assert rows["SFT"]["seeds"] == "0,1"
    assert rows["StepAgent-implicit"][col] == f"{implicit:.1f}"  # one seed: no ± part
    md = (out / "table.md").read_text()
    assert md.splitlines()[0] == f"| method | {col} | seeds |"

    with open(out / "runs.csv") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 2 + 2  # sft: one stage per run; implicit: sft + cycle 1
    assert {(r["arm"], r["stage"]) for r in raw} >= {("implicit", "cycle 1"), ("sft", "sft")}

    for png in ("eval_reward_by_cycle.png", "step_reward_curves.png", "agreement.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and 5_000 < len(data) < 400_000, png
    assert not (out / "disc_accuracy.png").exists()  # no inverse arm in this sweep
