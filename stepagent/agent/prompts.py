"""The one prompt builder shared by SFT, inspection, evaluation and rollouts.

A state ``s_t = (instruction, a_1, o_1, ..., a_{t-1}, o_{t-1})`` becomes chat
messages ``[system: preamble]? user: instruction, assistant: a_1, user: o_1, ...``
rendered with the tokenizer's own chat template.

ETO's evaluation prompt (``PromptFrame``: ``task.instruction_file``, ``task.icl_example``,
``task.icl_format``) puts fixed text around the task, as ETO's ``prompt_with_icl`` does
with one example (ETO's 1-shot setting); the instruction then replaces the system preamble:

* ``conversation`` (the layout ETO's task configs select for ScienceWorld, ALFWorld and
  WebShop): ``user: instruction, assistant: "OK", user: example task, assistant: example
  a_1, user: example o_1, ..., assistant: example a_n, user: task, assistant: a_1, ...``;
* ``first``: one first user message ``{instruction}\n---\nHere is an example.\n\n{example}
  \n---\n\nNow, it's your turn and here is the task.\n{task}``, where ``{example}`` is the
  example's task, actions and ``Observation: ...`` lines in ETO's spacing.

The example ends at its last action (as ETO's example files do). Its turns are context,
never targets. Every encoder call (SFT sequences, inspection, evaluation, rollouts, ETO's
and the discriminator's sequences) goes through the same frame, so training and evaluation
see one prompt. A task instruction that already starts with the instruction file's text
(ETO's ``*_sft.json`` records open with it and a gpt "OK") is used without that copy.

Token ids are built *segment by segment*: the template is rendered for growing
prefixes and each new piece of text is tokenized on its own. An action segment
is exactly the text generation would produce (``action + end-of-turn``), so a
sequence seen in training is token-for-token the sequence seen at inference
(prompt ids, then the generated ids) — no BPE merge can straddle the boundary
between prompt and action.

History truncation rule (documented in docs/method_choices.md), applied when a prompt is
longer than ``max_prompt_tokens``:
  1. every observation is cut to its first ``max_observation_chars`` characters
     (the instruction to ``2 * max_observation_chars``), with a "[...]" marker;
  2. the oldest (action, observation) turns are dropped, one at a time, and the
     instruction gets a note "[k earlier steps omitted]"; the instruction and the
     most recent turns always stay;
  3. if the instruction alone is still too long, the prompt keeps its *last*
     ``max_prompt_tokens`` tokens.
The frame (instruction file, example) is never clipped or dropped: it is fixed text the user
chose, and an encoder whose frame alone does not fit ``max_prompt_tokens`` is an error.

Goal reminder (``goal_reminder=True``, config ``policy.goal_reminder``): every observation message
ends with ``GOAL_PREFIX`` + the task's goal, the first paragraph of its text (ScienceWorld: the
task description; the rest is the first look around). A small policy trained from scratch learns
the route and ignores a goal that only the first message states (experiments/goal_following.py);
with the goal beside every action it needs no long-range attention to read it. The reminder is
added after clipping, in training and at inference alike, and is never clipped itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

Message = Dict[str, str]

ICL_LAYOUTS = ("conversation", "first")
# ETO's wording (eval_agent/prompt/templates.py, 1-shot)
ETO_ACK = "OK"
ETO_EXAMPLE_HEAD = "Here is an example."
ETO_YOUR_TURN = "Now, it's your turn and here is the task."
OBSERVATION_PREFIX = "Observation: "
GOAL_PREFIX = "\n\nYour goal: "


def goal_of(task_text: str) -> str:
    """The first paragraph of a task's text (its goal sentence(s))."""
    return task_text.strip().split("\n\n", 1)[0].strip()


@dataclass
class Encoded:
    input_ids: List[int]
    action_mask: List[int]  # 1 on tokens the policy generates (actions + end-of-turn)
    # (start, end) token spans of each action in input_ids, in order
    action_spans: List[Tuple[int, int]]
    dropped_turns: int = 0


@dataclass(frozen=True)
class PromptFrame:
    """ETO's fixed text around every prompt: an instruction and one in-context example.

    ``example_observations`` has one entry per example action but the last (the example ends at
    its last action). Build it with ``PromptFrame.build``."""

    instruction: str = ""
    example_task: str = ""
    example_actions: Tuple[str, ...] = ()
    example_observations: Tuple[str, ...] = ()
    layout: str = "conversation"

    @classmethod
    def build(cls, instruction: str = "", example=None, layout: str = "conversation") -> "PromptFrame":
        """``example``: a ``Trajectory`` (or anything with ``instruction`` and ``steps`` of
        ``action``/``observation``), or None."""
        layout = str(layout)
        if layout not in ICL_LAYOUTS:
            raise ValueError(f"icl layout must be {' | '.join(ICL_LAYOUTS)}, got {layout!r}")
        frame = cls(instruction=(instruction or "").strip(), layout=layout)
        if example is not None:
            steps = list(example.steps)
            if not steps:
                raise ValueError("the in-context example has no action")
            frame = cls(frame.instruction, frame.task_text(example.instruction),
                        tuple(s.action for s in steps), tuple(s.observation for s in steps[:-1]), layout)
        return frame

    @property
    def empty(self) -> bool:
        return not self.instruction and not self.example_actions

    def task_text(self, instruction: str) -> str:
        """The task's own text: without a leading copy of the instruction (ETO's SFT records)."""
        head = instruction.lstrip()
        if self.instruction and head.startswith(self.instruction):
            return head[len(self.instruction):].lstrip()
        return instruction

    def example_text(self) -> str:
        """The example as ETO's ``first`` layout writes it: task, then each action on its line,
        each observation as ``Observation: ...`` followed by a blank line."""
        text = self.example_task + "\n"
        for i, a in enumerate(self.example_actions):
            text += a + "\n"
            if i < len(self.example_observations):
                text += OBSERVATION_PREFIX + self.example_observations[i] + "\n\n"
        return text

    def head(self) -> List[Message]:
        """The messages before the task's own user message (all context)."""
        if self.layout != "conversation":
            return []
        msgs: List[Message] = []
        if self.instruction:
            msgs += [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": ETO_ACK}]
        if self.example_actions:
            msgs.append({"role": "user", "content": self.example_task})
            for i, a in enumerate(self.example_actions):
                msgs.append({"role": "assistant", "content": a})
                if i < len(self.example_observations):
                    msgs.append({"role": "user", "content": self.example_observations[i]})
        return msgs

    def task_message(self, task: str) -> str:
        """The content of the task's user message."""
        if self.layout != "first" or self.empty:
            return task
        parts = [self.instruction] if self.instruction else []
        if self.example_actions:
            parts.append(f"{ETO_EXAMPLE_HEAD}\n\n{self.example_text()}")
        return "\n---\n".join(parts) + f"\n---\n\n{ETO_YOUR_TURN}\n{task}"

    def texts(self) -> List[str]:
        """Every text the frame adds to a prompt (for the tiny tokenizer's corpus)."""
        if self.empty:
            return []
        return [self.instruction, self.example_task, *self.example_actions, *self.example_observations,
                ETO_ACK, ETO_EXAMPLE_HEAD, ETO_YOUR_TURN, self.task_message("")]


def build_messages(
    instruction: str,
    actions: Sequence[str],
    observations: Sequence[str],
    preamble: str = "",
    frame: Optional[PromptFrame] = None,
) -> List[Message]:
    """Messages for the history (a_i, o_i), i < len(actions). ``observations`` may be one shorter
    than ``actions`` (the last action then ends the conversation, as in SFT). With a ``frame``
    the messages of ``head_messages`` come first and the task's message is the frame's."""
    msgs = head_messages(preamble, frame)
    msgs.append({"role": "user", "content": frame.task_message(instruction) if frame else instruction})
    for i, a in enumerate(actions):
        msgs.append({"role": "assistant", "content": a})
        if i < len(observations):
            msgs.append({"role": "user", "content": observations[i]})
    return msgs


def head_messages(preamble: str = "", frame: Optional[PromptFrame] = None) -> List[Message]:
    """The context messages before the task's own user message: the system preamble (if any) and
    the frame's conversation-layout turns."""
    msgs: List[Message] = [{"role": "system", "content": preamble}] if preamble else []
    return msgs + (frame.head() if frame is not None else [])


class PromptEncoder:
    def __init__(
        self,
        tokenizer,
        max_prompt_tokens: int,
        max_observation_chars: int = 2000,
        preamble: str = "",
        frame: Optional[PromptFrame] = None,
        goal_reminder: bool = False,
    ):
        self.tok = tokenizer
        self.goal_reminder = goal_reminder
        self.max_prompt_tokens = max_prompt_tokens
        self.max_observation_chars = max_observation_chars
        self.preamble = preamble
        self.frame = frame if frame is not None and not frame.empty else None
        # leading messages that are context (their assistant turns are not actions)
        self.n_context = len(head_messages(preamble, self.frame))
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos (end-of-turn) token")
        self.eos_text = eos
        self.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set one in the policy config")
        if self.frame is not None:
            n = len(self.encode_messages(self._messages("", [], []), add_generation_prompt=True).input_ids)
            if n >= max_prompt_tokens:
                raise ValueError(
                    f"the instruction file and in-context example take {n} tokens, the whole prompt budget "
                    f"({max_prompt_tokens} = policy.max_seq_len - policy.max_new_tokens); raise policy.max_seq_len "
                    "or use a shorter example")
            if n > max_prompt_tokens // 2:
                log.warning("the instruction file and in-context example take %d of the %d prompt tokens", n,
                            max_prompt_tokens)

    # ------------------------------------------------------------------ rendering
    def _render(self, msgs: List[Message], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _ids(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _messages(self, instruction: str, actions: Sequence[str], observations: Sequence[str]) -> List[Message]:
        return build_messages(instruction, actions, observations, self.preamble, self.frame)

    def encode_messages(self, msgs: List[Message], add_generation_prompt: bool,
                        context: Optional[int] = None) -> Encoded:
        """Segment-wise tokenization; action segments are marked in ``action_mask``. The assistant
        turns among the first ``context`` messages (default: this encoder's frame) are context."""
        context = self.n_context if context is None else context
        segments: List[Tuple[str, bool]] = []
        prev = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = self._render(msgs[:i], add_generation_prompt=True)
            full = self._render(msgs[: i + 1], add_generation_prompt=False)
            if not head.startswith(prev) or not full.startswith(head):
                raise ValueError(
                    "the chat template is not prefix-stable (rendering a longer conversation "
                    "changed earlier text); step-wise encoding needs a prefix-stable template"
                )
            action_text = full[len(head):]
            # The action ends at the first end-of-turn token: that is where generation
            # stops. Whatever the template puts after it (a newline) is not generated.
            cut = action_text.find(self.eos_text)
            if cut < 0:
                raise ValueError(f"the chat template does not end assistant turns with {self.eos_text!r}")
            cut += len(self.eos_text)
            segments.append((head[len(prev):], False))
            segments.append((action_text[:cut], i >= context))
            segments.append((action_text[cut:], False))
            prev = full
        tail = self._render(msgs, add_generation_prompt=add_generation_prompt)
        if not tail.startswith(prev):
            raise ValueError("the chat template is not prefix-stable")
        segments.append((tail[len(prev):], False))

        ids: List[int] = []
        mask: List[int] = []
        spans: List[Tuple[int, int]] = []
        for text, is_action in segments:
            seg = self._ids(text)
            if is_action:
                spans.append((len(ids), len(ids) + len(seg)))
            ids.extend(seg)
            mask.extend([int(is_action)] * len(seg))
        return Encoded(ids, mask, spans)

    def encode_action(self, action: str) -> List[int]:
        """Token ids of an action as the policy would generate it (with end-of-turn)."""
        return self._ids(action + self.eos_text)

    # ------------------------------------------------------------------ states
    def _task(self, instruction: str) -> str:
        return self.frame.task_text(instruction) if self.frame is not None else instruction

    def _clip(self, text: str, limit: int) -> str:
        return text if len(text) <= limit else text[:limit] + " [...]"

    def _observations(self, instruction: str, observations: Sequence[str]) -> List[str]:
        """Clipped observations, each followed by the goal reminder when it is on."""
        obs = [self._clip(o, self.max_observation_chars) for o in observations]
        if self.goal_reminder:
            reminder = GOAL_PREFIX + goal_of(self._task(instruction))
            obs = [o + reminder for o in obs]
        return obs

    def encode_state(
        self,
        instruction: str,
        actions: Sequence[str],
        observations: Sequence[str],
        max_prompt_tokens: Optional[int] = None,
    ) -> Encoded:
        """Prompt ids for the state after ``len(actions)`` steps, ending with the generation prompt.

        Applies the history-truncation rule so the prompt fits ``max_prompt_tokens``
        (default: the encoder's).
        """
        limit = max_prompt_tokens or self.max_prompt_tokens
        assert len(actions) == len(observations), "a state has one observation per past action"
        obs = self._observations(instruction, observations)
        instr = self._clip(self._task(instruction), 2 * self.max_observation_chars)
        dropped = 0
        while True:
            note = f"\n\n[{dropped} earlier steps omitted]" if dropped else ""
            msgs = self._messages(instr + note, actions[dropped:], obs[dropped:])
            enc = self.encode_messages(msgs, add_generation_prompt=True)
            if len(enc.input_ids) <= limit or dropped >= len(actions):
                break
            dropped += 1
        if len(enc.input_ids) > limit:  # rule 3: keep the last tokens
            cut = len(enc.input_ids) - limit
            enc = Encoded(enc.input_ids[cut:], enc.action_mask[cut:], [])
        enc.dropped_turns = dropped
        return enc

    def encode_trajectory_steps(
        self, instruction: str, actions: Sequence[str], observations: Sequence[str], max_len: int
    ) -> List[Tuple[Encoded, List[int]]]:
        """``encode_trajectory`` with, for each sequence, the trajectory step of each action span."""
        seqs = self.encode_trajectory(instruction, actions, observations, max_len)
        if len(seqs) == 1:
            return [(seqs[0], list(range(len(actions))))]
        return [(e, [t]) for t, e in enumerate(seqs)]

    def encode_trajectory(
        self, instruction: str, actions: Sequence[str], observations: Sequence[str], max_len: int
    ) -> List[Encoded]:
        """Training sequences covering every action of a trajectory.

        If the whole trajectory fits in ``max_len`` it is one sequence with every action
        in the loss mask. Otherwise each step becomes its own sequence: the truncated
        state exactly as inference would build it, followed by the action.
        """
        obs = self._observations(instruction, observations)
        instr = self._clip(self._task(instruction), 2 * self.max_observation_chars)
        msgs = self._messages(instr, actions, obs[: len(actions) - 1])
        full = self.encode_messages(msgs, add_generation_prompt=False)
        if len(full.input_ids) <= max_len:
            return [full]
        out = []
        for t, a in enumerate(actions):
            act = self.encode_action(a)[: max_len // 2]  # a runaway action never fills the window
            limit = min(self.max_prompt_tokens, max_len - len(act))
            state = self.encode_state(instruction, actions[:t], observations[:t], limit)
            n = len(state.input_ids)
            out.append(Encoded(state.input_ids + act, [0] * n + [1] * len(act), [(n, n + len(act))],
                               state.dropped_turns))
        return out
