#!/usr/bin/env python
"""Mean ± std over seeds of dev reward and agreement, per stage (init, SFT, each cycle).

    python experiments/summarize_seeds.py outputs/*/*_scienceworld_implicit_s*

Reads each run directory's results.json and metrics.jsonl; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def fmt(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def load(run: Path):
    res = json.loads((run / "results.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    reward = {k: v["overall"]["reward_x100"] for k, v in res["summaries"].items()}
    held = {}
    for r in rows:
        if "agreement/heldout" in r and r.get("cycle") is not None and r["agreement/heldout"] is not None:
            held["sft" if r["cycle"] == 0 else f"cycle {r['cycle']}"] = 100 * r["agreement/heldout"]
    insp = {f"cycle {c['cycle']}": 100 * c["agreement/inspection"] for c in res.get("cycles", [])}
    return reward, held, insp


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    runs = [r for r in args.runs if (r / "results.json").exists()]
    if not runs:
        raise SystemExit("no finished run directories (results.json) among the arguments")
    reward, held, insp = defaultdict(list), defaultdict(list), defaultdict(list)
    for run in runs:
        rw, hd, ip = load(run)
        for k, v in rw.items():
            reward[k].append(v)
        for k, v in hd.items():
            held[k].append(v)
        for k, v in ip.items():
            insp[k].append(v)
    print(f"{len(runs)} runs: {', '.join(r.name for r in runs)}\n")
    print("| stage | dev reward x100 | held-out agreement % | inspection agreement % (sampled, T=1) |")
    print("|---|---:|---:|---:|")
    for stage in reward:
        print(f"| {stage} | {fmt(reward[stage])} | {fmt(held.get(stage, []))} | {fmt(insp.get(stage, []))} |")


if __name__ == "__main__":
    main()
