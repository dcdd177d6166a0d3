"""Tests of the PPO math in train_ppo.py.

Checks, each against an independent float64 reference (Python loops, hand computations):
- kl_penalty: each estimator elementwise; k1 and k3 unbiased for KL(p || q) of small categorical
  distributions (exactly in expectation, and as a sample mean of tokens drawn from p); k2, k3 never
  negative; all three exactly 0 when the policy equals the reference; unknown names rejected.
- token_rewards: the KL penalty on the response tokens and the score at each row's last valid
  position, rows with different offsets and lengths, an empty row.
- gae: a loop over time per row, rows of different lengths and offsets (ending before T included),
  gamma and lam at 0, 1 and in between, and closed forms at the extremes. With holes (tool output
  between the policy's tokens): a loop over each row's mask-1 positions, the same as the row with its
  tool tokens deleted; contiguous masks bit for bit what the function gave before holes (kept here).
- token_rewards with holes: the KL penalty on the policy's tokens only, the score on the last of them.
- ppo_policy_loss / ppo_value_loss: every clip branch with both signs of the advantage (or of the
  error), the gradient exactly 0 when the clipped term is active; ratio exactly 1 before an update.
- ppo_policy_stats: approx_kl and clipfrac.
- gradchecks (float64) of every differentiable function; inputs never mutated.
- AdaptiveKLController against hand computations (both clip limits); FixedKLController is constant.

Run: python -m pytest -q tests/test_ppo_loss.py
"""

import math

import pytest
import torch

from train_ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    ppo_policy_loss,
    ppo_policy_stats,
    ppo_value_loss,
    token_rewards,
)

F64 = torch.float64


# Response masks: full row, a run in the middle (starts late, ends before T), a run at the start
# (ends before T), a run at the end (left offset), a single token, an empty row.
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
)


def valid_run(mask_row):
    """(start, end) inclusive of a row's contiguous valid run, or None."""
    idx = [t for t, m in enumerate(mask_row.tolist()) if m]
    if not idx:
        return None
    assert idx == list(range(idx[0], idx[-1] + 1)), "valid positions must be contiguous"
    return idx[0], idx[-1]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------------

def test_kl_estimators_elementwise():
    lp, ref = randn(4, 5, seed=0), randn(4, 5, seed=1)
    k1, k2, k3 = (kl_penalty(lp, ref, e) for e in ("k1", "k2", "k3"))
    for b in range(4):
        for t in range(5):
            d = float(lp[b, t]) - float(ref[b, t])
            assert abs(k1[b, t].item() - d) < 1e-12
            assert abs(k2[b, t].item() - d * d / 2) < 1e-12
            assert abs(k3[b, t].item() - (math.exp(-d) - 1 + d)) < 1e-12


def categorical_pair(seed, n=6):
    p = torch.softmax(randn(n, seed=seed) * 1.5, dim=0)
    q = torch.softmax(randn(n, seed=seed + 100) * 1.5, dim=0)
    exact_kl = sum(float(p[i]) * math.log(float(p[i]) / float(q[i])) for i in range(n))
    return p, q, exact_kl


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_unbiased_in_exact_expectation(seed):
    # E_{y ~ p}[k(y)] summed exactly over the support: k1 and k3 give KL(p || q), k2 does not.
    p, q, exact_kl = categorical_pair(seed)
    lp, lq = p.log(), q.log()
    for estimator in ("k1", "k3"):
        expectation = (p * kl_penalty(lp, lq, estimator)).sum().item()
        assert abs(expectation - exact_kl) < 1e-12
    assert exact_kl > 0.05  # the distributions differ, so the check above means something


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_sample_means_approach_kl(seed):
    p, q, exact_kl = categorical_pair(seed)
    n = 200_000
    tokens = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    lp, lq = p.log()[tokens], q.log()[tokens]  # log-probs of tokens sampled from the policy p
    for estimator in ("k1", "k3"):
        k = kl_penalty(lp, lq, estimator)
        stderr = k.std().item() / math.sqrt(n)
        assert abs(k.mean().item() - exact_kl) < 5 * stderr
    assert (kl_penalty(lp, lq, "k3") >= 0).all()
    assert (kl_penalty(lp, lq, "k2") >= 0).all()
    assert (kl_penalty(lp, lq, "k1") < 0).any()  # k1 is unbiased but not per-sample non-negative


def test_k2_k3_never_negative_on_a_grid():
    d = torch.linspace(-30, 30, 6001, dtype=F64)
    zero = torch.zeros_like(d)
    assert (kl_penalty(d, zero, "k3") >= 0).all()
    assert (kl_penalty(d, zero, "k2") >= 0).all()
    # Near 0, where k3 is about d**2 / 2, float32 keeps it accurate and non-negative (exp(-d) - 1 + d
    # written naively comes out about -1.7e-8 at d = 1e-4).
    small = torch.tensor([1e-4, -3e-4, 1e-3, 2e-5], dtype=torch.float32)
    k3 = kl_penalty(small, torch.zeros_like(small), "k3")
    exact = torch.expm1(-small.double()) + small.double()
    assert (k3 >= 0).all()
    assert ((k3.double() - exact).abs() < 1e-7 * small.double().abs()).all()  # error ~ eps * |d|, not eps


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_zero_when_policy_equals_reference(estimator):
    lp = -torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.all(kl_penalty(lp, lp.clone(), estimator) == 0)


def test_kl_unknown_estimator():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_gradcheck(estimator):
    lp = randn(2, 3, seed=2).requires_grad_(True)
    ref = randn(2, 3, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, estimator), (lp, ref))


# ---------------------------------------------------------------------------------------------------
# token_rewards
# ---------------------------------------------------------------------------------------------------

def reference_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        run = valid_run(mask[b])
        if run is None:
            continue
        for t in range(run[0], run[1] + 1):
            out[b][t] = -kl_coef * (float(logprobs[b, t]) - float(ref_logprobs[b, t]))
        out[b][run[1]] += float(scores[b])
    return torch.tensor(out, dtype=F64)


def test_token_rewards_matches_loop():
    B, T = MASK.shape
    scores, lp, ref = randn(B, seed=4), randn(B, T, seed=5), randn(B, T, seed=6)
    got = token_rewards(scores, lp, ref, MASK, kl_coef=0.07)
    torch.testing.assert_close(got, reference_token_rewards(scores, lp, ref, MASK, 0.07), rtol=0, atol=1e-12)


def test_token_rewards_score_at_last_valid_position():
    B, T = MASK.shape
    scores = torch.arange(1, B + 1, dtype=F64) * 10
    lp = randn(B, T, seed=7)
    got = token_rewards(scores, lp, lp.clone(), MASK, kl_coef=0.1)  # no KL: only the score remains
    expected = torch.zeros(B, T, dtype=F64)
    for b, last in enumerate([7, 5, 2, 7, 3]):  # row 5 is empty: nothing
        expected[b, last] = scores[b]
    assert torch.equal(got, expected)


def test_token_rewards_gradcheck():
    B, T = MASK.shape
    args = (randn(B, seed=8), randn(B, T, seed=9), randn(B, T, seed=10))
    args = tuple(a.requires_grad_(True) for a in args)
    assert torch.autograd.gradcheck(lambda s, a, b: token_rewards(s, a, b, MASK, 0.2), args)


# ---------------------------------------------------------------------------------------------------
# gae
# ---------------------------------------------------------------------------------------------------

def reference_gae(rewards, values, mask, gamma, lam):
    """Backwards over each row's own valid run; the value and advantage after its end are 0."""
    B, T = mask.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        run = valid_run(mask[b])
        if run is None:
            continue
        start, end = run
        next_adv = 0.0
        for t in range(end, start - 1, -1):
            next_value = float(values[b, t + 1]) if t < end else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            adv[b][t] = delta + gamma * lam * next_adv
            ret[b][t] = adv[b][t] + float(values[b, t])
            next_adv = adv[b][t]
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


# Rewards and values hold large garbage outside the mask: it must not leak into valid positions.
def gae_inputs(seed):
    B, T = MASK.shape
    outside = 1 - MASK.to(F64)
    rewards = randn(B, T, seed=seed) + 100.0 * outside
    values = randn(B, T, seed=seed + 1) - 100.0 * outside
    return rewards, values


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_loop(gamma, lam):
    rewards, values = gae_inputs(seed=11)
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, MASK, gamma, lam)
    torch.testing.assert_close(advantages, ref_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, ref_ret, rtol=0, atol=1e-12)


def test_gae_closed_forms():
    rewards, values = gae_inputs(seed=12)
    m = MASK.to(F64)
    # gamma = 0: one-step, A = r - V and the return is the reward itself.
    adv, ret = gae(rewards, values, MASK, 0.0, 0.7)
    torch.testing.assert_close(adv, (rewards - values) * m)
    torch.testing.assert_close(ret, rewards * m)
    # gamma = lam = 1: the return is the undiscounted sum of the rewards to the end of the row's run.
    adv, ret = gae(rewards, values, MASK, 1.0, 1.0)
    reward_to_go = (rewards * m).flip(1).cumsum(1).flip(1) * m
    torch.testing.assert_close(ret, reward_to_go)
    torch.testing.assert_close(adv, (reward_to_go - values) * m)


def test_gae_row_independent_of_padding():
    # A row gives the same result whatever the padding around its run, and alone or in a batch.
    rewards, values = gae_inputs(seed=13)
    adv, _ = gae(rewards, values, MASK, 0.99, 0.95)
    run_adv, _ = gae(rewards[1:2, 2:6], values[1:2, 2:6], MASK[1:2, 2:6], 0.99, 0.95)
    torch.testing.assert_close(adv[1:2, 2:6], run_adv, rtol=0, atol=1e-12)


def test_gae_gradcheck():
    rewards, values = gae_inputs(seed=14)
    args = (rewards.requires_grad_(True), values.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda r, v: gae(r, v, MASK, 0.9, 0.8), args)


# ---------------------------------------------------------------------------------------------------
# ppo_policy_loss and ppo_policy_stats
# ---------------------------------------------------------------------------------------------------

EPS = 0.2
# (advantage, ratio, clipped term active?) with clip_eps = 0.2; the last token is masked out.
POLICY_CASES = [
    (+1.5, 1.1, False),  # A > 0, ratio inside the range
    (+1.5, 1.5, True),  # A > 0, ratio above 1 + eps: clipped, no gradient
    (+1.5, 0.5, False),  # A > 0, ratio below 1 - eps: the objective got worse, not clipped
    (-2.0, 0.5, True),  # A < 0, ratio below 1 - eps: clipped, no gradient
    (-2.0, 1.5, False),  # A < 0, ratio above 1 + eps: got worse, not clipped
    (-2.0, 0.9, False),  # A < 0, ratio inside the range
    (+5.0, 3.0, False),  # masked
]
POLICY_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])


def policy_inputs():
    adv = torch.tensor([[a for a, _, _ in POLICY_CASES]], dtype=F64)
    ratio = torch.tensor([[r for _, r, _ in POLICY_CASES]], dtype=F64)
    old = randn(1, len(POLICY_CASES), seed=15) - 2.0
    return old + ratio.log(), old, adv


def reference_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    terms = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                r = math.exp(float(logprobs[b, t]) - float(old_logprobs[b, t]))
                a = float(advantages[b, t])
                terms.append(max(-a * r, -a * min(max(r, 1 - clip_eps), 1 + clip_eps)))
    return sum(terms) / len(terms)


def test_policy_loss_clip_branches_and_gradients():
    lp, old, adv = policy_inputs()
    lp.requires_grad_(True)
    loss = ppo_policy_loss(lp, old, adv, POLICY_MASK, EPS)
    n = int(POLICY_MASK.sum())
    hand = [-1.5 * 1.1, -1.5 * 1.2, -1.5 * 0.5, 2.0 * 0.8, 2.0 * 1.5, 2.0 * 0.9]
    assert abs(loss.item() - sum(hand) / n) < 1e-12
    loss.backward()
    for t, (a, r, clipped) in enumerate(POLICY_CASES):
        # d/d logprob of -A * ratio is -A * ratio; a clipped or masked token gets exactly 0.
        expected = 0.0 if clipped or not POLICY_MASK[0, t] else -a * r / n
        assert abs(lp.grad[0, t].item() - expected) < 1e-12, t
        if clipped or not POLICY_MASK[0, t]:
            assert lp.grad[0, t].item() == 0.0


def test_policy_loss_matches_loop_random():
    B, T = MASK.shape
    old = randn(B, T, seed=16) - 3
    lp = old + 0.4 * randn(B, T, seed=17)
    adv = randn(B, T, seed=18)
    got = ppo_policy_loss(lp, old, adv, MASK, EPS).item()
    assert abs(got - reference_policy_loss(lp, old, adv, MASK, EPS)) < 1e-12


def test_policy_ratio_is_one_before_update():
    B, T = MASK.shape
    lp, adv = randn(B, T, seed=19) - 3, randn(B, T, seed=20)
    loss = ppo_policy_loss(lp, lp.clone(), adv, MASK, EPS)
    m = MASK.to(F64)
    assert loss.item() == (-(adv * m).sum() / m.sum()).item()
    stats = ppo_policy_stats(lp, lp.clone(), adv, MASK, EPS)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0


def test_policy_stats():
    lp, old, adv = policy_inputs()
    stats = ppo_policy_stats(lp, old, adv, POLICY_MASK, EPS)
    assert abs(stats["clipfrac"].item() - 2 / 6) < 1e-12
    ratios = [r for _, r, _ in POLICY_CASES[:6]]
    approx_kl = sum(r - 1 - math.log(r) for r in ratios) / 6  # k3 of KL(old || new)
    assert abs(stats["approx_kl"].item() - approx_kl) < 1e-12
    assert not stats["clipfrac"].requires_grad


def test_policy_loss_gradcheck():
    B, T = MASK.shape
    old = randn(B, T, seed=21) - 3
    lp = (old + 0.4 * randn(B, T, seed=22)).requires_grad_(True)
    adv = randn(B, T, seed=23).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ppo_policy_loss(a, old, b, MASK, EPS), (lp, adv))


# ---------------------------------------------------------------------------------------------------
# ppo_value_loss
# ---------------------------------------------------------------------------------------------------

# (old value, new value, return, clipped term active?) with clip_eps = 0.2; the last token is masked.
VALUE_CASES = [
    (0.0, 0.1, 1.0, False),  # moved less than eps: both terms equal
    (0.0, 1.0, 1.0, True),  # moved up past eps, clipped prediction worse: no gradient
    (0.0, 1.0, -1.0, False),  # moved up past eps, unclipped worse: full gradient
    (0.0, -1.0, -1.0, True),  # moved down past eps, clipped prediction worse: no gradient
    (0.0, -1.0, 1.0, False),  # moved down past eps, unclipped worse: full gradient
    (0.0, 9.0, -9.0, False),  # masked
]
VALUE_MASK = torch.tensor([[1, 1, 1, 1, 1, 0]])


def reference_value_loss(values, old_values, returns, mask, clip_eps):
    terms = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                v, o, g = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
                v_clip = o + min(max(v - o, -clip_eps), clip_eps)
                terms.append(max((v - g) ** 2, (v_clip - g) ** 2))
    return 0.5 * sum(terms) / len(terms)


def test_value_loss_clip_branches_and_gradients():
    old, v, g = (torch.tensor([[c[i] for c in VALUE_CASES]], dtype=F64) for i in range(3))
    v.requires_grad_(True)
    loss = ppo_value_loss(v, old, g, VALUE_MASK, EPS)
    n = int(VALUE_MASK.sum())
    hand = [0.81, 0.64, 4.0, 0.64, 4.0]
    assert abs(loss.item() - 0.5 * sum(hand) / n) < 1e-12
    loss.backward()
    for t, (_, vt, gt, clipped) in enumerate(VALUE_CASES):
        expected = 0.0 if clipped or not VALUE_MASK[0, t] else (vt - gt) / n
        assert abs(v.grad[0, t].item() - expected) < 1e-12, t
        if clipped or not VALUE_MASK[0, t]:
            assert v.grad[0, t].item() == 0.0


def test_value_loss_matches_loop_random():
    B, T = MASK.shape
    old, g = randn(B, T, seed=24), randn(B, T, seed=25)
    v = old + 0.3 * randn(B, T, seed=26)
    got = ppo_value_loss(v, old, g, MASK, EPS).item()
    assert abs(got - reference_value_loss(v, old, g, MASK, EPS)) < 1e-12


def test_value_loss_gradcheck():
    B, T = MASK.shape
    old = randn(B, T, seed=27)
    v = (old + 0.3 * randn(B, T, seed=28)).requires_grad_(True)
    g = randn(B, T, seed=29).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ppo_value_loss(a, old, b, MASK, EPS), (v, g))


def test_losses_do_not_mutate_inputs():
    B, T = MASK.shape
    tensors = [randn(B, T, seed=30 + i) for i in range(4)]
    copies = [x.clone() for x in tensors] + [MASK.clone()]
    a, b, c, d = tensors
    ppo_policy_loss(a, b, c, MASK, EPS)
    ppo_policy_stats(a, b, c, MASK, EPS)
    ppo_value_loss(a, b, c, MASK, EPS)
    gae(a, b, MASK, 0.9, 0.9)
    token_rewards(d[:, 0], a, b, MASK, 0.1)
    kl_penalty(a, b, "k3")
    for x, y in zip(tensors + [MASK], copies):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------

def test_adaptive_kl_controller_hand_computation():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    assert ctl.value == 0.2
    ctl.update(current_kl=6.6, n_steps=256)  # e = 0.1, inside the clip
    expected = 0.2 * (1 + 0.1 * 256 / 10_000)
    assert abs(ctl.value - expected) < 1e-15
    ctl.update(current_kl=60.0, n_steps=256)  # e = 9 -> upper clip 0.2
    expected *= 1 + 0.2 * 256 / 10_000
    assert abs(ctl.value - expected) < 1e-15
    ctl.update(current_kl=0.0, n_steps=512)  # e = -1 -> lower clip -0.2
    expected *= 1 - 0.2 * 512 / 10_000
    assert abs(ctl.value - expected) < 1e-15
    ctl.update(current_kl=torch.tensor(6.0), n_steps=256)  # on target: unchanged (tensor accepted)
    assert abs(ctl.value - expected) < 1e-15
    assert abs(expected - 0.2 * 1.00256 * 1.00512 * 0.98976) < 1e-15


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_value_stats_count_the_tokens_the_clip_zeroes():
    from train_ppo import ppo_value_stats
    old = torch.zeros(1, 4, dtype=torch.float64)
    values = torch.tensor([[0.1, 0.5, -0.5, 0.3]], dtype=torch.float64)    # moves of 0.1, 0.5, -0.5, 0.3
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    s = ppo_value_stats(values, old, returns, mask, clip_eps=0.2)
    # token 0: inside the clip; token 1: clipped to 0.2, a worse error than 0.5 -> the clip wins;
    # token 2: clipped to -0.2, a better error than -0.5 -> the unclipped wins; token 3 is masked
    assert s["vf_clipfrac"].item() == 1 / 3
    assert abs(s["value_error"].item() - ((0.1 - 1) + (0.5 - 1) + (-0.5 - 1)) / 3) < 1e-12
    # the loss's gradient is zero exactly on the tokens counted as clipped
    values = values.clone().requires_grad_(True)
    ppo_value_loss(values, old, returns, mask, 0.2).backward()
    assert values.grad[0, 1] == 0 and values.grad[0, 0] != 0 and values.grad[0, 2] != 0


# ---------------------------------------------------------------------------------------------------
# Responses with holes: tool output (mask 0) between the policy's tokens
# ---------------------------------------------------------------------------------------------------

# A hole of two in the middle; three holes, the row starting and ending on the policy's tokens; a hole of
# one after the first token; tool output after the last policy token (a reply cut at the length limit);
# a contiguous row; an empty row.
HOLED = torch.tensor(
    [
        [0, 1, 1, 0, 0, 1, 1, 0],
        [1, 0, 1, 0, 0, 1, 0, 1],
        [0, 0, 1, 0, 1, 1, 1, 1],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
)


def reference_gae_over_positions(rewards, values, mask, gamma, lam):
    """Backwards over each row's mask-1 positions in order, whatever lies between them: the next state of
    the policy's token at position p_i is the one at p_{i+1}, and after the last there is none."""
    B, T = mask.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        positions = [t for t in range(T) if mask[b, t]]
        next_adv = 0.0
        for i in reversed(range(len(positions))):
            t = positions[i]
            next_value = float(values[b, positions[i + 1]]) if i + 1 < len(positions) else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            adv[b][t] = delta + gamma * lam * next_adv
            ret[b][t] = adv[b][t] + float(values[b, t])
            next_adv = adv[b][t]
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


def gae_before_tools(rewards, values, mask, gamma, lam):
    """train_ppo.gae as it was before responses could have holes, kept verbatim as the reference that
    contiguous masks must reproduce bit for bit."""
    B, T = rewards.shape
    mask = mask.to(values.dtype)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_advantage = torch.zeros_like(next_value)
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages_reversed.append(advantage)
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


def holed_inputs(seed, mask=HOLED):
    # garbage outside the mask, tool positions included: it must not leak into the policy's positions
    B, T = mask.shape
    outside = 1 - mask.to(F64)
    return randn(B, T, seed=seed) + 100.0 * outside, randn(B, T, seed=seed + 1) - 100.0 * outside


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_with_holes_matches_loop_over_the_policy_tokens(gamma, lam):
    rewards, values = holed_inputs(seed=21)
    advantages, returns = gae(rewards, values, HOLED, gamma, lam)
    ref_adv, ref_ret = reference_gae_over_positions(rewards, values, HOLED, gamma, lam)
    torch.testing.assert_close(advantages, ref_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, ref_ret, rtol=0, atol=1e-12)


def test_gae_with_holes_equals_the_row_without_its_tool_tokens():
    # deleting a row's tool tokens (and their values) leaves the advantages of its own tokens unchanged
    rewards, values = holed_inputs(seed=22)
    adv, ret = gae(rewards, values, HOLED, 0.97, 0.9)
    for b in range(HOLED.size(0) - 1):
        keep = HOLED[b].bool()
        alone = gae(rewards[b:b + 1, keep], values[b:b + 1, keep], HOLED[b:b + 1, keep], 0.97, 0.9)
        torch.testing.assert_close(adv[b, keep], alone[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ret[b, keep], alone[1][0], rtol=0, atol=1e-12)


def bits(x):
    return x.view(torch.int64) if x.dtype == F64 else x.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.0, 1.0)])
def test_gae_contiguous_masks_bit_identical_to_before_tools(dtype, gamma, lam):
    rewards, values = (x.to(dtype) for x in gae_inputs(seed=23))
    new, old = gae(rewards, values, MASK, gamma, lam), gae_before_tools(rewards, values, MASK, gamma, lam)
    for a, b in zip(new, old):  # the same bits, signs of zero included
        assert torch.equal(bits(a), bits(b))


def test_gae_with_holes_gradcheck():
    rewards, values = holed_inputs(seed=24)
    args = (rewards.requires_grad_(True), values.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda r, v: gae(r, v, HOLED, 0.9, 0.8), args)


def reference_token_rewards_over_positions(scores, logprobs, ref_logprobs, mask, kl_coef):
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        positions = [t for t in range(T) if mask[b, t]]
        for t in positions:
            out[b][t] = -kl_coef * (float(logprobs[b, t]) - float(ref_logprobs[b, t]))
        if positions:
            out[b][positions[-1]] += float(scores[b])
    return torch.tensor(out, dtype=F64)


def test_token_rewards_with_holes_only_on_the_policy_tokens():
    # the KL penalty on the policy's tokens only (the tool's were not sampled from pi), the score on the
    # last of them, even where tool output follows it (row 3 ends in a cut-off tool reply)
    B, T = HOLED.shape
    scores, lp, ref = randn(B, seed=25), randn(B, T, seed=26), randn(B, T, seed=27)
    got = token_rewards(scores, lp, ref, HOLED, kl_coef=0.07)
    torch.testing.assert_close(got, reference_token_rewards_over_positions(scores, lp, ref, HOLED, 0.07),
                               rtol=0, atol=1e-12)
    assert torch.equal(got * (1 - HOLED), torch.zeros(B, T, dtype=F64))
    # summed over a row, the KL term is the log-ratio of the policy's own tokens: the sequence-level KL
    kl = -(got - scores[:, None] * (torch.arange(T) == torch.tensor([6, 7, 7, 3, 5, 0])[:, None]) * HOLED)
    torch.testing.assert_close(kl.sum(1) / 0.07, ((lp - ref) * HOLED).sum(1), rtol=0, atol=1e-12)
