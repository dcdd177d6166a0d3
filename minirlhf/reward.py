"""Reward models as the later stages use them: loaded from checkpoints, normalised, combined with weights.

`--reward-model PATH[:WEIGHT]` (repeatable) names one reward model per sub-goal; the reward is

    r(x, y) = sum_i  w_i * (s_i(x, y) - mean_i) / std_i

where s_i is model i's score read at the last response token (the EOS token when there is one) and
mean_i, std_i are the statistics of its scores on SFT samples, saved by train_rm.py. Normalising puts
every model on the same scale, so the weights mean what they say and the KL coefficient keeps its
meaning whatever the reward model's offset.
"""

from dataclasses import dataclass

import torch

from minirlhf.checkpoint import CheckpointError, ckpt_path, load_model
from minirlhf.ops import gather_last


@dataclass
class RewardModel:
    model: torch.nn.Module
    weight: float
    mean: float
    std: float
    path: str
    tokenizer: str


def parse_spec(spec: str) -> tuple[str, float]:
    """"out/rm" -> ("out/rm", 1.0); "out/rm_polite:0.5" -> ("out/rm_polite", 0.5)."""
    path, sep, w = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(w)
        except ValueError:
            pass
    return spec, 1.0


def load_reward_models(specs, device="cpu", tokenizer: str | None = None,
                       block_size: int | None = None) -> list[RewardModel]:
    """Load and freeze the reward models of `specs`. Given the policy's `tokenizer` and `block_size`, refuse a
    reward model that reads other token ids (its scores would be of garbage) or a shorter context."""
    out = []
    for spec in specs:
        path, weight = parse_spec(spec)
        model, ck = load_model(path, device, kind="scalar")
        if tokenizer is not None and ck["tokenizer"] != tokenizer:
            raise CheckpointError(f"{ckpt_path(path)}: the reward model uses tokenizer {ck['tokenizer']!r}, "
                                  f"the policy {tokenizer!r}")
        if block_size is not None and model.config.block_size < block_size:
            raise CheckpointError(f"{ckpt_path(path)}: the reward model reads {model.config.block_size} "
                                  f"tokens, shorter than the policy's context of {block_size}")
        for p in model.parameters():
            p.requires_grad_(False)  # frozen: only ever scored
        out.append(RewardModel(model, weight, float(ck["extra"].get("reward_mean", 0.0)),
                               float(ck["extra"].get("reward_std", 1.0)), path, ck["tokenizer"]))
    return out


@torch.no_grad()
def combined_reward(rms: list[RewardModel], idx, attention_mask, response_mask):
    """(B,) weighted sum of the normalised scores, each read at the last response token."""
    total = torch.zeros(idx.size(0), device=idx.device)
    for rm in rms:
        s = gather_last(rm.model(idx, attention_mask), response_mask).float()
        total += rm.weight * (s - rm.mean) / rm.std
    return total
