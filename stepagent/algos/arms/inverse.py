"""StepAgent-inverse (docs/method.md §1): inspection, a GAIL discriminator's step reward, PPO.

Each cycle:
  1. inspection    — K agent actions â_t^k at every expert prefix s_t^e (``algos/inspection.py``);
  2. discriminator — D(s, a) (→ 1 on agent pairs) is measured on the fresh agent actions (its
                     accuracy before training on them: the convergence proxy, → 0.5 when the
                     agent's (s, a) occupancy matches the expert's), then trained on expert
                     (s_t^e, a_t^e) vs agent (s_t^e, â_t^k) pairs (``algos/discriminator.py``);
  3. step reward   — r = -log D(s, â) (gail) or -logit D (airl) for every agent sample, the
                     expert's own reward for samples equal to the expert action, normalised over
                     the batch (``algos/inverse_reward.py``);
  4. PPO           — each (s_t^e, â_t^k) is a one-step sample, all K of a state in one packed
                     forward with the expert trajectory (``algos/contrast.py``):
                       ppo.advantage=loo: A_k = r_k - mean_{i≠k} r_i over the K samples of s;
                       ppo.advantage=gae: A_k = r_k - V_old(s) — GAE over one step is its TD
                       residual with V(terminal) = 0 — and V(s) is regressed to r;
                     π_old = the sampling policy (cycle start), π_ref = SFT or the same policy
                     (``ppo.reference``) for the KL term (``algos/ppo_update.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

import torch

from stepagent.algos.contrast import build_packs
from stepagent.algos.discriminator import Discriminator, accuracy, build_pairs, config_from_reward, train_discriminator
from stepagent.algos.inspection import inspect_cycle
from stepagent.algos.inverse_reward import by_step_means, inverse_step_rewards, normalize_rewards
from stepagent.algos.ppo_update import (PPOSample, fill_old_logprobs, ppo_optimizer, ppo_step_on_samples, ppo_update,
                                        set_one_step_gae, value_head_for)
from stepagent.algos.registry import Arm, register_arm, sft_reference
from stepagent.config import disc_backbone_of
from stepagent.train.engine import train_engine
from stepagent.train.ppo import drop_small_advantages, loo_advantages

log = logging.getLogger(__name__)


@register_arm("inverse")
class InverseArm(Arm):
    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, rcfg, model = ctx.cfg, ctx.cfg.reward, ctx.policy.model
        self.reference = sft_reference(ctx, cfg.ppo.reference == "sft")
        # the policy (+ the value head with ppo.advantage=gae, kept on ctx.value_head): one optimizer
        self.opt = ppo_optimizer(model, cfg.ppo, value_head_for(ctx))
        torch.manual_seed(cfg.seed)
        self.backbone = disc_backbone_of(rcfg, cfg.policy.kind)  # auto: policy for tiny, encoder for hf
        if self.backbone == "policy":  # the SFT policy's features: a copy of its decoder + a head
            self.disc = Discriminator.from_policy(model, ctx.policy.tokenizer, config_from_reward(rcfg))
        else:  # a separate small encoder
            self.disc = Discriminator.for_tokenizer(ctx.policy.tokenizer, config_from_reward(rcfg))
        self.disc.to(next(model.parameters()).device)
        log.info("discriminator (%s backbone): %.2fM parameters", self.backbone,
                 sum(p.numel() for p in self.disc.parameters()) / 1e6)
        self.disc_opt = train_engine(self.disc, lr=rcfg.disc_lr)  # its own DeepSpeed engine under deepspeed=...
        self.train_state = {"policy_optimizer": self.opt, "discriminator": self.disc,
                            "discriminator_optimizer": self.disc_opt, "value_head": ctx.value_head}

    def heldout_metrics(self, segments) -> Dict[str, Any]:
        """D's accuracy on held-out (dev) expert prefixes, expert action vs the updated policy's greedy
        action where they differ (a pair it never trained on): disc/acc_heldout, the convergence proxy."""
        expert_pairs, agent_pairs = build_pairs(self.ctx.encoder, self.ctx.heldout, segments,
                                                self.ctx.cfg.reward.disc_max_len)
        if not agent_pairs:  # the greedy policy matches the expert at every held-out prefix
            return {"disc/heldout_pairs": 0}
        acc = accuracy(self.disc, expert_pairs, agent_pairs)
        return {**{f"disc/{k}_heldout": v for k, v in acc.items()}, "disc/heldout_pairs": len(agent_pairs)}

    def step(self, cycle: int, subset: List[Any], cdir: Path) -> Dict[str, Any]:
        ctx, cfg, rcfg, pcfg = self.ctx, self.ctx.cfg, self.ctx.cfg.reward, self.ctx.cfg.ppo
        model, pad = ctx.policy.model, ctx.policy.tokenizer.pad_token_id
        segments, row = inspect_cycle(ctx, subset, cycle, cdir)

        # the discriminator: measured on the fresh agent actions, then trained on them
        expert_pairs, agent_pairs = build_pairs(ctx.encoder, subset, segments, rcfg.disc_max_len)
        stats: Dict[str, Any] = {}
        if agent_pairs:
            stats.update({f"disc/{k}_fresh": v for k, v in accuracy(self.disc, expert_pairs, agent_pairs).items()})
        dst = train_discriminator(self.disc, self.disc_opt, expert_pairs, agent_pairs, rcfg.disc_epochs,
                                  rcfg.disc_batch_size, seed=cfg.seed * 1000 + cycle)
        stats.update({f"disc/{k}_train": v for k, v in dst.items()})

        # the step reward of every agent sample (all K of a state, for the leave-one-out baseline)
        expert_r, agent_r = inverse_step_rewards(self.disc, expert_pairs, agent_pairs, segments, rcfg.form)
        packs, index = build_packs(ctx.encoder, subset, segments, cfg.policy.max_seq_len, include_matches=True)
        rewards = normalize_rewards(torch.tensor([agent_r[(tid, t, k)] for _, _, tid, t, k in index]),
                                    rcfg.normalize)

        desc = f"cycle {cycle} PPO (inverse reward, {pcfg.advantage})"
        head = ctx.value_head if pcfg.advantage == "gae" else None
        if head is None:
            groups: Dict[tuple, int] = {}
            gid = torch.tensor([groups.setdefault((tid, t), len(groups)) for _, _, tid, t, _ in index])
            adv = loo_advantages(rewards, gid)  # A_k = r_k - mean_{i≠k} r_i over the K samples of a state
            keep = drop_small_advantages(adv, pcfg.drop_advantage_below) if pcfg.drop_advantage_below > 0 \
                else torch.ones_like(adv, dtype=torch.bool)
            samples = [PPOSample(p, j, float(a)) for (p, j, *_), a, kp in zip(index, adv, keep) if kp]
            stats.update(ppo_step_on_samples(model, self.opt, packs, samples, pcfg, pad, self.reference,
                                             seed=cfg.seed + cycle, desc=desc))
        else:
            # V_old(s) from the old-log-prob forward, then A = r - V_old(s) (one-step GAE).
            samples = [PPOSample(p, j, 0.0) for p, j, *_ in index]
            fill_old_logprobs(model, packs, samples, pcfg, pad, self.reference, head)
            set_one_step_gae(samples, rewards)
            adv = torch.tensor([s.advantage for s in samples])
            keep = drop_small_advantages(adv, pcfg.drop_advantage_below) if pcfg.drop_advantage_below > 0 \
                else torch.ones_like(adv, dtype=torch.bool)
            samples = [s for s, kp in zip(samples, keep.tolist()) if kp]
            stats.update(ppo_update(model, self.opt, packs, samples, pcfg, pad, seed=cfg.seed + cycle, desc=desc,
                                    value_head=head) if samples else {"ppo/steps": 0, "ppo/samples": 0})
        stats["ppo/dropped_small_advantage"] = int((~keep).sum())
        return {**row, "step_reward/expert_by_step": by_step_means(expert_r),
                "step_reward/agent_by_step": by_step_means(agent_r), **stats}
