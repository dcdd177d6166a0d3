"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al. 2023).

No critic, no reference model, no RL loop: sample K candidate responses per prompt, score them with the
reward model, and train the policy so that its length-normalised log-likelihoods rank the candidates
in the reward model's order, plus SFT on the best candidate (Yuan et al. 2023, "RRHF: Rank Responses to
Align Language Models with Human Feedback without tears", Sec. 3).
"""

import torch


def rrhf_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """RRHF loss: a hinge ranking loss on length-normalised log-likelihoods plus SFT on the best candidate.

    For each prompt, with candidates i = 1..K:

        p_i    = sum_t log pi(y_{i,t}) * m_{i,t} / (sum_t m_{i,t}) ** alpha
        L_rank = sum_{(i, j) : r_i < r_j} max(0, p_i - p_j)
        L_ft   = - sum_t log pi(y_{i',t}) * m_{i',t} / sum_t m_{i',t},    i' = argmax_i r_i (first on ties)
        L      = L_rank + L_ft,   averaged over the B prompts

    log pi = `logprobs` (B, K, T): the policy's per-token log-probs of each candidate; m = `mask`
    (B, K, T), 1 on response tokens; r = `rewards` (B, K): the reward model's scores; alpha =
    `length_penalty` (1: mean log-prob per token, the paper's choice; 0: the sequence log-likelihood).

    L_rank is a sum over pairs, not a mean, as in the paper; tied rewards form no pair. It is zero as
    soon as every lower-reward candidate has a score no higher than every higher-reward one: no margin.

    Deviation: the paper's L_ft sums the log-probs over tokens and the official code divides by the
    padded length; here L_ft is the token mean over the best candidate's own tokens, so that with K = 1
    (L_rank = 0) RRHF on one prompt is exactly `sft_loss` from train_sft.py, the paper's remark that SFT
    is a special case of RRHF made literal. Over a batch of several prompts the two differ by
    weighting: RRHF averages per-prompt token means, `sft_loss` pools all tokens of the batch.

    A candidate with no tokens has p_i = 0 (its length is clamped to 1).

    Returns a scalar.
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(dim=-1).clamp(min=1.0)  # (B, K)
    seq_logprobs = (logprobs * mask).sum(dim=-1)  # (B, K)
    scores = seq_logprobs / lengths**length_penalty  # (B, K): p_i

    # pairs[b, i, j] = candidate i has a strictly lower reward than j, so p_i should not exceed p_j.
    pairs = (rewards[:, :, None] < rewards[:, None, :]).to(scores.dtype)  # (B, K, K)
    hinge = torch.relu(scores[:, :, None] - scores[:, None, :])  # (B, K, K): max(0, p_i - p_j)
    rank_loss = (hinge * pairs).sum(dim=(1, 2))  # (B,)

    best = rewards.argmax(dim=1, keepdim=True)  # (B, 1); argmax returns the first maximum on ties
    ft_loss = -(seq_logprobs / lengths).gather(1, best).squeeze(1)  # (B,)
    return (rank_loss + ft_loss).mean()


if __name__ == "__main__":
    raise SystemExit("training loop: written by the lead")
