"""The generation interface shared by inspection, evaluation, outcome/LOOP rollouts and ETO
exploration: the algorithms hand token-id prompts to a ``RolloutEngine`` and never know which
engine runs (``rollout=hf``: HF ``generate`` on the trainer's model; ``rollout=vllm``: vLLM with
prefix caching, given the trainer's weights after every update).

Weights: an engine that holds its own copy of the policy (vLLM) compares a fingerprint of the
trainer's trainable parameters at the start of every generation phase and pushes the weights
when they changed, so no update stage can be followed by generation with stale weights.

Counters (``GenerationStats``): prompt tokens handed over, prompt tokens the engine prefilled
(HF: the left-padded batch, once per returned sequence; vLLM: the prompt minus its cached
prefix), generated tokens and wall time; ``pop_stats`` returns and resets them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ENGINES: Dict[str, Callable[..., "RolloutEngine"]] = {}


def register_engine(name: str):
    def wrap(cls):
        ENGINES[name] = cls
        return cls

    return wrap


@dataclass
class GenerationStats:
    calls: int = 0
    prompts: int = 0
    sequences: int = 0  # prompts x samples
    prompt_tokens: int = 0  # the prompts' own tokens (once per prompt)
    prefilled_tokens: int = 0  # prompt tokens the engine computed (padding and repeats included, cache hits not)
    generated_tokens: int = 0
    seconds: float = 0.0
    weight_syncs: int = 0
    sync_seconds: float = 0.0
    logprob_checked_tokens: int = 0
    logprob_abs_diff_sum: float = 0.0

    def as_row(self, prefix: str) -> Dict[str, Any]:
        row = {f"{prefix}/{k}": v for k, v in asdict(self).items() if k != "logprob_abs_diff_sum"}
        row[f"{prefix}/tokens_per_s"] = self.generated_tokens / self.seconds if self.seconds > 0 else None
        row[f"{prefix}/logprob_abs_diff"] = (self.logprob_abs_diff_sum / self.logprob_checked_tokens
                                             if self.logprob_checked_tokens else None)
        return row


class RolloutEngine:
    """Generates actions for token-id prompts with the current policy."""

    name = "?"

    def __init__(self) -> None:
        self.stats = GenerationStats()
        self.recorded_prompts: Optional[List[List[int]]] = None  # set to [] to keep every prompt (benchmarks)

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        """Around a generation phase (one inspection, evaluation or rollout pass): the HF engine
        gathers ZeRO-3 parameters once; an engine with its own weights brings them up to date."""
        yield

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int,
                 temperature: float = 0.0, num_samples: int = 1) -> List[List[List[int]]]:
        """For each prompt, ``num_samples`` generated token-id lists (end-of-turn token excluded);
        ``temperature == 0`` is greedy."""
        if not prompts:
            return []
        t0 = time.perf_counter()
        out = self._generate(prompts, max_new_tokens, eos_token_id, temperature, num_samples)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.prompts += len(prompts)
        self.stats.sequences += len(prompts) * num_samples
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.generated_tokens += sum(len(s) for samples in out for s in samples)
        if self.recorded_prompts is not None:
            self.recorded_prompts.extend(list(p) for p in prompts)
        return out

    def _generate(self, prompts, max_new_tokens, eos_token_id, temperature, num_samples):
        raise NotImplementedError

    def batch_prompts(self, batch_size: int, num_samples: int) -> int:
        """Prompts per ``generate`` call for a caller that asks for ``batch_size`` (HF: as asked,
        its memory grows with the padded batch; vLLM: as many as it decodes at once)."""
        return batch_size

    def pop_stats(self) -> GenerationStats:
        stats, self.stats = self.stats, GenerationStats()
        return stats

    def close(self) -> None:
        pass


def unique_prefix_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens a perfect prefix cache computes for ``prompts``: the nodes of their token trie
    (a token is computed once per distinct prefix ending in it)."""
    root: Dict[int, Any] = {}
    nodes = 0
    for p in prompts:
        node = root
        for tok in p:
            nxt = node.get(tok)
            if nxt is None:
                nxt = node[tok] = {}
                nodes += 1
            node = nxt
    return nodes


def block_prefix_bound(prompts: Sequence[Sequence[int]], block: int, samples: int = 1) -> int:
    """Prompt tokens a prefix cache that reuses whole ``block``-token blocks must compute: every
    distinct full block once (a trie over block tuples), plus, for each of the ``samples`` sequences
    per prompt, the prompt's last partial block (at least its last token), never reused."""
    root: Dict[Tuple[int, ...], Any] = {}
    full = 0
    tail = 0
    for p in prompts:
        node = root
        n = len(p) // block
        for b in range(n):
            key = tuple(p[b * block:(b + 1) * block])
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
                full += block
            node = nxt
        tail += samples * max(len(p) - n * block, 1)
    return full + tail


def priming_waves(prompts: Sequence[Sequence[int]], min_shared: int = 16) -> List[List[Tuple[int, ...]]]:
    """Prefixes to prefill, wave after wave, before ``prompts`` are generated in one batch, so that a
    prefix cache computes every shared token once (requests of one batch are prefilled side by side
    and cannot reuse each other's blocks).

    Sorted lexicographically, adjacent prompts give the trie's branch points (their longest common
    prefix, when it is a proper prefix of both). Waves: the branch prefixes of at least
    ``min_shared`` tokens with no branch prefix above them, then the ones below those (deeper levels
    in a third wave), then the leaves: prompts that are no other prompt's prefix (inspection's
    shorter expert prefixes are prefixes of the longer ones, so the leaves cover them)."""
    uniq = sorted({tuple(p) for p in prompts})
    if len(uniq) < 2:
        return []

    def lcp(a: Tuple[int, ...], b: Tuple[int, ...]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    branches = set()
    leaves = []
    for i, p in enumerate(uniq):
        nxt = uniq[i + 1] if i + 1 < len(uniq) else None
        k = lcp(p, nxt) if nxt is not None else 0
        if nxt is not None and k == len(p):
            continue  # p is a prefix of the next prompt: covered by a leaf
        leaves.append(p)
        if nxt is not None and min_shared <= k < len(p):
            branches.add(p[:k])
    lengths = sorted({len(b) for b in branches})
    levels: List[List[Tuple[int, ...]]] = [[], [], []]
    for b in sorted(branches, key=len):
        above = sum(1 for n in lengths if n < len(b) and b[:n] in branches)
        levels[min(above, 2)].append(b)
    return [w for w in levels if w] + [leaves]


def as_rollout_engine(model_or_engine: Any, tokenizer: Any) -> RolloutEngine:
    """An engine as is; a bare model (tests, benchmarks, old callers) wrapped in the HF engine."""
    if isinstance(model_or_engine, RolloutEngine):
        return model_or_engine
    from stepagent.rollout.hf import HFEngine

    return HFEngine(model_or_engine, tokenizer)


def make_engine(cfg: Any, policy: Any, workdir: Any) -> RolloutEngine:
    """The engine ``cfg.rollout.name`` names, for ``policy`` (``workdir``: where it may write files)."""
    name = str(cfg.rollout.name)
    if name == "vllm":
        from stepagent.rollout import vllm_engine  # noqa: F401  (registers itself; imports vLLM)
    else:
        from stepagent.rollout import hf  # noqa: F401
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: hf, vllm")
    return ENGINES[name](cfg, policy, workdir)
