"""Tests of `dpo_loss` and `dpo_stats` in train_dpo.py: the math alone, no model.

Checks: both loss types, with and without label smoothing, against a float64 Python loop over the pairs;
a float64 gradient check (all four inputs); exactly log 2 when the policy equals the reference (any
beta, any label smoothing); the gradient raises the chosen log-prob and lowers the rejected one, and
the reference's gradient is the policy's negated; the loss depends only on the margin h; label
smoothing 0.5 is minimised at h = 0 and eps is minimised at beta * h = log((1 - eps) / eps), IPO at
h = 1 / (2 beta); finite loss and gradient at |beta * h| = 1e3, equal to the asymptotes; `dpo_stats`
against hand-computed values; no input is modified; bad loss types and IPO with label smoothing raise.
Well under a second.

Run: python -m pytest -q tests/test_dpo_loss.py
"""

import math

import pytest
import torch

from train_dpo import dpo_loss, dpo_stats

F64 = torch.float64


def reference_dpo_loss(lp_c, lp_r, ref_c, ref_r, beta, loss_type, eps):
    """One pair at a time, in Python floats, -log sigmoid(z) written as log(1 + exp(-z))."""
    losses = []
    for a, b, c, d in zip(lp_c.tolist(), lp_r.tolist(), ref_c.tolist(), ref_r.tolist()):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            z = beta * h
            losses.append((1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z)))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
    return sum(losses) / len(losses)


def random_inputs(B, seed, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    # sequence log-probs: sums over a response's tokens, so negative and of a few nats to tens
    return [-torch.rand(B, generator=g, dtype=F64) * scale * 4 for _ in range(4)]


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.0)]


@pytest.mark.parametrize("loss_type,eps", CASES)
@pytest.mark.parametrize("beta", [0.03, 0.1, 1.0])
def test_matches_float64_loop(loss_type, eps, beta):
    inputs = random_inputs(B=7, seed=int(beta * 100) + int(eps * 10))
    got = dpo_loss(*inputs, beta, loss_type, eps)
    assert got.dtype == F64 and got.dim() == 0
    assert abs(got.item() - reference_dpo_loss(*inputs, beta, loss_type, eps)) < 1e-12


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_gradcheck(loss_type, eps):
    inputs = [x.requires_grad_(True) for x in random_inputs(B=5, seed=3, scale=1.0)]
    assert torch.autograd.gradcheck(lambda *xs: dpo_loss(*xs, 0.5, loss_type, eps), inputs)


@pytest.mark.parametrize("beta", [0.01, 0.1, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_log2_when_policy_equals_reference(beta, eps):
    lp_c, lp_r, _, _ = random_inputs(B=6, seed=1)
    loss = dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta, "sigmoid", eps)
    assert loss.item() == math.log(2)  # h is exactly 0: log sigmoid(0) = -log 2, and (1 - eps) + eps = 1
    stats = dpo_stats(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta)
    assert all(v.item() == 0 for v in stats.values())  # no reward yet, and a tie is not a correct pair


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0)])
def test_gradient_raises_chosen_lowers_rejected(loss_type, eps):
    # at h = 0 (policy = reference) every loss wants a larger margin: IPO's target 1 / (2 beta) > 0 too
    lp_c, lp_r, ref_c, ref_r = random_inputs(B=4, seed=2)
    lp_c, lp_r, ref_c, ref_r = (x.clone().requires_grad_(True) for x in (lp_c, lp_r, lp_c, lp_r))
    dpo_loss(lp_c, lp_r, ref_c, ref_r, 0.1, loss_type, eps).backward()
    assert (lp_c.grad < 0).all() and (lp_r.grad > 0).all()  # descent raises log pi(chosen), lowers rejected
    torch.testing.assert_close(lp_c.grad, -lp_r.grad)
    torch.testing.assert_close(ref_c.grad, -lp_c.grad)  # only the log-ratios enter
    torch.testing.assert_close(ref_r.grad, -lp_r.grad)
    if loss_type == "sigmoid":  # d/dh of -log sigmoid(beta h) at 0, times (1 - 2 eps), over the batch of 4
        torch.testing.assert_close(lp_c.grad, torch.full_like(lp_c, -0.1 * 0.5 * (1 - 2 * eps) / 4))


def test_depends_only_on_the_margin():
    lp_c, lp_r, ref_c, ref_r = random_inputs(B=5, seed=4)
    shift = torch.randn(5, dtype=F64)
    for loss_type in ("sigmoid", "ipo"):
        a = dpo_loss(lp_c, lp_r, ref_c, ref_r, 0.2, loss_type)
        b = dpo_loss(lp_c + shift, lp_r, ref_c + shift, ref_r, 0.2, loss_type)     # same log-ratio of y_w
        c = dpo_loss(lp_c + shift, lp_r + shift, ref_c, ref_r, 0.2, loss_type)     # same h
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def loss_at(h, beta, loss_type="sigmoid", eps=0.0):
    """The loss of one pair with margin h (the reference at 0) and its derivative d loss / d h."""
    zero = torch.zeros(1, dtype=F64)
    h = torch.tensor([float(h)], dtype=F64, requires_grad=True)
    loss = dpo_loss(h, zero, zero, zero, beta, loss_type, eps)
    loss.backward()
    return loss.item(), h.grad.item()


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_minimisers(beta):
    def is_minimum(h, loss_type="sigmoid", eps=0.0):
        value, slope = loss_at(h, beta, loss_type, eps)
        return abs(slope) < 1e-12 and value < min(loss_at(h - 0.1, beta, loss_type, eps)[0],
                                                  loss_at(h + 0.1, beta, loss_type, eps)[0])

    # eps = 0.5: the labels carry no information, so the loss is symmetric and minimised at h = 0
    assert is_minimum(0.0, eps=0.5)
    assert loss_at(1.7, beta, eps=0.5)[0] == pytest.approx(loss_at(-1.7, beta, eps=0.5)[0], abs=1e-14)
    # eps = 0.1: the soft target 0.9 is met at beta * h = log(0.9 / 0.1); eps = 0 keeps falling
    assert is_minimum(math.log(0.9 / 0.1) / beta, eps=0.1)
    assert all(loss_at(h, beta)[1] < 0 for h in (-10.0, 0.0, 10.0, 30.0))
    # IPO: zero exactly at its target margin 1 / (2 beta), and a parabola around it
    assert is_minimum(1 / (2 * beta), "ipo") and loss_at(1 / (2 * beta), beta, "ipo")[0] == 0.0
    assert loss_at(1 / (2 * beta) + 1, beta, "ipo")[0] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_stable_at_large_margins(dtype, eps):
    beta = 0.1
    h = torch.tensor([1e4, -1e4], dtype=dtype)  # beta * h = +-1e3: sigmoid is 1 or 0 in floating point
    zero = torch.zeros(2, dtype=dtype)
    lp_c = h.clone().requires_grad_(True)
    loss = dpo_loss(lp_c, zero, zero, zero, beta, "sigmoid", eps)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp_c.grad).all()
    # asymptotes: -log sigmoid(z) -> max(0, -z): pair +1e3 costs eps * 1e3, pair -1e3 (1 - eps) * 1e3
    expected = ((eps * 1e3) + (1 - eps) * 1e3) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # gradient: d/dh = beta * (sigmoid(beta h) - (1 - eps)) / B: -> beta * eps / 2 and -beta * (1 - eps) / 2
    torch.testing.assert_close(lp_c.grad, torch.tensor([beta * eps / 2, -beta * (1 - eps) / 2], dtype=dtype))


def test_stats_hand_values():
    lp_c = torch.tensor([-10.0, -8.0, -5.0], dtype=F64)
    lp_r = torch.tensor([-12.0, -6.0, -5.0], dtype=F64)
    ref_c = torch.tensor([-11.0, -8.0, -6.0], dtype=F64)
    ref_r = torch.tensor([-11.0, -7.0, -4.0], dtype=F64)
    s = dpo_stats(lp_c, lp_r, ref_c, ref_r, beta=0.5)
    # chosen log-ratios 1, 0, 1 -> rewards 0.5, 0, 0.5; rejected -1, 1, -1 -> -0.5, 0.5, -0.5
    assert s["reward_chosen"].item() == pytest.approx(1 / 3)
    assert s["reward_rejected"].item() == pytest.approx(-1 / 6)
    assert s["reward_margin"].item() == pytest.approx((1.0 - 0.5 + 1.0) / 3)
    assert s["reward_acc"].item() == pytest.approx(2 / 3)
    # the margin is what the loss sees: beta * h
    h = (lp_c - ref_c) - (lp_r - ref_r)
    assert dpo_loss(lp_c, lp_r, ref_c, ref_r, 0.5).item() == pytest.approx(reference_dpo_loss(
        lp_c, lp_r, ref_c, ref_r, 0.5, "sigmoid", 0.0))
    assert s["reward_margin"].item() == pytest.approx(0.5 * h.mean().item())
    stats = dpo_stats(lp_c.requires_grad_(True), lp_r, ref_c, ref_r, 0.5)
    assert not any(v.requires_grad for v in stats.values())


def test_does_not_mutate_inputs():
    inputs = random_inputs(B=4, seed=5)
    copies = [x.clone() for x in inputs]
    for loss_type in ("sigmoid", "ipo"):
        dpo_loss(*inputs, 0.1, loss_type, 0.2 if loss_type == "sigmoid" else 0.0)
    dpo_stats(*inputs, 0.1)
    for x, c in zip(inputs, copies):
        assert torch.equal(x, c)


def test_bad_arguments_raise():
    inputs = random_inputs(B=2, seed=6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*inputs, 0.1, "hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*inputs, 0.1, "ipo", 0.1)
