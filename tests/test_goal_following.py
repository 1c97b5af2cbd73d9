"""experiments/goal_following.py: hand-checked episodes, then the script on the real simulator."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("goal_following", REPO / "experiments" / "goal_following.py")
gf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gf)


def test_goal_and_episode_rates_by_hand():
    text = ("Your task is to find a(n) animal. First, focus on the thing. Then, move it to the red box in the "
            "living room.\n\nThis room is called the hallway.")
    assert gf.box_target(text) == ("red", "living room")
    with pytest.raises(ValueError, match="move it to the"):
        gf.box_target("Your task is to boil water.")
    follows = gf.episode_follows(
        ["go to kitchen", "go to outside", "focus on dove", "go to kitchen", "go to living room",
         "move dove egg in inventory to red box"], "red", "living room")
    assert follows == {"box_room": True, "instructed_room": True, "instructed_colour": True}
    # the last box room counts (living room, then back to the kitchen); "red box" in another action does not
    wrong = gf.episode_follows(["go to living room", "go to kitchen", "move dove to blue box", "focus on red box"],
                               "red", "living room")
    assert wrong == {"box_room": True, "instructed_room": False, "instructed_colour": False}
    nowhere = gf.episode_follows(["go to outside", "look around"], "red", "living room")
    assert nowhere == {"box_room": False, "instructed_room": None, "instructed_colour": False}
    r = gf.rates([follows, wrong, nowhere], [True, False, False])
    # 2 of 3 reached a box room; of those 1 of 2 ended in the instructed one; 1 of 3 tried red; 1 of 3 won
    assert r == {"episodes": 3, "box_room_pct": pytest.approx(200 / 3), "instructed_room_pct": 50.0,
                 "instructed_colour_pct": pytest.approx(100 / 3), "success_pct": pytest.approx(100 / 3)}


def test_script_reads_goals_from_the_simulator(tmp_path):
    from stepagent.envs.base import TaskInstance
    from stepagent.envs.scienceworld import ScienceWorldTextEnv

    env = ScienceWorldTextEnv()
    try:
        colour, room = gf.box_target(env.reset(TaskInstance("scienceworld", "find-animal", "225", "test", 1)))
    finally:
        env.close()
    other_room = next(r for r in gf.BOX_ROOMS if r != room)
    other_colour = next(c for c in gf.COLOURS if c != colour)
    episodes = [
        {"id": "scienceworld/find-animal/225", "task_type": "find-animal", "won": True,
         "actions": [f"go to {room}", f"move dove egg in inventory to {colour} box"]},
        {"id": "scienceworld/find-animal/225", "task_type": "find-animal", "won": False,
         "actions": [f"go to {other_room}", f"move dove egg in inventory to {other_colour} box"]},
    ]
    run = tmp_path / "sft_s0"
    run.mkdir()
    (run / "eval_final_test.json").write_text(json.dumps({"episodes": episodes}))
    out = tmp_path / "goal.md"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "goal_following.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in out.read_text().splitlines() if line.startswith("| sft_s0")]
    assert row == ["| sft_s0 (eval_final_test.json) | 2 | 100.0 | 50.0 | 50.0 | 50.0 |"]
