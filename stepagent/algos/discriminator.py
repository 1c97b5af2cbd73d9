"""GAIL discriminator D(s, a) for StepAgent's inverse-RL reflection (docs/method.md §1).

Saddle point (GAIL sign convention: D → 1 on AGENT pairs, D → 0 on EXPERT pairs):

    min_π max_D  E_{(s,a)~π}[log D(s,a)] + E_{(s,a)~π_E}[log(1 - D(s,a))] - λ H(π)

D is trained with binary cross-entropy, label 1 = agent pair (s_t^e, â_t^k),
label 0 = expert pair (s_t^e, a_t^e), on the inspection data: both actions are
taken in the same expert state, so D can only tell them apart by the action.
Its output is the agent's step reward (``step_rewards``):

    gail:  r = -log D(s,a)            = softplus(-ℓ)            (ℓ = D's logit, D = σ(ℓ))
    airl:  r = log D_E - log(1 - D_E) = -ℓ                      (D_E = 1 - D = σ(-ℓ))

Architecture. A separate small encoder, not the policy: a tiny LlamaModel
(``DiscriminatorConfig``: hidden 128, 2 layers, 4 heads, MLP 344 by default) over
the policy tokenizer's vocabulary, reading the token sequence

    encode_state(s_t).input_ids + encode_action(a)     (left-truncated to max_len)

i.e. exactly the prompt + generated ids the policy sees, and a linear head on the
hidden state of the last (non-pad) token → one logit. Being causal, that last
token is the only one that has read the whole (state, action). A separate network
keeps the policy's memory budget at one LLM copy (LOOP-style) and lets D train at
its own pace. With the tiny policy's 4096-token vocabulary the default D has
0.92M parameters (3.5 MiB in float32), vs 4.2M for the tiny policy; with Llama-3's
128k vocabulary the embedding dominates: 16.8M parameters (64 MiB in float32).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from stepagent import distributed as dist
from stepagent.agent.prompts import PromptEncoder
from stepagent.algos.inspection import Segment
from stepagent.config import InverseRewardConfig
from stepagent.data.trajectory import Trajectory
from stepagent.train.engine import as_engine
from stepagent.train.loops import MinibatchLoop, sharded_no_grad

EXPERT, AGENT = 0, 1  # labels: D(s, a) = P(agent | s, a)


@dataclass
class DiscriminatorConfig:
    """D's architecture. Its defaults are the reward schema's (``InverseRewardConfig.disc_*``, the
    one source); its training settings (lr, epochs, batch size) are read from the reward config
    by the inverse arm."""

    hidden_size: int = InverseRewardConfig.disc_hidden_size
    num_layers: int = InverseRewardConfig.disc_num_layers
    num_heads: int = InverseRewardConfig.disc_num_heads
    intermediate_size: int = 344  # ≈ 8/3 · 128, the Llama MLP ratio at the default width
    max_len: int = InverseRewardConfig.disc_max_len  # tokens of state + action; the state's oldest go first


def config_from_reward(rcfg) -> DiscriminatorConfig:
    """The discriminator of ``reward=inverse``'s config."""
    return DiscriminatorConfig(hidden_size=rcfg.disc_hidden_size, num_layers=rcfg.disc_num_layers,
                               num_heads=rcfg.disc_num_heads, max_len=rcfg.disc_max_len)


class Pair(NamedTuple):
    """One (state, action) example. ``p[0], p[1]`` are (ids, label)."""

    ids: List[int]
    label: int  # EXPERT (0) or AGENT (1)
    traj_id: str
    step: int
    # -1: the expert action; k ≥ 0: the k-th agent action of the segment that differs from
    # the expert's — the same k ``build_packs``/``pack_trajectory`` give that agent slot.
    sample: int


class Discriminator(nn.Module):
    """logit ℓ(s, a) with D(s, a) = σ(ℓ) = P(agent | s, a)."""

    def __init__(self, cfg: DiscriminatorConfig, vocab_size: int, pad_id: int, encoder: Optional[nn.Module] = None,
                 hidden_size: Optional[int] = None):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.cfg = cfg
        self.pad_id = pad_id
        if encoder is None:
            lcfg = LlamaConfig(
                vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_heads, max_position_embeddings=max(cfg.max_len, 64),
                pad_token_id=pad_id,
            )
            lcfg._attn_implementation = "sdpa"
            encoder, hidden_size = LlamaModel(lcfg), cfg.hidden_size
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, 1)
        # Start near D = 0.5 (no class preferred): small weights, zero bias.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def for_tokenizer(cls, tokenizer, cfg: Optional[DiscriminatorConfig] = None) -> "Discriminator":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(cfg or DiscriminatorConfig(), len(tokenizer), pad)

    @classmethod
    def from_policy(cls, model: nn.Module, tokenizer, cfg: Optional[DiscriminatorConfig] = None) -> "Discriminator":
        """D on the policy's own features: a copy of ``model``'s decoder as it is now (after SFT) and a
        fresh scalar head. The copy trains on its own; the policy is not touched (also under ZeRO-3:
        the full weights are read once, gathered)."""
        from stepagent.train.engine import gathered

        decoder = model.get_decoder()
        with gathered(model):
            state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
        encoder = type(decoder)(decoder.config)
        encoder.load_state_dict(state)
        encoder.to(next(iter(state.values())).dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(cfg or DiscriminatorConfig(), len(tokenizer), pad, encoder=encoder,
                   hidden_size=decoder.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded [B, T] → logits [B], read at each row's last non-pad token."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return self.head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1)


# ----------------------------------------------------------------------------- data
def _flat(segments: Union[Dict[str, List[Segment]], Sequence[Segment]]) -> List[Segment]:
    return [s for v in segments.values() for s in v] if isinstance(segments, dict) else list(segments)


def build_pairs(
    encoder: PromptEncoder,
    trajs: Sequence[Trajectory],
    segments: Union[Dict[str, List[Segment]], Sequence[Segment]],
    max_len: int = 512,
) -> Tuple[List[Pair], List[Pair]]:
    """(expert pairs, agent pairs) from inspection segments.

    Expert: (s_t^e, a_t^e), label 0, one per segment. Agent: (s_t^e, â_t^k), label 1,
    for every agent action that does NOT match the expert's: a matching action is the
    expert action (up to normalisation), so labelling it "agent" would ask D to separate
    identical inputs — pure label noise. Matches are counted by inspection's agreement
    rate instead.
    """
    by_id = {t.id: t for t in trajs}
    expert: List[Pair] = []
    agent: List[Pair] = []
    for seg in _flat(segments):
        tr = by_id.get(seg.traj_id)
        if tr is None:
            continue
        t = seg.step
        obs = [s.observation for s in tr.steps[:t]]
        # The state once per segment; the pair is then cut from the left so the action
        # (the only thing that differs between the classes) is always whole.
        state = encoder.encode_state(tr.instruction, tr.actions[:t], obs,
                                     min(encoder.max_prompt_tokens, max_len)).input_ids

        def ids_of(action: str) -> List[int]:
            return (state + encoder.encode_action(action))[-max_len:]

        expert.append(Pair(ids_of(seg.expert_action), EXPERT, seg.traj_id, t, -1))
        k = 0
        for a, m in zip(seg.agent_actions, seg.matches):
            if m:
                continue
            agent.append(Pair(ids_of(a), AGENT, seg.traj_id, t, k))
            k += 1
    return expert, agent


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad: input_ids, attention_mask [B, T], labels [B] (float)."""
    T = max(len(p[0]) for p in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), T), dtype=torch.long)
    for b, p in enumerate(pairs):
        ids[b, : len(p[0])] = torch.tensor(p[0], dtype=torch.long)
        attn[b, : len(p[0])] = 1
    labels = torch.tensor([float(p[1]) for p in pairs])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def balanced_batches(
    n_expert: int, n_agent: int, batch_size: int, rng: random.Random
) -> Iterator[Tuple[List[int], List[int]]]:
    """One epoch of (expert indices, agent indices), batch_size // 2 of each per batch.

    The larger class is visited once, without replacement; the smaller one is drawn with
    replacement to fill its half. Balanced halves keep D's prior at 0.5, so its logit is
    the log-likelihood ratio of the two occupancy measures, whatever the class sizes
    (K agent samples per expert action would otherwise bias D towards "agent").
    """
    half = max(1, batch_size // 2)
    n_batches = math.ceil(max(n_expert, n_agent) / half)
    big_is_expert = n_expert >= n_agent
    n_big, n_small = (n_expert, n_agent) if big_is_expert else (n_agent, n_expert)
    order = list(range(n_big))
    rng.shuffle(order)
    for i in range(n_batches):
        big = order[i * half : (i + 1) * half]
        if len(big) < half:  # top up the last batch so it stays balanced
            big = big + [rng.randrange(n_big) for _ in range(half - len(big))]
        small = [rng.randrange(n_small) for _ in range(half)]
        yield (big, small) if big_is_expert else (small, big)


# ----------------------------------------------------------------------------- training
def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-[ y log D + (1-y) log(1-D) ], D = σ(ℓ), y = 1 on agent pairs (maximises GAIL's inner
    objective E_π[log D] + E_πE[log(1-D)] on a balanced batch)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def train_discriminator(
    disc: Discriminator,
    opt: torch.optim.Optimizer,
    expert_pairs: Sequence[Pair],
    agent_pairs: Sequence[Pair],
    epochs: int,
    batch_size: int,
    seed: int,
    max_grad_norm: Optional[float] = 1.0,
) -> Dict[str, float]:
    """BCE on balanced batches. Stats of the LAST epoch, from each batch's pre-update
    predictions: loss, acc_expert (ℓ < 0 on expert pairs), acc_agent (ℓ > 0 on agent
    pairs), acc (their mean; 0.5 = indistinguishable), steps. Use ``accuracy`` on held-out
    segments for the convergence proxy.

    ``opt``: a ``train.engine`` engine (or a torch optimizer). Data parallel: each rank takes
    its part of both halves of every batch; the stats are averaged over ranks."""
    if not expert_pairs or not agent_pairs:  # the agent already matches the expert everywhere
        return {"loss": float("nan"), "acc": float("nan"), "acc_expert": float("nan"),
                "acc_agent": float("nan"), "steps": 0}
    opt = as_engine(opt)
    dev = next(disc.parameters()).device
    disc.train()
    n_e, n_a = len(expert_pairs), len(agent_pairs)
    loop = MinibatchLoop([], batch_size, epochs, seed, desc="discriminator", progress=False,
                         where="training the discriminator",
                         epoch_batches=lambda rng: balanced_batches(n_e, n_a, batch_size, rng),
                         steps_per_epoch=math.ceil(max(n_e, n_a) / max(1, batch_size // 2)),
                         shard=lambda b: (dist.shard_batch(b[0]), dist.shard_batch(b[1])))
    for _, batches in loop.epochs():
        loss_sum, n_b, ok_e, ok_a, seen_e, seen_a = 0.0, 0, 0, 0, 0, 0  # stats of the last epoch
        for ei, ai in batches:
            batch = collate_pairs([expert_pairs[i] for i in ei] + [agent_pairs[i] for i in ai], disc.pad_id)
            batch = {k: v.to(dev) for k, v in batch.items()}
            logits = disc(batch["input_ids"], batch["attention_mask"])
            loss = discriminator_loss(logits, batch["labels"])
            opt.backward(loss)
            opt.step(max_grad_norm)
            with torch.no_grad():
                pred = logits > 0
                ok_e += int((~pred[: len(ei)]).sum())
                ok_a += int(pred[len(ei):].sum())
                seen_e, seen_a = seen_e + len(ei), seen_a + len(ai)
                loss_sum += float(loss)
                n_b += 1
    disc.eval()
    if dist.world_size() > 1:
        tot = dist.mean_over_ranks({"ok_e": ok_e, "ok_a": ok_a, "n_e": seen_e, "n_a": seen_a, "loss": loss_sum})
        ok_e, ok_a, seen_e, seen_a, loss_sum = (tot[k] for k in ("ok_e", "ok_a", "n_e", "n_a", "loss"))
    acc_e, acc_a = ok_e / max(seen_e, 1), ok_a / max(seen_a, 1)
    return {"loss": loss_sum / max(n_b, 1), "acc": 0.5 * (acc_e + acc_a), "acc_expert": acc_e,
            "acc_agent": acc_a, "steps": loop.steps}


def disc_logits(disc: Discriminator, pairs: Sequence[Pair], batch_size: int = 64) -> torch.Tensor:
    """ℓ(s, a) for every pair, [N] on the CPU (eval mode, no grad), sharded over ranks."""
    dev = next(disc.parameters()).device

    def run(chunk: List[Pair]) -> List[float]:
        b = collate_pairs(chunk, disc.pad_id)
        return disc(b["input_ids"].to(dev), b["attention_mask"].to(dev)).float().cpu().tolist()

    return torch.tensor(sharded_no_grad(disc, pairs, batch_size, run, where="scoring with the discriminator"),
                        dtype=torch.float32)


def step_rewards(disc: Discriminator, pairs: Sequence[Pair], form: str = "gail", batch_size: int = 64) -> torch.Tensor:
    """Step reward of each (s, a), [N], raw (the PPO samples' rewards are normalised over the
    batch by ``inverse_reward.normalize_rewards``):

        gail:  r = -log D(s,a) = -log σ(ℓ) = softplus(-ℓ)     (≥ 0; large when D says "expert")
        airl:  r = log D_E - log(1 - D_E) = -ℓ                 (D_E = 1 - D)
    """
    logits = disc_logits(disc, pairs, batch_size)
    if form == "gail":
        return F.softplus(-logits)
    if form == "airl":
        return -logits
    raise ValueError(f"unknown reward form {form!r} (gail | airl)")


def accuracy(
    disc: Discriminator, expert_pairs: Sequence[Pair], agent_pairs: Sequence[Pair], batch_size: int = 64
) -> Dict[str, float]:
    """Class-balanced accuracy: acc = ½ (P[ℓ<0 | expert] + P[ℓ>0 | agent]); 0.5 when D
    cannot tell the occupancy measures apart (docs/method.md §1's convergence proxy)."""
    le, la = disc_logits(disc, expert_pairs, batch_size), disc_logits(disc, agent_pairs, batch_size)
    acc_e = float((le < 0).float().mean()) if le.numel() else float("nan")
    acc_a = float((la > 0).float().mean()) if la.numel() else float("nan")
    return {"acc": 0.5 * (acc_e + acc_a), "acc_expert": acc_e, "acc_agent": acc_a}
