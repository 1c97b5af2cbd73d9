"""Batched action generation with a KV cache (HF ``generate``), stopping at end-of-turn."""

from __future__ import annotations

from typing import List, Sequence

import torch


@torch.no_grad()
def generate_actions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int,
    temperature: float = 0.0,
    num_samples: int = 1,
    synced_gpus: bool = False,
) -> List[List[List[int]]]:
    """For each prompt, ``num_samples`` generated token-id lists (end-of-turn token excluded).

    Prompts are left-padded into one batch; ``temperature == 0`` is greedy.

    A ZeRO-3 model outside ``engine.gathered`` fetches its parameter shards layer by layer
    (a collective per layer): then ``synced_gpus`` keeps every rank stepping until all are done
    (set automatically; the ranks must still make the same number of calls — the phase
    functions gather the parameters instead, so their calls are purely local).
    """
    if not prompts:
        return []
    if not synced_gpus and getattr(model, "_stepagent_gathered", False) is False:
        from stepagent import distributed as dist
        from stepagent.train.engine import is_partitioned

        synced_gpus = dist.world_size() > 1 and is_partitioned(model)
    pad = tokenizer.pad_token_id
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[i, T - len(p):] = 1
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    sample = temperature > 0
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=None,
        top_k=None,
        num_return_sequences=num_samples,
        eos_token_id=eos_token_id,
        pad_token_id=pad,
        use_cache=True,
        synced_gpus=synced_gpus,
    )
    if was_training:
        model.train()
    gen = out[:, T:].tolist()
    result: List[List[List[int]]] = []
    for i in range(len(prompts)):
        samples = []
        for row in gen[i * num_samples : (i + 1) * num_samples]:
            if eos_token_id in row:
                row = row[: row.index(eos_token_id)]
            samples.append([t for t in row if t != pad])
        result.append(samples)
    return result
