"""StepAgent (METHOD.md §1): after SFT, cycles of inspection and reflection.

Each cycle:
  1. inspection  — at every expert prefix s_t^e of a random subset of the expert
                   trajectories the policy samples K actions â_t^k;
  2. reflection  — reward=implicit: step-level DPO, a_t^e ≻ â_t^k in s_t^e, all
                   log-probs of a trajectory from ONE packed forward pass;
  3. evaluation  — on the dev split in the real environment;
  4. checkpoint  — the policy and the training state after the cycle (stepagent/checkpoint.py).

π_ref: the policy at the start of the cycle (``reward.reference=cycle_start``) or
the SFT policy (``sft``). Either way no second model is kept: reference
log-probs are computed once, when the pairs are built, before any update. For
``sft`` the SFT values of the *trainable* parameters (the LoRA adapter, or the
full weights for the tiny model) are kept on the CPU and swapped in for that pass.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from stepagent import distributed as dist
from stepagent.agent.prompts import PromptEncoder
from stepagent.algos.inspection import Segment, agreement, inspect, write_contrast_jsonl
from stepagent.checkpoint import check_preemption
from stepagent.data.trajectory import Trajectory
from stepagent.train.dpo import implicit_reward, step_dpo_loss
from stepagent.train.engine import as_engine, gathered, release_full_copies, train_engine
from stepagent.train.packing import Packed, pack_trajectory, packed_forward

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- packing
def build_packs(
    encoder: PromptEncoder, trajs: Sequence[Trajectory], segments: Dict[str, List[Segment]], max_len: int,
    include_matches: bool = False,
) -> Tuple[List[Packed], List[Tuple[int, int, str, int, int]]]:
    """One packed sequence per expert trajectory (or per step window for long ones) with the
    agent actions as branches: those that differ from the expert's (step DPO: a match has no
    contrast), or all K of them (``include_matches``: PPO's leave-one-out baseline needs the
    whole group). Returns (packs, [(pack, slot, traj id, step, k)] for every agent slot), where
    k indexes the branches kept at that step."""
    packs: List[Packed] = []
    index: List[Tuple[int, int, str, int, int]] = []
    for tr in trajs:
        segs = segments.get(tr.id)
        if not segs:
            continue
        obs = [s.observation for s in tr.steps]
        for win, steps in encoder.encode_trajectory_steps(tr.instruction, tr.actions, obs, max_len):
            branches = {
                i: [encoder.encode_action(a) for a, m in zip(segs[t].agent_actions, segs[t].matches)
                    if include_matches or not m]
                for i, t in enumerate(steps)
            }
            if not any(branches.values()):
                continue
            pack = pack_trajectory(win, branches, steps)
            index.extend((len(packs), j, tr.id, sl.step, sl.sample) for j, sl in enumerate(pack.slots) if sl.sample >= 0)
            packs.append(pack)
    return packs, index


def slot_of(packs: Sequence[Packed], flat_index: int):
    """The ActionSlot at ``flat_index`` of the concatenated slots of ``packs``."""
    for p in packs:
        if flat_index < len(p.slots):
            return p.slots[flat_index]
        flat_index -= len(p.slots)
    raise IndexError(flat_index)


def pair_indices(pack: Packed) -> Tuple[List[int], List[int]]:
    """(chosen, rejected) slot indices within a pack: the expert slot of step t vs each agent slot of t."""
    expert_of = {s.step: i for i, s in enumerate(pack.slots) if s.sample < 0}
    rejected = [i for i, s in enumerate(pack.slots) if s.sample >= 0]
    return [expert_of[pack.slots[i].step] for i in rejected], rejected


# ----------------------------------------------------------------------------- reference
def _local_values(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor holding this rank's values of ``p``: the parameter itself, or under ZeRO-3
    its local shard (``ds_tensor``; the parameter's own data is empty between forwards)."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


@contextlib.contextmanager
def swapped_trainable(model: torch.nn.Module, saved: Optional[Dict[str, torch.Tensor]]):
    """Temporarily load ``saved`` values into the trainable parameters (None: no-op).

    Under ZeRO-3 the swap is of each rank's shard, so a later ``gathered`` forward sees the
    saved values; it must not be inside ``gathered`` (the gathered copies would not change)."""
    if saved is None:
        yield
        return
    if getattr(model, "_stepagent_gathered", False):
        raise RuntimeError("swapped_trainable inside gathered(model): swap first, then gather")
    current = {}
    release_full_copies(model)  # ZeRO-3: whole copies (kept for small params) would hide the swap
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                v = _local_values(p)
                current[n] = v.detach().to("cpu", copy=True)
                v.copy_(saved[n].to(v.device))
    try:
        yield
    finally:
        release_full_copies(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in current:
                    v = _local_values(p)
                    v.copy_(current[n].to(v.device))


def trainable_snapshot(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters (under ZeRO-3: of this rank's shards)."""
    return {n: _local_values(p).detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


@torch.no_grad()
def slot_logprobs(model, packs: Sequence[Packed], pad_id: int, batch_size: int) -> List[torch.Tensor]:
    """Per-pack tensors of slot log-prob sums (no grad). Data parallel: each rank computes every
    W-th pack (full parameters gathered once under ZeRO-3); every rank returns all of them."""
    was = model.training
    model.eval()
    mine = [packs[i] for i in dist.shard_indices(len(packs))]
    out: List[torch.Tensor] = []
    with gathered(model):
        for i in range(0, len(mine), batch_size):
            check_preemption("computing log-probs")
            chunk = mine[i : i + batch_size]
            lp, _ = packed_forward(model, chunk, pad_id)
            sizes = [len(p.slots) for p in chunk]
            out.extend(t.cpu() for t in torch.split(lp, sizes))
    model.train(was)
    return dist.gather_sharded(out, len(packs))


# ----------------------------------------------------------------------------- reflection
def reflect_implicit(
    model, opt, packs: List[Packed], ref_lps: List[torch.Tensor], rcfg, pad_id: int, seed: int, progress: bool = True
) -> Dict[str, float]:
    """Step-level DPO over the cycle's packs. Returns mean diagnostics over optimizer steps.

    ``opt``: a ``train.engine`` engine (or a torch optimizer). Data parallel: every rank takes
    its part of each minibatch (``shard_batch``); the engine averages the gradients."""
    opt = as_engine(opt)
    rng = random.Random(seed)
    sums: Dict[str, float] = defaultdict(float)
    n_steps = 0
    model.train()
    total = rcfg.epochs * ((len(packs) + rcfg.batch_size - 1) // rcfg.batch_size)
    bar = tqdm(total=total, desc="reflection (step DPO)", disable=not progress, dynamic_ncols=True)
    for _ in range(rcfg.epochs):
        order = list(range(len(packs)))
        rng.shuffle(order)
        for i in range(0, len(order), rcfg.batch_size):
            check_preemption("in step DPO")
            idx = dist.shard_batch(order[i : i + rcfg.batch_size])
            chunk = [packs[j] for j in idx]
            lp, _ = packed_forward(model, chunk, pad_id)
            ref = torch.cat([ref_lps[j] for j in idx]).to(lp.device)
            chosen, rejected, offset = [], [], 0
            for p in chunk:
                c, r = pair_indices(p)
                chosen += [offset + k for k in c]
                rejected += [offset + k for k in r]
                offset += len(p.slots)
            c, r = torch.tensor(chosen), torch.tensor(rejected)
            loss, st = step_dpo_loss(lp[c], lp[r], ref[c], ref[r], rcfg.beta)
            if rcfg.nll_weight > 0:
                # Optional λ · NLL(a^e | s) per token (not in METHOD.md's loss; default 0): DPO
                # alone can raise the margin by lowering log π(a^e|s) too.
                expert_slots = sorted(set(chosen))
                n_tok = torch.tensor([len(slot_of(chunk, k).targets) for k in expert_slots], dtype=lp.dtype)
                nll = -(lp[torch.tensor(expert_slots)] / n_tok.to(lp.device)).mean()
                loss = loss + rcfg.nll_weight * nll
                st["nll_expert"] = nll.detach()
            opt.backward(loss)
            st["grad_norm"] = opt.step(rcfg.max_grad_norm)
            for k, v in st.items():
                sums[k] += float(v)
            n_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(st['loss']):.3f}", acc=f"{float(st['accuracy']):.2f}", refresh=False)
    bar.close()
    model.eval()
    means = dist.mean_over_ranks({f"dpo/{k}": v / max(n_steps, 1) for k, v in sums.items()})
    return means | {"dpo/steps": n_steps, "dpo/pairs": sum(len(pair_indices(p)[1]) for p in packs)}


def step_reward_curve(
    packs: Sequence[Packed], pol_lps: Sequence[torch.Tensor], ref_lps: Sequence[torch.Tensor], beta: float
) -> Dict[str, List[Optional[float]]]:
    """Mean implicit reward β(log π - log π_ref) of expert and agent actions by step index."""
    acc: Dict[str, Dict[int, List[float]]] = {"expert": defaultdict(list), "agent": defaultdict(list)}
    for p, lp, ref in zip(packs, pol_lps, ref_lps):
        r = implicit_reward(lp, ref, beta)
        for s, v in zip(p.slots, r.tolist()):
            acc["expert" if s.sample < 0 else "agent"][s.step].append(v)
    n = 1 + max((s.step for p in packs for s in p.slots), default=-1)
    return {k: [sum(d[t]) / len(d[t]) if d[t] else None for t in range(n)] for k, d in acc.items()}


# ----------------------------------------------------------------------------- inverse reward
def inverse_step_rewards(disc, expert_pairs, agent_pairs, segments, rcfg):
    """Step reward of every agent sample (traj id, step, k) and of every expert action.

    D scores the non-matching agent actions; an agent action equal to the expert's is
    the expert pair itself, so it gets the expert pair's reward. Raw (unnormalised)."""
    from stepagent.algos.discriminator import step_rewards

    r_exp = step_rewards(disc, expert_pairs, rcfg.form, None).tolist()
    r_agt = step_rewards(disc, agent_pairs, rcfg.form, None).tolist()
    expert_r = {(p.traj_id, p.step): r for p, r in zip(expert_pairs, r_exp)}
    differing = {(p.traj_id, p.step, p.sample): r for p, r in zip(agent_pairs, r_agt)}
    agent_r: Dict[Tuple[str, int, int], float] = {}
    for segs in segments.values():
        for seg in segs:
            k_diff = 0
            for k, m in enumerate(seg.matches):
                if m:
                    agent_r[(seg.traj_id, seg.step, k)] = expert_r[(seg.traj_id, seg.step)]
                else:
                    agent_r[(seg.traj_id, seg.step, k)] = differing[(seg.traj_id, seg.step, k_diff)]
                    k_diff += 1
    return expert_r, agent_r


def by_step_means(values: Dict[tuple, float]) -> List[Optional[float]]:
    acc: Dict[int, List[float]] = defaultdict(list)
    for key, v in values.items():
        acc[key[1]].append(v)
    n = 1 + max(acc, default=-1)
    return [sum(acc[t]) / len(acc[t]) if acc[t] else None for t in range(n)]


def reflect_inverse(ctx: "CycleContext", opt, disc, disc_opt, subset, segments, ref_params, cycle: int):
    """GAIL reflection: train D on expert vs agent pairs, reward agent actions with D, PPO.

    Each (expert prefix s_t^e, agent action â_t^k) is a one-step sample with step reward r_k.
    ppo.advantage=loo: A_k = r_k - mean_{i≠k} r_i over the K samples of the state.
    ppo.advantage=gae: A_k = r_k - V_old(s_t^e) — GAE over a single step is its TD residual
    with V(terminal) = 0 — and V(s) is regressed to r (``ppo_common.set_one_step_gae``).
    """
    from stepagent.algos.discriminator import accuracy, build_pairs, train_discriminator
    from stepagent.algos.ppo_common import (PPOSample, fill_old_logprobs, ppo_step_on_samples, ppo_update,
                                            set_one_step_gae)
    from stepagent.train.ppo import drop_small_advantages, loo_advantages

    cfg, rcfg, pcfg, model = ctx.cfg, ctx.cfg.reward, ctx.cfg.ppo, ctx.policy.model
    pad = ctx.policy.tokenizer.pad_token_id
    expert_pairs, agent_pairs = build_pairs(ctx.encoder, subset, segments, rcfg.disc_max_len)
    stats: Dict[str, Any] = {}
    if agent_pairs:
        # D's accuracy on this cycle's fresh agent actions, before it trains on them:
        # the convergence proxy (-> 0.5 when expert and agent occupancy measures match).
        stats.update({f"disc/{k}_fresh": v for k, v in accuracy(disc, expert_pairs, agent_pairs).items()})
    dst = train_discriminator(disc, disc_opt, expert_pairs, agent_pairs, rcfg.disc_epochs,
                              rcfg.disc_batch_size, seed=cfg.seed * 1000 + cycle)
    stats.update({f"disc/{k}_train": v for k, v in dst.items()})
    expert_r, agent_r = inverse_step_rewards(disc, expert_pairs, agent_pairs, segments, rcfg)

    packs, index = build_packs(ctx.encoder, subset, segments, cfg.policy.max_seq_len, include_matches=True)
    rewards = torch.tensor([agent_r[(tid, t, k)] for _, _, tid, t, k in index])
    if rcfg.normalize == "batch" and rewards.numel() > 1:
        rewards = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
    # π_old = the sampling policy (cycle start); π_ref = SFT snapshot, or the same policy.
    desc = f"cycle {cycle} PPO (inverse reward, {pcfg.advantage})"
    head = ctx.value_head if pcfg.advantage == "gae" else None
    if head is None:
        groups = {}
        gid = torch.tensor([groups.setdefault((tid, t), len(groups)) for _, _, tid, t, _ in index])
        adv = loo_advantages(rewards, gid)  # A_k = r_k - mean_{i≠k} r_i over the K samples of a state
        keep = drop_small_advantages(adv, pcfg.drop_advantage_below) if pcfg.drop_advantage_below > 0 \
            else torch.ones_like(adv, dtype=torch.bool)
        samples = [PPOSample(p, j, float(a)) for (p, j, *_), a, kp in zip(index, adv, keep) if kp]
        stats.update(ppo_step_on_samples(model, opt, packs, samples, pcfg, pad, ref_params, seed=cfg.seed + cycle,
                                         desc=desc))
    else:
        # V_old(s) from the old-log-prob forward, then A = r - V_old(s) (one-step GAE).
        samples = [PPOSample(p, j, 0.0) for p, j, *_ in index]
        fill_old_logprobs(model, packs, samples, pcfg, pad, ref_params, head)
        set_one_step_gae(samples, rewards)
        adv = torch.tensor([s.advantage for s in samples])
        keep = drop_small_advantages(adv, pcfg.drop_advantage_below) if pcfg.drop_advantage_below > 0 \
            else torch.ones_like(adv, dtype=torch.bool)
        samples = [s for s, kp in zip(samples, keep.tolist()) if kp]
        stats.update(ppo_update(model, opt, packs, samples, pcfg, pad, seed=cfg.seed + cycle, desc=desc,
                                value_head=head) if samples else {"ppo/steps": 0, "ppo/samples": 0})
    stats["ppo/dropped_small_advantage"] = int((~keep).sum())
    curve = {"expert": by_step_means(expert_r), "agent": by_step_means(agent_r)}
    return stats, curve


# ----------------------------------------------------------------------------- the cycles
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
    pool: Any = None  # the EnvPool, for algorithms that roll out in the environment
    # ppo.advantage=gae: the critic (train.ppo.ValueHead), created once per run by
    # ppo_common.value_head_for and trained across cycles; part of a checkpoint. None otherwise.
    value_head: Any = None
    # stepagent.checkpoint.Checkpointer: saves a checkpoint after each cycle, and restores the
    # loop's state when the run resumes (a fresh one, resuming nothing, when not given)
    checkpoints: Any = None

    def __post_init__(self):
        if self.checkpoints is None:
            from stepagent.checkpoint import Checkpointer

            self.checkpoints = Checkpointer(self.run_dir, self.cfg, self.logger, self.policy)


def record_cycle(ctx: CycleContext, cdir: Path, row: Dict[str, Any]) -> None:
    """A cycle's metrics row: logged (metrics.jsonl, W&B) and kept beside the cycle's data
    as ``<cdir>/metrics.json`` (rank 0 writes files). Every algorithm's cycle loop ends here."""
    import json

    ctx.logger.log(row)
    if dist.is_main():
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "metrics.json").write_text(json.dumps(row, indent=1))


def heldout_agreement(ctx: CycleContext) -> Dict[str, Any]:
    """Greedy agreement with the expert on held-out (dev) expert segments."""
    if not ctx.heldout:
        return {"rate": None, "by_step": [], "samples": 0}
    segs = inspect(ctx.policy.model, ctx.policy.tokenizer, ctx.encoder, ctx.task, ctx.heldout, 1, 0.0,
                   ctx.cfg.policy.max_new_tokens, ctx.cfg.inspection.batch_size, desc="held-out agreement")
    return agreement(segs)


def cycle_subset(items: Sequence[Any], cfg, cycle: int) -> List[Any]:
    """The ``inspection.trajectories`` expert trajectories (or tasks) of a cycle: a fresh,
    seeded random subset each cycle (all of them when None)."""
    n = cfg.inspection.trajectories
    rng = random.Random(cfg.seed * 1000 + cycle)
    return rng.sample(list(items), min(n, len(items))) if n else list(items)


def log_initial_agreement(ctx: CycleContext) -> None:
    """Held-out agreement of the SFT policy: the 'cycle 0' point of the convergence curve."""
    h0 = heldout_agreement(ctx)
    ctx.logger.log({"cycle": 0, "agreement/heldout": h0["rate"], "agreement/heldout_by_step": h0["by_step"]})


def run_stepagent_cycles(ctx: CycleContext) -> List[Dict[str, Any]]:
    cfg, rcfg, model, tok = ctx.cfg, ctx.cfg.reward, ctx.policy.model, ctx.policy.tokenizer
    if rcfg.name not in ("implicit", "inverse"):
        raise ValueError(f"the inspection/reflection cycles take reward=implicit|inverse, not {rcfg.name}")
    pad = tok.pad_token_id
    reference = rcfg.reference if rcfg.name == "implicit" else cfg.ppo.reference
    if reference not in ("cycle_start", "sft"):
        raise ValueError(f"the reference policy must be cycle_start or sft, got {reference!r}")
    # π_ref = SFT: its trainable values now, or the checkpoint's copy when resuming after a cycle
    sft_params = (ctx.checkpoints.reference_snapshot() or trainable_snapshot(model)) if reference == "sft" else None
    disc = disc_opt = None
    if rcfg.name == "implicit":
        opt = train_engine(model, lr=rcfg.lr, weight_decay=rcfg.weight_decay)
    else:
        from stepagent.algos.discriminator import Discriminator, DiscriminatorConfig

        from stepagent.algos.ppo_common import ppo_optimizer, value_head_for

        # policy (+ value head with ppo.advantage=gae, kept on ctx.value_head) in one optimizer
        opt = ppo_optimizer(model, cfg.ppo, value_head_for(ctx))
        dcfg = DiscriminatorConfig(hidden_size=rcfg.disc_hidden_size, num_layers=rcfg.disc_num_layers,
                                   num_heads=rcfg.disc_num_heads, max_len=rcfg.disc_max_len,
                                   lr=rcfg.disc_lr, epochs=rcfg.disc_epochs, batch_size=rcfg.disc_batch_size)
        torch.manual_seed(cfg.seed)
        disc = Discriminator.for_tokenizer(tok, dcfg).to(next(model.parameters()).device)
        log.info("discriminator: %.2fM parameters", sum(p.numel() for p in disc.parameters()) / 1e6)
        disc_opt = train_engine(disc, lr=rcfg.disc_lr)  # its own DeepSpeed engine under deepspeed=...

    # What trains across cycles: in every checkpoint, restored when resuming after cycle n.
    train = {"policy_optimizer": opt, "discriminator": disc, "discriminator_optimizer": disc_opt,
             "value_head": ctx.value_head}
    history, first = ctx.checkpoints.resume_cycles(train)
    if first == 1:
        log_initial_agreement(ctx)
    for cycle in range(first, cfg.cycles + 1):
        cdir = ctx.run_dir / "cycles" / f"cycle_{cycle}"
        subset = cycle_subset(ctx.experts, cfg, cycle)

        # 1. Inspection: the novice acts at every expert prefix.
        segments = inspect(model, tok, ctx.encoder, ctx.task, subset, cfg.inspection.samples_per_state,
                           cfg.inspection.temperature, cfg.policy.max_new_tokens, cfg.inspection.batch_size,
                           desc=f"cycle {cycle} inspection")
        if dist.is_main():
            write_contrast_jsonl(cdir / "contrast.jsonl", segments)
        agree = agreement(segments)

        # 2. Reflection with the step reward (one packed pass per trajectory).
        if rcfg.name == "implicit":
            packs, _ = build_packs(ctx.encoder, subset, segments, cfg.policy.max_seq_len)
            with swapped_trainable(model, sft_params):
                ref_lps = slot_logprobs(model, packs, pad, rcfg.batch_size)
            stats = reflect_implicit(model, opt, packs, ref_lps, rcfg, pad, seed=cfg.seed + cycle) if packs else {}
            pol_lps = slot_logprobs(model, packs, pad, rcfg.batch_size)
            curve = step_reward_curve(packs, pol_lps, ref_lps, rcfg.beta)
        else:
            stats, curve = reflect_inverse(ctx, opt, disc, disc_opt, subset, segments, sft_params, cycle)

        # 3. Held-out agreement and evaluation in the environment.
        held = heldout_agreement(ctx)
        summary = ctx.evaluate(f"eval_cycle_{cycle}")

        row = {
            "cycle": cycle,
            "agreement/inspection": agree["rate"],
            "agreement/inspection_by_step": agree["by_step"],
            "agreement/heldout": held["rate"],
            "agreement/heldout_by_step": held["by_step"],
            "contrast/segments": sum(len(v) for v in segments.values()),
            "contrast/segments_with_contrast": sum(s.has_contrast for v in segments.values() for s in v),
            "step_reward/expert_by_step": curve["expert"],
            "step_reward/agent_by_step": curve["agent"],
            "eval/reward_x100": summary["overall"]["reward_x100"],
            "eval/success_rate": summary["overall"]["success_rate"],
            **stats,
        }
        record_cycle(ctx, cdir, row)
        log.info("cycle %d: agreement %.3f (held-out %s), dev reward %.1f", cycle, agree["rate"],
                 held["rate"], summary["overall"]["reward_x100"])
        history.append(row)

        # 4. Checkpoint: the policy and everything needed to continue exactly after this cycle.
        ctx.checkpoints.save_cycle(cycle, history, train, reference=sft_params)
    return history
