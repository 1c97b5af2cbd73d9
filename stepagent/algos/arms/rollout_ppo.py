"""PPO on the agent's own multi-turn rollouts: the outcome ablation and LOOP (docs/method.md §2, §3).

Each cycle:
  1. rollouts   — ``inspection.trajectories`` training tasks x ``inspection.samples_per_state``
                  rollouts each (K), at ``inspection.temperature``, in the real environment
                  (the same budget knobs as inspection, so the arms are comparable);
  2. advantage  — the final score R is the only reward, on the last action token; with
                  γ = 1 and the critic-free leave-one-out baseline over the K rollouts of a task
                  every generated token of rollout k gets  A_k = R_k - mean_{i≠k} R_i
                  (ppo.advantage=loo); with ppo.advantage=gae, token-level GAE(γ, λ) over the
                  rollout's generated tokens (observation tokens skipped) with the value head's
                  V_old from the old-log-prob forward (``ppo_update.set_rollout_gae``);
  3. PPO        — per-token clipped ratio over generated tokens only (instruction and
                  observation tokens are context), KL to π_ref (``ppo.kl_coef``; LOOP: 0),
                  rollouts with |A| < ``ppo.drop_advantage_below`` dropped (LOOP: 0.01);

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
from stepagent.algos.ppo_update import (PPOSample, fill_old_logprobs, ppo_optimizer, ppo_step_on_samples, ppo_update,
                                        set_rollout_gae, value_head_for)
from stepagent.algos.registry import Arm, register_arm, sft_reference
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


@register_arm("outcome", "loop")
class RolloutPPOArm(Arm):
    """reward=outcome and algo=loop: the same code, LOOP's preset is conf/algo/loop.yaml."""

    def __init__(self, ctx):
        super().__init__(ctx)
        pcfg, model = ctx.cfg.ppo, ctx.policy.model
        self.head = value_head_for(ctx)  # ppo.advantage=gae: the critic, ctx.value_head; loo: None
        self.opt = ppo_optimizer(model, pcfg, self.head)
        self.reference = sft_reference(ctx, pcfg.reference == "sft" and pcfg.kl_coef > 0)
        self.train_state = {"policy_optimizer": self.opt, "value_head": self.head}
        expert_ids = {t.id for t in ctx.experts}
        # the training tasks the other arms learn from (those with an expert trajectory)
        self.tasks = [i for i in ctx.task.instances("train") if i.id in expert_ids]
        if not self.tasks:
            raise ValueError(f"{ctx.cfg.algo.name}/{ctx.cfg.reward.name}: no training task has an expert "
                             "trajectory, so there is nothing to roll out (do the trajectory file's ids name "
                             "task instances? see docs/tasks.md)")

    def items(self):
        return self.tasks

    def step(self, cycle: int, subset: List[Any], cdir: Path) -> Dict[str, Any]:
        ctx, cfg, pcfg = self.ctx, self.ctx.cfg, self.ctx.cfg.ppo
        model, tok, head = ctx.policy.model, ctx.policy.tokenizer, self.head
        pad, K = tok.pad_token_id, cfg.inspection.samples_per_state

        # 1. K rollouts per task in the environment.
        episodes = run_episodes(ctx.rollout, tok, ctx.encoder, ctx.task, [t for t in subset for _ in range(K)],
                                ctx.pool, cfg.policy.max_new_tokens, cfg.inspection.temperature,
                                desc=f"cycle {cycle} rollouts")
        ok = [e for e in episodes if not e.crashed]

        rewards = torch.tensor([e.score for e in ok])
        desc = f"cycle {cycle} PPO ({self.name}, {pcfg.advantage})"
        if head is None:
            # 2. Leave-one-out advantage over the rollouts of the same task.
            groups: Dict[str, int] = {}
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
            stats = ppo_step_on_samples(model, self.opt, packs, samples, pcfg, pad, self.reference,
                                        seed=cfg.seed + cycle, desc=desc)
        else:
            # 2. GAE: V_old comes out of the same packed forward as log π_old. Every rollout is
            # kept (ppo.drop_advantage_below applies to one-advantage-per-rollout loo only).
            keep = torch.ones(len(ok), dtype=torch.bool)
            packs, index = rollout_packs(ctx.encoder, ok, cfg.policy.max_seq_len)
            samples = [PPOSample(p, j, 0.0) for p, j, _ in index]
            fill_old_logprobs(model, packs, samples, pcfg, pad, self.reference, head)
            set_rollout_gae(samples, [e for *_, e in index], rewards.tolist(), pcfg.gamma, pcfg.lam)
            write_rollouts_jsonl(cdir / "rollouts.jsonl", ok, episode_mean_advantages(samples, index, len(ok)))

            # 3. PPO on every generated token, the critic in the same minibatch steps.
            stats = ppo_update(model, self.opt, packs, samples, pcfg, pad, seed=cfg.seed + cycle, desc=desc,
                               value_head=head) if samples else {"ppo/steps": 0, "ppo/samples": 0}
        row = {
            "rollout/reward_mean": float(rewards.mean()) if ok else None,
            "rollout/episodes": len(episodes),
            "rollout/crashed": len(episodes) - len(ok),
            "rollout/dropped_small_advantage": int((~keep).sum()),
            **stats,
        }
        log.info("cycle %d (%s): rollout reward %.3f", cycle, self.name, row["rollout/reward_mean"] or 0.0)
        return row
