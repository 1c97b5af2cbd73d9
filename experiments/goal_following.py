#!/usr/bin/env python
"""Does a ScienceWorld find-* policy read its goal? Goal-following rates of evaluated episodes.

    python experiments/goal_following.py outputs/ablation_mini/scienceworld/sft_s0 [RUN_DIR ...]
    python experiments/goal_following.py outputs/ablation_mini/scienceworld/*_s? --out docs/ablation_mini/goal_following.md

A find-* task says where the object goes: "... Then, move it to the red box in the kitchen." The
two words that matter (the box colour and the room) appear only in that first message. For every
episode of a run's final evaluation (``eval_final_<split>.json``, else ``eval_sft.json``) this
reads the episode's task text from the simulator and measures, from the actions played:

  box room reached   the episode went (``go to <room>``) to any of the five rooms holding boxes
  instructed room    of those, the last such room is the instructed one (chance: 1 in 5)
  instructed colour  some ``move ... to <colour> box`` names the instructed colour (chance: about
                     1 in 6 per try; the six colours are equally common in ETO's splits)
  success            the episode solved the task (reward 1)

A policy that follows its goal scores well above chance on the middle two; one that ignores it
lands near chance however often it finishes the other steps (find, focus, pick up).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for stepagent without an install

GOAL = re.compile(r"move it to the (\w+) box in the ([\w ]+?)\.")
BOX_ROOMS = ("bathroom", "bedroom", "kitchen", "living room", "workshop")
COLOURS = ("blue", "green", "orange", "purple", "red", "yellow")


def box_target(task_text: str) -> Tuple[str, str]:
    """(colour, room) of a find-* task text; ValueError for a task without that sentence."""
    m = GOAL.search(task_text)
    if m is None:
        raise ValueError(f"no 'move it to the <colour> box in the <room>.' in {task_text[:120]!r}")
    return m.group(1), m.group(2)


def episode_follows(actions: Sequence[str], colour: str, room: str) -> Dict[str, Optional[bool]]:
    """What one episode's actions show about its goal (None: the episode reached no box room)."""
    rooms = [a[len("go to "):] for a in actions if a.startswith("go to ") and a[len("go to "):] in BOX_ROOMS]
    tried = any(a.startswith("move ") and a.endswith(f" to {colour} box") for a in actions)
    return {"box_room": bool(rooms), "instructed_room": (rooms[-1] == room) if rooms else None,
            "instructed_colour": tried}


def rates(rows: Sequence[Mapping[str, Optional[bool]]], won: Sequence[bool]) -> Dict[str, float]:
    n = len(rows)
    reached = [r for r in rows if r["box_room"]]
    return {
        "episodes": n,
        "box_room_pct": 100.0 * len(reached) / n if n else float("nan"),
        "instructed_room_pct": 100.0 * sum(bool(r["instructed_room"]) for r in reached) / len(reached)
        if reached else float("nan"),
        "instructed_colour_pct": 100.0 * sum(bool(r["instructed_colour"]) for r in rows) / n if n else float("nan"),
        "success_pct": 100.0 * sum(won) / n if n else float("nan"),
    }


def eval_file(run_dir: Path, split: str) -> Path:
    for name in (f"eval_final_{split}.json", "eval_sft.json"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir}: no eval_final_{split}.json or eval_sft.json")


class TaskTexts:
    """Task texts by episode id, read from the simulator once per id (one JVM)."""

    def __init__(self) -> None:
        self._env = None
        self._texts: Dict[str, str] = {}

    def __call__(self, episode_id: str, split: str) -> str:
        if episode_id not in self._texts:
            from stepagent.envs.base import TaskInstance
            from stepagent.envs.scienceworld import ScienceWorldTextEnv

            if self._env is None:
                self._env = ScienceWorldTextEnv()
            _, task_type, variation = episode_id.split("/")
            self._texts[episode_id] = self._env.reset(TaskInstance("scienceworld", task_type, variation, split, 1))
        return self._texts[episode_id]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--split", default="test", help="the split of eval_final_<split>.json (default test)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    texts = TaskTexts()
    lines = ["| run | episodes | reached a box room % | last box room = instructed % (chance 20) "
             "| tried the instructed colour % (chance ~17 per try) | success % |",
             "|---|---:|---:|---:|---:|---:|"]
    try:
        for run_dir in args.run_dirs:
            path = eval_file(run_dir, args.split)
            episodes = json.loads(path.read_text())["episodes"]
            rows, won = [], []
            for ep in episodes:
                if not ep["task_type"].startswith("find-"):
                    continue
                colour, room = box_target(texts(ep["id"], args.split))
                rows.append(episode_follows(ep["actions"], colour, room))
                won.append(bool(ep["won"]))
            r = rates(rows, won)
            lines.append(f"| {run_dir.name} ({path.name}) | {r['episodes']} | {r['box_room_pct']:.1f} | "
                         f"{r['instructed_room_pct']:.1f} | {r['instructed_colour_pct']:.1f} | {r['success_pct']:.1f} |")
            print(lines[-1], flush=True)
    finally:
        texts.close()
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
