"""Evaluate a policy in the real environment.

All live episodes (one per pool worker) advance together: their prompts go
through the model as one batch, then their actions go to the workers in
parallel. When an episode ends its worker immediately starts the next instance
(continuous batching). A crashed environment ends its episode as failed
(reward 0, ``crashed``) and the pool restarts the worker.

An episode's reward is ``Task.episode_score`` of its steps' scores (ScienceWorld: ETO's highest
score reached, or the final score: ``task.score``). With ReAct actions an output without
``Action: `` is a step answered with ``INVALID_FORMAT`` that never reaches the environment.

Reported: average episode reward x100, success rate (reward 1), average steps, overall and per
task type; JSON + Markdown in the run directory.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from stepagent.rollout.base import as_rollout_engine
from stepagent.agent.prompts import PromptEncoder
from stepagent.eval.protocol import caption, score_rule, split_label, split_name
from stepagent.preemption import check_preemption
from stepagent.envs.base import INVALID_FORMAT, Task, TaskInstance

log = logging.getLogger(__name__)


@dataclass
class Episode:
    instance: TaskInstance
    instruction: str = ""
    actions: List[str] = field(default_factory=list)  # as generated (the history the model sees)
    # as parsed and sent to the environment; None: an output without an action (ReAct's invalid format)
    env_actions: List[Optional[str]] = field(default_factory=list)
    observations: List[str] = field(default_factory=list)
    step_scores: List[Optional[float]] = field(default_factory=list)  # Task.step_score per step (None: invalid)
    score: float = 0.0  # Task.episode_score of step_scores (task.score: ETO's max, or final)
    crashed: bool = False

    def result(self) -> Dict[str, Any]:
        return {
            "id": self.instance.id,
            "task_type": self.instance.task_type,
            "reward": self.score,
            "won": self.score >= 1.0 - 1e-9,
            "steps": len(self.actions),
            "crashed": self.crashed,
            "actions": self.env_actions,
        }


def summarize(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    def agg(rows):
        n = len(rows)
        return {
            "episodes": n,
            "reward_x100": 100.0 * sum(r["reward"] for r in rows) / max(n, 1),
            "success_rate": sum(r["won"] for r in rows) / max(n, 1),
            "avg_steps": sum(r["steps"] for r in rows) / max(n, 1),
            "crashed": sum(r["crashed"] for r in rows),
        }

    by_type: Dict[str, list] = defaultdict(list)
    for r in results:
        by_type[r["task_type"]].append(r)
    return {"overall": agg(results), "per_type": {k: agg(v) for k, v in sorted(by_type.items())}}


SUMMARY_COLUMNS = ["task_type", "episodes", "reward_x100", "success_rate", "avg_steps", "crashed"]


def summary_rows(summary: Dict[str, Any]) -> List[List[Any]]:
    """``summarize`` output as table rows: one per task type, then "all"."""
    rows = list(summary["per_type"].items()) + [("all", summary["overall"])]
    return [[name] + [m[c] for c in SUMMARY_COLUMNS[1:]] for name, m in rows]


def markdown_table(summaries: Dict[str, Dict[str, Any]]) -> str:
    """One row per (policy label, task type); ``summaries`` maps a label to ``summarize`` output."""
    lines = [
        "| policy | task type | episodes | reward x100 | success % | avg steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, s in summaries.items():
        rows = list(s["per_type"].items()) + [("**all**", s["overall"])]
        for name, m in rows:
            lines.append(
                f"| {label} | {name} | {m['episodes']} | {m['reward_x100']:.1f} | "
                f"{100 * m['success_rate']:.1f} | {m['avg_steps']:.1f} |"
            )
    return "\n".join(lines)


def splits_table(task: str, split: str, summaries: Dict[str, Dict[str, Any]],
                 finals: Optional[Dict[str, Dict[str, Any]]] = None, final_label: Optional[str] = None) -> str:
    """The paper's layout: one row per policy label and, per split (ScienceWorld: seen, unseen), its
    episodes, reward x100 and success %. ``summaries``: the evaluations on ``split`` (the per-cycle
    split) by label; ``finals``: the final policy's (``final_label``'s) on every split. A label
    evaluated on ``split`` only shows "–" under the other splits."""
    finals = finals or {}
    splits = list(finals) if split in finals else [split, *finals]
    header = ["policy"]
    for sp in splits:
        name = split_label(task, sp)
        header += [f"{name} episodes", f"{name} reward x100", f"{name} success %"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, s in summaries.items():
        cells = [label]
        for sp in splits:
            m = s["overall"] if sp == split else finals[sp]["overall"] if label == final_label else None
            cells += ["–"] * 3 if m is None else [str(m["episodes"]), f"{m['reward_x100']:.1f}",
                                                  f"{100 * m['success_rate']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(task: str, split: str, summaries: Dict[str, Dict[str, Any]],
                     finals: Optional[Dict[str, Dict[str, Any]]] = None, final_label: Optional[str] = None,
                     rule: Optional[str] = None) -> str:
    """A run's ``results.md``: the splits side by side (``splits_table``) under a caption naming the
    metric and the score rule, then per task type the evaluations on each split."""
    finals = finals or {}
    others = [sp for sp in finals if sp != split]
    parts = [f"# {task}: results", caption(task, rule), splits_table(task, split, summaries, finals, final_label)]
    if others:
        def named(sp: str, key: str) -> str:
            name = split_name(task, sp)
            return f'{sp} ("{name}", `{key}`)' if name != sp else f"{sp} (`{key}`)"

        parts.append(f"Every stage is evaluated on {named(split, 'eval.split')}; the final policy ({final_label}) "
                     "also on " + ", ".join(named(sp, "eval.final_splits") for sp in others) + ".")
    parts += [f"## {split_label(task, split)} by task type", markdown_table(summaries)]
    for sp in others:
        parts += [f"## {split_label(task, sp)} by task type (the final policy)",
                  markdown_table({final_label: finals[sp]})]
    return "\n\n".join(parts) + "\n"


def run_episodes(
    model,
    tokenizer,
    encoder: PromptEncoder,
    task: Task,
    instances: Sequence[TaskInstance],
    pool,
    max_new_tokens: int,
    temperature: float = 0.0,
    progress: bool = True,
    desc: str = "eval",
) -> List[Episode]:
    """Play every instance to the end; returns the finished episodes in instance order.

    An instance may appear several times (K rollouts of one task): episodes are
    tracked by position, not by instance id.

    Data parallel (several ranks): each rank plays its share of the instances (every
    W-th) in its own environment pool, with the full parameters gathered once for the
    whole phase under ZeRO-3, so ranks may need different numbers of generation calls;
    every rank returns all episodes.
    """
    from stepagent import distributed as dist

    engine = as_rollout_engine(model, tokenizer)
    mine = dist.shard_indices(len(instances))
    with engine.phase():  # ZeRO-3 parameters gathered once (hf); the engine's weights brought up to date (vllm)
        local = _play_episodes(engine, tokenizer, encoder, task, [instances[i] for i in mine], pool,
                               max_new_tokens, temperature, progress, desc)
    return dist.gather_sharded(local, len(instances))


def _play_episodes(
    engine,
    tokenizer,
    encoder: PromptEncoder,
    task: Task,
    instances: Sequence[TaskInstance],
    pool,
    max_new_tokens: int,
    temperature: float = 0.0,
    progress: bool = True,
    desc: str = "eval",
) -> List[Episode]:
    """``run_episodes`` in this process: continuous batching over the pool's workers."""
    queue = list(enumerate(instances))
    finished: Dict[int, Episode] = {}
    position: Dict[int, int] = {}  # slot -> position in ``instances``
    live: Dict[int, Episode] = {}
    free = list(range(pool.num_workers))
    bar = tqdm(total=len(queue), desc=desc, disable=not progress, dynamic_ncols=True)

    def finish(slot: int) -> None:
        ep = live.pop(slot)
        finished[position.pop(slot)] = ep
        free.append(slot)
        bar.update(1)

    while queue or live:
        # 1. Start new episodes on free workers.
        starts = []
        while free and queue:
            starts.append((free.pop(0), queue.pop(0)))
        if starts:
            results = pool.reset_batch([(slot, inst) for slot, (_, inst) in starts])
            for (slot, (pos, inst)), res in zip(starts, results):
                ep = Episode(inst, instruction=res.observation)
                live[slot] = ep
                position[slot] = pos
                if res.crashed:
                    ep.crashed = True
                    finish(slot)
        if not live:
            continue
        # 2. One batched generation for every live episode.
        slots = sorted(live)
        prompts = [
            encoder.encode_state(live[s].instruction, live[s].actions, live[s].observations).input_ids
            for s in slots
        ]
        gens = engine.generate(prompts, max_new_tokens, encoder.eos_token_id, temperature)
        texts = [tokenizer.decode(g[0], skip_special_tokens=True).strip() for g in gens]
        # 3. Step every live environment with an action in parallel; an output without one
        #    (ReAct without "Action: ") is a step answered with INVALID_FORMAT, as in ETO.
        env_actions = [task.parse_action(t) for t in texts]
        valid = [(s, a) for s, a in zip(slots, env_actions) if a is not None]
        stepped = dict(zip([s for s, _ in valid], pool.step_batch(valid) if valid else []))
        # before using the results: a preemption signal may also have ended environment processes
        check_preemption(f"in {desc}")
        for slot, text, act in zip(slots, texts, env_actions):
            ep = live[slot]
            res = stepped.get(slot)
            ep.actions.append(text)
            ep.env_actions.append(act)
            ep.observations.append(INVALID_FORMAT if res is None else res.observation)
            ep.step_scores.append(None if res is None or res.crashed else task.step_score(res))
            ep.crashed = res is not None and res.crashed
            ep.score = 0.0 if ep.crashed else task.episode_score(ep.step_scores)
            done = res is not None and (res.done or res.crashed)
            if done or len(ep.actions) >= ep.instance.max_steps:
                finish(slot)
    bar.close()
    return [finished[i] for i in range(len(instances))]


def evaluate(
    model,
    tokenizer,
    encoder: PromptEncoder,
    task: Task,
    instances: Sequence[TaskInstance],
    pool,
    max_new_tokens: int,
    temperature: float,
    out_dir: Optional[Path] = None,
    tag: str = "eval",
    logger=None,
    progress: bool = True,
) -> Dict[str, Any]:
    episodes = run_episodes(
        model, tokenizer, encoder, task, instances, pool, max_new_tokens, temperature, progress, desc=tag
    )
    results = [ep.result() for ep in episodes]
    summary = summarize(results)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        split = instances[0].split if instances else "?"
        rule = score_rule(task.name, getattr(task, "cfg", None))
        (out_dir / f"{tag}.json").write_text(json.dumps(
            {"summary": summary, "split": split, "score": rule, "episodes": results}, indent=1))
        o = summary["overall"]
        (out_dir / f"{tag}.md").write_text(
            f"# {tag}: {task.name} {split_label(task.name, split)}, {o['episodes']} episodes\n\n"
            f"{caption(task.name, rule)}\n\n{markdown_table({tag: summary})}\n")
    if logger is not None:
        o = summary["overall"]
        logger.log({f"{tag}/reward_x100": o["reward_x100"], f"{tag}/success_rate": o["success_rate"],
                    f"{tag}/avg_steps": o["avg_steps"], f"{tag}/crashed": o["crashed"]})
        logger.log_table(
            f"{tag}/episodes",
            ["task_type", "variation", "reward", "success", "steps", "crashed"],
            [[r["task_type"], ep.instance.index, r["reward"], r["won"], r["steps"], r["crashed"]]
             for ep, r in zip(episodes, results)],
        )
        logger.log_table(f"{tag}/summary", SUMMARY_COLUMNS, summary_rows(summary))
    return summary
