"""Tests of `rrhf_loss` in train_rrhf.py.

Checks: the loss against a float64 loop over pairs and tokens (ties, K from 1 to 5, candidates of
different lengths and offsets, length_penalty 0 and 1); with K = 1 it equals `sft_loss` from
train_sft.py on the same tokens (per prompt, and on a batch of equal-length responses); the rank term
is 0 when the scores are already in reward order; the best candidate is the first of tied maxima;
masked tokens get zero gradient; a float64 gradient check.

Run: python -m pytest -q tests/test_rrhf_loss.py
"""

import pytest
import torch

from train_rrhf import rrhf_loss, rrhf_stats
from train_sft import sft_loss

F64 = torch.float64


def reference_rrhf_loss(logprobs, mask, rewards, length_penalty):
    B, K, T = logprobs.shape
    losses = []
    for b in range(B):
        sums, lengths = [], []
        for i in range(K):
            tokens = [float(logprobs[b, i, t]) for t in range(T) if mask[b, i, t]]
            sums.append(sum(tokens))
            lengths.append(len(tokens))
        p = [sums[i] / lengths[i] ** length_penalty for i in range(K)]
        r = [float(x) for x in rewards[b]]
        rank = 0.0
        for i in range(K):
            for j in range(K):
                if r[i] < r[j]:
                    rank += max(0.0, p[i] - p[j])
        best = r.index(max(r))  # first index of the largest reward
        ft = -sums[best] / lengths[best]
        losses.append(rank + ft)
    return sum(losses) / B


def random_inputs(B, K, T, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, K, T, generator=g, dtype=F64) * 4  # log-probs are <= 0
    # Each candidate: a run of its own length at its own offset (prompt before, padding after).
    mask = torch.zeros(B, K, T, dtype=torch.long)
    for b in range(B):
        for i in range(K):
            length = int(torch.randint(1, T + 1, (1,), generator=g))
            start = int(torch.randint(0, T - length + 1, (1,), generator=g))
            mask[b, i, start : start + length] = 1
    # Rewards on a coarse grid, so that ties happen.
    rewards = torch.randint(0, 3, (B, K), generator=g).to(F64)
    rewards[0, -1] = rewards[0, 0]  # at least one tie (for K > 1)
    return logprobs, mask, rewards


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_matches_float64_loop(K, length_penalty):
    logprobs, mask, rewards = random_inputs(B=6, K=K, T=9, seed=10 * K + int(length_penalty))
    if K > 1:
        assert any(len(set(r.tolist())) < K for r in rewards)  # some ties
    got = rrhf_loss(logprobs, mask, rewards, length_penalty)
    expected = reference_rrhf_loss(logprobs, mask, rewards, length_penalty)
    assert abs(got.item() - expected) < 1e-12


def test_k1_equals_sft_loss():
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 8, 13
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0],
                         [0, 1, 1, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 1, 1],
                         [1] * 8])
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    rewards = torch.zeros(B, 1, dtype=F64)
    for b in range(B):  # per prompt: exactly sft_loss
        got = rrhf_loss(logprobs[b : b + 1, None], mask[b : b + 1, None], rewards[b : b + 1])
        torch.testing.assert_close(got, sft_loss(logits[b : b + 1], targets[b : b + 1], mask[b : b + 1]))
    # on a batch whose responses have equal lengths the token mean and the mean of means coincide
    equal = torch.zeros_like(mask)
    equal[:, 3:6] = 1
    torch.testing.assert_close(rrhf_loss(logprobs[:, None], equal[:, None], rewards),
                               sft_loss(logits, targets, equal))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_rank_term_zero_in_reward_order(length_penalty):
    # Candidate i has constant per-token log-prob -3 + i and reward i (i = 0 and 1 tied at reward 0):
    # scores rise with the reward, so every hinge is 0 and the loss is the SFT term alone.
    T = 4
    logprobs = torch.stack([torch.full((T,), -3.0 + i, dtype=F64) for i in range(4)])[None]  # (1, 4, T)
    mask = torch.ones(1, 4, T, dtype=torch.long)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 2.0]], dtype=F64)
    if length_penalty == 0.0:
        mask[0, 0, :1] = 0  # with the sequence log-likelihood, different lengths must still keep the order
    loss = rrhf_loss(logprobs, mask, rewards, length_penalty)
    assert loss.item() == 0.0 - (-3.0 + 3)  # L_ft of candidate 3: -mean(logprobs) = 0
    # swapping the rewards of the extremes makes the rank term positive
    assert rrhf_loss(logprobs, mask, rewards[:, [3, 1, 2, 0]], length_penalty).item() > 0


def test_best_is_first_of_tied_maxima():
    logprobs = torch.tensor([[[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]]], dtype=F64)
    mask = torch.ones(1, 3, 2, dtype=torch.long)
    rewards = torch.tensor([[0.0, 5.0, 5.0]], dtype=F64)
    # pairs: (0, 1) and (0, 2) with hinges max(0, -1 + 2) = 1 and max(0, -1 + 3) = 2; L_ft on candidate 1
    assert rrhf_loss(logprobs, mask, rewards).item() == 3.0 + 2.0


def test_masked_tokens_get_zero_gradient():
    logprobs, mask, rewards = random_inputs(B=3, K=4, T=7, seed=99)
    logprobs.requires_grad_(True)
    rrhf_loss(logprobs, mask, rewards).backward()
    assert torch.all(logprobs.grad[mask == 0] == 0)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_gradcheck(length_penalty):
    logprobs, mask, rewards = random_inputs(B=2, K=3, T=4, seed=7)
    logprobs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: rrhf_loss(lp, mask, rewards, length_penalty), (logprobs,))


def test_does_not_mutate_inputs():
    logprobs, mask, rewards = random_inputs(B=2, K=3, T=5, seed=8)
    copies = [x.clone() for x in (logprobs, mask, rewards)]
    rrhf_loss(logprobs, mask, rewards, 0.5)
    for x, c in zip((logprobs, mask, rewards), copies):
        assert torch.equal(x, c)


def test_stats_are_the_terms_of_the_loss():
    logprobs, mask, rewards = random_inputs(B=3, K=4, T=6, seed=11)
    for alpha in (0.0, 1.0):
        s = rrhf_stats(logprobs, mask, rewards, alpha)
        assert torch.allclose(s["rank_loss"] + s["sft_loss"], rrhf_loss(logprobs, mask, rewards, alpha))
    # hand values: p = (-1, -2, -3), rewards (0, 5, 5): pairs (0, 1), (0, 2), both misordered (p_0 > p_j)
    logprobs = torch.tensor([[[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]]], dtype=F64)
    s = rrhf_stats(logprobs, torch.ones(1, 3, 2), torch.tensor([[0.0, 5.0, 5.0]], dtype=F64))
    assert (s["rank_loss"].item(), s["sft_loss"].item(), s["rank_acc"].item()) == (3.0, 2.0, 0.0)
    s = rrhf_stats(logprobs, torch.ones(1, 3, 2), torch.tensor([[9.0, 5.0, 1.0]], dtype=F64))
    assert (s["rank_loss"].item(), s["rank_acc"].item()) == (0.0, 1.0)  # already in the reward's order
