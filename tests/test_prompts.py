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


def test_goal_reminder_follows_every_observation_in_training_and_inference(tiny_tokenizer, sample_trajectory):
    tok, t = tiny_tokenizer, sample_trajectory
    plain = PromptEncoder(tok, max_prompt_tokens=4096)
    enc = PromptEncoder(tok, max_prompt_tokens=4096, goal_reminder=True)
    obs = [s.observation for s in t.steps]
    goal = t.instruction.split("\n\n")[0]
    assert goal and "\n\n" not in goal
    # the same conversation as the plain encoder's, each observation with the goal appended
    reminded = [o + "\n\nYour goal: " + goal for o in obs]
    (e,) = enc.encode_trajectory(t.instruction, t.actions, obs, max_len=4096)
    (expected,) = plain.encode_trajectory(t.instruction, t.actions, reminded, max_len=4096)
    assert e.input_ids == expected.input_ids and e.action_mask == expected.action_mask
    assert e.input_ids != plain.encode_trajectory(t.instruction, t.actions, obs, max_len=4096)[0].input_ids
    # inference at every step is a prefix of that training sequence (the goal is the first paragraph only)
    for step in range(len(t.actions)):
        state = enc.encode_state(t.instruction, t.actions[:step], obs[:step])
        assert e.input_ids[: len(state.input_ids)] == state.input_ids
        assert tok.decode(state.input_ids).count("Your goal: ") == step
    # the reminder survives observation clipping (it is added after the clip)
    short = PromptEncoder(tok, max_prompt_tokens=4096, max_observation_chars=5, goal_reminder=True)
    text = tok.decode(short.encode_state(t.instruction, t.actions[:2], obs[:2]).input_ids)
    assert text.count("[...]\n\nYour goal: " + goal) == 2


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


# ----------------------------------------------------------------------------- ETO's prompt: instruction + example
INSTRUCTION = "You are a helpful assistant to do some scientific experiment in an environment.\nThe available actions are: look around, go to LOC, focus on OBJ."


def example_trajectory():
    from stepagent.data.trajectory import Step, Trajectory

    return Trajectory(
        id="icl/0", task="scienceworld", task_type="unknown", instruction="Your task is to find a(n) plant.",
        steps=[Step("Thought: plants grow outside.\nAction: go to outside", "You move to the outside."),
               Step("Thought: there is a tree.\nAction: focus on tree", "")],
        reward=1.0,
    )


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_first_layout_is_eto_text_in_the_first_user_message(tiny_tokenizer, sample_trajectory):
    """ETO's prompt_with_icl text (1-shot), token for token; the example appears once, before the task."""
    from stepagent.agent.prompts import PromptFrame

    frame = PromptFrame.build(INSTRUCTION + "\n", example_trajectory(), "first")
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=4096, frame=frame)
    t = sample_trajectory
    first_user = (
        INSTRUCTION + "\n---\nHere is an example.\n\n"
        "Your task is to find a(n) plant.\n"
        "Thought: plants grow outside.\nAction: go to outside\n"
        "Observation: You move to the outside.\n\n"
        "Thought: there is a tree.\nAction: focus on tree\n"
        "\n---\n\nNow, it's your turn and here is the task.\n" + t.instruction
    )
    state = enc.encode_state(t.instruction, [], [])
    assert state.input_ids == ids_of(tiny_tokenizer, "<|bos|><|user|>\n" + first_user + "<|end|>\n<|assistant|>\n")
    assert sum(state.action_mask) == 0
    text = tiny_tokenizer.decode(state.input_ids)
    assert text.count("Your task is to find a(n) plant.") == 1 and text.count("focus on tree") == 1
    assert text.index("focus on tree") < text.index(t.instruction)

    # SFT sequences carry the same prompt; only the task's own actions are targets
    obs = [s.observation for s in t.steps]
    (full,) = enc.encode_trajectory(t.instruction, t.actions, obs, max_len=4096)
    assert full.input_ids[: len(state.input_ids)] == state.input_ids
    assert [tiny_tokenizer.decode(full.input_ids[a:b]) for a, b in full.action_spans] == [a + "<|end|>" for a in t.actions]


def test_conversation_layout_token_by_token(tiny_tokenizer, sample_trajectory):
    """ETO's task configs' layout: instruction, "OK", the example's turns, then the task; the
    example's turns are context (mask 0), the task's actions the only targets; the instruction
    replaces the system preamble (make_encoder passes none)."""
    from stepagent.agent.prompts import PromptFrame

    tok = tiny_tokenizer
    frame = PromptFrame.build(INSTRUCTION, example_trajectory(), "conversation")
    enc = PromptEncoder(tok, max_prompt_tokens=4096, frame=frame)
    t = sample_trajectory
    obs = [s.observation for s in t.steps]
    (e,) = enc.encode_trajectory(t.instruction, t.actions, obs, max_len=4096)

    exp_ids, exp_mask = [], []

    def add(text, m):
        piece = ids_of(tok, text)
        exp_ids.extend(piece)
        exp_mask.extend([m] * len(piece))

    add(f"<|bos|><|user|>\n{INSTRUCTION}<|end|>\n<|assistant|>\n", 0)
    add("OK<|end|>", 0)
    add("\n<|user|>\nYour task is to find a(n) plant.<|end|>\n<|assistant|>\n", 0)
    add("Thought: plants grow outside.\nAction: go to outside<|end|>", 0)
    add("\n<|user|>\nYou move to the outside.<|end|>\n<|assistant|>\n", 0)
    add("Thought: there is a tree.\nAction: focus on tree<|end|>", 0)
    add("\n<|user|>\n" + t.instruction + "<|end|>\n<|assistant|>\n", 0)
    for i, a in enumerate(t.actions):
        add(a + "<|end|>", 1)
        add("\n<|user|>\n" + obs[i] + "<|end|>\n<|assistant|>\n" if i < len(t.actions) - 1 else "\n", 0)
    assert e.input_ids == exp_ids and e.action_mask == exp_mask
    assert [tok.decode(e.input_ids[a:b]) for a, b in e.action_spans] == [a + "<|end|>" for a in t.actions]
    text = tok.decode(e.input_ids)
    assert text.count("focus on tree") == 1 and text.index("focus on tree") < text.index(t.instruction)
    # inference at every step sees the training sequence's prefix
    for step in range(len(t.actions)):
        state = enc.encode_state(t.instruction, t.actions[:step], obs[:step])
        assert e.input_ids[: len(state.input_ids)] == state.input_ids
        assert e.action_spans[step][0] == len(state.input_ids)


def test_instruction_alone_and_example_alone():
    from stepagent.agent.prompts import PromptFrame, build_messages

    only_inst = PromptFrame.build(INSTRUCTION, None, "conversation")
    assert build_messages("the task", ["a"], [], frame=only_inst) == [
        {"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": "OK"},
        {"role": "user", "content": "the task"}, {"role": "assistant", "content": "a"}]
    first = PromptFrame.build(INSTRUCTION, None, "first")
    assert build_messages("the task", [], [], preamble="P", frame=first) == [
        {"role": "system", "content": "P"},
        {"role": "user", "content": INSTRUCTION + "\n---\n\nNow, it's your turn and here is the task.\nthe task"}]
    only_example = PromptFrame.build("", example_trajectory(), "first")
    (msg,) = build_messages("the task", [], [], frame=only_example)
    assert msg["content"].startswith("Here is an example.\n\nYour task is to find a(n) plant.\n")
    assert PromptFrame.build("", None, "first").empty
    with pytest.raises(ValueError, match="conversation | first"):
        PromptFrame.build(INSTRUCTION, None, "last")


def test_a_task_text_holding_the_instruction_is_not_repeated(tiny_tokenizer, sample_trajectory):
    """ETO's *_sft.json records open with the instruction and a gpt "OK" (the reader folds both into
    the trajectory's instruction): the prompt is the same as for the bare task."""
    from stepagent.agent.prompts import PromptFrame

    t = sample_trajectory
    obs = [s.observation for s in t.steps]
    for layout in ("conversation", "first"):
        enc = PromptEncoder(tiny_tokenizer, 4096, frame=PromptFrame.build(INSTRUCTION, example_trajectory(), layout))
        (bare,) = enc.encode_trajectory(t.instruction, t.actions, obs, 4096)
        (eto,) = enc.encode_trajectory(INSTRUCTION + "\n\n" + t.instruction, t.actions, obs, 4096)
        assert eto.input_ids == bare.input_ids and eto.action_mask == bare.action_mask
        assert tiny_tokenizer.decode(bare.input_ids).count("You are a helpful assistant") == 1


def test_truncation_keeps_the_frame(tiny_tokenizer):
    from stepagent.agent.prompts import PromptFrame

    frame = PromptFrame.build(INSTRUCTION, example_trajectory(), "conversation")
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=400, max_observation_chars=60, frame=frame)
    actions = [f"go to kitchen {i}" for i in range(30)]
    obs = ["You move to the kitchen. " * 10] * 30
    s = enc.encode_state("Your task is to find a(n) animal.", actions, obs)
    text = tiny_tokenizer.decode(s.input_ids)
    assert len(s.input_ids) <= 400 and s.dropped_turns > 0
    assert text.startswith("<|bos|><|user|>\n" + INSTRUCTION) and text.count("focus on tree") == 1
    assert f"Your task is to find a(n) animal.\n\n[{s.dropped_turns} earlier steps omitted]" in text
    assert "go to kitchen 29" in text and "go to kitchen 0<" not in text

    # a frame that leaves no room for the task is an error at start, not a silently cut prompt
    with pytest.raises(ValueError, match="in-context example take"):
        PromptEncoder(tiny_tokenizer, max_prompt_tokens=40, frame=frame)


def test_prompt_frame_from_files_and_the_tiny_tokenizer(tmp_path, tiny_tokenizer, sample_trajectory):
    """task.instruction_file + task.icl_example (ETO's icl file shape: a list holding one bare list of
    {role, content} messages) through make_encoder; the tokenizer corpus carries the frame's text."""
    import json
    from types import SimpleNamespace

    from stepagent.agent.tokenizer import train_bpe_tokenizer
    from stepagent.pipeline import make_encoder, prompt_frame, tokenizer_corpus

    inst = tmp_path / "sciworld_inst.txt"
    inst.write_text(INSTRUCTION + "\n")
    icl = tmp_path / "sciworld_icl.json"
    ex = example_trajectory()
    icl.write_text(json.dumps([[
        {"role": "user", "content": ex.instruction},
        {"role": "assistant", "content": ex.steps[0].action},
        {"role": "user", "content": "Observation: " + ex.steps[0].observation},
        {"role": "assistant", "content": ex.steps[1].action},
    ]]))
    task_cfg = SimpleNamespace(name="scienceworld", instruction_file=str(inst), icl_example=str(icl),
                               icl_format="first")
    frame = prompt_frame(SimpleNamespace(task=task_cfg))
    assert frame.instruction == INSTRUCTION and frame.example_task == ex.instruction
    assert frame.example_actions == tuple(ex.actions) and frame.example_observations == (ex.steps[0].observation,)

    class _Task:
        def preamble(self):
            return "Reply with one action."

    corpus = tokenizer_corpus(_Task(), [sample_trajectory], frame)
    assert INSTRUCTION in corpus and frame.task_message("") in corpus
    tok = train_bpe_tokenizer(corpus * 20, vocab_size=500)
    policy = SimpleNamespace(tokenizer=tok)
    pcfg = SimpleNamespace(max_seq_len=1024, max_new_tokens=24, max_observation_chars=1200, use_task_preamble=True)
    enc = make_encoder(policy, SimpleNamespace(policy=pcfg, task=task_cfg), _Task())
    assert enc.preamble == ""  # the instruction file replaces the task's preamble
    text = tok.decode(enc.encode_state(sample_trajectory.instruction, [], []).input_ids)
    assert text.startswith("<|bos|><|user|>\n" + INSTRUCTION + "\n---\nHere is an example.")
    assert text.endswith("here is the task.\n" + sample_trajectory.instruction + "<|end|>\n<|assistant|>\n")

    # neither file: the plain prompt, with the task's preamble where the policy asks for it
    none = SimpleNamespace(name="scienceworld", instruction_file=None, icl_example=None, icl_format="conversation")
    assert prompt_frame(SimpleNamespace(task=none)) is None
    plain = make_encoder(policy, SimpleNamespace(policy=pcfg, task=none), _Task())
    assert plain.frame is None and plain.preamble == "Reply with one action."
