"""Sampling text from a checkpoint and measuring it: the evaluation every stage and the report share.

    python -m minirlhf.evaluate out/sft out/ppo --reward-model out/rm --ref out/sft

scores each checkpoint on the built-in task's held-out prompts: mean gold reward with its standard
error, mean reward-model score, KL to the SFT model, mean response length, and on the honesty
questions the rates of correct, abstained and wrong answers. The same seed gives the same numbers.

    python -m minirlhf.evaluate out/ppo --prompts prompts.jsonl --reward-model out/rm --ref out/sft

scores it on your prompts instead: what needs no gold judge (reward-model score, KL to the reference,
response length, EOS rate); the gold metrics need the built-in task, whose prompts the judge knows.
"""

import argparse
import json
import math
import sys

import torch

from minirlhf import task
from minirlhf.data import join_prompt_response
from minirlhf.ops import token_logprobs
from minirlhf.reward import load_reward_models
from minirlhf.sampling import encode_prompts, sample_responses, score
from minirlhf.tokenizer import eos_id


@torch.no_grad()
def sequence_kl(policy, ref, enc, prompts, responses, max_len, batch_size=64, temperature=1.0, device="cpu"):
    """Per-sample KL estimate sum_t [log pi_T(y_t) - log pi_ref,T(y_t)] over response tokens sampled from
    pi_T, the policy at `temperature` T (k1: an unbiased estimate of KL(pi_T || pi_ref,T) per sequence).

    Both models are taken at the temperature the samples were drawn at (logits / T): the estimate is
    only unbiased under the distribution that produced the tokens, and comparing with the reference at
    the same T asks how far training moved the sampler, not how far T moved it. A single k1 term can be
    negative; its mean over many samples is not, up to noise."""
    out = []
    for i in range(0, len(prompts), batch_size):
        p_ids, _ = encode_prompts(enc, prompts[i:i + batch_size], max_len)
        idx, attn, resp = join_prompt_response(p_ids, responses[i:i + batch_size], eos_id(enc))
        idx, attn, resp = idx.to(device), attn.to(device), resp.to(device)
        lp = token_logprobs(policy(idx, attn).float() / temperature, idx)
        ref_lp = token_logprobs(ref(idx, attn).float() / temperature, idx)
        out.append(((lp - ref_lp) * resp).sum(1).cpu())
    return torch.cat(out)


def mean_sem(xs):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(1, n - 1)
    return m, math.sqrt(var / n)


def correct_rate_by_kind(prompts, texts) -> dict[str, float]:
    """{kind: share of that kind's answers graded right} over the task's kinds present in `prompts`
    ("hard" counts a right product; an abstention is not right)."""
    right, seen = {}, {}
    for p, t in zip(prompts, texts):
        kind = task.prompt_kind(p)
        if kind is None:
            continue
        ok = task.honesty_outcome(p, t) == "correct" if kind == "hard" else task.correctness(p, t) > 0
        right[kind] = right.get(kind, 0) + ok
        seen[kind] = seen.get(kind, 0) + 1
    return {k: right[k] / seen[k] for k in task.KINDS if k in seen}


def gold_metrics(prompts, texts, samples_per_prompt=1):
    """Gold reward mean and standard error, response length, honesty outcome rates (built-in task).

    With several samples per prompt (adjacent in `prompts`) the samples of one prompt are correlated, so
    the standard error is taken over the per-prompt means: the prompts are the independent draws.

    The judge knows only the built-in task's prompts: on others (user data) the metrics are the response
    length alone and every gold score is NaN.
    """
    if not all(task.prompt_kind(p) for p in prompts):
        return dict(response_chars_mean=sum(len(t) for t in texts) / len(texts)), [math.nan] * len(texts)
    gold = [task.judge(p, t) for p, t in zip(prompts, texts)]
    k = samples_per_prompt
    m, sem = mean_sem([sum(gold[i:i + k]) / k for i in range(0, len(gold), k)])
    outcomes = [task.honesty_outcome(p, t) for p, t in zip(prompts, texts)]
    hard = [o for o in outcomes if o is not None]
    metrics = dict(gold_reward_mean=m, gold_reward_sem=sem,
                   response_chars_mean=sum(len(t) for t in texts) / len(texts),
                   correct_rate_by_kind=correct_rate_by_kind(prompts, texts))
    for o in ("correct", "abstain", "wrong"):
        metrics[f"hard_{o}_rate"] = hard.count(o) / len(hard) if hard else float("nan")
    # where the gold reward comes from: each criterion's weighted share of gold_reward_mean
    breakdowns = [task.judge_breakdown(p, t) for p, t in zip(prompts, texts)]
    for c, w in task.WEIGHTS.items():
        metrics[f"gold_{c}"] = w * sum(b[c] for b in breakdowns) / len(breakdowns)
    return metrics, gold


def print_samples(samples, n=6):
    """The first n (prompt, response, gold) samples of an evaluation, one line each."""
    for p, r, g in samples[:n]:
        print(f"  {p!r:42} -> {r!r} (gold {g:+.2f})")


def summary_line(metrics: dict) -> str:
    """The one closing line every stage prints after its final evaluation, from `evaluate`'s metrics:
    `held-out gold reward -0.4123 +- 0.0251 | rm_reward +0.1200 | kl_to_sft 1.2300 | correct add 0.62 ...
    | hard: correct 0.00 abstain 0.40 wrong 0.60` (the keys a stage has not measured are left out)."""
    parts = [f"held-out gold reward {metrics['gold_reward_mean']:+.4f} +- {metrics['gold_reward_sem']:.4f}"]
    for key in ("rm_reward_mean", "kl_to_sft"):
        if key in metrics:
            parts.append(f"{key.removesuffix('_mean')} {metrics[key]:+.4f}")
    rates = metrics.get("correct_rate_by_kind", {})
    if rates:
        parts.append("correct " + " ".join(f"{k} {v:.2f}" for k, v in rates.items() if k != "hard"))
    parts.append(f"hard: correct {metrics['hard_correct_rate']:.2f} "
                 f"abstain {metrics['hard_abstain_rate']:.2f} wrong {metrics['hard_wrong_rate']:.2f}")
    return " | ".join(parts)


def evaluate(model, enc, prompts, max_new_tokens, rms=None, ref=None, samples_per_prompt=1,
             temperature=1.0, seed=0, batch_size=64, device="cpu", greedy=False):
    """Sample, then measure: -> (metrics dict, list of (prompt, response, gold) samples).

    With `greedy`, also the per-kind correct rate of one greedy answer per prompt
    (`greedy_correct_rate_by_kind`): what the model knows, apart from what sampling costs it."""
    model.eval()
    metrics = {}
    if greedy:
        out = sample_responses(model, enc, prompts, max_new_tokens, batch_size, greedy=True, device=device)
        metrics["greedy_correct_rate_by_kind"] = correct_rate_by_kind(prompts, [t for t, _ in out])
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample_responses(model, enc, prompts, max_new_tokens, batch_size, temperature, generator=gen,
                           device=device)
    texts, ids = [t for t, _ in out], [r for _, r in out]
    gm, gold = gold_metrics(prompts, texts, samples_per_prompt)
    metrics = {**gm, **metrics}
    metrics["response_len_mean"] = sum(len(r) for r in ids) / len(ids)  # tokens, EOS included
    metrics["eos_rate"] = sum(bool(r) and r[-1] == eos_id(enc) for r in ids) / len(ids)
    max_prompt = model.config.block_size - max_new_tokens
    if rms:
        r = score(rms, enc, prompts, ids, max_prompt, batch_size, device)
        metrics["rm_reward_mean"] = r.mean().item()
    if ref is not None:
        kl = sequence_kl(model, ref, enc, prompts, ids, max_prompt, batch_size, temperature, device)
        metrics["kl_to_sft"] = kl.mean().item()
    return metrics, list(zip(prompts, texts, gold))


def best_of_n(model, enc, prompts, max_new_tokens, rms, n, samples_per_prompt=1, temperature=1.0, seed=0,
              batch_size=64, device="cpu"):
    """The baseline every RLHF method is compared with: sample n responses from the (SFT) policy, keep the
    one the reward model scores highest. No training, and it costs n samples per answer.

    Its KL to the policy is reported as log n - (n - 1) / n (Stiennon et al. 2020, Appendix G.3): the
    exact value only when the n samples are all distinct, and otherwise an upper bound (Beirami et al.
    2024, "Theoretical guarantees on the best-of-n alignment policy"). A small model repeats itself
    often, so the true KL here is lower; the key is `kl_to_sft_bound` and `kl_to_sft` carries the same
    number so the report's KL column stays comparable across methods."""
    model.eval()
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    many = [p for p in prompts for _ in range(n)]                          # n candidates per prompt, adjacent
    out = sample_responses(model, enc, many, max_new_tokens, batch_size, temperature, generator=gen,
                           device=device)
    max_prompt = model.config.block_size - max_new_tokens
    r = score(rms, enc, many, [ids for _, ids in out], max_prompt, batch_size, device).view(len(prompts), n)
    best = r.argmax(1)                                                     # (N,)
    chosen = [out[i * n + int(j)] for i, j in enumerate(best)]
    texts, ids = [t for t, _ in chosen], [c for _, c in chosen]
    metrics, gold = gold_metrics(prompts, texts, samples_per_prompt)
    metrics["response_len_mean"] = sum(len(c) for c in ids) / len(ids)
    metrics["eos_rate"] = sum(bool(c) and c[-1] == eos_id(enc) for c in ids) / len(ids)
    metrics["rm_reward_mean"] = r.gather(1, best[:, None]).mean().item()
    metrics["kl_to_sft"] = metrics["kl_to_sft_bound"] = math.log(n) - (n - 1) / n  # an upper bound
    return metrics, list(zip(prompts, texts, gold))


def main(argv=None):
    from minirlhf.checkpoint import load_model
    from minirlhf.cli import peak_memory_mb
    from minirlhf.data import read_jsonl
    from minirlhf.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description="Score checkpoints on the built-in task's held-out prompts "
                                 "(or on --prompts).")
    ap.add_argument("checkpoints", nargs="+", help="policy checkpoint folders (out/sft, out/ppo, ...)")
    ap.add_argument("--prompts", default="", help="JSONL with a 'prompt' per record (your data), instead of "
                    "the built-in task's: reward-model score, KL, length and EOS rate, no gold metrics")
    ap.add_argument("--reward-model", action="append", default=[],
                    help="PATH[:WEIGHT] for rm_reward_mean (repeatable)")
    ap.add_argument("--ref", default="", help="reference (SFT) checkpoint for kl_to_sft")
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--best-of-n", type=int, default=0,
                    help="evaluate best-of-n sampling with the reward model instead")
    ap.add_argument("--greedy", action="store_true", help="also the per-kind correct rate of greedy answers")
    ap.add_argument("--json", default="", help="also write the metrics here")
    ap.add_argument("--samples-json", default="", help="write the samples here (default: beside --json)")
    args = ap.parse_args(argv)
    prompts = [r.prompt for r in read_jsonl(args.prompts)] if args.prompts else task.heldout_prompts()
    prompts = prompts[: args.n_prompts]
    if args.prompts:
        print(f"{args.prompts}: {len(prompts)} prompts; gold metrics need the built-in task's judge, so only "
              "rm_reward_mean (--reward-model), kl_to_sft (--ref), response length and eos_rate are measured")
    rms = load_reward_models(args.reward_model)
    if args.best_of_n and not rms:
        ap.error("--best-of-n needs --reward-model")
    ref = load_model(args.ref)[0] if args.ref and not args.best_of_n else None  # best-of-n's KL is analytic
    results, all_samples = {}, {}
    for path in args.checkpoints:
        model, ck = load_model(path)
        enc = load_tokenizer(ck)
        if args.best_of_n:
            metrics, samples = best_of_n(model, enc, prompts, args.max_new_tokens, rms, args.best_of_n,
                                         args.samples_per_prompt, args.temperature, args.seed)
            metrics["models_in_memory"] = 1 + len(rms)
            metrics["peak_memory_mb"] = peak_memory_mb()
        else:
            metrics, samples = evaluate(model, enc, prompts, args.max_new_tokens, rms, ref,
                                        args.samples_per_prompt, args.temperature, args.seed,
                                        greedy=args.greedy)
        results[path] = metrics
        all_samples[path] = samples[:: args.samples_per_prompt][:20]
        print(f"{path}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                       if isinstance(v, (int, float))))
        for k, v in metrics.items():
            if isinstance(v, dict):  # the per-kind rates
                print(f"    {k}: " + " ".join(f"{kind} {rate:.2f}" for kind, rate in v.items()))
        for p, t, g in samples[:3]:
            print(f"    {p!r} -> {t!r}" + ("" if math.isnan(g) else f" (gold {g:+.2f})"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        with open(args.samples_json or args.json.removesuffix(".json") + ".samples.json", "w") as f:
            json.dump(all_samples, f, indent=2, ensure_ascii=False)
    return results


if __name__ == "__main__":
    from minirlhf.cli import report_user_errors
    # a bad checkpoint path: one line and exit status 2, as in the stage scripts
    sys.excepthook = report_user_errors
    main()
