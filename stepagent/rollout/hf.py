"""``rollout=hf``: HF ``generate`` on the trainer's own model (no copy, nothing to sync)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from stepagent.agent.generation import generate_actions
from stepagent.rollout.base import RolloutEngine, register_engine


class HFEngine(RolloutEngine):
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        from stepagent.train.engine import gathered

        with gathered(self.model):  # ZeRO-3: the full parameters once for the phase
            yield

    def _generate(self, prompts, max_new_tokens, eos_token_id, temperature, num_samples):
        # generate left-pads the batch and repeats each row num_samples times before the prefill
        self.stats.prefilled_tokens += max(len(p) for p in prompts) * len(prompts) * num_samples
        return generate_actions(self.model, self.tokenizer, prompts, max_new_tokens, eos_token_id,
                                temperature=temperature, num_samples=num_samples)


@register_engine("hf")
def hf_engine(cfg: Any, policy: Any, workdir: Any) -> HFEngine:
    return HFEngine(policy.model, policy.tokenizer)
