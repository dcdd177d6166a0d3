"""Tests of the GRPO math in train_grpo.py: group_advantages, grpo_loss and its twin grpo_stats.

Checks, each against an independent float64 reference (Python loops over prompts, responses, tokens):
- group_advantages: both modes (divided by the group's sample std, or only centred), groups of equal
  rewards give advantages of exactly 0 (also G = 1), sizes that do not split into groups are refused;
- grpo_loss: all three aggregations ("grpo" leaves rows with an empty mask out), rows of different
  lengths and offsets, ratios inside and beyond the clip with both signs of the advantage, kl_coef 0,
  0.1 and 1; gradchecks (float64); unknown aggregations refused;
- invariants: on the first step (old = current) the ratio is exactly 1 and the surrogate's gradient is
  the plain policy gradient -A grad log pi pooled the same way, with the per-token weights each
  aggregation's docstring promises (1 / (B' |o_i|), 1 / sum |o_i|, 1 / (B T)); zero advantages give a
  zero surrogate gradient; the KL term and its gradient are 0 when the policy is the reference; the clip
  zeroes exactly the gradients it should; masked (tool-like) tokens inside a response get exactly zero
  gradient; no input is mutated;
- grpo_stats: pg_loss + beta * the pooled KL is the loss; clipfrac is the share of tokens whose
  gradient the clip zeroed; approx_kl, ratio and advantage statistics against loops.

Run: python -m pytest -q tests/test_grpo_loss.py   (about a second on a CPU)
"""

import math
import statistics

import pytest
import torch

from train_grpo import aggregate, group_advantages, grpo_loss, grpo_stats

F64 = torch.float64
AGGS = ("grpo", "token", "dr_grpo")

# Response masks: full row, a run in the middle, a run at the start, a run at the end, one token, an
# empty row, and a response with a hole (tool output the environment wrote: attention 1, mask 0).
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 1, 1, 0],
    ]
)
B, T = MASK.shape


def randn(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def inputs(seed=0, spread=0.4):
    """logprobs, old_logprobs, ref_logprobs (B, T) and advantages (B,), float64. With spread 0.4 the
    log-ratio lp - old is large enough that many tokens fall beyond the clip at eps = 0.2."""
    old = -randn(B, T, seed=seed).abs() - 0.1
    lp = old + randn(B, T, seed=seed + 1, scale=spread)
    ref = old + randn(B, T, seed=seed + 2, scale=0.3)
    adv = randn(B, seed=seed + 3)
    return lp, old, ref, adv


# ---------------------------------------------------------------------------------------------------
# float64 loop references
# ---------------------------------------------------------------------------------------------------

def ref_group_advantages(rewards, G, scale_by_std):
    out = []
    r = [float(x) for x in rewards]
    for g in range(0, len(r), G):
        group = r[g:g + G]
        mean = sum(group) / G
        std = statistics.stdev(group) if G > 1 else 0.0
        for x in group:
            if max(group) == min(group):
                out.append(0.0)
            else:
                out.append((x - mean) / (std + 1e-4) if scale_by_std else x - mean)
    return out


def ref_token_loss(lp, old, ref, a, clip_eps, kl_coef):
    rho = math.exp(lp - old)
    s = min(rho * a, min(max(rho, 1 - clip_eps), 1 + clip_eps) * a)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    return -(s - kl_coef * kl)


def ref_grpo_loss(lp, old, ref, adv, mask, clip_eps, kl_coef, loss_agg):
    rows, total, n_tokens = [], 0.0, 0
    for b in range(mask.shape[0]):
        ls = [ref_token_loss(float(lp[b, t]), float(old[b, t]), float(ref[b, t]), float(adv[b]), clip_eps,
                             kl_coef) for t in range(mask.shape[1]) if mask[b, t]]
        if ls:
            rows.append(sum(ls) / len(ls))
        total += sum(ls)
        n_tokens += len(ls)
    if loss_agg == "grpo":
        return sum(rows) / len(rows)
    if loss_agg == "token":
        return total / n_tokens
    return total / (mask.shape[0] * mask.shape[1])


# ---------------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_loop(scale_by_std):
    # three groups of random rewards, one of equal rewards, one with a single outlier
    rewards = torch.cat([randn(12, seed=5), torch.full((4,), 0.3, dtype=F64),
                         torch.tensor([1.0, 1, 1, -1], dtype=F64)])
    a = group_advantages(rewards, 4, scale_by_std)
    want = ref_group_advantages(rewards, 4, scale_by_std)
    assert a.shape == (20,) and a.dtype == F64
    for x, y in zip(a.tolist(), want):
        assert abs(x - y) < 1e-12
    assert a.view(-1, 4).sum(1).abs().max() < 1e-12  # centred within each group


def test_group_advantages_scale_and_ties():
    # the std is the sample std (n - 1): for rewards (+1, -1) mean 0, std sqrt(2)
    a = group_advantages(torch.tensor([1.0, -1.0], dtype=F64), 2)
    assert torch.allclose(a, torch.tensor([1, -1], dtype=F64) / (math.sqrt(2) + 1e-4), atol=0, rtol=1e-15)
    # equal rewards give exactly 0, even where r - mean in float32 would be a rounding error
    for value in (0.1, 1 / 3, -0.7, 1e6 + 0.1):
        for dtype in (torch.float32, F64):
            r = torch.full((7,), value, dtype=dtype)
            for scale in (True, False):
                assert torch.equal(group_advantages(r, 7, scale), torch.zeros(7, dtype=dtype))
    # G = 1: every group is its own baseline, so no signal and no NaN from a std of one sample
    assert torch.equal(group_advantages(torch.tensor([0.5, -2.0]), 1), torch.zeros(2))


def test_group_advantages_keep_groups_apart_and_refuse_bad_sizes():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    assert torch.equal(group_advantages(r, 3, False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)
    r_in = r.clone()
    group_advantages(r, 3)
    assert torch.equal(r, r_in)


# ---------------------------------------------------------------------------------------------------
# grpo_loss against the loop
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1, 1.0])
def test_grpo_loss_matches_loop(loss_agg, kl_coef):
    for seed in (0, 10):
        lp, old, ref, adv = inputs(seed)
        got = grpo_loss(lp, old, ref, adv, MASK, 0.2, kl_coef, loss_agg)
        want = ref_grpo_loss(lp, old, ref, adv, MASK, 0.2, kl_coef, loss_agg)
        assert got.dim() == 0 and abs(got.item() - want) < 1e-12, (got.item(), want)


def test_grpo_aggregation_leaves_out_empty_rows_only():
    lp, old, ref, adv = inputs(1)
    full = grpo_loss(lp, old, ref, adv, MASK, 0.2, 0.1, "grpo")
    keep = MASK.sum(1) > 0
    kept = grpo_loss(lp[keep], old[keep], ref[keep], adv[keep], MASK[keep], 0.2, 0.1, "grpo")
    assert torch.allclose(full, kept, atol=1e-14, rtol=0)
    # an all-empty batch has no tokens: 0, not NaN, for every aggregation
    for agg in AGGS:
        assert grpo_loss(lp, old, ref, adv, torch.zeros_like(MASK), 0.2, 0.1, agg).item() == 0.0


def test_unknown_aggregation_is_refused():
    lp, old, ref, adv = inputs()
    with pytest.raises(ValueError, match="dr_grpo"):
        grpo_loss(lp, old, ref, adv, MASK, 0.2, 0.1, "mean")


@pytest.mark.parametrize("loss_agg", AGGS)
def test_gradcheck(loss_agg):
    lp, old, ref, adv = inputs(2)
    lp.requires_grad_(True)
    ref.requires_grad_(True)
    # random log-ratios never sit within gradcheck's 1e-6 of the clip's kinks
    def f(x, r):
        return grpo_loss(x, old, r, adv, MASK, 0.2, 0.5, loss_agg)
    assert torch.autograd.gradcheck(f, (lp, ref))


# ---------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------

def token_weights(mask, loss_agg):
    """The weight each token has in the pooled loss, as `grpo_loss`'s docstring states it."""
    m = mask.to(F64)
    if loss_agg == "grpo":
        n = m.sum(1, keepdim=True)
        return torch.where(n > 0, m / n.clamp(min=1), 0 * m) / (n > 0).sum()
    if loss_agg == "token":
        return m / m.sum()
    return m / m.numel()


@pytest.mark.parametrize("loss_agg", AGGS)
def test_first_step_is_the_plain_policy_gradient(loss_agg):
    _, _, ref, adv = inputs(3)
    lp = randn(B, T, seed=30).requires_grad_(True)
    old = lp.detach().clone()  # the rollout's log-probs: the policy has not moved yet
    s = grpo_stats(lp, old, ref, adv, MASK, 0.2, loss_agg)
    assert s["ratio_min"].item() == s["ratio_max"].item() == 1.0  # exp(0) exactly
    assert s["approx_kl"].item() == 0.0 and s["clipfrac"].item() == 0.0
    (grad,) = torch.autograd.grad(grpo_loss(lp, old, ref, adv, MASK, 0.2, 0.0, loss_agg), lp)
    (plain,) = torch.autograd.grad(aggregate(-adv[:, None] * lp, MASK, loss_agg), lp)  # REINFORCE with A
    assert torch.allclose(grad, plain, atol=1e-15, rtol=0)
    # the per-token weights of the docstring: long responses' tokens weigh less under "grpo"
    assert torch.allclose(grad, -adv[:, None] * token_weights(MASK, loss_agg), atol=1e-15, rtol=0)


@pytest.mark.parametrize("loss_agg", AGGS)
def test_zero_advantages_give_zero_surrogate_gradient(loss_agg):
    lp, old, ref, _ = inputs(4)
    lp.requires_grad_(True)
    zero = torch.zeros(B, dtype=F64)
    (grad,) = torch.autograd.grad(grpo_loss(lp, old, ref, zero, MASK, 0.2, 0.0, loss_agg), lp)
    assert torch.equal(grad, torch.zeros_like(grad))
    # with the KL on, only the KL's gradient is left: beta * (1 - exp(ref - lp)) per token, pooled
    (grad,) = torch.autograd.grad(grpo_loss(lp, old, ref, zero, MASK, 0.2, 1.0, loss_agg), lp)
    want = (1 - torch.exp(ref - lp.detach())) * token_weights(MASK, loss_agg)
    assert torch.allclose(grad, want, atol=1e-14, rtol=0)


@pytest.mark.parametrize("loss_agg", AGGS)
def test_kl_coef_zero_and_one(loss_agg):
    lp, old, ref, adv = inputs(5)
    l0 = grpo_loss(lp, old, ref, adv, MASK, 0.2, 0.0, loss_agg)
    l1 = grpo_loss(lp, old, ref, adv, MASK, 0.2, 1.0, loss_agg)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    assert (k3[MASK.bool()] >= 0).all()
    assert abs((l1 - l0).item() - aggregate(k3, MASK, loss_agg).item()) < 1e-13
    assert abs(l0.item() - grpo_stats(lp, old, ref, adv, MASK, 0.2, loss_agg)["pg_loss"].item()) < 1e-13
    # the policy equal to its reference: KL term 0 and no KL gradient, so beta changes nothing
    x = lp.clone().requires_grad_(True)
    l0, l1 = (grpo_loss(x, old, lp, adv, MASK, 0.2, c, loss_agg) for c in (0.0, 1.0))
    assert torch.equal(l0, l1)
    g0, g1 = (torch.autograd.grad(loss, x)[0] for loss in (l0, l1))
    assert torch.allclose(g0, g1, atol=1e-15, rtol=0)


def test_k3_keeps_its_digits_for_tiny_log_ratios():
    # float32, log-ratio 1e-4: k3 = d**2 / 2 = 5e-9, all lost if computed as exp(d) - 1 - d
    lp = torch.zeros(1, 1)
    ref = torch.full((1, 1), 1e-4)
    mask = torch.ones(1, 1)
    kl = grpo_stats(lp, lp, ref, torch.zeros(1), mask, 0.2)["kl"].item()
    assert abs(kl - 5e-9) < 5e-10  # exp(d) - 1 - d in float32 would be off by ~1e-7


def test_clip_zeroes_the_gradient_where_it_should():
    eps = 0.2
    # one response per row, one token each: (log-ratio, advantage)
    cases = [(math.log(1.5), +1.0, True),    # rho > 1 + eps, A > 0: clipped, gradient 0
             (math.log(0.5), -1.0, True),    # rho < 1 - eps, A < 0: clipped, gradient 0
             (math.log(1.5), -1.0, False),   # rho > 1 + eps, A < 0: the worse move is never clipped
             (math.log(0.5), +1.0, False),   # rho < 1 - eps, A > 0: likewise
             (math.log(1.1), +1.0, False),   # inside the clip range
             (math.log(0.9), -1.0, False)]
    old = torch.zeros(len(cases), 1, dtype=F64)
    lp = torch.tensor([[c[0]] for c in cases], dtype=F64, requires_grad=True)
    adv = torch.tensor([c[1] for c in cases], dtype=F64)
    mask = torch.ones(len(cases), 1)
    for agg in AGGS:
        (grad,) = torch.autograd.grad(grpo_loss(lp, old, old, adv, mask, eps, 0.0, agg), lp)
        for (d, a, clipped), g in zip(cases, grad[:, 0].tolist()):
            if clipped:
                assert g == 0.0
            else:  # d/dlp of -rho * A = -rho * A, pooled over 6 responses of one token
                assert abs(g - (-math.exp(d) * a / len(cases))) < 1e-14
        s = grpo_stats(lp, old, old, adv, mask, eps, agg)
        assert abs(s["clipfrac"].item() - 2 / len(cases)) < 1e-15


@pytest.mark.parametrize("loss_agg", AGGS)
def test_masked_tokens_get_exactly_zero_gradient(loss_agg):
    lp, old, ref, adv = inputs(6)
    lp.requires_grad_(True)
    (grad,) = torch.autograd.grad(grpo_loss(lp, old, ref, adv, MASK, 0.2, 1.0, loss_agg), lp)
    off = ~MASK.bool()  # prompt, padding, and the tool output inside row 6
    assert MASK[6, 3] == 0 and off[6, 3] and torch.equal(grad[off], torch.zeros_like(grad[off]))
    # and what sits there never reaches the loss
    lp2 = lp.detach().clone()
    lp2[off] += 5.0
    assert torch.allclose(grpo_loss(lp2, old, ref, adv, MASK, 0.2, 1.0, loss_agg),
                          grpo_loss(lp.detach(), old, ref, adv, MASK, 0.2, 1.0, loss_agg), atol=1e-14, rtol=0)


def test_inputs_are_not_mutated():
    lp, old, ref, adv = inputs(7)
    lp.requires_grad_(True)
    before = [x.detach().clone() for x in (lp, old, ref, adv, MASK)]
    for agg in AGGS:
        grpo_loss(lp, old, ref, adv, MASK, 0.2, 0.3, agg).backward()
        grpo_stats(lp, old, ref, adv, MASK, 0.2, agg)
    for x, y in zip((lp, old, ref, adv, MASK), before):
        assert torch.equal(x.detach(), y)


def test_stats_against_loops():
    lp, old, ref, adv = inputs(8)
    s = grpo_stats(lp, old, ref, adv, MASK, 0.2)
    toks = [(b, t) for b in range(B) for t in range(T) if MASK[b, t]]
    rho = [math.exp(float(lp[b, t] - old[b, t])) for b, t in toks]
    kl = [math.exp(float(ref[b, t] - lp[b, t])) - float(ref[b, t] - lp[b, t]) - 1 for b, t in toks]
    approx = [math.exp(float(lp[b, t] - old[b, t])) - float(lp[b, t] - old[b, t]) - 1 for b, t in toks]
    clipped = [min(max(r, 0.8), 1.2) * float(adv[b]) < r * float(adv[b]) for r, (b, _) in zip(rho, toks)]
    a = [float(adv[b]) for b in range(B) if MASK[b].any()]
    want = {"kl": sum(kl) / len(kl), "approx_kl": sum(approx) / len(approx),
            "clipfrac": sum(clipped) / len(toks),
            "ratio_mean": sum(rho) / len(rho), "ratio_min": min(rho), "ratio_max": max(rho),
            "adv_mean": sum(a) / len(a), "adv_std": statistics.stdev(a), "adv_abs_max": max(map(abs, a))}
    for k, v in want.items():
        assert abs(s[k].item() - v) < 1e-12, k
    assert 0 < s["clipfrac"].item() < 1  # the inputs exercise both sides of the clip
