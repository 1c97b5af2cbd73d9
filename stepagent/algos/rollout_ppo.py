"""PPO on the agent's own multi-turn rollouts: reward=outcome (the ablation) and LOOP.

Each cycle:
  1. rollouts   — ``inspection.trajectories`` training tasks x ``inspection.samples_per_state``
                  rollouts each (K), at ``inspection.temperature``, in the real environment
                  (the same budget knobs as inspection, so the arms are comparable);
  2. advantage  — the final score R is the only reward, on the last action token; with
                  γ = 1 and the critic-free leave-one-out baseline over the K rollouts of a task
                  every generated token of rollout k gets  A_k = R_k - mean_{i≠k} R_i
                  (ppo.advantage=loo); with ppo.advantage=gae, token-level GAE(γ, λ) over the
                  rollout's generated tokens (observation tokens skipped) with the value head's
                  V_old from the old-log-prob forward (``ppo_common.set_rollout_gae``);
  3. PPO        — per-token clipped ratio over generated tokens only (instruction and
                  observation tokens are context), KL to π_ref (``ppo.kl_coef``; LOOP: 0),
                  rollouts with |A| < ``ppo.drop_advantage_below`` dropped (LOOP: 0.01);
  4. evaluation and checkpoint, as in the StepAgent cycles.

A rollout is one sequence (or one window per step when too long), so all of its
log-probs come from one forward pass: it is packed with no branches, and each of
its actions is a slot. Crashed rollouts (environment failure) carry no reward and
are left out of the update, counted in ``rollout/crashed``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import torch

from stepagent import distributed as dist
from stepagent.algos.ppo_common import (PPOSample, fill_old_logprobs, ppo_optimizer, ppo_step_on_samples, ppo_update,
                                        set_rollout_gae, value_head_for)
from stepagent.algos.stepagent import (CycleContext, cycle_subset, heldout_agreement, log_initial_agreement,
                                       record_cycle, trainable_snapshot)
from stepagent.eval.evaluate import Episode, run_episodes
from stepagent.train.packing import Packed, pack_trajectory
from stepagent.train.ppo import drop_small_advantages, loo_advantages

log = logging.getLogger(__name__)


def rollout_packs(encoder, episodes: List[Episode], max_len: int):
    """(packs, [(pack, slot, episode index)]) for every action of every episode."""
    packs: List[Packed] = []
    index = []
    for e, ep in enumerate(episodes):
        if not ep.actions:
            continue
        for win, st in encoder.encode_trajectory_steps(ep.instruction, ep.actions, ep.observations, max_len):
            pack = pack_trajectory(win, {}, st)
            index.extend((len(packs), j, e) for j in range(len(pack.slots)))
            packs.append(pack)
    return packs, index


def episode_mean_advantages(samples: List[PPOSample], index, n_episodes: int) -> List[float]:
    """Mean GAE advantage over each episode's generated tokens (for rollouts.jsonl)."""
    tot, cnt = [0.0] * n_episodes, [0] * n_episodes
    for s, (_, _, e) in zip(samples, index):
        tot[e] += float(s.token_advantages.sum())
        cnt[e] += s.token_advantages.numel()
    return [t / max(c, 1) for t, c in zip(tot, cnt)]


def write_rollouts_jsonl(path: Path, episodes: List[Episode], advantages: List[float]) -> None:
    if not dist.is_main():  # data parallel: rank 0 writes the run directory's files
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ep, a in zip(episodes, advantages):
            f.write(json.dumps({"id": ep.instance.id, "reward": ep.score, "advantage": a, "crashed": ep.crashed,
                                "actions": ep.env_actions, "observations": ep.observations}, ensure_ascii=False) + "\n")


def run_rollout_ppo_cycles(ctx: CycleContext) -> List[Dict[str, Any]]:
    cfg, pcfg, model, tok = ctx.cfg, ctx.cfg.ppo, ctx.policy.model, ctx.policy.tokenizer
    arm = "loop" if cfg.algo.name == "loop" else "outcome"
    pad = tok.pad_token_id
    head = value_head_for(ctx)  # ppo.advantage=gae: the critic, ctx.value_head; loo: None
    opt = ppo_optimizer(model, pcfg, head)
    ref_params = (ctx.checkpoints.reference_snapshot() or trainable_snapshot(model)) \
        if (pcfg.reference == "sft" and pcfg.kl_coef > 0) else None
    expert_ids = {t.id for t in ctx.experts}
    # The training tasks the other arms learn from (those with an expert trajectory).
    tasks = [i for i in ctx.task.instances("train") if i.id in expert_ids]
    K = cfg.inspection.samples_per_state
    train = {"policy_optimizer": opt, "value_head": head}  # restored when resuming after cycle n
    history, first = ctx.checkpoints.resume_cycles(train)
    if first == 1:
        log_initial_agreement(ctx)
    for cycle in range(first, cfg.cycles + 1):
        cdir = ctx.run_dir / "cycles" / f"cycle_{cycle}"
        chosen = cycle_subset(tasks, cfg, cycle)

        # 1. K rollouts per task in the environment.
        episodes = run_episodes(model, tok, ctx.encoder, ctx.task, [t for t in chosen for _ in range(K)],
                                ctx.pool, cfg.policy.max_new_tokens, cfg.inspection.temperature,
                                desc=f"cycle {cycle} rollouts")
        ok = [e for e in episodes if not e.crashed]

        rewards = torch.tensor([e.score for e in ok])
        desc = f"cycle {cycle} PPO ({arm}, {pcfg.advantage})"
        if head is None:
            # 2. Leave-one-out advantage over the rollouts of the same task.
            groups = {}
            gid = torch.tensor([groups.setdefault(e.instance.id, len(groups)) for e in ok])
            adv = loo_advantages(rewards, gid) if ok else torch.zeros(0)
            keep = drop_small_advantages(adv, pcfg.drop_advantage_below) if pcfg.drop_advantage_below > 0 \
                else torch.ones_like(adv, dtype=torch.bool)
            write_rollouts_jsonl(cdir / "rollouts.jsonl", ok, adv.tolist())

            # 3. PPO on every generated token of the kept rollouts.
            kept = [e for e, k in zip(ok, keep.tolist()) if k]
            kept_adv = [float(a) for a, k in zip(adv, keep.tolist()) if k]
            packs, index = rollout_packs(ctx.encoder, kept, cfg.policy.max_seq_len)
            samples = [PPOSample(p, j, kept_adv[e]) for p, j, e in index]
            stats = ppo_step_on_samples(model, opt, packs, samples, pcfg, pad, ref_params, seed=cfg.seed + cycle,
                                        desc=desc)
        else:
            # 2. GAE: V_old comes out of the same packed forward as log π_old. Every rollout is
            # kept (ppo.drop_advantage_below applies to one-advantage-per-rollout loo only).
            keep = torch.ones(len(ok), dtype=torch.bool)
            packs, index = rollout_packs(ctx.encoder, ok, cfg.policy.max_seq_len)
            samples = [PPOSample(p, j, 0.0) for p, j, _ in index]
            fill_old_logprobs(model, packs, samples, pcfg, pad, ref_params, head)
            set_rollout_gae(samples, [e for *_, e in index], rewards.tolist(), pcfg.gamma, pcfg.lam)
            write_rollouts_jsonl(cdir / "rollouts.jsonl", ok, episode_mean_advantages(samples, index, len(ok)))

            # 3. PPO on every generated token, the critic in the same minibatch steps.
            stats = ppo_update(model, opt, packs, samples, pcfg, pad, seed=cfg.seed + cycle, desc=desc,
                               value_head=head) if samples else {"ppo/steps": 0, "ppo/samples": 0}

        # 4. Held-out agreement, evaluation, checkpoint (after the row is logged).
        held = heldout_agreement(ctx)
        summary = ctx.evaluate(f"eval_cycle_{cycle}")
        row = {
            "cycle": cycle,
            "rollout/reward_mean": float(rewards.mean()) if ok else None,
            "rollout/episodes": len(episodes),
            "rollout/crashed": len(episodes) - len(ok),
            "rollout/dropped_small_advantage": int((~keep).sum()),
            "agreement/heldout": held["rate"],
            "agreement/heldout_by_step": held["by_step"],
            "eval/reward_x100": summary["overall"]["reward_x100"],
            "eval/success_rate": summary["overall"]["success_rate"],
            **stats,
        }
        record_cycle(ctx, cdir, row)
        log.info("cycle %d (%s): rollout reward %.3f, dev reward %.1f", cycle, arm,
                 row["rollout/reward_mean"] or 0.0, row["eval/reward_x100"])
        history.append(row)
        ctx.checkpoints.save_cycle(cycle, history, train, reference=ref_params)
    return history
