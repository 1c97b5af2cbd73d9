import math

import torch

from stepagent.train.dpo import implicit_reward, step_dpo_loss


def test_step_dpo_loss_hand_computed():
    beta = 0.5
    pi_c = torch.tensor([-2.0, -1.0], requires_grad=True)
    pi_r = torch.tensor([-3.0, -0.5], requires_grad=True)
    ref_c = torch.tensor([-2.5, -1.0])
    ref_r = torch.tensor([-2.0, -1.5])
    loss, stats = step_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    # pair 0: β[(−2+2.5) − (−3+2)] = 0.5*1.5 = 0.75 ; pair 1: β[(0) − (−0.5+1.5)] = −0.5
    m = [0.75, -0.5]
    expected = sum(-math.log(1 / (1 + math.exp(-x))) for x in m) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert stats["accuracy"].item() == 0.5
    assert abs(stats["margin"].item() - sum(m) / 2) < 1e-6
    assert abs(stats["reward_chosen"].item() - 0.5 * (0.5 * 0.5 + 0.0)) < 1e-6
    loss.backward()
    # dL/dπ_c = -β σ(-margin) / N : raising the chosen log-prob lowers the loss
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert torch.allclose(pi_c.grad, torch.tensor([-beta * sig(-mi) / 2 for mi in m]), atol=1e-6)
    assert torch.allclose(pi_r.grad, -pi_c.grad, atol=1e-6)


def test_implicit_reward():
    assert abs(implicit_reward(torch.tensor(-1.0), torch.tensor(-3.0), 0.1).item() - 0.2) < 1e-7
