"""GAIL discriminator: pairs from inspection segments, balanced batches, learns a separable
set of (state, action) pairs, reward forms."""

import random

import pytest
import torch

from stepagent.agent.prompts import PromptEncoder
from stepagent.algos.discriminator import (
    AGENT,
    EXPERT,
    Discriminator,
    DiscriminatorConfig,
    accuracy,
    balanced_batches,
    build_pairs,
    disc_logits,
    step_rewards,
    train_discriminator,
)
from stepagent.algos.inspection import Segment
from stepagent.algos.contrast import build_packs
from stepagent.algos.inverse_reward import by_step_means, inverse_step_rewards, normalize_rewards
from stepagent.data.trajectory import Step, Trajectory

AGENT_NONSENSE = ["eat the table", "xyzzy look", "sing to the wall", "throw red box at air"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(traj):
    trajs = [traj, Trajectory(
        id="scienceworld/find-animal/1", task="scienceworld", task_type="find-animal",
        instruction="Your task is to find a(n) animal. First, focus on the thing.\n\n"
                    "This room is called the kitchen. In it, you see: the agent, a red box.",
        steps=[Step("look around", "You see a dove egg."), Step("pick up dove", "You move the dove to the inventory."),
               Step("move egg dove egg in inventory to red box", "You move the dove to the red box.")],
        reward=1.0)]
    segs = {}
    for i, tr in enumerate(trajs):
        segs[tr.id] = []
        for t, st in enumerate(tr.steps):
            # two nonsense actions per step, plus one copy of the expert action (a match)
            bad = [AGENT_NONSENSE[(i + t + j) % len(AGENT_NONSENSE)] for j in range(2)]
            acts = [bad[0], st.action, bad[1]]
            segs[tr.id].append(Segment(tr.id, t, st.action, acts, [False, True, False]))
    return trajs, segs


def _disc(tok, seed=0):
    torch.manual_seed(seed)
    cfg = DiscriminatorConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_len=96)
    return Discriminator.for_tokenizer(tok, cfg)


def test_build_pairs_drops_matches_and_aligns_with_packs(tiny_tokenizer, sample_trajectory):
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=4096)
    trajs, segs = _data(sample_trajectory)
    expert, agent = build_pairs(enc, trajs, segs, max_len=96)
    assert len(expert) == 6 and len(agent) == 12  # the matching copy is in neither class
    assert {p.label for p in expert} == {EXPERT} and {p.label for p in agent} == {AGENT}
    assert all(len(p.ids) <= 96 for p in expert + agent)
    # left truncation keeps the action whole: the pair ends with the action's ids
    p = next(q for q in agent if q.traj_id == trajs[0].id and q.step == 2 and q.sample == 1)
    a = segs[trajs[0].id][2].agent_actions[2]
    assert p.ids[-len(enc.encode_action(a)):] == enc.encode_action(a)
    # (traj, step, sample) of agent pairs == the agent slots build_packs creates
    packs, _ = build_packs(enc, trajs, segs, max_len=4096)
    slots = {(tr.id, s.step, s.sample) for tr, pk in zip(trajs, packs) for s in pk.slots if s.sample >= 0}
    assert slots == {(q.traj_id, q.step, q.sample) for q in agent}


def test_balanced_batches_half_half():
    rng = random.Random(0)
    batches = list(balanced_batches(3, 10, 4, rng))
    assert len(batches) == 5
    assert all(len(e) == 2 and len(a) == 2 for e, a in batches)
    assert sorted(i for _, a in batches for i in a) == list(range(10))  # larger class: each once
    assert all(0 <= i < 3 for e, _ in batches for i in e)  # smaller class: with replacement
    batches = list(balanced_batches(7, 2, 4, rng))  # expert is the larger class; last batch topped up
    assert len(batches) == 4 and all(len(e) == 2 and len(a) == 2 for e, a in batches)
    assert set(range(7)) <= {i for e, _ in batches for i in e}


def test_discriminator_separates_and_rewards(tiny_tokenizer, sample_trajectory):
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=4096)
    trajs, segs = _data(sample_trajectory)
    expert, agent = build_pairs(enc, trajs, segs, max_len=96)
    disc = _disc(tiny_tokenizer)
    n_params = sum(p.numel() for p in disc.parameters())
    assert n_params < 100_000
    before = accuracy(disc, expert, agent)
    opt = torch.optim.AdamW(disc.parameters(), lr=3e-3)
    st = train_discriminator(disc, opt, expert, agent, epochs=25, batch_size=8, seed=0)
    after = accuracy(disc, expert, agent)
    assert st["steps"] == 25 * 3 and st["acc"] > 0.9, st
    assert after["acc"] > 0.9 and after["acc_expert"] > 0.9 and after["acc_agent"] > 0.9, (before, after)

    # gail: r = -log D is larger on expert-like pairs (D → 0) than on agent pairs (D → 1)
    r_e, r_a = step_rewards(disc, expert, "gail"), step_rewards(disc, agent, "gail")
    assert torch.all(r_e >= 0) and torch.all(r_a >= 0)
    assert r_e.mean() > r_a.mean() and r_e.min() > r_a.max()
    # airl: exactly -logit
    assert torch.equal(step_rewards(disc, agent, "airl"), -disc_logits(disc, agent))
    assert torch.allclose(step_rewards(disc, agent, "gail"),
                          torch.nn.functional.softplus(-disc_logits(disc, agent)))


def test_forward_reads_last_non_pad_token(tiny_tokenizer):
    disc = _disc(tiny_tokenizer).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    full = disc(ids, torch.ones_like(ids))
    padded = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 0, 0, 0, 0]])
    attn = (torch.arange(7)[None] < torch.tensor([[5], [3]])).long()
    out = disc(padded, attn)
    assert out.shape == (2,)
    assert torch.allclose(out[0], full[0], atol=1e-5)
    assert torch.allclose(out[1], disc(ids[:, :3], torch.ones(1, 3, dtype=torch.long))[0], atol=1e-5)
    no_agent = train_discriminator(disc, torch.optim.SGD(disc.parameters(), lr=0.1), [], [], 1, 4, 0)
    assert no_agent["steps"] == 0


def test_inverse_rewards_of_all_k_samples_and_their_normalisation(tiny_tokenizer, sample_trajectory):
    """What the inverse arm does with D: every one of the K samples of a state gets a reward (a
    sample equal to the expert action gets the expert pair's, the others their own pair's), the
    PPO slot index of ``build_packs(include_matches=True)`` finds each slot's reward, and the
    rewards are normalised over the batch (the arm's one normalisation)."""
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=4096)
    trajs, segs = _data(sample_trajectory)  # per state: [differing, matching, differing]
    expert, agent = build_pairs(enc, trajs, segs, max_len=96)
    disc = _disc(tiny_tokenizer, seed=3)
    le, la = disc_logits(disc, expert), disc_logits(disc, agent)
    expert_r, agent_r = inverse_step_rewards(disc, expert, agent, segs, "airl")  # airl: r = -logit
    assert len(expert_r) == 6 and len(agent_r) == 18
    for tr in trajs:
        for t, seg in enumerate(segs[tr.id]):
            e = next(i for i, p in enumerate(expert) if (p.traj_id, p.step) == (tr.id, t))
            a0 = next(i for i, p in enumerate(agent) if (p.traj_id, p.step, p.sample) == (tr.id, t, 0))
            a1 = next(i for i, p in enumerate(agent) if (p.traj_id, p.step, p.sample) == (tr.id, t, 1))
            assert expert_r[(tr.id, t)] == pytest.approx(-le[e].item())
            assert agent_r[(tr.id, t, 1)] == expert_r[(tr.id, t)]  # the match: the expert pair's reward
            assert agent_r[(tr.id, t, 0)] == pytest.approx(-la[a0].item())  # 1st differing action
            assert agent_r[(tr.id, t, 2)] == pytest.approx(-la[a1].item())  # 2nd differing action
            assert agent_r[(tr.id, t, 0)] != agent_r[(tr.id, t, 2)]
    packs, index = build_packs(enc, trajs, segs, max_len=4096, include_matches=True)
    assert len(index) == 18
    for p, j, tid, t, k in index:  # the slot holds exactly the action its reward belongs to
        slot = packs[p].slots[j]
        seg = segs[tid][t]
        assert [packs[p].input_ids[x] for x in slot.targets] == enc.encode_action(seg.agent_actions[k])
    rewards = torch.tensor([agent_r[(tid, t, k)] for _, _, tid, t, k in index])
    rn = normalize_rewards(rewards, "batch")
    assert abs(rn.mean().item()) < 1e-5 and abs(rn.std(unbiased=False).item() - 1) < 1e-4
    assert torch.allclose(rn * rewards.std(unbiased=False) + rewards.mean(), rewards, atol=1e-5)
    assert torch.equal(normalize_rewards(rewards, "none"), rewards)
    assert torch.equal(normalize_rewards(rewards[:1], "batch"), rewards[:1])  # one sample: left as it is
    curve = by_step_means(agent_r)
    assert len(curve) == 3 and curve[0] == pytest.approx(sum(agent_r[(tr.id, 0, k)] for tr in trajs
                                                             for k in range(3)) / 6)


def test_policy_backbone_discriminator_starts_from_the_policy_and_separates_shuffled_actions(tiny_tokenizer):
    """reward.disc_backbone=policy: D is a copy of the (SFT) policy's decoder + a head. It starts equal to
    the policy, trains without touching the policy, and tells expert actions from shuffled ones (each
    state paired with an expert action of another step)."""
    from omegaconf import OmegaConf

    from conftest import CORPUS, make_tiny_model
    from stepagent.train.sft import sft_samples, train_sft

    tok = tiny_tokenizer
    acts = ["open door to kitchen", "go to kitchen", "look around", "focus on dove", "pick up dove",
            "move egg dove egg in inventory to red box"]
    obs = ["The door is already open.", "You move to the kitchen.", CORPUS[1], "You focus on the dove egg.",
           "You move the dove to the inventory.", "You move the dove to the red box."]
    trajs = [Trajectory(id=f"scienceworld/find-animal/{i}", task="scienceworld", task_type="find-animal",
                        instruction=CORPUS[0] + f" Variation {i}.", steps=[Step(a, o) for a, o in zip(acts, obs)],
                        reward=1.0) for i in range(4)]
    enc = PromptEncoder(tok, max_prompt_tokens=480)
    torch.manual_seed(0)
    policy = make_tiny_model(tok, layers=2, hidden=64)
    sft = OmegaConf.create({"epochs": 20, "lr": 3e-3, "batch_size": 4, "warmup_steps": 0, "weight_decay": 0.0,
                            "max_grad_norm": 1.0})
    train_sft(policy, sft_samples(trajs, enc, 512), sft, tok.pad_token_id, progress=False)
    before = {k: v.clone() for k, v in policy.state_dict().items()}

    cfg = DiscriminatorConfig(max_len=256)
    disc = Discriminator.from_policy(policy, tok, cfg)
    dec = policy.get_decoder().state_dict()
    assert all(torch.equal(v, dec[k]) for k, v in disc.encoder.state_dict().items())  # starts as the policy
    assert disc.head.in_features == policy.config.hidden_size

    # shuffled: the action of step t + 2 (mod n) in the state of step t — a real action, in the wrong place
    segs = {tr.id: [Segment(tr.id, t, acts[t], [acts[(t + 2) % len(acts)]], [False]) for t in range(len(acts))]
            for tr in trajs}
    expert, agent = build_pairs(enc, trajs, segs, max_len=256)
    assert len(expert) == len(agent) == 24
    opt = torch.optim.AdamW(disc.parameters(), lr=2e-3)
    st = train_discriminator(disc, opt, expert, agent, epochs=20, batch_size=8, seed=0)
    after = accuracy(disc, expert, agent)
    assert st["steps"] > 0 and after["acc"] >= 0.9, (st, after)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the policy is untouched
    assert any(not torch.equal(v, dec[k]) for k, v in disc.encoder.state_dict().items())  # D's copy trained


def test_disc_backbone_auto_picks_the_policy_copy_for_tiny_and_the_encoder_for_hf():
    from stepagent.config import InverseRewardConfig, disc_backbone_of

    assert InverseRewardConfig().disc_backbone == "auto"
    assert disc_backbone_of(InverseRewardConfig(), "tiny") == "policy"
    assert disc_backbone_of(InverseRewardConfig(), "hf") == "encoder"
    assert disc_backbone_of(InverseRewardConfig(disc_backbone="encoder"), "tiny") == "encoder"
