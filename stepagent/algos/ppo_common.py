"""The PPO update shared by reward=inverse, reward=outcome and LOOP.

A PPO *sample* is one action slot of a packed sequence (``stepagent.train.packing``)
with an advantage. For reward=inverse the packs are expert trajectories whose
branches are the agent's K actions per state (one-step samples); for
reward=outcome and LOOP they are the agent's own multi-turn rollouts with no
branches (each of its actions is a slot). Either way every log-prob of a
trajectory comes from one forward pass, and only generated tokens are scored:
observation and instruction tokens are context.

Per optimizer step (``ppo.batch_size`` packs), with per-token ratio r_j:

    L = - mean_j min(r_j A, clip(r_j, 1±ε) A)          (policy, over generated tokens)
        + β_KL · mean_j KL_est(π_θ || π_ref)_j          (ppo.kl_coef, ppo.kl_estimator)
        - c_H · mean_j H(π_θ(· | x_<j))                 (ppo.entropy_coef)
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from stepagent.train.packing import Packed
from stepagent.train.ppo import kl_estimate, packed_token_logprobs, ppo_policy_loss


@dataclass
class PPOSample:
    pack: int  # index into the packs
    slot: int  # index into packs[pack].slots
    advantage: float
    logp_old: Optional[torch.Tensor] = None  # per token, under the sampling policy
    logp_ref: Optional[torch.Tensor] = None  # per token, under π_ref (for the KL term)


@torch.no_grad()
def token_logprobs_of(model, packs: Sequence[Packed], samples: Sequence[PPOSample], pad_id: int,
                      batch_size: int) -> List[torch.Tensor]:
    """Per-token log-probs of each sample's slot (no grad), in ``samples`` order."""
    was = model.training
    model.eval()
    by_pack: Dict[int, List[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_pack[s.pack].append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(samples)
    ids = sorted(by_pack)
    for c in range(0, len(ids), batch_size):
        chunk = ids[c : c + batch_size]
        lps, _ = packed_token_logprobs(model, [packs[p] for p in chunk], pad_id)
        for lp, p in zip(lps, chunk):
            for i in by_pack[p]:
                out[i] = lp[samples[i].slot].cpu()
    model.train(was)
    return out  # type: ignore[return-value]


def ppo_update(model, opt, packs: Sequence[Packed], samples: Sequence[PPOSample], pcfg, pad_id: int,
               seed: int, progress: bool = True, desc: str = "PPO") -> Dict[str, float]:
    """``ppo.epochs`` passes of minibatches of ``ppo.batch_size`` packs. Returns mean stats."""
    by_pack: Dict[int, List[PPOSample]] = defaultdict(list)
    for s in samples:
        by_pack[s.pack].append(s)
    pack_ids = sorted(by_pack)
    if not pack_ids:
        return {"ppo/steps": 0, "ppo/samples": 0}
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    sums: Dict[str, float] = defaultdict(float)
    steps = 0
    want_entropy = pcfg.entropy_coef > 0
    total = pcfg.epochs * ((len(pack_ids) + pcfg.batch_size - 1) // pcfg.batch_size)
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in range(pcfg.epochs):
        order = list(pack_ids)
        rng.shuffle(order)
        for c in range(0, len(order), pcfg.batch_size):
            chunk = order[c : c + pcfg.batch_size]
            lps, ents = packed_token_logprobs(model, [packs[p] for p in chunk], pad_id, with_entropy=want_entropy)
            logp, old, ref, adv, ent = [], [], [], [], []
            for j, p in enumerate(chunk):
                for s in by_pack[p]:
                    lp = lps[j][s.slot]
                    logp.append(lp)
                    old.append(s.logp_old.to(lp.device))
                    ref.append(s.logp_ref.to(lp.device))
                    adv.append(torch.full_like(lp, s.advantage))
                    if want_entropy:
                        ent.append(ents[j][s.slot])
            logp_t, old_t, ref_t, adv_t = (torch.cat(x)[None] for x in (logp, old, ref, adv))
            mask = torch.ones_like(logp_t)
            pg_loss, st = ppo_policy_loss(logp_t, old_t, adv_t, mask, pcfg.clip_eps)
            kl = kl_estimate(logp_t, ref_t, pcfg.kl_estimator).mean()
            entropy = torch.cat(ent).mean() if want_entropy else torch.zeros((), device=logp_t.device)
            loss = pg_loss + pcfg.kl_coef * kl - pcfg.entropy_coef * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, pcfg.max_grad_norm)
            opt.step()
            for k, v in {"loss": loss, "pg_loss": pg_loss, "kl_ref": kl, "entropy": entropy,
                         "grad_norm": gnorm, **st}.items():
                sums[k] += float(v.detach()) if torch.is_tensor(v) else float(v)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", clip=f"{float(st['clip_frac']):.2f}", refresh=False)
    bar.close()
    model.eval()
    return {f"ppo/{k}": v / steps for k, v in sums.items()} | {"ppo/steps": steps, "ppo/samples": len(samples)}


def ppo_step_on_samples(model, opt, packs: Sequence[Packed], samples: List[PPOSample], pcfg, pad_id: int,
                        ref_params, seed: int, desc: str) -> Dict[str, float]:
    """Fill each sample's old and reference log-probs, then run ``ppo_update``.

    π_old is the current (sampling) policy. π_ref is the same policy when ``ref_params`` is
    None, else those trainable-parameter values swapped in (the SFT snapshot): no second model.
    """
    from stepagent.algos.stepagent import swapped_trainable

    if not samples:
        return {"ppo/steps": 0, "ppo/samples": 0}
    olds = token_logprobs_of(model, packs, samples, pad_id, pcfg.batch_size)
    if ref_params is None:
        refs = olds
    else:
        with swapped_trainable(model, ref_params):
            refs = token_logprobs_of(model, packs, samples, pad_id, pcfg.batch_size)
    for s, o, r in zip(samples, olds, refs):
        s.logp_old, s.logp_ref = o, r
    return ppo_update(model, opt, packs, samples, pcfg, pad_id, seed=seed, desc=desc)

