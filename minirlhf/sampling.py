"""Sampling that makes data: responses from a policy, and their reward-model scores, as text and ids.

What the stages use to make their training data (the reward model's candidates, RRHF's, best-of-n's)
and what the evaluation samples with: prompts through the chat template, left-padded, through
`minirlhf.model.generate` (KV cache), back to text and response ids (EOS included when emitted).

With a `tool` (the built-in task's calculator, `task.calculator_tool(enc)`), the tool's output is part
of the response: in its ids and its text, which is what the judge reads and the reward model scores.
Where a loss or a KL needs the policy's tokens alone, `data.tool_mask` (or `join_prompt_response(...,
tool=tool)`) finds the tool's again.
"""

import torch

from minirlhf.data import join_prompt_response, left_pad, truncate_prompt
from minirlhf.model import generate
from minirlhf.reward import combined_reward
from minirlhf.tokenizer import decode_response, encode_prompt, eos_id


def encode_prompts(enc, prompts, max_len):
    """Template-encode prompts, truncating from the left to max_len tokens -> (ids, n_truncated)."""
    out, n_cut = [], 0
    for p in prompts:
        ids, cut = truncate_prompt(encode_prompt(enc, p), max_len)
        out.append(ids)
        n_cut += cut
    return out, n_cut


@torch.no_grad()
def sample_responses(model, enc, prompts, max_new_tokens, batch_size=64, temperature=1.0, greedy=False,
                     generator=None, device="cpu", tool=None):
    """Sample one response per prompt -> list of (text, response ids incl. EOS when emitted), the
    tool's output included in both (`tool`: see `minirlhf.model.generate`)."""
    max_prompt = model.config.block_size - max_new_tokens
    ids, _ = encode_prompts(enc, prompts, max_prompt)
    out = []
    for i in range(0, len(prompts), batch_size):
        idx, mask = left_pad(ids[i:i + batch_size], eos_id(enc))
        seqs, attn, _ = generate(model, idx.to(device), mask.to(device), max_new_tokens, eos_id(enc),
                                 temperature=temperature, greedy=greedy, generator=generator, tool=tool)
        P = idx.size(1)
        for row, m in zip(seqs[:, P:].tolist(), attn[:, P:].tolist()):  # attention: the tool's tokens too
            r = [t for t, keep in zip(row, m) if keep]
            out.append((decode_response(enc, r), r))
    return out


@torch.no_grad()
def score(rms, enc, prompts, responses, max_len, batch_size=64, device="cpu"):
    """The combined, normalised reward (see minirlhf.reward) of (prompt, response ids) pairs -> (N,)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        p_ids, _ = encode_prompts(enc, prompts[i:i + batch_size], max_len)
        idx, attn, resp = join_prompt_response(p_ids, responses[i:i + batch_size], eos_id(enc))
        out.append(combined_reward(rms, idx.to(device), attn.to(device), resp.to(device)).cpu())
    return torch.cat(out)
