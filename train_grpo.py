"""Group Relative Policy Optimization (GRPO): PPO without a critic, from a reward model or a verifier.

Sample G responses to each prompt; a response's advantage is its reward relative to its group's,
A_i = (r_i - mean(r)) / std(r), given to every one of its tokens; update the policy with PPO's clipped
ratio and a KL penalty to a frozen reference inside the loss (Shao et al. 2024, "DeepSeekMath: Pushing the
Limits of Mathematical Reasoning in Open Language Models", Sec. 4.1, Eq. 3 and 4; used for DeepSeek-R1).
The group's mean is the baseline a critic would have learned: no value model, no GAE.
`group_advantages` and `grpo_loss` below are the whole algorithm; the rest of the file is plumbing:

    for each step: B prompts, G samples each (B * G responses, a group contiguous) -> rewards (B * G,)
        -> group_advantages -> ppo_epochs passes over minibatches of whole groups -> grpo_loss

Models in memory: the policy, the frozen reference, and the reward model(s) of train_rm.py; or, with
`--reward verifier`, no reward model at all: `minirlhf.task.verify` checks each answer the way a unit
test checks code (+1 right, -1 wrong, 0.3 for "I don't know" on a hard question) and knows nothing of
politeness or length (RLVR: Lambert et al. 2024, "Tulu 3"; DeepSeek-R1's rule-based rewards). A
learned reward model teaches what its labelers saw at a glance; a verifier teaches correctness only.

Deviations from the paper, all common practice:
- The log-probs are those of the sampling distribution (logits / T), as in train_ppo.py, so the ratio
  and the KL are about the policy that acted.
- A response that never emits EOS loses `missing_eos_penalty` from its reward (a program that does
  not terminate fails its test), with either reward.
- `--loss-agg` chooses how tokens are pooled (see `grpo_loss`): the paper's per-response mean ("grpo"),
  DAPO's token mean ("token", Yu et al. 2025) or Dr. GRPO's constant ("dr_grpo", Liu et al. 2025, who
  also drop the division by the group's std: `--no-scale-by-std`). Dr. GRPO's constant is the padded
  width of the rollout's (B, T) tensors, which here changes from step to step with the longest prompt
  and response; the paper uses the generation budget.
- beta depends on the reward (`--kl-coef`): the paper's 0.04 with the verifier, 0.4 with a reward model.
  A verifier cannot be fooled, a reward model can: with 0.04 and 270 steps, GRPO against this project's
  reward model said "Sorry, I don't know." to everything (gold -0.84, KL 23.5 nats); with 0.4, gold
  +0.33 and KL 1.0. The verifier with 0.4 learns less (gold +0.45 against +0.58; right on 0.63 of the hard
  questions against 0.78). The stages' own evaluations on the 300 held-out prompts, one sample each.
  At 400 steps 0.4 no longer holds the reward model: gold -0.21, KL 9.5 (the verifier: +0.63), so the
  step count depends on the reward too (`--max-steps`): 270 with a reward model, 400 with the verifier.
- The default is one pass over each rollout (`--ppo-epochs 1`) in two minibatches of whole groups: the
  first minibatch is on-policy (ratio exactly 1, the clip idle), the second already slightly off.
  Sized for a CPU: 400 steps of 4 prompts x G = 8 with the verifier, 12,800 sampled responses (8,640 in
  270 steps with a reward model; PPO's default samples 3,840 and makes four passes over each). With 45
  steps GRPO with the verifier had seen too few hard questions (about 26) to learn the calculator; with
  135 it called it on 0.61 of the held-out hard questions and still abstained on 0.32; with 270 it called
  on 0.93, right on 0.78 and wrong on 0.22; with 400 it is wrong on 0.15, and right on 0.80 of the sums
  (0.66 at 270; see the README's Results).

Logged every step (metrics.jsonl; printed): `loss`, and from `grpo_stats` `pg_loss`, `kl` (k3 to the
reference, per token), `approx_kl` (k3 between the rollout policy and the updated one; `first_approx_kl`,
the first minibatch's, is exactly 0), `clipfrac`, `ratio_*` and `adv_*`; then the rollout's `reward`
mean and std over the batch, `group_reward_std` (the mean std within a group: the signal GRPO feeds on),
`zero_var_groups` (the share of groups whose rewards are all equal: zero advantages, no gradient),
`response_len` (tokens), `entropy`, `eos_rate`, `gold_reward` (task.judge of the batch, built-in task),
`grad_norm`, `lr`. Every --eval-interval steps, from the policy's samples on held-out prompts:
`eval_gold_reward`, `eval_correct_<kind>` (each prompt kind's share of right answers, for the kinds
among the --monitor-prompts) and `kl_to_sft`.

    python train_grpo.py                                  # after train_sft.py and train_rm.py, CPU, ~5 min
    python train_grpo.py --reward verifier --out out/grpo_verifier     # no reward model: the task's check
    python train_grpo.py --data qa.jsonl --reward verifier  # prompts with an "answer" field each
    python train_grpo.py --device cuda --batch-size 64 --group-size 16 --minibatch-size 16    # one GPU
    torchrun --standalone --nproc_per_node 8 train_grpo.py --device cuda --batch-size 64 \
        --group-size 16 --minibatch-size 16            # 8 GPUs: 8 prompts' groups each, 2 per minibatch

Reads out/sft (policy init and reference) and out/rm (`--reward-model PATH[:WEIGHT]`, repeatable);
writes out/grpo/ckpt.pt and out/grpo/metrics.jsonl. A stopped run continues with `--resume`.
"""

import copy
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from minirlhf import dist, task
from minirlhf.checkpoint import load_model, remove_resume, save_checkpoint
from minirlhf.cli import (Log, arg, check_device, check_dtype, check_finite, nonnegative, one_of, parse_args,
                          peak_memory_mb, positive, require, warmup_cosine)
from minirlhf.data import left_pad, read_jsonl
from minirlhf.evaluate import evaluate, print_samples, summary_line
from minirlhf.model import generate
from minirlhf.ops import last_index, masked_mean, token_logprobs
from minirlhf.reward import combined_reward, load_reward_models
from minirlhf.sampling import encode_prompts
from minirlhf.tokenizer import decode_response, eos_id, load_tokenizer


@dataclass
class Args:
    """GRPO against a reward model or a verifier, with a KL penalty to the SFT model."""
    # I/O
    out: str = arg("out/grpo", "output folder for the checkpoint and metrics.jsonl")
    init: str = arg("out/sft", "the SFT checkpoint: the initial policy and the frozen reference")
    data: str = arg("", "JSONL of prompts ('answer' fields for the verifier); '' = the built-in task's")
    reward_model: list = arg(["out/rm"], "a reward model PATH[:WEIGHT]; several are summed with weights")
    reward: str = arg("rm", "rm: the --reward-model(s); verifier: check the answer (task.verify), no model",
                      one_of("rm", "verifier"))
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    overwrite: bool = arg(False, "replace a finished run saved in --out")
    ckpt_interval: int = arg(15, "save out/grpo/resume.pt every this many steps, for --resume", positive)
    # system
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu | cuda | cuda:N | auto", check_device)
    dtype: str = arg("auto", "float32 | bfloat16 (autocast, CUDA only) | auto", check_dtype)
    compile: bool = arg(False, "torch.compile the update's policy forward (GPU)")
    threads: int = arg(0, "CPU threads (0: torch's default); a fixed count is bit-reproducible", nonnegative)
    # optimisation
    lr: float = arg(2e-4, "peak learning rate (Adam; linear warmup, cosine decay to lr/10)", positive)
    warmup_steps: int = arg(5, "learning-rate warmup", nonnegative)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", positive)
    batch_size: int = arg(4, "prompts per step, each with G responses (batch_size * G sequences)", positive)
    # schedule and evaluation
    max_steps: int = arg(-1, "GRPO iterations (rollout + update); -1: by --reward, 270 with a reward model "
                         "(more over-optimise it), 400 with the verifier",
                         lambda v: None if v > 0 or v == -1 else "must be positive, or -1 (by --reward)")
    eval_interval: int = arg(15, "sample the policy on held-out prompts every this many steps", positive)
    eval_prompts: int = arg(300, "held-out prompts for the final evaluation (0: none)", nonnegative)
    max_new_tokens: int = arg(88, "response length limit when sampling", positive)
    tool: bool = arg(True, "sample with the calculator of minirlhf/task.py, train on the policy's own tokens "
                     "only (--no-tool: without it)")
    monitor_prompts: int = arg(64, "built-in task: held-out prompts for the interval evaluations", positive)
    # GRPO
    group_size: int = arg(8, "G, responses sampled per prompt: the group that gives the baseline", positive)
    minibatch_size: int = arg(2, "prompts (whole groups of G) per gradient step", positive)
    ppo_epochs: int = arg(1, "passes over each rollout (1: old_logprobs are the rollout's)", positive)
    temperature: float = arg(1.0, "sampling temperature; the log-probs are taken at the same one", positive)
    clip_eps: float = arg(0.2, "PPO ratio clip", positive)
    kl_coef: float = arg(-1.0, "beta, the weight of the k3 KL to the reference in the loss; -1: by --reward, "
                         "0.4 with a reward model (it can be fooled), 0.04 with the verifier (the paper's)",
                         lambda v: None if v >= 0 or v == -1 else "must be >= 0, or -1 (chosen by --reward)")
    loss_agg: str = arg("grpo", "grpo (mean of response means) | token (token mean) | dr_grpo (sum / B*T)",
                        one_of("grpo", "token", "dr_grpo"))
    scale_by_std: bool = arg(True, "divide advantages by the group's std (--no-scale-by-std: Dr. GRPO)")
    missing_eos_penalty: float = arg(1.0, "subtracted from the reward of a response that never emits EOS",
                                     nonnegative)


# ---------------------------------------------------------------------------------------------------
# The policy's log-probs (the same code for the rollout and the update, so the ratio starts at exactly 1)
# ---------------------------------------------------------------------------------------------------

def policy_forward(model, seqs, attention_mask, temperature):
    """Log-probs (B, T) of the tokens at temperature T (the sampling distribution), and entropies (B, T).

    Both aligned with `seqs`: position t is about token t, predicted from logits[:, t - 1].
    """
    logits = model(seqs, attention_mask).float() / temperature                # (B, T, V)
    logprobs = token_logprobs(logits, seqs)                                   # (B, T)
    with torch.no_grad():  # a diagnostic: no gradient, and no (B, T, V) tensor kept for backward
        logp_all = torch.log_softmax(logits[:, :-1], dim=-1)                  # (B, T-1, V)
        entropy = -(logp_all.exp() * logp_all).sum(-1)                        # (B, T-1)
    return logprobs, torch.cat([torch.zeros_like(entropy[:, :1]), entropy], dim=1)


# ---------------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True) -> torch.Tensor:
    """Each response's reward relative to the other responses to its prompt (Shao et al. 2024, Sec. 4.1.2).

        scale_by_std=True:   A_i = (r_i - mean_g) / (std_g + 1e-4)      (GRPO's outcome supervision)
        scale_by_std=False:  A_i =  r_i - mean_g                        (Dr. GRPO, Liu et al. 2025)

    r = `rewards` (B,), B = n_prompts * G with G = `group_size`, each prompt's G responses contiguous;
    mean_g and std_g are over the group of r_i, std_g the sample standard deviation (n - 1, torch.std).
    The 1e-4 keeps a group of near-equal rewards finite; it is not an epsilon for equal ones: a group
    whose rewards are all equal carries no signal and gets advantages of exactly 0 (r_i - mean_g in
    floating point can be a rounding error instead), so its responses add no gradient.

    Dividing by std_g makes every group's advantages the same size, so a prompt whose samples barely
    differ (a nearly solved one, or a hopeless one) weighs as much as one that is still being learned:
    the question-difficulty bias that Dr. GRPO removes by not dividing.

    Returns (B,).
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size)                                       # (n_prompts, G)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:  # (one sample has no std; its advantage is 0 below)
        advantages = advantages / (r.std(dim=1, keepdim=True) + 1e-4)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)       # (n_prompts, 1): G = 1 too
    return torch.where(flat, torch.zeros_like(advantages), advantages).view(-1)


# ---------------------------------------------------------------------------------------------------
# The GRPO loss
# ---------------------------------------------------------------------------------------------------

def grpo_token_terms(logprobs, old_logprobs, ref_logprobs, advantages, clip_eps):
    """The per-token quantities that `grpo_loss` and `grpo_stats` share, each (B, T):
    ratio rho_t, its unclipped and clipped surrogate terms, the surrogate s_t (their min) and KL_t (k3)."""
    ratio = torch.exp(logprobs - old_logprobs)                                # (B, T)
    A = advantages[:, None]                                                   # (B, 1): one per response
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * A
    surrogate = torch.minimum(unclipped, clipped)
    # k3 = exp(ref - lp) - (ref - lp) - 1; expm1 keeps the digits of a small log-ratio (train_ppo.kl_penalty)
    d = ref_logprobs - logprobs
    kl = torch.expm1(d) - d
    return ratio, unclipped, clipped, surrogate, kl


def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Pool (B, T) per-token values over the tokens where mask is 1 (see `grpo_loss`) -> scalar."""
    mask = mask.to(x.dtype)
    if loss_agg == "grpo":
        n_tokens = mask.sum(dim=1)                                            # (B,)
        per_response = (x * mask).sum(dim=1) / n_tokens.clamp(min=1)          # (B,)
        nonempty = (n_tokens > 0).to(x.dtype)                                 # empty rows are left out
        return (per_response * nonempty).sum() / nonempty.sum().clamp(min=1)
    if loss_agg == "token":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if loss_agg == "dr_grpo":
        return (x * mask).sum() / mask.numel()
    raise ValueError(f"unknown loss aggregation {loss_agg!r}: expected 'grpo', 'token' or 'dr_grpo'")


def aggregate_count(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """What `aggregate` divides by: the responses with a token ("grpo"), the tokens ("token"), B * T
    ("dr_grpo"), so that dist.batch_mean pools the ranks' losses with the same weights. (Under torchrun
    Dr. GRPO's constant becomes the sum over ranks of B_r * T_r, each rank's rollout padded to its own T.)"""
    mask = mask.to(torch.float32)
    if loss_agg == "grpo":
        return (mask.sum(dim=1) > 0).sum()
    return mask.sum() if loss_agg == "token" else torch.tensor(float(mask.numel()))


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
    loss_agg: str = "grpo",
) -> torch.Tensor:
    """GRPO's objective as a loss (Shao et al. 2024, Eq. 3, negated, with the k3 KL of Eq. 4).

        rho_t  = exp(log pi(y_t) - log pi_old(y_t))
        s_t    = min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps) * A)
        KL_t   = exp(log pi_ref(y_t) - log pi(y_t)) - (log pi_ref(y_t) - log pi(y_t)) - 1
        l_t    = -(s_t - beta * KL_t)

    log pi = `logprobs` (B, T) of the policy being updated; log pi_old = `old_logprobs` (B, T) recorded at
    rollout time; log pi_ref = `ref_logprobs` (B, T) of the frozen reference; A = `advantages` (B,), one
    per response, broadcast over its tokens; `mask` (B, T) 1 on response tokens (0 on prompt, padding and
    tool output); eps = `clip_eps`; beta = `kl_coef`. The l_t are pooled over the tokens where mask is 1,
    with |o_i| the number of response i's tokens and T = `mask.shape[1]`:

        "grpo"     (1/B') sum_i (1/|o_i|) sum_t l_{i,t}   the paper's mean of per-response means, over
                                                          the B' responses with at least one token
        "token"    sum_{i,t} l_{i,t} / sum_i |o_i|        DAPO's token-level mean (Yu et al. 2025)
        "dr_grpo"  sum_{i,t} l_{i,t} / (B * T)            Dr. GRPO's constant (Liu et al. 2025)

    What each does to long and short responses (the length bias Dr. GRPO points out). "grpo" gives every
    response the same total weight, so a token of a long response weighs 1/|o_i|, less than a token of a
    short one: a right answer is pushed up harder when it is short, and a wrong answer is pushed down
    more gently when it is long, so wrong answers drift longer. "token" weighs every token of the batch
    the same, so a long response counts in proportion to its length, and no sign of A favours a length;
    but the weight of a token still depends on how long the other responses of the batch are. "dr_grpo"
    weighs every token by the same constant: the gradient is the plain sequence-level policy gradient
    sum_t A grad log pi(y_t), a response's pull grows with its length exactly as its log-likelihood does,
    and no batch statistic enters (the loss's scale shrinks with padding instead).

    The min is PPO's pessimistic bound: once rho is past 1 + eps with A > 0 (or below 1 - eps with A < 0)
    the clipped term wins and is constant, so that token's surrogate gradient is exactly 0. The KL sits in
    the loss, not in the reward as in PPO, so it does not enter the advantages; k3 is an unbiased, never
    negative estimate of KL(pi || pi_ref) from tokens sampled from pi (here pi_old, close to pi).

    Returns a scalar.
    """
    _, _, _, surrogate, kl = grpo_token_terms(logprobs, old_logprobs, ref_logprobs, advantages, clip_eps)
    return aggregate(-(surrogate - kl_coef * kl), mask, loss_agg)


@torch.no_grad()
def grpo_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    loss_agg: str = "grpo",
) -> dict[str, torch.Tensor]:
    """Diagnostics of a GRPO update from the quantities `grpo_loss` computes (no gradient).

    pg_loss:    the surrogate part of the loss, -s_t pooled by `loss_agg` (loss = pg_loss + beta * KL part)
    kl:         KL(pi || pi_ref) by k3, the masked mean over tokens: what the penalty holds down
    approx_kl:  KL(pi_old || pi) by k3 on the rollout tokens, the masked token mean; 0 when on-policy
    clipfrac:   the share of tokens whose clipped term is strictly the smaller, i.e. whose gradient the
                clip has set to 0
    ratio_mean, ratio_min, ratio_max: of rho_t over the tokens
    adv_mean, adv_std, adv_abs_max: of A over the responses with at least one token

    Arguments as in `grpo_loss`. Returns a dict of scalars.
    """
    ratio, unclipped, clipped, surrogate, kl = grpo_token_terms(logprobs, old_logprobs, ref_logprobs,
                                                                advantages, clip_eps)
    m = mask.bool()
    d = logprobs - old_logprobs
    adv = advantages[m.any(dim=1)].to(logprobs.dtype)
    r = ratio[m] if m.any() else torch.ones(1, dtype=ratio.dtype, device=ratio.device)
    return {
        "pg_loss": aggregate(-surrogate, mask, loss_agg),
        "kl": masked_mean(kl, mask),
        "approx_kl": masked_mean(torch.expm1(d) - d, mask),
        "clipfrac": masked_mean((clipped < unclipped).to(logprobs.dtype), mask),
        "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
        "adv_mean": adv.mean() if adv.numel() else adv.new_zeros(()),
        "adv_std": adv.std() if adv.numel() > 1 else adv.new_zeros(()),
        "adv_abs_max": adv.abs().max() if adv.numel() else adv.new_zeros(()),
    }


# ---------------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(policy, ref, rms, enc, prompts, answers, args, generator, tool=None):
    """G responses to each prompt, their rewards and group advantages; nothing here has a gradient.

    `prompts`, `answers`: n each (an answer is None for a built-in prompt); `rms` empty = the verifier.
    Sequences come out in groups: rows g * G ... g * G + G - 1 answer prompts[g]. With a `tool`, its
    output is in `attn` but not in `mask` (the policy's tokens): the reward reads it, the loss does not.
    """
    device = next(policy.parameters()).device
    G = args.group_size
    prompts = [p for p in prompts for _ in range(G)]
    answers = [a for a in answers for _ in range(G)]
    policy.eval()
    ids, _ = encode_prompts(enc, prompts, policy.config.block_size - args.max_new_tokens)
    idx, pmask = left_pad(ids, eos_id(enc))
    seqs, attn, mask = generate(policy, idx.to(device), pmask.to(device), args.max_new_tokens, eos_id(enc),
                                temperature=args.temperature, generator=generator, tool=tool)
    logprobs, entropy = policy_forward(policy, seqs, attn, args.temperature)
    ref_logprobs, _ = policy_forward(ref, seqs, attn, args.temperature)
    P = idx.size(1)
    # what the judge and the verifier read: every response token, the tool's output included (attn, not mask)
    texts = [decode_response(enc, row[a.bool()].tolist()) for row, a in zip(seqs[:, P:], attn[:, P:])]
    if rms:
        scores = combined_reward(rms, seqs, attn, mask)                      # (B,) at the last response token
    else:
        scores = torch.tensor([task.verify(p, t, a) for p, t, a in zip(prompts, texts, answers)])
    has_eos = seqs.gather(1, last_index(mask)[:, None]).squeeze(1) == eos_id(enc)
    scores = scores.to(device).float() - args.missing_eos_penalty * (~has_eos).float()
    advantages = group_advantages(scores, G, args.scale_by_std)               # (B,)
    return dict(seqs=seqs, attn=attn, mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                entropy=entropy, scores=scores, advantages=advantages, has_eos=has_eos, prompts=prompts,
                texts=texts)


def by_reward(args: Args) -> Args:
    """Resolve the defaults that depend on the reward (-1: see "Deviations" above). A learned reward needs
    the tighter leash, beta 0.4 (the verifier: the paper's 0.04), and fewer steps, 270 (the verifier: 400):
    past about 270 the policy finds the reward model's blind spots. An explicit value is kept."""
    rm = args.reward == "rm"
    return replace(args, kl_coef=(0.4 if rm else 0.04) if args.kl_coef == -1 else args.kl_coef,
                   max_steps=(270 if rm else 400) if args.max_steps == -1 else args.max_steps)


if __name__ == "__main__":
    args = by_reward(parse_args(Args))

    # ---- device, dtype, seed ----------------------------------------------------------------------
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init(device)  # under torchrun: join the process group; cuda becomes cuda:LOCAL_RANK
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=(dtype == "bfloat16"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_rng = random.Random(args.seed)                                # which prompts each step
    # sampling and minibatch order: each rank samples its own prompts' groups with its own generator
    generator = torch.Generator(device=device).manual_seed(args.seed + dist.RANK)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models: the policy, the frozen reference, the reward model(s) unless the verifier ----------
    policy, ck = load_model(args.init, device, kind="lm")
    enc = load_tokenizer(ck)
    tool = task.calculator_tool(enc) if args.tool else None  # the sampler's calculator; None: --no-tool
    block_size = policy.config.block_size
    require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens} must leave room for a "
            f"prompt in the context of {block_size} tokens")
    require(args.batch_size % args.minibatch_size == 0,
            f"--batch-size {args.batch_size} is not a multiple of --minibatch-size {args.minibatch_size}")
    require(args.group_size >= 2, f"--group-size {args.group_size}: a group needs 2 responses or more")
    # each of the W ranks samples the groups of B = batch_size / W prompts (a group never straddles two
    # ranks) and updates on minibatches of M of its groups
    B, M = dist.split(args.batch_size, "--batch-size"), dist.split(args.minibatch_size, "--minibatch-size")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rms = load_reward_models(args.reward_model, device, enc.name, block_size) if args.reward == "rm" else []
    # The reference and reward models must never change: keep a copy of their weights to check at the end.
    frozen = [ref] + [rm.model for rm in rms]
    frozen_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    print(f"policy/reference: {policy.num_params() / 1e6:.2f}M parameters from {args.init}, tokenizer "
          f"{enc.name}, device {device}, dtype {dtype} | reward: "
          + (" + ".join(f"{r.weight:g} * {r.path}" for r in rms) or "the verifier (task.verify)"))

    # ---- data: prompts (and, for the verifier, their answers) --------------------------------------
    if args.data:
        records = read_jsonl(args.data, "auto")
        prompts, answers = [r.prompt for r in records], [getattr(r, "answer", None) for r in records]
        for i, (p, a) in enumerate(zip(prompts, answers) if args.reward == "verifier" else []):
            require(a is not None, f"{args.data}: record {i + 1}: field 'answer': missing, and --reward "
                    "verifier needs one in every record ({\"prompt\": ..., \"answer\": ...} lines)")
            require(task.verify(p, a, a) == 1.0, f"{args.data}: record {i + 1}: field 'answer': {a!r} does "
                    "not read back as an answer to its prompt (see task.verify)")
    else:
        prompts = task.train_prompts()
        answers = [None] * len(prompts)                 # the verifier computes each from the prompt
    builtin = not args.data  # the gold judge and the held-out prompts: built-in task only
    max_prompt = block_size - args.max_new_tokens       # prompts are cut from the left to fit
    n_long = encode_prompts(enc, prompts, max_prompt)[1]
    print(f"data: {len(prompts)} prompts; {args.batch_size} per step x G = {args.group_size} responses each"
          + (f"; {n_long} longer than the {max_prompt} tokens the context leaves them lose their start"
             if n_long else ""))

    # ---- optimizer --------------------------------------------------------------------------------
    # Adam with eps 1e-5, as train_ppo.py: the RL stages' optimizer (no weight decay on a policy that a
    # KL penalty already holds near its reference)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr, eps=1e-5, fused=device.startswith("cuda"))
    lr_at = lambda step: warmup_cosine(step, args.lr, args.warmup_steps, args.max_steps)  # noqa: E731
    # --compile speeds up the update's forward only: the sampler feeds the model a new shape each step.
    update_forward = torch.compile(policy_forward) if args.compile else policy_forward
    train_policy = dist.wrap(policy)  # under torchrun, DDP for the update; the rollout uses the policy itself
    state = dict(optimizer=optimizer, data_rng=data_rng, generator=generator)  # what --resume restores
    start, _ = dist.resume_or_start(args, policy, state)
    log = Log(args.out, first_step=start) if dist.is_main else dist.skip

    # ---- training loop ----------------------------------------------------------------------------
    G, last = args.group_size, args.max_steps - 1
    t_start = time.time()
    for step in tqdm(range(start, args.max_steps), "grpo", initial=start, total=args.max_steps,
                     disable=dist.tqdm_disable):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        pick = dist.shard([data_rng.randrange(len(prompts)) for _ in range(args.batch_size)])  # this rank's B
        with autocast:
            b = rollout(policy, ref, rms, enc, [prompts[i] for i in pick], [answers[i] for i in pick], args,
                        generator, tool)
        mask = b["mask"]
        t_rollout = time.time() - t0

        # the update: ppo_epochs passes over the rollout, in minibatches of whole groups
        policy.train()
        losses, stats, grad_norms = [], [], []
        for epoch in range(args.ppo_epochs):
            perm = torch.randperm(B, generator=generator, device=device)  # groups, not rows
            for groups in perm.split(M):
                mb = (groups[:, None] * G + torch.arange(G, device=device)).view(-1)  # each group's G rows
                with autocast:
                    logprobs, _ = update_forward(train_policy, b["seqs"][mb], b["attn"][mb], args.temperature)
                inputs = (logprobs, b["logprobs"][mb], b["ref_logprobs"][mb], b["advantages"][mb], mask[mb])
                # l_t = -(min(rho_t A, clip(rho_t, 1 +- eps) A) - beta * KL3_t), pooled by --loss-agg over
                # the minibatch's rows on every rank (dist.batch_mean)
                loss = grpo_loss(*inputs, args.clip_eps, args.kl_coef, args.loss_agg)
                loss = dist.batch_mean(loss, aggregate_count(mask[mb], args.loss_agg))
                check_finite(loss, step, args.out)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip).item())
                optimizer.step()
                losses.append(loss.item())
                # of the minibatch's rows on every rank (dist.gather): its min, max and std are the batch's
                stats.append(grpo_stats(*map(dist.gather, inputs), args.clip_eps, args.loss_agg))

        # the rollout's numbers are the whole batch's: every rank's rows (dist.gather), as one process's
        mask, entropy, has_eos = (dist.gather(b[k]) for k in ("mask", "entropy", "has_eos"))
        r = dist.gather(b["scores"]).view(-1, G)                                     # (batch_size, G)
        metrics = dict(loss=sum(losses) / len(losses),
                       **{k: sum(s[k].item() for s in stats) / len(stats) for k in stats[0]},
                       first_approx_kl=stats[0]["approx_kl"], reward=r.mean(), reward_std=r.std(),
                       group_reward_std=r.std(dim=1).mean(),
                       zero_var_groups=(r.amax(1) == r.amin(1)).float().mean(),    # no signal: A = 0
                       response_len=mask.sum(1).float().mean(), entropy=masked_mean(entropy, mask),
                       eos_rate=has_eos.float().mean())
        if builtin:
            gold = dist.gather_list([task.judge(p, t) for p, t in zip(b["prompts"], b["texts"])])
            metrics["gold_reward"] = sum(gold) / len(gold)
        metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), lr=lr_at(step),
                       rollout_ms=t_rollout * 1000, ms=(time.time() - t0) * 1000)
        evaluate_now = step % args.eval_interval == 0 or step == last
        if evaluate_now and builtin and dist.is_main:
            # the policy's own samples on held-out prompts (same seed every time: the points differ by the
            # policy, not by the sampling noise): gold reward, each kind's correct rate, KL to the SFT model
            m, samples = evaluate(policy, enc, task.heldout_prompts()[: args.monitor_prompts],
                                  args.max_new_tokens, rms=rms, ref=ref, seed=args.seed, device=device,
                                  tool=tool)
            metrics.update(eval_gold_reward=m["gold_reward_mean"], kl_to_sft=m["kl_to_sft"],
                           **{f"eval_correct_{k}": v for k, v in m["correct_rate_by_kind"].items()})
        log(step, **metrics)
        if evaluate_now:
            for p, t, s in list(zip(b["prompts"], b["texts"], b["scores"].tolist()))[::G][:3]:
                print(f"  {p!r:42} -> {t!r} (reward {s:+.2f})")
        if (step + 1) % args.ckpt_interval == 0 and step < last:
            dist.save_resume(args.out, policy, enc.name, args, step + 1, state)
    train_seconds = time.time() - t_start
    if not dist.is_main:  # rank 0 alone evaluates and writes the result; the others wait for it
        dist.barrier()
        sys.exit()

    # ---- checks, final evaluation and save -------------------------------------------------------
    for before, m in zip(frozen_before, frozen):
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), "a frozen model changed"
    print("reference" + (" and reward models" if rms else "") + " unchanged: ok")
    policy.eval()
    # held and needed: the policy, the reference and the reward model(s); the verifier is a function
    extra = dict(train_seconds=train_seconds, peak_memory_mb=peak_memory_mb(device),
                 models_in_memory=2 + len(rms), world_size=dist.WORLD_SIZE)
    # the result is saved before anything that could fail, then again with the evaluation's numbers
    save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    if builtin and args.eval_prompts:
        prompts = task.heldout_prompts()[: args.eval_prompts]
        metrics, samples = evaluate(policy, enc, prompts, args.max_new_tokens, rms=rms, ref=ref,
                                    seed=args.seed, device=device, tool=tool)
        print_samples(samples)
        print(summary_line(metrics))
        shares = " | ".join(f"{c} {metrics['gold_' + c]:+.3f}" for c in task.WEIGHTS)
        print(f"gold reward by criterion: {shares}")  # their sum is the gold reward
        if "gold_reward_mean" in ck["extra"]:
            print(f"SFT, as train_sft.py measured it: {summary_line(ck['extra'])}")
        save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, {**extra, **metrics})
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training")
    dist.barrier()  # the other ranks exit with this one
