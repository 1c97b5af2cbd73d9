"""Inspection (docs/method.md §1): the novice observes the expert step by step.

Every expert trajectory of n steps is split after each action into n segments
(s_t^e, a_t^e). At each expert prefix s_t^e the current policy generates K
actions â_t^k ~ π_θ(· | s_t^e); no environment call is needed. Segments where
the agent reproduces the expert action carry no contrast but count towards the
agreement rate — the measurable proxy for the paper's convergence claim.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

from tqdm.auto import tqdm

from stepagent.agent.prompts import PromptEncoder
from stepagent.preemption import check_preemption
from stepagent.data.trajectory import Trajectory
from stepagent.envs.base import Task
from stepagent.rollout.base import as_rollout_engine


def normalize_action(text: str) -> str:
    """Compare actions modulo case, whitespace and trailing punctuation."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!")


def comparison_key(task: Task, text: str, match: str = "action") -> str:
    """What ``inspection.match`` compares of an action text.

    action: the action part as the environment would receive it (``Task.parse_action``; with
    ReAct the thoughts may differ and the actions still agree); a text without one (a bare expert
    action in a ReAct run, or an agent output without ``Action: ``) is compared whole.
    full: the whole text, thoughts included."""
    parsed = task.parse_action(text) if str(match) == "action" else None
    return normalize_action(parsed if parsed is not None else text)


@dataclass
class Segment:
    traj_id: str
    step: int
    expert_action: str
    agent_actions: List[str] = field(default_factory=list)  # generated text, as the history would hold it
    matches: List[bool] = field(default_factory=list)  # agent action == expert action (normalised, parsed)

    @property
    def has_contrast(self) -> bool:
        return not all(self.matches)


def segments_of(trajs: Sequence[Trajectory]) -> List[tuple]:
    return [(tr, t) for tr in trajs for t in range(len(tr.steps))]


def inspect(
    model,
    tokenizer,
    encoder: PromptEncoder,
    task: Task,
    trajs: Sequence[Trajectory],
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "inspection",
    match: str = "action",
) -> Dict[str, List[Segment]]:
    """Agent actions at every expert prefix; returns {trajectory id: segments in step order}.
    ``model``: the policy, or the run's rollout engine (``stepagent.rollout``) generating for it.
    ``match``: when an agent action counts as the expert's (``comparison_key``).

    Data parallel: each rank generates for every W-th prompt (by length) with the full
    parameters gathered once (ZeRO-3), and every rank returns all segments."""
    from stepagent import distributed as dist

    engine = as_rollout_engine(model, tokenizer)
    segs = segments_of(trajs)
    out: Dict[str, List[Segment]] = defaultdict(list)
    # Longest prompts first: batches of similar length waste less padding.
    prompts = []
    for tr, t in segs:
        obs = [s.observation for s in tr.steps[:t]]
        prompts.append(encoder.encode_state(tr.instruction, tr.actions[:t], obs).input_ids)
    order = sorted(range(len(segs)), key=lambda i: -len(prompts[i]))
    order = order[dist.rank() :: dist.world_size()]  # this rank's prompts
    bar = tqdm(total=len(order), desc=desc, disable=not progress, dynamic_ncols=True)
    results: Dict[int, Segment] = {}
    with engine.phase():  # ZeRO-3 parameters gathered once (hf); the engine's weights brought up to date (vllm)
        _inspect_batches(engine, tokenizer, encoder, task, segs, prompts, order, num_samples, temperature,
                         max_new_tokens, batch_size, desc, bar, results, match)
    bar.close()
    for part in dist.all_gather_objects(results):
        results.update(part)
    for j in range(len(segs)):
        out[segs[j][0].id].append(results[j])
    return dict(out)


def _inspect_batches(engine, tokenizer, encoder, task, segs, prompts, order, num_samples, temperature,
                     max_new_tokens, batch_size, desc, bar, results: Dict[int, Segment], match: str) -> None:
    """Generate for the prompts ``order`` lists, ``batch_size`` at a time (or as many as the engine
    decodes at once), into ``results``."""
    batch_size = engine.batch_prompts(batch_size, num_samples)
    for i in range(0, len(order), batch_size):
        check_preemption(f"in {desc}")
        idx = order[i : i + batch_size]
        gens = engine.generate([prompts[j] for j in idx], max_new_tokens, encoder.eos_token_id,
                               temperature=temperature, num_samples=num_samples)
        for j, samples in zip(idx, gens):
            tr, t = segs[j]
            expert = tr.steps[t].action
            texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in samples]
            target = comparison_key(task, expert, match)
            matches = [comparison_key(task, x, match) == target for x in texts]
            results[j] = Segment(tr.id, t, expert, texts, matches)
        bar.update(len(idx))


def agreement(segments: Dict[str, List[Segment]]) -> Dict[str, object]:
    """Agreement rate overall and by step index (fraction of agent samples equal to the expert's)."""
    by_step: Dict[int, List[bool]] = defaultdict(list)
    for segs in segments.values():
        for s in segs:
            by_step[s.step].extend(s.matches)
    flat = [m for v in by_step.values() for m in v]
    return {
        "rate": sum(flat) / max(len(flat), 1),
        "by_step": [sum(by_step[t]) / len(by_step[t]) for t in sorted(by_step)],
        "samples": len(flat),
    }


def write_contrast_jsonl(path: Path, segments: Dict[str, List[Segment]]) -> None:
    """The cycle's contrast data, one segment per line, human-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for segs in segments.values():
            for s in segs:
                f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")


def inspect_cycle(ctx, subset: Sequence[Trajectory], cycle: int, cdir: Path):
    """A cycle's inspection (K agent actions at every expert prefix of ``subset``), its contrast
    data written to ``<cdir>/contrast.jsonl`` (rank 0), and the row's inspection metrics."""
    from stepagent import distributed as dist

    cfg = ctx.cfg
    segments = inspect(ctx.rollout, ctx.policy.tokenizer, ctx.encoder, ctx.task, subset,
                       cfg.inspection.samples_per_state, cfg.inspection.temperature, cfg.policy.max_new_tokens,
                       cfg.inspection.batch_size, desc=f"cycle {cycle} inspection", match=cfg.inspection.match)
    if dist.is_main():
        write_contrast_jsonl(cdir / "contrast.jsonl", segments)
    agree = agreement(segments)
    row = {
        "agreement/inspection": agree["rate"],
        "agreement/inspection_by_step": agree["by_step"],
        "contrast/segments": sum(len(v) for v in segments.values()),
        "contrast/segments_with_contrast": sum(s.has_contrast for v in segments.values() for s in v),
    }
    return segments, row
