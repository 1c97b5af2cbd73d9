"""The cycle driver: after SFT, ``cycles`` rounds of the chosen arm, each evaluated and saved.

    resume (the rows and training state of finished cycles, when continuing a run)
    held-out agreement of the SFT policy                      (cycle 0 of the convergence curve)
    for each cycle:
        subset      a fresh, seeded random subset of the arm's items (experts or training tasks)
        step        the arm's training: inspection + reflection, rollouts + PPO, ETO, ... (arms/)
        agreement   greedy agreement with the expert on held-out (dev) expert trajectories
        evaluation  in the real environment, on the evaluation split
        row         one metrics row (metrics.jsonl, W&B, cycles/cycle_<n>/metrics.json)
        checkpoint  everything needed to continue exactly after this cycle

The arms (``algos/arms/``, looked up by ``algos/registry.py``) know nothing of this loop.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from stepagent import distributed as dist
from stepagent.agent.prompts import PromptEncoder
from stepagent.algos.inspection import agreement, inspect
from stepagent.algos.registry import make_arm
from stepagent.data.trajectory import Trajectory

log = logging.getLogger(__name__)


@dataclass
class CycleContext:
    cfg: Any
    policy: Any
    encoder: PromptEncoder
    task: Any
    experts: List[Trajectory]
    heldout: List[Trajectory]
    run_dir: Path
    logger: Any
    evaluate: Any  # callable(tag) -> summary
    pool: Any = None  # the EnvPool, for arms that roll out in the environment
    # ppo.advantage=gae: the critic (train.ppo.ValueHead), created once per run by
    # ppo_update.value_head_for and trained across cycles; part of a checkpoint. None otherwise.
    value_head: Any = None
    # stepagent.checkpoint.Checkpointer: saves a checkpoint after each cycle, and restores the
    # loop's state when the run resumes (a fresh one, resuming nothing, when not given)
    checkpoints: Any = None
    # what inspection, held-out agreement and rollouts generate with (stepagent.rollout: hf | vllm);
    # HF generate on the policy when not given
    rollout: Any = None

    def __post_init__(self):
        if self.rollout is None:
            from stepagent.rollout.hf import HFEngine

            self.rollout = HFEngine(self.policy.model, self.policy.tokenizer)
        if self.checkpoints is None:
            from stepagent.checkpoint import Checkpointer

            self.checkpoints = Checkpointer(self.run_dir, self.cfg, self.logger, self.policy)


def cycle_subset(items: Sequence[Any], n: Optional[int], seed: int, cycle: int) -> List[Any]:
    """``n`` of ``items`` (all when None): a fresh, seeded random subset each cycle."""
    rng = random.Random(seed * 1000 + cycle)
    return rng.sample(list(items), min(n, len(items))) if n else list(items)


def heldout_agreement(ctx: CycleContext) -> Dict[str, Any]:
    """Greedy agreement with the expert on held-out (dev) expert segments; "segments": the
    inspected segments themselves (for the arm's held-out metrics)."""
    if not ctx.heldout:
        return {"rate": None, "by_step": [], "samples": 0, "segments": {}}
    segs = inspect(ctx.rollout, ctx.policy.tokenizer, ctx.encoder, ctx.task, ctx.heldout, 1, 0.0,
                   ctx.cfg.policy.max_new_tokens, ctx.cfg.inspection.batch_size, desc="held-out agreement",
                   match=ctx.cfg.inspection.match)
    return {**agreement(segs), "segments": segs}


def record_cycle(ctx: CycleContext, cdir: Path, row: Dict[str, Any]) -> None:
    """A cycle's metrics row: logged (metrics.jsonl, W&B) and kept beside the cycle's data
    as ``<cdir>/metrics.json`` (rank 0 writes files)."""
    ctx.logger.log(row)
    if dist.is_main():
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "metrics.json").write_text(json.dumps(row, indent=1))


def run_cycles(ctx: CycleContext) -> List[Dict[str, Any]]:
    """The cycles of the arm ``ctx.cfg`` names (none for the SFT baseline); their rows."""
    cfg = ctx.cfg
    arm = make_arm(ctx) if cfg.cycles > 0 else None
    if arm is None:
        return []
    history, first = ctx.checkpoints.resume_cycles(arm.train_state)
    if first == 1:  # the SFT policy's agreement: the 'cycle 0' point of the convergence curve
        h0 = heldout_agreement(ctx)
        ctx.logger.log({"cycle": 0, "agreement/heldout": h0["rate"], "agreement/heldout_by_step": h0["by_step"]})
    for cycle in range(first, cfg.cycles + 1):
        cdir = ctx.run_dir / "cycles" / f"cycle_{cycle}"
        subset = cycle_subset(arm.items(), arm.subset_size(), cfg.seed, cycle)
        ctx.rollout.pop_stats()  # counted from here: this cycle's training generation
        stats = arm.step(cycle, subset, cdir)
        gen = ctx.rollout.pop_stats().as_row("generation/train")
        held = heldout_agreement(ctx)
        gen.update(ctx.rollout.pop_stats().as_row("generation/heldout"))
        stats.update(arm.heldout_metrics(held["segments"]) if held["segments"] else {})
        summary = ctx.evaluate(f"eval_cycle_{cycle}")
        row = {
            "cycle": cycle,
            **stats,
            **gen,
            "agreement/heldout": held["rate"],
            "agreement/heldout_by_step": held["by_step"],
            "eval/reward_x100": summary["overall"]["reward_x100"],
            "eval/success_rate": summary["overall"]["success_rate"],
        }
        record_cycle(ctx, cdir, row)
        log.info("cycle %d (%s): held-out agreement %s, %s reward %.1f", cycle, arm.name,
                 "n/a" if held["rate"] is None else f"{held['rate']:.3f}", cfg.eval.split,
                 row["eval/reward_x100"])
        history.append(row)
        ctx.checkpoints.save_cycle(cycle, history, arm.train_state, reference=arm.reference)
    return history
