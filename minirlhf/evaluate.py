"""Sampling text from a checkpoint and measuring it: the evaluation every stage and the report share.

    python -m minirlhf.evaluate out/sft out/ppo --reward-model out/rm --ref out/sft

scores each checkpoint on the built-in task's held-out prompts: mean gold reward with its standard
error, mean reward-model score, KL to the SFT model, mean response length, and on the honesty
questions the rates of correct, abstained and wrong answers. The same seed gives the same numbers.
"""

import argparse
import json
import math

import torch

from minirlhf import task
from minirlhf.data import join_prompt_response, left_pad, truncate_prompt
from minirlhf.model import generate
from minirlhf.ops import gather_last, token_logprobs
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
                     generator=None, device="cpu"):
    """Sample one response per prompt -> list of (text, response ids incl. EOS when emitted)."""
    max_prompt = model.config.block_size - max_new_tokens
    ids, _ = encode_prompts(enc, prompts, max_prompt)
    out = []
    for i in range(0, len(prompts), batch_size):
        idx, mask = left_pad(ids[i:i + batch_size], eos_id(enc))
        seqs, _, resp = generate(model, idx.to(device), mask.to(device), max_new_tokens, eos_id(enc),
                                 temperature=temperature, greedy=greedy, generator=generator)
        P = idx.size(1)
        for row, m in zip(seqs[:, P:].tolist(), resp[:, P:].tolist()):
            r = [t for t, keep in zip(row, m) if keep]
            out.append((decode_response(enc, r), r))
    return out


@torch.no_grad()
def score(rm, enc, prompts, responses, max_len, batch_size=64, device="cpu", mean=0.0, std=1.0):
    """Reward-model scores (B,) of (prompt, response ids) pairs, read at the last response token and
    normalised as (r - mean) / std with the statistics the reward stage saved."""
    out = []
    for i in range(0, len(prompts), batch_size):
        p_ids, _ = encode_prompts(enc, prompts[i:i + batch_size], max_len)
        idx, attn, resp = join_prompt_response(p_ids, responses[i:i + batch_size], eos_id(enc))
        idx, attn, resp = idx.to(device), attn.to(device), resp.to(device)
        out.append((gather_last(rm(idx, attn), resp).float().cpu() - mean) / std)
    return torch.cat(out)


@torch.no_grad()
def sequence_kl(policy, ref, enc, prompts, responses, max_len, batch_size=64, device="cpu"):
    """Per-sample KL estimate sum_t [log pi(y_t) - log pi_ref(y_t)] over response tokens sampled from
    the policy (k1: an unbiased estimate of KL(pi || pi_ref) per sequence)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        p_ids, _ = encode_prompts(enc, prompts[i:i + batch_size], max_len)
        idx, attn, resp = join_prompt_response(p_ids, responses[i:i + batch_size], eos_id(enc))
        idx, attn, resp = idx.to(device), attn.to(device), resp.to(device)
        lp = token_logprobs(policy(idx, attn), idx)
        ref_lp = token_logprobs(ref(idx, attn), idx)
        out.append(((lp - ref_lp) * resp).sum(1).cpu())
    return torch.cat(out)


def mean_sem(xs):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(1, n - 1)
    return m, math.sqrt(var / n)


def gold_metrics(prompts, texts):
    """Gold reward mean and standard error, response length, honesty outcome rates (built-in task)."""
    gold = [task.judge(p, t) for p, t in zip(prompts, texts)]
    m, sem = mean_sem(gold)
    outcomes = [task.honesty_outcome(p, t) for p, t in zip(prompts, texts)]
    hard = [o for o in outcomes if o is not None]
    metrics = dict(gold_reward_mean=m, gold_reward_sem=sem,
                   response_chars_mean=sum(len(t) for t in texts) / len(texts))
    for o in ("correct", "abstain", "wrong"):
        metrics[f"hard_{o}_rate"] = hard.count(o) / len(hard) if hard else float("nan")
    return metrics, gold


def evaluate(model, enc, prompts, max_new_tokens, rm=None, rm_stats=(0.0, 1.0), ref=None, samples_per_prompt=1,
             temperature=1.0, seed=0, batch_size=64, device="cpu"):
    """Sample, then measure: -> (metrics dict, list of (prompt, response, gold) samples)."""
    model.eval()
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample_responses(model, enc, prompts, max_new_tokens, batch_size, temperature, generator=gen, device=device)
    texts, ids = [t for t, _ in out], [r for _, r in out]
    metrics, gold = gold_metrics(prompts, texts)
    metrics["response_len_mean"] = sum(len(r) for r in ids) / len(ids)  # tokens, EOS included
    metrics["eos_rate"] = sum(bool(r) and r[-1] == eos_id(enc) for r in ids) / len(ids)
    max_prompt = model.config.block_size - max_new_tokens
    if rm is not None:
        metrics["rm_reward_mean"] = score(rm, enc, prompts, ids, max_prompt, batch_size, device, *rm_stats).mean().item()
    if ref is not None:
        metrics["kl_to_sft"] = sequence_kl(model, ref, enc, prompts, ids, max_prompt, batch_size, device).mean().item()
    return metrics, list(zip(prompts, texts, gold))


def main(argv=None):
    from minirlhf.checkpoint import load_model
    from minirlhf.tokenizer import get_encoding

    ap = argparse.ArgumentParser(description="Score checkpoints on the built-in task's held-out prompts.")
    ap.add_argument("checkpoints", nargs="+", help="policy checkpoint folders (out/sft, out/ppo, ...)")
    ap.add_argument("--reward-model", default="", help="reward model checkpoint for rm_reward_mean")
    ap.add_argument("--ref", default="", help="reference (SFT) checkpoint for kl_to_sft")
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the metrics here")
    args = ap.parse_args(argv)
    prompts = task.heldout_prompts()[: args.n_prompts]
    rm, stats = None, (0.0, 1.0)
    if args.reward_model:
        rm, ck = load_model(args.reward_model)
        stats = (ck["extra"].get("reward_mean", 0.0), ck["extra"].get("reward_std", 1.0))
    ref = load_model(args.ref)[0] if args.ref else None
    results = {}
    for path in args.checkpoints:
        model, ck = load_model(path)
        enc = get_encoding(ck["tokenizer"])
        metrics, samples = evaluate(model, enc, prompts, args.max_new_tokens, rm, stats, ref,
                                    args.samples_per_prompt, args.temperature, args.seed)
        results[path] = metrics
        print(f"{path}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        for p, t, g in samples[:3]:
            print(f"    {p!r} -> {t!r} (gold {g:+.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
