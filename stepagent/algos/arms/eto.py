"""ETO baseline (docs/method.md §3): Song et al. 2024, "Trial and Error: Exploration-Based
Trajectory Optimization for LLM Agents" (arXiv:2403.02502, ACL 2024).

Starting from the SFT policy, each iteration:
  1. exploration — the policy plays training tasks (those with an expert trajectory)
                   in the real environment, ``rollouts_per_task`` times each;
  2. pairs       — every FAILED agent trajectory τ^a (final reward below the expert's,
                   not crashed) is paired with the expert trajectory τ^e of the same
                   task: chosen = τ^e, rejected = τ^a;
  3. training    — trajectory-level DPO on the pairs:

        L_DPO = -log σ( β [ (log π_θ(τ^e) - log π_ref(τ^e)) - (log π_θ(τ^a) - log π_ref(τ^a)) ] )

                   where log π(τ) = Σ_t log π(a_t | u, a_1, o_1, ..., o_{t-1}) sums the
                   log-probs of the ACTION tokens of the multi-turn trajectory only
                   (instruction and observation tokens are context, never scored);

What the source says (checked in the official repository, Yifan-Song793/ETO):
  * Loss: ETO's training phase is plain DPO on (success, failure) trajectory pairs;
    ``run_eto.sh`` passes only ``--beta`` and ``--learning_rate`` to its DPO trainer and
    the paper's objective has no SFT/NLL term (the follow-up IPR adds one). Hence
    ``nll_weight`` defaults to 0.0; set it > 0 to add λ · NLL(τ^e) (mean over the
    expert's action tokens) as an optional extra.
  * Reference: each iteration's DPO run uses the policy at the START of the iteration
    as π_ref (``--ref_model_name_or_path ${cur_model_name}``) -> ``reference:
    iteration_start``; ``reference: sft`` keeps the SFT policy as π_ref instead.
  * Each iteration is a fresh training run (new optimizer): so here, a new AdamW.
  * ``construct_preference.py`` keeps at most len(expert) + 5 agent actions of the
    rejected trajectory -> ``rejected_extra_steps: 5`` (None: keep all).
  * Their hyper-parameters (Llama-2-7B, full fine-tuning): iteration 1 β=0.1, lr=1e-6;
    later iterations β=0.5, lr=5e-7; 3 epochs, 32 pairs per step. The defaults below
    (lr=1e-4, 1 epoch) match this project's StepAgent step-DPO defaults instead, so
    the two methods are compared under one training budget.

No second model is kept: reference log-probs are computed once per iteration, before
any update (for ``sft`` with the SFT values of the trainable parameters swapped in,
see ``stepagent.train.reference``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from stepagent import distributed as dist
from stepagent.agent.prompts import Encoded, PromptEncoder
from stepagent.algos.registry import Arm, register_arm, sft_reference
from stepagent.data.trajectory import Trajectory
from stepagent.eval.evaluate import Episode, run_episodes
from stepagent.train.dpo import step_dpo_loss
from stepagent.train.engine import as_engine, train_engine
from stepagent.train.loops import MinibatchLoop, sharded_no_grad
from stepagent.train.reference import swapped_trainable
from stepagent.train.sft import collate, token_logprobs

log = logging.getLogger(__name__)

Windows = List[Encoded]  # the training sequence(s) of one trajectory (see encode_trajectory)


# ----------------------------------------------------------------------------- log π(τ)
def trajectory_logprob_batches(
    model, encoded_list: Sequence[Windows], pad_id: int, batch_size: Optional[int] = None
) -> torch.Tensor:
    """log π(τ) for each trajectory: the sum of its action-token log-probs, over all its
    windows. Shape [N]; differentiable (wrap in ``torch.no_grad`` for reference values).
    ``batch_size`` trajectories go through the model per forward pass (None: all at once)."""
    device = next(model.parameters()).device
    bs = batch_size or max(len(encoded_list), 1)
    out: List[torch.Tensor] = []
    for start in range(0, len(encoded_list), bs):
        chunk = encoded_list[start : start + bs]
        windows = [w for wins in chunk for w in wins]
        owner = torch.tensor([i for i, wins in enumerate(chunk) for _ in wins], device=device)
        batch = {k: v.to(device) for k, v in collate(windows, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = token_logprobs(logits, batch["input_ids"])  # [W, T-1]: position j scores token j+1
        per_window = (lp * batch["loss_mask"][:, 1:]).sum(-1)  # Σ over action tokens only
        out.append(torch.zeros(len(chunk), dtype=lp.dtype, device=device).index_add(0, owner, per_window))
    return torch.cat(out) if out else torch.zeros(0)


def action_token_count(windows: Windows) -> int:
    return sum(sum(w.action_mask) for w in windows)


# ----------------------------------------------------------------------------- the loss
def eto_loss(
    pi_e: torch.Tensor,
    pi_a: torch.Tensor,
    ref_e: torch.Tensor,
    ref_a: torch.Tensor,
    beta: float,
    nll_weight: float = 0.0,
    num_pairs: Optional[int] = None,
    num_expert_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Trajectory-level DPO (+ optional NLL on the expert) for a chunk of pairs:

        L = 1/B Σ_pairs -log σ(β [(log π_θ(τ^e) - log π_ref(τ^e)) - (log π_θ(τ^a) - log π_ref(τ^a))])
            + λ · (-Σ_pairs log π_θ(τ^e)) / #expert action tokens

    ``num_pairs`` (B) and ``num_expert_tokens`` are the whole minibatch's counts when it is
    processed in micro-batches (so the accumulated gradient is the minibatch's); by
    default the chunk's own."""
    B = num_pairs or len(pi_e)
    dpo, _ = step_dpo_loss(pi_e, pi_a, ref_e, ref_a, beta)  # mean over the chunk: same formula
    loss = dpo * (len(pi_e) / B)
    if nll_weight:
        loss = loss + nll_weight * (-pi_e.sum()) / max(num_expert_tokens or 1, 1)
    return loss


# ----------------------------------------------------------------------------- pairs
def eto_pairs(
    experts_by_instance_id: Mapping[str, Trajectory], episodes: Sequence[Episode]
) -> List[Tuple[Trajectory, Episode]]:
    """(τ^e, τ^a) for every agent episode that failed: final reward below the expert's,
    not crashed (a crash says nothing about the policy), at least one action."""
    pairs = []
    for ep in episodes:
        expert = experts_by_instance_id.get(ep.instance.id)
        if expert is None or ep.crashed or not ep.actions:
            continue
        if ep.score < expert.reward - 1e-9:
            pairs.append((expert, ep))
    return pairs


def encode_pair(
    encoder: PromptEncoder, expert: Trajectory, agent: Episode, max_len: int, extra_steps: Optional[int]
) -> Tuple[Windows, Windows]:
    """Training sequences of (chosen, rejected). The agent trajectory is cut to
    len(τ^e) + ``extra_steps`` actions, as ETO's construct_preference.py does."""
    n = len(agent.actions) if extra_steps is None else min(len(agent.actions), len(expert.steps) + extra_steps)
    chosen = encoder.encode_trajectory(expert.instruction, expert.actions,
                                       [s.observation for s in expert.steps], max_len)
    rejected = encoder.encode_trajectory(agent.instruction, agent.actions[:n], agent.observations[:n], max_len)
    return chosen, rejected


def pair_logprobs(model, pairs_encoded: Sequence[Tuple[Windows, Windows]], pad_id: int, batch_size: int) -> torch.Tensor:
    """[N, 2] log π(τ^e), log π(τ^a) of every pair, no grad (reference values), sharded over ranks."""

    def run(chunk) -> List[torch.Tensor]:
        lp = trajectory_logprob_batches(model, [c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        return list(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], dim=1).cpu())

    rows = sharded_no_grad(model, pairs_encoded, batch_size, run, where="computing ETO reference log-probs")
    return torch.stack(rows) if rows else torch.zeros(0, 2)


# ----------------------------------------------------------------------------- training
def reflect_eto(
    model, opt, pairs_encoded: Sequence[Tuple[Windows, Windows]], ref_logps: torch.Tensor, ecfg, pad_id: int,
    seed: int, progress: bool = True,
) -> Dict[str, float]:
    """Trajectory-level DPO epochs over the pairs. ``ecfg``: the ETO config (``cfg.algo`` with algo=eto);
    ``ref_logps``: [N, 2] reference log π(τ^e), log π(τ^a). Returns mean diagnostics
    over optimizer steps (``dpo/loss``, accuracy, reward_chosen/rejected, margin, ...).

    ``opt``: a ``train.engine`` engine (or a torch optimizer). Data parallel: each rank takes its
    part of every minibatch (``shard_batch``) and normalises by its own pair and token counts;
    the engine averages the gradients, the diagnostics are averaged over ranks."""
    opt = as_engine(opt)
    micro = ecfg.micro_batch_size or ecfg.batch_size
    sums: Dict[str, float] = defaultdict(float)
    model.train()
    loop = MinibatchLoop(range(len(pairs_encoded)), ecfg.batch_size, ecfg.epochs, seed,
                         desc="ETO (trajectory DPO)", progress=progress, where="in ETO's DPO")
    for idx in loop:
        n_tok = sum(action_token_count(pairs_encoded[k][0]) for k in idx)
        pi_e_all, pi_a_all = [], []
        for j in range(0, len(idx), micro):
            sub = idx[j : j + micro]
            lp = trajectory_logprob_batches(
                model, [pairs_encoded[k][0] for k in sub] + [pairs_encoded[k][1] for k in sub], pad_id)
            pi_e, pi_a = lp[: len(sub)], lp[len(sub) :]
            ref = ref_logps[sub].to(lp.device)
            loss = eto_loss(pi_e, pi_a, ref[:, 0], ref[:, 1], ecfg.beta, ecfg.nll_weight, len(idx), n_tok)
            opt.backward(loss, boundary=j + micro >= len(idx))  # gradients accumulate over micro-batches
            pi_e_all.append(pi_e.detach())
            pi_a_all.append(pi_a.detach())
        grad_norm = opt.step(ecfg.max_grad_norm)
        # diagnostics of the whole minibatch, at the parameters it was computed with
        pi_e, pi_a = torch.cat(pi_e_all), torch.cat(pi_a_all)
        ref = ref_logps[idx].to(pi_e.device)
        _, st = step_dpo_loss(pi_e, pi_a, ref[:, 0], ref[:, 1], ecfg.beta)
        st["nll_chosen"] = -pi_e.sum() / max(n_tok, 1)
        st["grad_norm"] = grad_norm
        for k, v in st.items():
            sums[k] += float(v)
        loop.postfix(loss=f"{float(st['loss']):.3f}", acc=f"{float(st['accuracy']):.2f}")
    model.eval()
    n_steps = loop.steps
    return dist.mean_over_ranks({f"dpo/{k}": v / max(n_steps, 1) for k, v in sums.items()}) | {"dpo/steps": n_steps}


# ----------------------------------------------------------------------------- exploration log
def write_exploration_jsonl(path: Path, episodes: Sequence[Episode], paired: Sequence[bool]) -> None:
    """One line per explored episode: what the agent did and what the environment said."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ep, p in zip(episodes, paired):
            row = {
                "id": ep.instance.id,
                "task_type": ep.instance.task_type,
                "reward": ep.score,
                "crashed": ep.crashed,
                "paired": p,  # became a rejected trajectory
                "steps": len(ep.actions),
                "instruction": ep.instruction,
                "actions": ep.actions,  # as generated
                "env_actions": ep.env_actions,  # as sent to the environment
                "observations": ep.observations,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- the arm
@register_arm("eto")
class ETOArm(Arm):
    """One ETO iteration per cycle. Nothing but the policy (and the RNG) carries over between
    iterations: each runs a fresh optimizer, as ETO runs each iteration as a new DPO training."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ecfg = ctx.cfg.algo
        # π_ref = SFT: its trainable values now, or the checkpoint's copy when resuming
        self.reference = sft_reference(ctx, self.ecfg.reference == "sft")
        self.experts = {t.id: t for t in ctx.experts}
        self.candidates = [inst for inst in ctx.task.instances("train") if inst.id in self.experts]
        if not self.candidates:
            raise ValueError("ETO: no training instance has an expert trajectory (ids must match)")

    def items(self):
        return self.candidates

    def subset_size(self) -> Optional[int]:
        return self.ecfg.tasks_per_iteration

    def step(self, cycle: int, subset: List[Any], cdir: Path, progress: bool = True) -> Dict[str, Any]:
        ctx, cfg, ecfg = self.ctx, self.ctx.cfg, self.ecfg
        model, pad = ctx.policy.model, ctx.policy.tokenizer.pad_token_id

        # 1. Exploration: the current policy plays each task ``rollouts_per_task`` times.
        rollouts = [inst for inst in subset for _ in range(ecfg.rollouts_per_task)]
        episodes = run_episodes(ctx.rollout, ctx.policy.tokenizer, ctx.encoder, ctx.task, rollouts, ctx.pool,
                                cfg.policy.max_new_tokens, ecfg.temperature, progress,
                                desc=f"iteration {cycle} exploration")

        # 2. Failure / expert pairs, written next to every explored trajectory.
        pairs = eto_pairs(self.experts, episodes)
        paired_ids = {id(a) for _, a in pairs}
        if dist.is_main():
            write_exploration_jsonl(cdir / "exploration.jsonl", episodes, [id(ep) in paired_ids for ep in episodes])
        encoded = [encode_pair(ctx.encoder, e, a, cfg.policy.max_seq_len, ecfg.rejected_extra_steps)
                   for e, a in pairs]

        # 3. Reference log-probs before any update, then trajectory DPO with a fresh optimizer.
        with swapped_trainable(model, self.reference):
            ref = pair_logprobs(model, encoded, pad, ecfg.micro_batch_size or ecfg.batch_size)
        stats: Dict[str, Any] = {}
        if encoded:
            opt = train_engine(model, lr=ecfg.lr, weight_decay=ecfg.weight_decay)
            stats = reflect_eto(model, opt, encoded, ref, ecfg, pad, seed=cfg.seed + cycle, progress=progress)
        rewards = [ep.score for ep in episodes]
        row = {
            "eto/explore_reward": sum(rewards) / max(len(rewards), 1),
            "eto/explore_success_rate": sum(r >= 1.0 - 1e-9 for r in rewards) / max(len(rewards), 1),
            "eto/explore_crashed": sum(ep.crashed for ep in episodes),
            "eto/episodes": len(episodes),
            "eto/pairs": len(pairs),
            **stats,
        }
        log.info("ETO iteration %d: explore reward %.3f, %d pairs", cycle, row["eto/explore_reward"], len(pairs))
        return row
