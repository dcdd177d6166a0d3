"""Reward modelling: the second stage of RLHF.

Train a scalar reward r(x, y) on human rankings of K responses per prompt with the Bradley-Terry
pairwise loss over every ranked pair (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", Sec. 3.5, Eq. 1).
"""

import torch
import torch.nn.functional as F


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss over all ranked pairs of K candidates per prompt.

        loss_b = - (1 / |P_b|) * sum_{(i, j) in P_b} log sigmoid(r[b, i] - r[b, j])
        P_b    = {(i, j) : 0 <= rank[b, i] < rank[b, j]}
        loss   = mean of loss_b over the prompts b with |P_b| > 0

    r = `rewards` (B, K) float: the reward model's score of each candidate; rank = `ranks` (B, K) int64:
    0 is best, a smaller rank is preferred, equal ranks are ties (they form no pair), a negative rank
    marks an absent candidate (it forms no pair; its reward is ignored).

    This is InstructGPT's Eq. 1: with K candidates, all present and no ties, |P_b| = C(K, 2) and the
    1 / |P_b| is its 1 / C(K, 2); with ties or absent candidates we divide by the pairs that exist, so
    every prompt weighs the same. With K = 2 and ranks [0, 1] it is the pairwise loss
    mean_b(-log sigmoid(r_chosen - r_rejected)). All K candidates of a prompt go through the model in
    one batch, as InstructGPT does, so each response's forward pass serves all its pairs.

    -log sigmoid is taken with `logsigmoid`, stable for large margins. If no prompt in the batch has a
    pair the loss is 0, still attached to `rewards` (zero gradient) so `backward()` works.

    Returns a scalar.
    """
    # pairs[b, i, j] = candidate i is ranked strictly above candidate j (both present: rank_i >= 0 and
    # rank_j > rank_i imply rank_j >= 1).
    pairs = (ranks[:, :, None] >= 0) & (ranks[:, :, None] < ranks[:, None, :])  # (B, K, K)
    margins = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    losses = torch.where(pairs, -F.logsigmoid(margins), torch.zeros_like(margins))  # (B, K, K)
    n_pairs = pairs.sum(dim=(1, 2)).to(rewards.dtype)  # (B,)
    per_prompt = losses.sum(dim=(1, 2)) / n_pairs.clamp(min=1.0)  # (B,)
    has_pairs = (n_pairs > 0).to(rewards.dtype)  # (B,)
    return (per_prompt * has_pairs).sum() / has_pairs.sum().clamp(min=1.0)


if __name__ == "__main__":
    raise SystemExit("training loop: written by the lead")
