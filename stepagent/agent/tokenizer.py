"""A byte-level BPE tokenizer trained on a task's own text, with a chat template.

The embedded default policy cannot download a tokenizer, so it trains one on
the expert trajectories (instructions, actions, observations) and the task's
preamble. Byte-level BPE means any text the environment produces later is
still encodable. The chat template renders

    <|system|>\n{preamble}<|end|>\n<|user|>\n{instruction}<|end|>\n
    <|assistant|>\n{action}<|end|>\n<|user|>\n{observation}<|end|>\n ...

and ``<|end|>`` is the end-of-turn token generation stops at.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, List

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_fingerprint(texts: List[str], vocab_size: int) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"vocab_size": vocab_size, "template": CHAT_TEMPLATE}).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()[:12]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    # Left padding: batched generation appends new tokens on the right.
    fast.padding_side = "left"
    return fast


def load_or_train_tokenizer(texts: List[str], vocab_size: int, cache_dir: Path):
    """Train once per corpus; later runs load the cached tokenizer from disk."""
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_dir) / f"tokenizer-{corpus_fingerprint(texts, vocab_size)}"
    if (path / "tokenizer.json").exists():
        log.info("loading cached tokenizer from %s", path)
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        tok.padding_side = "left"
        return tok, path
    log.info("training a %d-token BPE tokenizer on %d texts", vocab_size, len(texts))
    tok = train_bpe_tokenizer(texts, vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    tok.save_pretrained(str(tmp))
    tmp.rename(path)  # atomic: a half-written tokenizer is never picked up
    return tok, path
