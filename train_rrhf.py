"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al. 2023).

No critic, no reference model, no RL loop: sample K candidate responses per prompt, score them with the
reward model, and train the policy so that its length-normalised log-likelihoods rank the candidates
in the reward model's order, plus SFT on the best candidate (Yuan et al. 2023, "RRHF: Rank Responses to
Align Language Models with Human Feedback without tears", Sec. 3). `rrhf_loss` below is the whole
algorithm; the rest of the file is plumbing:

    for each round (--rounds, 1 by default):
        sample K - d candidates per prompt from the current policy (round 1: the SFT model itself) for
        --n-prompts prompts, join them with each prompt's d dataset responses (--data), score all K
        with the reward model(s)
        for max_steps / rounds steps: B prompts of that pool -> policy log-probs (B, K, T) -> rrhf_loss

With one round every sampled candidate comes from the SFT model and the training is offline: a fixed
pool of scored candidates, seen for a few epochs. More rounds resample from the policy being trained
(the paper's iterative variant); each round chases the reward model further from the data it was
trained on, so watch the gold reward, not the RM reward, when trying it.

Models in memory. RRHF needs the policy and the reward model, and the reward model only to score
the candidates: with one round it could be freed before the first step, the paper's "1 to 2 models".
There is no reference model because the loss never asks for one; the SFT term on the best candidate is
what keeps the policy on good text, where PPO needs a KL penalty to a frozen copy. This script does hold
a third model, a frozen copy of the SFT model, but only to *report* the KL to it (`kl` and the final
evaluation; built-in task only): the training is the same without it. The checkpoint records both
counts (`models_in_memory`, `models_needed`).

Deviations from the paper:
- L_ft is a token mean (see `rrhf_loss`), so that with K = 1 RRHF is exactly SFT.
- Every candidate, dataset responses included, is scored by the reward model; the dataset's ranks or
  chosen/rejected labels are not read. A prompt whose record holds fewer responses gets more policy
  samples, so that every prompt has the same K and a batch is one (B, K, T) tensor.
- Candidates are the policy's own samples at temperature 1; the paper also ranks other models' and
  people's responses (pass those with --data). A tiny model's samples often repeat: identical
  candidates get identical scores, and tied rewards form no pair.

Logged every 10 steps (metrics.jsonl; printed): `loss` = `rank_loss` + `sft_loss` (L_rank and L_ft of the
batch); `rank_acc`, the share of the batch's reward-ordered pairs whose scores p_i the policy already
orders; `rm_reward` and `gold_reward`, the mean reward-model and gold (task.judge) scores of the batch's
candidates, and `gold_reward_best`, the gold of the candidate the RM ranks first (what L_ft imitates).
With one round the candidates are fixed, so these last three measure the pool, not progress; progress
is every --eval-interval steps, from the policy's own samples on held-out prompts: `eval_gold_reward`,
`eval_rm_reward` and `kl` (the summed log-ratio to the SFT model per response, a k1 estimate).
`ms` is the step's update; a round's first step is always logged, with `rollout_ms` and `score_ms`,
the time of sampling and of scoring that round's candidates.

    python train_rrhf.py                                     # built-in task, CPU, about 1.5 minutes
    python train_rrhf.py --rounds 2 --max-steps 240          # the iterative variant
    python train_rrhf.py --rounds 2 --max-steps 240 --resume # continue it after a stop
    python train_rrhf.py --init out/sft --reward-model out/rm --data hh.jsonl --device cuda \\
        --batch-size 32 --n-prompts 8192 --max-steps 2000 --max-new-tokens 128              # one GPU
    torchrun --standalone --nproc_per_node 8 train_rrhf.py --device cuda ...  # 8 GPUs: a pool split 8 ways

Reads out/sft (policy init and the KL reference) and out/rm (`--reward-model PATH[:WEIGHT]`, repeatable);
writes out/rrhf/ckpt.pt and out/rrhf/metrics.jsonl. On the built-in task, reports the held-out mean gold
reward with its standard error, the RM reward and the KL to the SFT model, next to the SFT model's gold.
"""

import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from minirlhf import dist, task
from minirlhf.checkpoint import load_model, remove_resume, save_checkpoint
from minirlhf.cli import (Log, adamw, arg, check_device, check_dtype, check_finite, nonnegative, parse_args,
                          peak_memory_mb, positive, require, warmup_cosine)
from minirlhf.data import PairRecord, RankRecord, SFTRecord, join_prompt_response, read_jsonl
from minirlhf.evaluate import evaluate, print_samples, summary_line
from minirlhf.ops import token_logprobs
from minirlhf.reward import load_reward_models
from minirlhf.sampling import encode_prompts, sample_responses, score
from minirlhf.tokenizer import encode_response, eos_id, load_tokenizer


@dataclass
class Args:
    """RRHF: rank sampled responses by reward-model score."""
    # I/O
    out: str = arg("out/rrhf", "output folder for the checkpoint and metrics.jsonl")
    init: str = arg("out/sft", "the SFT checkpoint: the policy starts here, and it is the KL reference")
    data: str = arg("", "JSONL of prompts (prompts, sft, pairwise, kway or hh records, whose responses join "
                        "the candidates); '' = the built-in task's training prompts")
    reward_model: list = arg(["out/rm"], "a reward model PATH[:WEIGHT]; several are summed with weights")
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    overwrite: bool = arg(False, "replace a finished run saved in --out")
    ckpt_interval: int = arg(40, "save out/rrhf/resume.pt every this many steps, for --resume", positive)
    # system
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu | cuda | cuda:N | auto", check_device)
    dtype: str = arg("auto", "float32 | bfloat16 (autocast, CUDA only) | auto", check_dtype)
    compile: bool = arg(False, "torch.compile the model (GPU)")
    threads: int = arg(0, "CPU threads (0: torch's default); a fixed count is bit-reproducible", nonnegative)
    # optimisation
    lr: float = arg(3e-4, "peak learning rate (linear warmup, cosine decay to lr/10)", positive)
    warmup_steps: int = arg(10, "learning-rate warmup", nonnegative)
    weight_decay: float = arg(0.0, "AdamW weight decay on matrices", nonnegative)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", positive)
    batch_size: int = arg(8, "prompts per step (each with K candidates: batch_size * K sequences)", positive)
    # schedule and evaluation
    max_steps: int = arg(120, "optimisation steps, split evenly over the rounds", positive)
    eval_interval: int = arg(40, "sample the policy on held-out prompts every this many steps", positive)
    eval_prompts: int = arg(300, "held-out prompts for the final evaluation (0: none)", nonnegative)
    max_new_tokens: int = arg(88, "response length limit when sampling", positive)
    tool: bool = arg(True, "sample with the calculator of minirlhf/task.py, train on the policy's own tokens "
                     "only (--no-tool: without it)")
    monitor_prompts: int = arg(64, "built-in task: held-out prompts for the interval evaluations", positive)
    gen_batch_size: int = arg(256, "sequences sampled (or scored) at once", positive)
    # RRHF
    k: int = arg(4, "K, candidates per prompt: a record's responses (--data), then samples", positive)
    length_penalty: float = arg(1.0, "alpha in p_i = sum log pi / len**alpha (1: mean log-prob per token)",
                                nonnegative)
    temperature: float = arg(1.0, "sampling temperature of the candidates", positive)
    rounds: int = arg(1, "sample candidates this often, each time from the current policy", positive)
    n_prompts: int = arg(256, "prompts whose candidates are sampled and scored, each round", positive)


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
    t = _rrhf_terms(logprobs, mask, rewards, length_penalty)
    return (t["rank_loss"] + t["ft_loss"]).mean()


def _rrhf_terms(logprobs, mask, rewards, length_penalty):
    """The quantities rrhf_loss is made of, per prompt; `rrhf_stats` reads the same ones."""
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
    return dict(scores=scores, pairs=pairs, rank_loss=rank_loss, ft_loss=ft_loss)


@torch.no_grad()
def rrhf_stats(logprobs, mask, rewards, length_penalty: float = 1.0) -> dict[str, torch.Tensor]:
    """What rrhf_loss computed, for the log (no gradient); arguments as in `rrhf_loss`.

    rank_loss: L_rank and sft_loss: L_ft, each averaged over the prompts (they sum to the loss);
    rank_acc:  of the pairs with r_i < r_j, the share whose scores the policy already orders, p_i < p_j.
    """
    t = _rrhf_terms(logprobs, mask, rewards, length_penalty)
    scores, pairs = t["scores"], t["pairs"]
    ordered = (scores[:, :, None] < scores[:, None, :]).to(pairs.dtype) * pairs  # (B, K, K)
    return dict(rank_loss=t["rank_loss"].mean(), sft_loss=t["ft_loss"].mean(),
                rank_acc=ordered.sum() / pairs.sum().clamp(min=1.0))


if __name__ == "__main__":
    args = parse_args(Args)

    # ---- device, dtype, seed ----------------------------------------------------------------------
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init(device)  # under torchrun: join the process group; cuda becomes cuda:LOCAL_RANK
    dist.split(args.batch_size, "--batch-size")  # each of the W ranks trains on batch_size / W prompts
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=(dtype == "bfloat16"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_rng = random.Random(args.seed)                           # which prompts each round, batch order
    # the candidates' sampling: each rank samples its share of a round's prompts with its own generator
    generator = torch.Generator(device=device).manual_seed(args.seed + dist.RANK)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models: the policy and the reward model(s); the SFT copy only measures KL -----------------
    policy, ck = load_model(args.init, device, kind="lm")
    enc = load_tokenizer(ck)
    tool = task.calculator_tool(enc) if args.tool else None  # the sampler's calculator; None: --no-tool
    block_size = policy.config.block_size
    require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens} must leave room for a "
            f"prompt in the context of {block_size} tokens")
    policy.train()
    rms = load_reward_models(args.reward_model, device, tokenizer=enc.name, block_size=block_size)
    builtin = not args.data  # the gold judge, the held-out prompts and the KL reference: built-in task only
    ref = load_model(args.init, device)[0].requires_grad_(False) if builtin else None
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters from {args.init}, tokenizer {enc.name}, "
          f"device {device}, dtype {dtype} | reward: " + " + ".join(f"{r.weight:g} * {r.path}" for r in rms))

    # ---- data: prompts, and the dataset responses that join the sampled candidates -----------------
    if args.data:
        def responses(r):
            if isinstance(r, SFTRecord):
                return [r.response]
            if isinstance(r, PairRecord):  # pairwise and HH records: the RM scores both, the label is unread
                return [r.chosen, r.rejected]
            return list(r.responses) if isinstance(r, RankRecord) else []  # a PromptRecord: samples only
        records = [(r.prompt, responses(r)) for r in read_jsonl(args.data, "auto")]
    else:
        records = [(p, []) for p in task.train_prompts()]
    # Every prompt gets K candidates (its dataset responses, then policy samples): a batch is (B, K, T).
    K = max(args.k, max(len(resp) for _, resp in records))
    require(args.rounds <= args.max_steps, f"--rounds {args.rounds} exceeds --max-steps {args.max_steps}")
    max_prompt = block_size - args.max_new_tokens     # prompts are cut from the left to fit
    n_long = encode_prompts(enc, [p for p, _ in records], max_prompt)[1]
    print(f"data: {len(records)} prompts, K = {K} candidates per prompt"
          + (f"; {n_long} longer than the {max_prompt} tokens the context leaves them lose their start"
             if n_long else ""))

    @torch.no_grad()
    def collect(batch):
        """K scored candidates for each (prompt, dataset responses) in `batch` -> prompt ids (N lists),
        response ids (N * K lists, EOS included), rewards (N, K), gold (N, K) or None, and the times of
        the sampling and the scoring (both end on the host, so they hold on a GPU too)."""
        policy.eval()
        t0 = time.time()
        to_sample = [p for p, resp in batch for _ in range(K - len(resp))]
        samples = iter(sample_responses(policy, enc, to_sample, args.max_new_tokens, args.gen_batch_size,
                                        args.temperature, generator=generator, device=device, tool=tool))
        t_sampled = time.time()
        texts, ids = [], []
        for p, resp in batch:
            # a dataset response gets the policy's length cap, so prompt + response always fits the context
            texts += resp
            ids += [encode_response(enc, r)[: args.max_new_tokens] for r in resp]
            for _ in range(K - len(resp)):
                text, r = next(samples)
                texts.append(text)
                ids.append(r)
        prompts = [p for p, _ in batch for _ in range(K)]
        rewards = score(rms, enc, prompts, ids, max_prompt, args.gen_batch_size, device).view(-1, K)  # (N, K)
        times = dict(rollout_ms=(t_sampled - t0) * 1000, score_ms=(time.time() - t_sampled) * 1000)
        gold = (torch.tensor([task.judge(p, t) for p, t in zip(prompts, texts)]).view(-1, K)
                if builtin else None)
        policy.train()
        return encode_prompts(enc, [p for p, _ in batch], max_prompt)[0], ids, rewards, gold, times

    def get_batch(idx):
        """Prompts idx of the round's pool -> tokens, attn, mask (B * K, T), rewards (B, K)."""
        P = [prompt_ids[i] for i in idx for _ in range(K)]
        R = [response_ids[i * K + k] for i in idx for k in range(K)]
        # prompts left-padded, responses right-padded (pad = EOS under mask 0): the layout sampling made;
        # the tool's output in a response under mask 0 too, as sampling marked it
        tokens, attn, mask = join_prompt_response(P, R, eos_id(enc), tool)
        return tokens.to(device), attn.to(device), mask.to(device), rewards[idx].to(device)

    # ---- optimizer --------------------------------------------------------------------------------
    optimizer = adamw(policy, args.lr, args.weight_decay, device)
    lr_at = lambda step: warmup_cosine(step, args.lr, args.warmup_steps, args.max_steps)  # noqa: E731
    train_policy = dist.wrap(policy)  # under torchrun, DDP: backward averages the gradients over the ranks
    train_policy = torch.compile(train_policy) if args.compile else train_policy
    # what --resume restores besides the weights. The round's scored candidates are saved as they are:
    # after the first round they come from a policy that no longer exists, so they cannot be sampled again.
    state = dict(optimizer=optimizer, data_rng=data_rng, generator=generator)
    start, saved = dist.resume_or_start(args, policy, state)
    round_, order = saved.get("round", -1), saved.get("order", [])
    prompt_ids, response_ids, rewards, gold = (saved.get(k) for k in ("prompt_ids", "response_ids", "rewards",
                                                                      "gold"))
    log = Log(args.out, first_step=start) if dist.is_main else dist.skip

    # ---- training loop ----------------------------------------------------------------------------
    last = args.max_steps - 1
    t_start = time.time()
    for step in tqdm(range(start, args.max_steps), "rrhf", initial=start, total=args.max_steps,
                     disable=dist.tqdm_disable):
        round_times = {}  # a round's rollout_ms and score_ms, logged with its first step
        if step * args.rounds // args.max_steps > round_:
            # ---- a new round: candidates from the current policy (round 1: still the SFT model), scored
            round_ += 1
            t0 = time.time()
            pool = data_rng.sample(records, min(args.n_prompts, len(records)))
            # each rank samples and scores its share of the pool; then every rank holds all of it
            prompt_ids, response_ids, rewards, gold, round_times = collect(dist.shard(pool))
            prompt_ids, response_ids, rewards = map(dist.gather_list, (prompt_ids, response_ids, rewards))
            gold = dist.gather_list(gold) if builtin else None
            order = []
            best = rewards.argmax(1, keepdim=True)  # the candidate L_ft trains on
            line = (f"round {round_ + 1}/{args.rounds} | {len(pool)} prompts x {K} candidates | "
                    f"{time.time() - t0:.1f} s | rm_reward {rewards.mean():+.3f}, best of {K} "
                    f"{rewards.gather(1, best).mean():+.3f}")
            if gold is not None:
                line += f" | gold {gold.mean():+.3f}, of the RM's best {gold.gather(1, best).mean():+.3f}"
            print(line)

        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        if len(order) < args.batch_size:  # a new pass over the round's prompts, in a new order
            order = data_rng.sample(range(len(prompt_ids)), len(prompt_ids))
        idx, order = order[: args.batch_size], order[args.batch_size:]
        mine = dist.shard(idx)  # this rank's slice of the batch
        tokens, attn, mask, batch_rewards = get_batch(mine)
        with autocast:
            logits = train_policy(tokens, attn)                                  # (B*K, T, V)
        logprobs = token_logprobs(logits, tokens).view(len(mine), K, -1)         # (B, K, T), as the tokens
        mask = mask.view(len(mine), K, -1)                                       # (B, K, T), 1 on responses
        # L = sum_{r_i < r_j} max(0, p_i - p_j) - mean_t log pi(y_best): rank by reward, SFT on the best
        # (the mean over the prompts of the whole batch, every rank's: dist.batch_mean)
        loss = dist.batch_mean(rrhf_loss(logprobs, mask, batch_rewards, args.length_penalty), len(mine))
        check_finite(loss, step, args.out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        optimizer.step()

        evaluate_now = step % args.eval_interval == 0 or step == last
        if step % 10 == 0 or evaluate_now or round_times:
            # the whole batch's: every rank's rows (dist.gather); the pool (rewards, gold) is on every rank
            stats = rrhf_stats(*map(dist.gather, (logprobs, mask, batch_rewards)), args.length_penalty)
            metrics = dict(loss=loss, **stats, rm_reward=rewards[idx].mean(), grad_norm=grad_norm,
                           lr=lr_at(step), **round_times, ms=(time.time() - t0) * 1000)
            if builtin:  # the gold of the candidates, and of the one the RM ranks first (L_ft's target)
                batch_gold = gold[idx]                                                       # (B, K)
                best = rewards[idx].argmax(1, keepdim=True)                                  # (B, 1)
                metrics.update(gold_reward=batch_gold.mean(),
                               gold_reward_best=batch_gold.gather(1, best).mean())
            if evaluate_now and builtin and dist.is_main:
                # the policy's own samples on held-out prompts: what training has done so far (same seed
                # every time, so the points differ by the policy, not by the sampling noise)
                m, samples = evaluate(policy, enc, task.heldout_prompts()[: args.monitor_prompts],
                                      args.max_new_tokens, rms=rms, ref=ref, seed=args.seed, device=device,
                                      tool=tool)
                policy.train()
                metrics.update(eval_gold_reward=m["gold_reward_mean"], eval_rm_reward=m["rm_reward_mean"],
                               kl=m["kl_to_sft"])
            log(step, **metrics)
            if evaluate_now and builtin and dist.is_main:
                print_samples(samples, 2)
        if (step + 1) % args.ckpt_interval == 0 and step < last:
            dist.save_resume(args.out, policy, enc.name, args, step + 1, state, round=round_, order=order,
                             prompt_ids=prompt_ids, response_ids=response_ids, rewards=rewards, gold=gold)
    train_seconds = time.time() - t_start
    if not dist.is_main:  # rank 0 alone evaluates and writes the result; the others wait for it
        dist.barrier()
        sys.exit()

    # ---- final evaluation and save ----------------------------------------------------------------
    policy.eval()
    # held: the policy, the reward model(s) and the SFT copy (for the KL only); needed: the policy, the RM(s)
    extra = dict(train_seconds=train_seconds, peak_memory_mb=peak_memory_mb(device),
                 models_in_memory=1 + len(rms) + (ref is not None), models_needed=1 + len(rms),
                 world_size=dist.WORLD_SIZE)
    # the result is saved before anything that could fail, then again with the evaluation's numbers
    save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    if builtin and args.eval_prompts:
        prompts = task.heldout_prompts()[: args.eval_prompts]
        metrics, samples = evaluate(policy, enc, prompts, args.max_new_tokens, rms=rms, ref=ref,
                                    seed=args.seed, device=device, tool=tool)
        print_samples(samples)
        print(summary_line(metrics))
        if "gold_reward_mean" in ck["extra"]:
            print(f"SFT, as train_sft.py measured it: {summary_line(ck['extra'])}")
        save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, {**extra, **metrics})
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training")
    dist.barrier()  # the other ranks exit with this one
