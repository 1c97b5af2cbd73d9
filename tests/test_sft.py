"""SFT: exact collator tensors, the masked loss, and a tiny model that actually learns."""

import math
from types import SimpleNamespace

import torch

from stepagent.agent.prompts import Encoded, PromptEncoder
from stepagent.train.sft import collate, masked_nll, sft_samples, train_sft
from tests.conftest import make_tiny_model


def test_collate_exact_tensors():
    batch = [Encoded([5, 6, 7], [0, 1, 1], [(1, 3)]), Encoded([8, 9], [0, 1], [(1, 2)])]
    out = collate(batch, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 0]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(out["loss_mask"], torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))


def test_masked_nll_hand_computed():
    # vocab of 2; logits chosen so the log-probs are easy to write down
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]])  # [B=1, T=3, V=2]
    ids = torch.tensor([[1, 0, 1]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # targets: token 1 (=0) and token 2 (=1)
    loss, n = masked_nll(logits, ids, mask)
    # position 0 predicts ids[1]=0 with p=1/2; position 1 predicts ids[2]=1 with p=1/4
    expected = -(math.log(0.5) + math.log(0.25)) / 2
    assert n.item() == 2
    assert abs(loss.item() - expected) < 1e-6
    # masking the first target changes the loss to the second target alone
    loss2, _ = masked_nll(logits, ids, torch.tensor([[0.0, 0.0, 1.0]]))
    assert abs(loss2.item() + math.log(0.25)) < 1e-6


def test_sft_lowers_loss_and_changes_parameters(tiny_tokenizer, sample_trajectory):
    model = make_tiny_model(tiny_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = PromptEncoder(tiny_tokenizer, max_prompt_tokens=1000)
    samples = sft_samples([sample_trajectory] * 4, enc, max_len=1024)
    cfg = SimpleNamespace(lr=5e-3, weight_decay=0.0, batch_size=2, epochs=15, warmup_steps=2, max_grad_norm=1.0)
    stats = train_sft(model, samples, cfg, tiny_tokenizer.pad_token_id, progress=False)
    assert stats["sft/last_epoch_loss"] < 0.5 * stats["sft/first_epoch_loss"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.embed_tokens.weight" in changed
