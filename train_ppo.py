"""Proximal Policy Optimization (PPO) from a reward model: the third stage of RLHF.

The policy is updated with PPO's clipped objective (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms") on a per-token reward: the reward model's score at the last response token minus a KL
penalty to a frozen reference copy of the SFT model at every token (Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences"; Ouyang et al. 2022, Eq. 2), with advantages from GAE
(Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation").
"""

import torch

from minirlhf.ops import last_index, masked_mean


# ---------------------------------------------------------------------------------------------------
# The KL penalty and the per-token reward
# ---------------------------------------------------------------------------------------------------

def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With d = log pi(y_t) - log pi_ref(y_t) = `logprobs - ref_logprobs` (any shape, e.g. (B, T)):

        "k1":  d                    unbiased, but a single sample can be negative (high variance)
        "k2":  d**2 / 2             never negative, biased (slightly, when pi is close to pi_ref), low variance
        "k3":  exp(-d) - 1 + d      unbiased and never negative: (rho - 1) - log rho with rho = pi_ref / pi,
                                    i.e. k1 plus the zero-mean control variate rho - 1

    (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.) Expectations
    are under y_t ~ pi, so pass the log-probs of the tokens the policy actually sampled.

    Returns a tensor of the same shape as `logprobs`.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        # expm1: for the small d of a policy close to its reference, exp(-d) - 1 in float32 loses all
        # the digits of the d**2 / 2 that k3 is made of (and can even come out negative).
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1', 'k2' or 'k3'")


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token reward: the KL penalty at every response token, the score at the last one.

        R[b, t] = - beta * (log pi(y_t) - log pi_ref(y_t)) + [t = last_b] * s[b]    where mask[b, t] = 1
        R[b, t] = 0                                                                 where mask[b, t] = 0

    s = `scores` (B,): the reward model's score of each response; log pi = `logprobs` (B, T) and
    log pi_ref = `ref_logprobs` (B, T) of the sampled tokens; `mask` (B, T) 1 on response tokens;
    beta = `kl_coef`; last_b is the last position of row b where mask is 1.

    The KL term is the k1 estimate, as in Ziegler et al. (2019, Sec. 2.2) and InstructGPT (Ouyang et al.
    2022, Eq. 2): summed over a response it is the sequence-level log-ratio of the paper's
    R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)), spread over the tokens so that GAE can credit
    each one. A row with an empty mask gets no score (all zeros).

    Returns a (B, T) tensor.
    """
    T = logprobs.shape[1]
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, "k1") * mask  # (B, T)
    positions = torch.arange(T, device=mask.device)  # (T,)
    # An empty row has no last position (last_index gives T - 1 there): multiplying by the mask drops
    # its score instead of placing it on padding.
    is_last = (positions[None, :] == last_index(mask)[:, None]).to(mask.dtype) * mask  # (B, T)
    return rewards + scores.to(rewards.dtype)[:, None] * is_last


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------

def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the response tokens (Schulman et al. 2016, Sec. 3).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}       (i.e. sum_l (gamma * lam)^l * delta_{t+l})
        G_t     = A_t + V_t                             (the lambda-return: the critic's target)

    r = `rewards` (B, T), V = `values` (B, T) of the critic, `mask` (B, T) 1 on response tokens;
    gamma = `gamma`, lam = `lam`. A row's valid positions are one contiguous run that may start and end
    anywhere in [0, T). After the last valid position the episode is over: V_{t+1} = 0 and A_{t+1} = 0,
    also for a response cut off at the length limit (we do not bootstrap from the critic there: the
    reward model has scored the response as it is, so there is no future reward to estimate).

    The loop runs over time only (T is short, B is the batch); the recursion is sequential in t.

    Returns (advantages, returns), each (B, T), 0 where `mask` is 0.
    """
    B, T = rewards.shape
    mask = mask.to(values.dtype)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # V_{t+1} (B,)
    next_advantage = torch.zeros_like(next_value)  # A_{t+1} (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Zeroing A_t outside the run is what stops the recursion at the row's last valid position: the
        # step after it is padding, whose A (and V, below) is 0, so nothing from beyond flows back.
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages_reversed.append(advantage)
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# The PPO losses
# ---------------------------------------------------------------------------------------------------

def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """PPO's clipped surrogate objective, as a loss (Schulman et al. 2017, Eq. 7, negated).

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L     = masked mean over t of  max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    log pi = `logprobs` (B, T) of the policy being updated; log pi_old = `old_logprobs` (B, T) recorded
    at rollout time; A = `advantages` (B, T); `mask` (B, T); eps = `clip_eps`. The mean pools all
    masked tokens of the batch.

    max of the negated terms is min of the paper's: a pessimistic bound. Once rho has moved past
    1 + eps with A > 0 (or below 1 - eps with A < 0) the clipped term wins, it is constant in the
    parameters, and that token's gradient is exactly 0; moves that make the objective worse are never
    clipped.

    Returns a scalar.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


@torch.no_grad()
def ppo_policy_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> dict[str, torch.Tensor]:
    """Diagnostics of a PPO update, masked means over the (B, T) tokens (no gradient).

    approx_kl: KL(pi_old || pi) by the k3 estimator on the rollout tokens (sampled from pi_old):
               (rho - 1) - log rho with rho = pi / pi_old. Exactly 0 before the first update.
    clipfrac:  the fraction of tokens whose clipped term is strictly the larger in `ppo_policy_loss`,
               i.e. whose gradient the clip has set to 0. (A looser, also common definition counts every
               |rho - 1| > eps, including tokens where the unclipped term still wins.)

    Arguments as in `ppo_policy_loss`. Returns {"approx_kl": scalar, "clipfrac": scalar}.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return {
        "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask),
        "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
    }


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """Clipped value loss of the critic.

        V_clip = V_old + clip(V - V_old, -eps, eps)
        L      = 0.5 * masked mean over t of  max((V_t - G_t)**2, (V_clip_t - G_t)**2)

    V = `values` (B, T) of the critic being updated; V_old = `old_values` (B, T) at rollout time;
    G = `returns` (B, T) from `gae`; `mask` (B, T); eps = `clip_eps` (in units of the value itself).

    The squared error is the L^VF term of Schulman et al. 2017, Eq. 9; the clipping is not in the paper
    but in OpenAI's PPO implementations, used for language models since Ziegler et al. 2019. As with the
    policy, the max is pessimistic: once V has moved more than eps from V_old and the clipped prediction
    is the worse one, the token's gradient is 0.

    Returns a scalar.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    losses = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


# ---------------------------------------------------------------------------------------------------
# The KL coefficient
# ---------------------------------------------------------------------------------------------------

class AdaptiveKLController:
    """Adapts the KL coefficient beta to keep the measured KL near a target (Ziegler et al. 2019, Sec. 2.2).

        e     = clip(KL / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    `init_kl_coef` is the starting beta, `target` is KL_target, `horizon` sets the speed: n_steps /
    horizon is the paper's K_beta per step. The clip bounds one update to a relative change of
    0.2 * n_steps / horizon, so one noisy KL estimate cannot swing beta.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl`: the KL(pi || pi_ref) just measured; `n_steps`: samples (or steps) since the last update."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit("training loop: written by the lead")
