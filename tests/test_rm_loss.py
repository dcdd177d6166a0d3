"""Tests of `ranking_loss` in train_rm.py.

Checks: the loss against a float64 loop over pairs, with ties and absent candidates, K from 2 to 5;
log 2 when all rewards are equal; K = 2 with ranks [0, 1] is the pairwise Bradley-Terry loss; a float64
gradient check; prompts with no pair are excluded from the mean; a batch with no pair gives a zero that
still back-propagates; large margins stay finite.

Run: python -m pytest -q tests/test_rm_loss.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from train_rm import ranking_loss


def reference_ranking_loss(rewards, ranks):
    """Mean over prompts with pairs of the mean over their pairs of -log sigmoid(r_i - r_j), in float64."""
    per_prompt = []
    B, K = rewards.shape
    for b in range(B):
        losses = []
        for i in range(K):
            for j in range(K):
                if 0 <= ranks[b, i] < ranks[b, j]:
                    margin = float(rewards[b, i]) - float(rewards[b, j])
                    losses.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin)
        if losses:
            per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_matches_float64_loop_with_ties_and_absent(K):
    g = torch.Generator().manual_seed(K)
    B = 16
    rewards = torch.randn(B, K, generator=g) * 2.0
    ranks = torch.randint(-1, K, (B, K), generator=g)  # -1 = absent; repeated values = ties
    ranks[0] = torch.arange(K)  # at least one full ranking
    ranks[1] = 0  # all tied: no pair
    assert (ranks < 0).any() and any(len(set(r.tolist())) < K for r in ranks)
    got = ranking_loss(rewards, ranks)
    assert abs(got.item() - reference_ranking_loss(rewards, ranks)) < 1e-5


def test_full_ranking_divides_by_k_choose_2():
    rewards = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    ranks = torch.tensor([[2, 0, 3, 1]])
    total = sum(
        -F.logsigmoid(rewards[0, i] - rewards[0, j])
        for i in range(4) for j in range(4) if ranks[0, i] < ranks[0, j]
    )
    torch.testing.assert_close(ranking_loss(rewards, ranks), total / math.comb(4, 2))


def test_equal_rewards_give_log2():
    rewards = torch.full((5, 4), 0.7)
    ranks = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1], [0, -1, 2, 1], [1, 0, -1, -1]])
    torch.testing.assert_close(ranking_loss(rewards, ranks), torch.tensor(math.log(2.0)))


def test_k2_is_pairwise_bradley_terry():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(8, generator=g), torch.randn(8, generator=g)
    rewards = torch.stack([chosen, rejected], dim=1)
    ranks = torch.tensor([[0, 1]]).expand(8, 2)
    expected = (-F.logsigmoid(chosen - rejected)).mean()
    torch.testing.assert_close(ranking_loss(rewards, ranks), expected)
    # the order of the columns does not matter, only the ranks
    torch.testing.assert_close(ranking_loss(rewards.flip(1), ranks.flip(1)), expected)


def test_prompts_without_pairs_are_excluded():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 4, generator=g)
    ranks = torch.tensor([[0, 1, 2, 3], [1, 0, 2, -1], [0, 2, 1, 1]])
    base = ranking_loss(rewards, ranks)
    extra_rewards = torch.cat([rewards, torch.randn(3, 4, generator=g)])
    extra_ranks = torch.cat([ranks, torch.tensor([[0, 0, 0, 0], [-1, -1, -1, -1], [2, -1, -1, -1]])])
    torch.testing.assert_close(ranking_loss(extra_rewards, extra_ranks), base)


def test_no_pairs_gives_zero_with_grad():
    rewards = torch.randn(2, 3, requires_grad=True)
    ranks = torch.tensor([[1, 1, -1], [-1, -1, -1]])
    loss = ranking_loss(rewards, ranks)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(rewards.grad == 0)


def test_large_margins_stay_finite():
    rewards = torch.tensor([[-200.0, 200.0], [200.0, -200.0]], requires_grad=True)
    ranks = torch.tensor([[0, 1], [0, 1]])
    loss = ranking_loss(rewards, ranks)
    torch.testing.assert_close(loss, torch.tensor(200.0))  # (400 + 0) / 2
    loss.backward()
    assert torch.isfinite(rewards.grad).all()


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ranks = torch.tensor([[0, 1, 2, 3], [0, 0, 1, -1], [1, 1, 1, 1], [2, 0, -1, 1]])
    assert torch.autograd.gradcheck(lambda r: ranking_loss(r, ranks), (rewards,))


def test_does_not_mutate_inputs():
    rewards, ranks = torch.randn(2, 3), torch.tensor([[0, 1, 2], [2, -1, 0]])
    copies = rewards.clone(), ranks.clone()
    ranking_loss(rewards, ranks)
    assert torch.equal(rewards, copies[0]) and torch.equal(ranks, copies[1])
