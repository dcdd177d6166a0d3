"""Small tensor helpers shared by every stage.

Conventions (see DESIGN.md): sequences are (B, T); `logits[:, t]` scores token t + 1; a response mask
(B, T) is 1 on the tokens the policy produced (EOS included) and 0 on prompt and padding.
"""

import torch


def token_logprobs(logits, tokens):
    """log p(tokens[:, t] | tokens[:, :t]) for every t, shape (B, T), aligned with `tokens`.

    logits: (B, T, V) from model(tokens); logits[:, t - 1] scores tokens[:, t]. This is the one place the
    shift happens, so a response mask over `tokens` applies to the result as is. out[:, 0] has no
    context and is 0 (it is never a response token). Computed in float32 as gather - logsumexp, which
    never materialises a (B, T, V) log-softmax.
    """
    logits = logits[:, :-1].float()                                        # (B, T-1, V)
    target = tokens[:, 1:]                                                 # (B, T-1)
    lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)             # (B, T)


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask, unbiased=True):
    """Variance of x over the positions where mask is 1 (Bessel-corrected by default)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the masked positions; 0 stays 0 outside the mask.

    shift_mean=False keeps the mean (scales only), as some implementations do for rewards.
    """
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_index(mask):
    """Index of the last 1 in each row of a (B, T) mask (rows must have at least one 1)."""
    T = mask.size(1)
    return T - 1 - mask.long().flip(1).argmax(1)                            # (B,)


def gather_last(x, mask):
    """x (B, T) read at each row's last masked position: the reward model's score position."""
    return x.gather(1, last_index(mask)[:, None]).squeeze(1)                # (B,)
