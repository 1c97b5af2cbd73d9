"""What every results table names: the split (ETO's "seen"/"unseen"), the metric and the score rule.

Used by the run's own tables (``results.md``, ``eval_*.md``, stepagent/eval/evaluate.py) and by
experiments/report.py, so a number is always printed with what it measures. No torch import.
"""

from __future__ import annotations

from typing import Any, Optional

# ETO's (and the paper's) names of the dev and test lists: ScienceWorld's, and ALFWorld's valid_seen /
# valid_unseen (ETO's 134 unseen games).
SPLIT_NAMES = {("scienceworld", "dev"): "seen", ("scienceworld", "test"): "unseen",
               ("alfworld", "dev"): "seen", ("alfworld", "test"): "unseen"}

# How an episode's reward is read off the environment, per (task, task.score).
SCORE_RULES = {
    ("scienceworld", "max"): "score: max — ETO's rule, the highest score reached during the episode (÷100)",
    ("scienceworld", "final"): "score: final — the score when the episode ends, negative counted as 0 (÷100)",
    ("hotpotqa", None): "score: exact match of the answer (1 or 0)",
    ("alfworld", None): "score: 1 when the game is won within the step cap (40, ETO's), else 0",
}

METRIC = ("reward x100: the mean episode reward ×100 (ETO's metric); success %: the episodes that solved "
          "the task (reward 1); episodes: how many were played")


def split_name(task: str, split: str) -> str:
    """"seen" / "unseen" for ScienceWorld's and ALFWorld's dev / test, else the split itself."""
    return SPLIT_NAMES.get((task, str(split)), str(split))


def split_label(task: str, split: str) -> str:
    """"seen (dev)" for ScienceWorld's dev, "dev" where the split has no other name."""
    name = split_name(task, split)
    return name if name == str(split) else f"{name} ({split})"


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    try:
        return getattr(cfg, key, None)
    except Exception:  # an OmegaConf node without the key
        return None


def score_rule(task: str, task_cfg: Any = None, legacy: bool = False) -> Optional[str]:
    """The run's ``task.score`` (ScienceWorld: max | final; None for a task without the choice). A
    ScienceWorld config without the key reads as the task's default, max (ETO's rule), or with
    ``legacy`` (a finished run's saved config, experiments/report.py) as final: such a run is from
    before the key existed, when the reward was always the final score."""
    rule = _get(task_cfg, "score")
    if rule is None and task == "scienceworld":
        return "final" if legacy else "max"
    return None if rule is None else str(rule)


def score_caption(task: str, rule: Optional[str] = None) -> str:
    """The sentence naming how rewards were scored, e.g. "score: max — ETO's rule, ..."."""
    if (task, rule) in SCORE_RULES:
        return SCORE_RULES[(task, rule)]
    if rule is not None:
        return f"score: {rule}"
    return "score: the environment's score when the episode ends"


def caption(task: str, rule: Optional[str] = None) -> str:
    """The caption line every results table carries: the metric and the score rule."""
    return f"{METRIC}. {score_caption(task, rule)}."
