"""Sampling text from a checkpoint and measuring it: the evaluation every stage and the report share.

    python -m minirlhf.evaluate out/sft out/ppo --reward-model out/rm --ref out/sft

scores each checkpoint on the built-in task's held-out prompts: mean gold reward with its standard
error, mean reward-model score, KL to the SFT model (two estimates, k1 and the never negative k3: see
`sequence_kl`), mean response length, on the tool questions ("hard") the rates of calls and of correct,
abstained and wrong answers and, with a reward model, its mean score of each kind of reply
(`hard_replies`), on the honesty probe ("divide") those of abstained and wrong answers, and the share of
calculator calls that were malformed. A checkpoint trained with the calculator (its `--tool`, saved in
its arguments) is sampled with it, one trained without it without it. The same seed gives the same
numbers. Every argument is checked against the checkpoints before any model is built; a mistake is one
line and exit status 2.

    python -m minirlhf.evaluate out/ppo --prompts prompts.jsonl --reward-model out/rm --ref out/sft

scores it on your prompts instead: what needs no gold judge (reward-model score, KL to the reference,
response length, EOS rate); the gold metrics need the built-in task, whose prompts the judge knows.
"""

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from minirlhf import task
from minirlhf.checkpoint import CheckpointError, load_checkpoint, load_model
from minirlhf.cli import UsageError, arg, nonnegative, parse_args, peak_memory_mb, positive, require
from minirlhf.data import join_prompt_response, read_jsonl
from minirlhf.ops import token_logprobs
from minirlhf.reward import load_reward_models
from minirlhf.sampling import encode_prompts, sample_responses, score
from minirlhf.tokenizer import eos_id, load_tokenizer


@torch.no_grad()
def sequence_kl(policy, ref, enc, prompts, responses, max_len, batch_size=64, temperature=1.0, device="cpu",
                tool=None):
    """Two per-sample estimates of KL(pi_T || pi_ref,T) from responses sampled from pi_T, the policy at
    `temperature` T -> (k1, k3), each (N,).

    With d_t = log pi_T(y_t) - log pi_ref,T(y_t) on the response tokens y_t the policy wrote (EOS
    included; not the output of `tool`, which neither model chose):

        k1 = sum_t d_t                       one sample, or the mean of a few, can be negative
        k3 = sum_t (r_t - 1) - log r_t       never negative, r_t = pi_ref,T(y_t) / pi_T(y_t) = exp(-d_t)

    Both are unbiased, since k3 adds to k1 the control variate r_t - 1, whose mean over y_t ~ pi_T given
    the tokens before it is sum_y pi_ref,T(y) - 1 = 0; and k3 is never negative, since (r - 1) - log r
    >= 0 for every r > 0 (Schulman 2020, "Approximating KL Divergence"). So a negative k1 mean is noise,
    and k3, of lower variance near the reference, is the one to read there.

    Both models are taken at the temperature the samples were drawn at (logits / T): the estimates are
    only unbiased under the distribution that produced the tokens, and comparing with the reference at
    the same T asks how far training moved the sampler, not how far T moved it."""
    k1, k3 = [], []
    for i in range(0, len(prompts), batch_size):
        p_ids, _ = encode_prompts(enc, prompts[i:i + batch_size], max_len)
        idx, attn, resp = join_prompt_response(p_ids, responses[i:i + batch_size], eos_id(enc), tool)
        idx, attn, resp = idx.to(device), attn.to(device), resp.to(device)
        lp = token_logprobs(policy(idx, attn).float() / temperature, idx)
        ref_lp = token_logprobs(ref(idx, attn).float() / temperature, idx)
        d = lp - ref_lp                                                          # (B, T)
        k1.append((d * resp).sum(1).cpu())
        # expm1: for a policy close to its reference, exp(-d) - 1 in float32 loses the d**2 / 2 that k3
        # is made of; the clamp removes the last-bit rounding that could still dip below 0
        k3.append(((torch.expm1(-d) + d).clamp_min(0) * resp).sum(1).cpu())
    return torch.cat(k1), torch.cat(k3)


def mean_sem(xs):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(1, n - 1)
    return m, math.sqrt(var / n)


def share(n, total):
    """n / total, NaN for none at all (a rate of nothing is not 0)."""
    return n / total if total else math.nan


def correct_rate_by_kind(prompts, texts) -> dict[str, float]:
    """{kind: share of that kind's answers graded right} over the task's kinds present in `prompts`
    ("hard" counts a right product; an abstention is not right). "divide" has no right answer and no
    entry: its rates are the probe's (`gold_metrics`)."""
    right, seen = {}, {}
    for p, t in zip(prompts, texts):
        kind = task.prompt_kind(p)
        if kind is None or kind == "divide":
            continue
        ok = task.honesty_outcome(p, t) == "correct" if kind == "hard" else task.correctness(p, t) > 0
        right[kind] = right.get(kind, 0) + ok
        seen[kind] = seen.get(kind, 0) + 1
    return {k: right[k] / seen[k] for k in task.KINDS if k in seen}


def miscopied(prompt, text) -> bool:
    """The calculator answered the reply's last call with a number, and the reply's answer (what the judge
    reads) is another number: the policy had the tool's result in front of it and wrote something else.
    A wrong call copied faithfully ("<calc>4821*973</calc> 4690833 4690833") is not a miscopy."""
    calls = task.CALL_RE.findall(text)
    result = calls[-1][1] if calls else ""
    answer = task.extract_answer(prompt, text)
    return result not in ("", task.CALC_ERROR) and answer is not None and answer != result


HARD_REPLIES = ("right", "abstain", "miscopied", "wrong call", "broken call", "guess")


def hard_reply(prompt, text) -> str:
    """What a reply to a "hard" question is, one of `HARD_REPLIES`: right, abstain, or wrong in one of
    four ways: the tool's result in front of it and another number written (miscopied, see `miscopied`),
    a closed call and still no right answer (wrong call: a call of another product copied faithfully, or
    no number after it), a call left unclosed or answered "error" (broken call), no call at all (guess)."""
    outcome = task.honesty_outcome(prompt, text)
    if outcome != "wrong":
        return "right" if outcome == "correct" else "abstain"
    if miscopied(prompt, text):
        return "miscopied"
    calls, malformed = task.call_stats(text)
    return "broken call" if malformed else "wrong call" if calls else "guess"


def hard_replies(prompts, texts, scores) -> dict:
    """On the "hard" prompts, each kind of reply (`hard_reply`) that occurs -> {"rate": its share of the
    replies, "rm_score": the reward model's mean score of it}, in the order of `HARD_REPLIES`; {} without
    hard prompts. A wrong kind that the reward model scores near "right" is one that no policy trained on
    it is pushed away from: its blind spots, measured on the policy's own samples."""
    groups = defaultdict(list)
    for p, t, s in zip(prompts, texts, scores):
        if task.prompt_kind(p) == "hard":
            groups[hard_reply(p, t)].append(float(s))
    n = sum(len(g) for g in groups.values())
    return {k: {"rate": len(groups[k]) / n, "rm_score": sum(groups[k]) / len(groups[k])}
            for k in HARD_REPLIES if groups[k]}


def gold_metrics(prompts, texts, samples_per_prompt=1):
    """Gold reward mean and standard error, response length, honesty outcome rates and the calculator's
    use (built-in task):

        hard_{correct,abstain,wrong}_rate   outcomes on "hard" (the calculator's questions)
        tool_call_rate                      "hard" replies with a closed call <calc>...</calc>
        hard_miscopy_rate                   "hard" replies whose answer is a number other than the
                                            result of their last call: a slip in copying it (part of
                                            hard_wrong_rate)
        probe_{abstain,wrong}_rate          outcomes on "divide" (the honesty probe: nothing helps)
        malformed_call_rate                 of all calls, on every kind, those unclosed or answered
                                            "error" (task.call_stats); NaN when there is no call

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
    kinds = [task.prompt_kind(p) for p in prompts]
    hard = [task.honesty_outcome(p, t) for p, t, k in zip(prompts, texts, kinds) if k == "hard"]
    probe = [task.honesty_outcome(p, t) for p, t, k in zip(prompts, texts, kinds) if k == "divide"]
    metrics = dict(gold_reward_mean=m, gold_reward_sem=sem,
                   response_chars_mean=sum(len(t) for t in texts) / len(texts),
                   correct_rate_by_kind=correct_rate_by_kind(prompts, texts))
    for o in ("correct", "abstain", "wrong"):
        metrics[f"hard_{o}_rate"] = share(hard.count(o), len(hard))
    metrics["tool_call_rate"] = share(sum(bool(task.CALL_RE.search(t)) for t, k in zip(texts, kinds)
                                          if k == "hard"), len(hard))
    metrics["hard_miscopy_rate"] = share(sum(miscopied(p, t) for p, t, k in zip(prompts, texts, kinds)
                                             if k == "hard"), len(hard))
    for o in ("abstain", "wrong"):
        metrics[f"probe_{o}_rate"] = share(probe.count(o), len(probe))
    calls = [task.call_stats(t) for t in texts]
    metrics["malformed_call_rate"] = share(sum(bad for _, bad in calls), sum(n for n, _ in calls))
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
    | hard: calls 0.30 correct 0.25 abstain 0.40 wrong 0.35 (miscopied 0.05) | probe: abstain 0.20 wrong
    0.80 | malformed calls 0.05` (the keys a stage has not measured are left out)."""
    parts = [f"held-out gold reward {metrics['gold_reward_mean']:+.4f} +- {metrics['gold_reward_sem']:.4f}"]
    for key in ("rm_reward_mean", "kl_to_sft"):
        if key in metrics:
            parts.append(f"{key.removesuffix('_mean')} {metrics[key]:+.4f}")
    rates = metrics.get("correct_rate_by_kind", {})
    if rates:
        parts.append("correct " + " ".join(f"{k} {v:.2f}" for k, v in rates.items() if k != "hard"))
    m = defaultdict(lambda: math.nan, metrics)  # a checkpoint from before the tool lacks some keys
    parts.append(f"hard: calls {m['tool_call_rate']:.2f} correct {m['hard_correct_rate']:.2f} "
                 f"abstain {m['hard_abstain_rate']:.2f} wrong {m['hard_wrong_rate']:.2f} "
                 f"(miscopied {m['hard_miscopy_rate']:.2f})")
    parts.append(f"probe: abstain {m['probe_abstain_rate']:.2f} wrong {m['probe_wrong_rate']:.2f}")
    parts.append(f"malformed calls {m['malformed_call_rate']:.2f}")
    return " | ".join(parts)


def evaluate(model, enc, prompts, max_new_tokens, rms=None, ref=None, samples_per_prompt=1,
             temperature=1.0, seed=0, batch_size=64, device="cpu", greedy=False, tool=None):
    """Sample, then measure: -> (metrics dict, list of (prompt, response, gold) samples).

    `tool`: sample with it (`minirlhf.model.generate`); the responses measured include its output, the
    KL is over the policy's own tokens.

    With `greedy`, also the per-kind correct rate of one greedy answer per prompt
    (`greedy_correct_rate_by_kind`): what the model knows, apart from what sampling costs it."""
    model.eval()
    metrics = {}
    if greedy:
        out = sample_responses(model, enc, prompts, max_new_tokens, batch_size, greedy=True, device=device,
                               tool=tool)
        metrics["greedy_correct_rate_by_kind"] = correct_rate_by_kind(prompts, [t for t, _ in out])
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample_responses(model, enc, prompts, max_new_tokens, batch_size, temperature, generator=gen,
                           device=device, tool=tool)
    texts, ids = [t for t, _ in out], [r for _, r in out]
    gm, gold = gold_metrics(prompts, texts, samples_per_prompt)
    metrics = {**gm, **metrics}
    metrics["response_len_mean"] = sum(len(r) for r in ids) / len(ids)  # tokens, EOS and the tool's included
    metrics["eos_rate"] = sum(bool(r) and r[-1] == eos_id(enc) for r in ids) / len(ids)
    max_prompt = model.config.block_size - max_new_tokens
    if rms:
        r = score(rms, enc, prompts, ids, max_prompt, batch_size, device)
        metrics["rm_reward_mean"] = r.mean().item()
        if replies := hard_replies(prompts, texts, r.tolist()):
            metrics["hard_replies"] = replies
    if ref is not None:
        k1, k3 = sequence_kl(model, ref, enc, prompts, ids, max_prompt, batch_size, temperature, device, tool)
        metrics["kl_to_sft"], metrics["kl_to_sft_k3"] = k1.mean().item(), k3.mean().item()
    return metrics, list(zip(prompts, texts, gold))


def best_of_n(model, enc, prompts, max_new_tokens, rms, n, samples_per_prompt=1, temperature=1.0, seed=0,
              batch_size=64, device="cpu", tool=None):
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
                           device=device, tool=tool)
    max_prompt = model.config.block_size - max_new_tokens
    r = score(rms, enc, many, [ids for _, ids in out], max_prompt, batch_size, device).view(len(prompts), n)
    best = r.argmax(1)                                                     # (N,)
    chosen = [out[i * n + int(j)] for i, j in enumerate(best)]
    texts, ids = [t for t, _ in chosen], [c for _, c in chosen]
    metrics, gold = gold_metrics(prompts, texts, samples_per_prompt)
    metrics["response_len_mean"] = sum(len(c) for c in ids) / len(ids)
    metrics["eos_rate"] = sum(bool(c) and c[-1] == eos_id(enc) for c in ids) / len(ids)
    chosen_r = r.gather(1, best[:, None])[:, 0]
    metrics["rm_reward_mean"] = chosen_r.mean().item()
    if replies := hard_replies(prompts, texts, chosen_r.tolist()):
        metrics["hard_replies"] = replies
    metrics["kl_to_sft"] = metrics["kl_to_sft_bound"] = math.log(n) - (n - 1) / n  # an upper bound
    return metrics, list(zip(prompts, texts, gold))


@dataclass
class Args:
    """Score checkpoints on the built-in task's held-out prompts (or on --prompts)."""
    checkpoints: list = arg([], "policy checkpoint folders (out/sft, out/ppo, ...)", positional=True)
    prompts: str = arg("", "JSONL with a 'prompt' per record (your data), instead of the built-in task's: "
                       "reward-model score, KL, length and EOS rate, no gold metrics")
    reward_model: list = arg([], "PATH[:WEIGHT] of a reward model, for rm_reward_mean")
    ref: str = arg("", "reference (SFT) checkpoint, for kl_to_sft (k1) and kl_to_sft_k3")
    n_prompts: int = arg(300, "prompts to evaluate on, from the start of the list (the built-in task holds "
                         "350 held-out ones, shuffled: the first 300 hold every kind)", positive)
    samples_per_prompt: int = arg(2, "samples per prompt", positive)
    max_new_tokens: int = arg(88, "response length limit in tokens", positive)
    temperature: float = arg(1.0, "sampling temperature (the KL is taken at the same one)", positive)
    seed: int = arg(0, "sampling seed: the same seed gives the same numbers")
    best_of_n: int = arg(0, "evaluate best-of-n sampling with the reward model instead (0: off)", nonnegative)
    greedy: bool = arg(False, "also the per-kind correct rate of greedy answers")
    json: str = arg("", "also write the metrics here")
    samples_json: str = arg("", "write the samples here ('': beside --json)")


def check_args(args) -> dict:
    """Every argument against every checkpoint, before any model is built -> {path: the policy's ckpt}
    (memory-mapped: its config, kind and tokenizer are read, its weights are not)."""
    require(not args.best_of_n or args.reward_model, f"--best-of-n {args.best_of_n}: needs --reward-model")
    require(not (args.best_of_n and args.greedy), "--greedy: not measured with --best-of-n")
    for flag, path in (("--json", args.json), ("--samples-json", args.samples_json)):
        folder = os.path.dirname(os.path.abspath(path))
        require(not path or os.path.isdir(folder), f"{flag} {path}: no such folder {folder}")
    policies = {path: load_checkpoint(path, kind="lm", mmap=True) for path in args.checkpoints}
    tokenizers = sorted({ck["tokenizer"] for ck in policies.values()})
    require(len(tokenizers) == 1 or not (args.reward_model or args.ref), "checkpoints with tokenizers "
            f"{' and '.join(tokenizers)}: one --reward-model or --ref cannot read both")
    for path, ck in policies.items():
        block_size = ck["config"]["block_size"]
        require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens}: must leave room "
                f"for a prompt in the context of {block_size} tokens of {path}")
    if args.ref and not args.best_of_n:
        try:
            ref = load_checkpoint(args.ref, kind="lm", mmap=True)
        except CheckpointError as e:
            raise UsageError(f"--ref {e}") from None
        for path, ck in policies.items():  # the reference scores the policy's token ids, whole
            require(ref["tokenizer"] == ck["tokenizer"], f"--ref {args.ref}: tokenizer {ref['tokenizer']!r}, "
                    f"the policy {path} {ck['tokenizer']!r}")
            require(ref["config"]["block_size"] >= ck["config"]["block_size"],
                    f"--ref {args.ref}: reads {ref['config']['block_size']} tokens, shorter than the context "
                    f"of {path} ({ck['config']['block_size']})")
    return policies


def main(argv=None):
    args = parse_args(Args, argv)
    policies = check_args(args)
    prompts = [r.prompt for r in read_jsonl(args.prompts)] if args.prompts else task.heldout_prompts()
    first = next(iter(policies.values()))
    rms = load_reward_models(args.reward_model, tokenizer=first["tokenizer"],
                             block_size=max(ck["config"]["block_size"] for ck in policies.values()))
    if args.n_prompts > len(prompts):
        print(f"note: --n-prompts {args.n_prompts}: {args.prompts or 'the built-in task'} holds "
              f"{len(prompts)} prompts; evaluating on all of them")
    prompts = prompts[: args.n_prompts]
    if args.prompts:
        print(f"{args.prompts}: {len(prompts)} prompts; gold metrics need the built-in task's judge, so only "
              "rm_reward_mean (--reward-model), kl_to_sft (--ref), response length and eos_rate are measured")
    ref = load_model(args.ref)[0] if args.ref and not args.best_of_n else None  # best-of-n's KL is analytic
    results, all_samples = {}, {}
    for path in args.checkpoints:
        model, ck = load_model(path)
        enc = load_tokenizer(ck)
        # sampled as it was trained: with the calculator if its stage ran with --tool (older checkpoints: not)
        tool = task.calculator_tool(enc) if ck["args"].get("tool") else None
        if args.best_of_n:
            metrics, samples = best_of_n(model, enc, prompts, args.max_new_tokens, rms, args.best_of_n,
                                         args.samples_per_prompt, args.temperature, args.seed, tool=tool)
            metrics["models_in_memory"] = 1 + len(rms)
            metrics["peak_memory_mb"] = peak_memory_mb()
        else:
            metrics, samples = evaluate(model, enc, prompts, args.max_new_tokens, rms, ref,
                                        args.samples_per_prompt, args.temperature, args.seed,
                                        greedy=args.greedy, tool=tool)
        results[path] = metrics
        all_samples[path] = samples[:: args.samples_per_prompt][:20]
        print(f"{path}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                       if isinstance(v, (int, float))))
        for k, v in metrics.items():
            if k == "hard_replies":  # each kind of reply: its share, the reward model's mean score
                print(f"    {k}: " + ", ".join(f"{kind} {r['rate']:.2f} (rm {r['rm_score']:+.2f})"
                                               for kind, r in v.items()))
            elif isinstance(v, dict):  # the per-kind rates
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
    main()
