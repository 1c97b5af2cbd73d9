"""The prompt encoder: loss mask token by token, train/inference consistency, truncation."""

import pytest

from stepagent.agent.prompts import PromptEncoder, build_messages


def test_action_mask_token_by_token(tiny_tokenizer, sample_trajectory):
    tok = tiny_tokenizer
    enc = PromptEncoder(tok, max_prompt_tokens=4096, preamble="Reply with one action.")
    t = sample_trajectory
    obs = [s.observation for s in t.steps]
    (e,) = enc.encode_trajectory(t.instruction, t.actions, obs, max_len=4096)

    # Rebuild the expected sequence by hand from the template's pieces.
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    exp_ids, exp_mask = [], []

    def add(text, m):
        piece = ids(text)
        exp_ids.extend(piece)
        exp_mask.extend([m] * len(piece))

    add("<|bos|><|system|>\nReply with one action.<|end|>\n<|user|>\n" + t.instruction + "<|end|>\n<|assistant|>\n", 0)
    for i, a in enumerate(t.actions):
        add(a + "<|end|>", 1)
        if i < len(t.actions) - 1:
            add("\n<|user|>\n" + obs[i] + "<|end|>\n<|assistant|>\n", 0)
        else:
            add("\n", 0)
    assert e.input_ids == exp_ids
    assert e.action_mask == exp_mask
    # Every masked span decodes to exactly one action plus the end-of-turn token.
    spans = [tok.decode(e.input_ids[a:b]) for a, b in e.action_spans]
    assert spans == [a + "<|end|>" for a in t.actions]
    # No instruction/observation token is a target.
    assert sum(e.action_mask) == sum(len(enc.encode_action(a)) for a in t.actions)


def test_state_prompt_is_prefix_of_training_sequence(tiny_tokenizer, sample_trajectory):
    """What inference sees at step t is token-for-token the training sequence's prefix."""
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=4096)
    t = sample_trajectory
    obs = [s.observation for s in t.steps]
    (full,) = enc.encode_trajectory(t.instruction, t.actions, obs, max_len=4096)
    for step in range(len(t.actions)):
        state = enc.encode_state(t.instruction, t.actions[:step], obs[:step])
        n = len(state.input_ids)
        assert full.input_ids[:n] == state.input_ids
        assert full.action_spans[step][0] == n
        a = enc.encode_action(t.actions[step])
        assert full.input_ids[n : n + len(a)] == a


def test_truncation_drops_oldest_turns(tiny_tokenizer):
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=120, max_observation_chars=60)
    actions = [f"go to kitchen {i}" for i in range(30)]
    obs = ["You move to the kitchen. " * 10] * 30
    s = enc.encode_state("Your task is to find a(n) animal.", actions, obs)
    text = tiny_tokenizer.decode(s.input_ids)
    assert len(s.input_ids) <= 120
    assert s.dropped_turns > 0
    assert f"[{s.dropped_turns} earlier steps omitted]" in text
    assert "Your task is to find" in text  # the instruction always stays
    assert "go to kitchen 29" in text  # the most recent turn stays
    assert "go to kitchen 0<" not in text
    # observations are clipped to max_observation_chars
    assert "[...]" in text


def test_long_trajectory_becomes_per_step_sequences(tiny_tokenizer, sample_trajectory):
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=4096)
    t = sample_trajectory
    obs = [s.observation for s in t.steps]
    seqs = enc.encode_trajectory(t.instruction, t.actions, obs, max_len=60)
    assert len(seqs) == len(t.actions)
    for s, a in zip(seqs, t.actions):
        span = [i for i, m in zip(s.input_ids, s.action_mask) if m]
        assert tiny_tokenizer.decode(span) == a + "<|end|>"


def test_foreign_chat_template_and_non_prefix_stable_template(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    # A Llama-3-like template with headers and an end-of-turn token.
    tok.chat_template = (
        "{% for m in messages %}<|system|>{{ m['role'] }}<|user|>\n\n{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|system|>assistant<|user|>\n\n{% endif %}"
    )
    enc = PromptEncoder(tok, max_prompt_tokens=4096)
    msgs = build_messages("find the dove", ["go to kitchen"], [])
    e = enc.encode_messages(msgs, add_generation_prompt=False)
    assert [tok.decode(e.input_ids[a:b]) for a, b in e.action_spans] == ["go to kitchen<|end|>"]

    # A template that rewrites earlier turns depending on the whole conversation.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ messages|length }}<|end|>{% endfor %}"
    with pytest.raises(ValueError, match="prefix-stable"):
        PromptEncoder(tok, 4096).encode_messages(msgs, add_generation_prompt=False)
