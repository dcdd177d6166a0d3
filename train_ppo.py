"""Proximal Policy Optimization (PPO) from a reward model: the third stage of RLHF.

The policy is updated with PPO's clipped objective (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms") on a per-token reward: the reward model's score at the last response token minus a KL
penalty to a frozen reference copy of the SFT model at every token (Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences"; Ouyang et al. 2022, Eq. 2), with advantages from GAE
(Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation").

Four models are in memory:
    policy     pi       the SFT model, trained here
    reference  pi_ref   a frozen copy of the SFT model: the KL penalty keeps pi near it
    reward     r        the reward model(s) of train_rm.py, frozen: one score per response
    critic     V        a value per token; initialised from the reward model (it already reads
                        responses and knows what scores well), the common choice since Ziegler et al.;
                        the alternative, `--critic-init sft`, is the SFT trunk with a fresh head

One iteration: sample a response to each of `batch_size` prompts (KV cache, temperature T); score the
sequences with the four models; turn the score and the KL penalty into per-token rewards; GAE gives
advantages and returns; whiten the advantages; run `ppo_epochs` passes of shuffled minibatches of the
clipped policy and value losses.

Deviations from the papers, all common practice for language models: the log-probs are those of the
sampling distribution (logits / T), so the ratio and the KL are about the policy that acted; the value
loss is clipped; advantages are whitened per batch; answers that never emit EOS lose `missing_eos_penalty`
from their score. With the calculator, `--malformed-call-penalty` (off) also takes a fixed amount from
answers holding a malformed call (`rule_penalties`), since the reward model scores a call begun and never
closed far above a guess; measured over three reward-model seeds it did not keep PPO off such calls
(README, Results). The KL coefficient is fixed (beta 0.4, as InstructGPT fixes it), or adaptive (Ziegler et
al.) with `--kl-target`. Measured on the built-in task (the README's Results): beta 0.05 and 0.1 let PPO
collapse onto the reward model's blind spot (KL 10 to 18, every reply "I'm not sure."), 0.2 and 0.4 keep
it near the SFT model (KL 1.2 to 1.5) and beat it; and with the default horizon of 10,000 samples the
adaptive controller moves beta by at most 8% in a 60-step run of 64 samples: it cannot rescue a low beta.

    python train_ppo.py                                   # after train_sft.py and train_rm.py, CPU
    python train_ppo.py --reward-model out/rm_a:0.7 --reward-model out/rm_b:0.3   # several RMs, weighted
    python train_ppo.py --init out/sft --reward-model out/rm --device cuda --batch-size 256   # one GPU
    torchrun --standalone --nproc_per_node 8 train_ppo.py --device cuda --batch-size 256   # 8 GPUs, 32 each

A stopped run continues with `--resume` (policy, critic, both optimizers, KL coefficient and RNGs).
"""

import copy
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from minirlhf import dist, task
from minirlhf.checkpoint import load_model, remove_resume, save_checkpoint
from minirlhf.cli import (Log, arg, check_device, check_dtype, check_finite, fraction, nonnegative, one_of,
                          parse_args, peak_memory_mb, positive, require)
from minirlhf.data import left_pad, read_jsonl
from minirlhf.evaluate import evaluate, print_samples, summary_line
from minirlhf.model import ScalarHead, generate
from minirlhf.ops import last_index, masked_mean, masked_var, masked_whiten, token_logprobs
from minirlhf.reward import combined_reward, load_reward_models
from minirlhf.sampling import encode_prompts
from minirlhf.tokenizer import decode_response, eos_id, load_tokenizer


@dataclass
class Args:
    """PPO against a reward model, with a KL penalty to the SFT model."""
    # I/O
    out: str = arg("out/ppo", "output folder for the checkpoint and metrics.jsonl")
    init: str = arg("out/sft", "the SFT checkpoint: the initial policy and the frozen reference")
    data: str = arg("", "JSONL with a 'prompt' field per line; '' = the built-in task's training prompts")
    reward_model: list = arg(["out/rm"], "a reward model PATH[:WEIGHT]; several are summed with weights")
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    overwrite: bool = arg(False, "replace a finished run saved in --out")
    ckpt_interval: int = arg(20, "save out/ppo/resume.pt every this many iterations, for --resume", positive)
    # system
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu | cuda | cuda:N | auto", check_device)
    dtype: str = arg("auto", "float32 | bfloat16 (autocast, CUDA only) | auto", check_dtype)
    compile: bool = arg(False, "torch.compile the policy and critic forwards of the update (GPU)")
    threads: int = arg(0, "CPU threads (0: torch's default); a fixed count is bit-reproducible", nonnegative)
    # optimisation
    lr: float = arg(1e-4, "policy learning rate (Adam)", positive)
    grad_clip: float = arg(1.0, "clip each model's gradient norm", positive)
    batch_size: int = arg(64, "prompts (= responses) per rollout", positive)
    minibatch_size: int = arg(32, "responses per gradient step", positive)
    ppo_epochs: int = arg(4, "passes over each rollout", positive)
    # schedule and evaluation
    max_steps: int = arg(60, "PPO iterations (rollout + update)", positive)
    eval_interval: int = arg(20, "print decoded samples every this many iterations", positive)
    eval_prompts: int = arg(300, "held-out prompts for the final evaluation (0: none)", nonnegative)
    max_new_tokens: int = arg(88, "response length limit", positive)
    tool: bool = arg(True, "sample with the calculator of minirlhf/task.py, train on the policy's own tokens "
                     "only (--no-tool: without it)")
    # PPO
    critic_init: str = arg("rm", "rm: the critic starts as the (first) reward model; sft: SFT trunk + a head",
                           one_of("rm", "sft"))
    critic_lr: float = arg(1e-3, "critic learning rate", positive)
    temperature: float = arg(1.0, "sampling temperature; log-probs are taken at the same one", positive)
    clip_eps: float = arg(0.2, "PPO ratio clip", positive)
    vf_clip_eps: float = arg(0.2, "value clip, in reward units", positive)
    gamma: float = arg(1.0, "discount: 1, the episode is one short response", fraction)
    lam: float = arg(0.95, "GAE lambda", fraction)
    kl_coef: float = arg(0.4, "KL coefficient beta (the initial one, if adaptive)", nonnegative)
    kl_target: float = arg(0.0, "adaptive KL target in nats per response; 0 = fixed beta", nonnegative)
    kl_horizon: int = arg(10000, "adaptive KL horizon in samples (Ziegler et al.)", positive)
    missing_eos_penalty: float = arg(1.0, "subtracted from the score of a response that never emits EOS",
                                     nonnegative)
    malformed_call_penalty: float = arg(0.0, "with the tool: subtracted from the score of a response with "
                                        "a malformed calculator call (task.call_stats); off by default, see "
                                        "README", nonnegative)


# ---------------------------------------------------------------------------------------------------
# Forward passes shared by the rollout and the update (the same code, so the ratio starts at exactly 1)
# ---------------------------------------------------------------------------------------------------

def policy_forward(model, seqs, attention_mask, temperature):
    """Log-probs (B, T) of the tokens at temperature T (the sampling distribution), and entropies (B, T).

    Both aligned with `seqs`: position t is about token t, predicted from logits[:, t - 1].
    """
    logits = model(seqs, attention_mask).float() / temperature                # (B, T, V)
    logprobs = token_logprobs(logits, seqs)                                   # (B, T)
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)                      # (B, T-1, V)
    entropy = -(logp_all.exp() * logp_all).sum(-1)                            # (B, T-1)
    return logprobs, torch.cat([torch.zeros_like(entropy[:, :1]), entropy], dim=1)


def critic_forward(critic, seqs, attention_mask):
    """Values (B, T) aligned with the tokens: values[:, t] = V(prompt, y_<t), the state in which token t
    is chosen, read from the critic's output at position t - 1: the same shift as the log-probs. (The
    reward model, in contrast, is read at the last token itself: it scores the finished response.)"""
    v = critic(seqs, attention_mask).float()                                  # (B, T)
    return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)


# ---------------------------------------------------------------------------------------------------
# The KL penalty and the per-token reward
# ---------------------------------------------------------------------------------------------------

def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With d = log pi(y_t) - log pi_ref(y_t) = `logprobs - ref_logprobs` (any shape, e.g. (B, T)):

        "k1":  d                    unbiased, but a single sample can be negative (high variance)
        "k2":  d**2 / 2             never negative, biased (slightly, when pi is near pi_ref), low variance
        "k3":  exp(-d) - 1 + d      unbiased and never negative: (rho - 1) - log rho with rho = pi_ref / pi,
                                    i.e. k1 plus the zero-mean control variate rho - 1

    (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.) Expectations
    are under y_t ~ pi, so pass the log-probs of the tokens the policy actually sampled.

    Returns a tensor of the same shape as `logprobs`.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        # expm1: for the small d of a policy close to its reference, exp(-d) - 1 in float32 loses all
        # the digits of the d**2 / 2 that k3 is made of (and can even come out negative).
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1', 'k2' or 'k3'")


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token reward: the KL penalty at every response token, the score at the last one.

        R[b, t] = - beta * (log pi(y_t) - log pi_ref(y_t)) + [t = last_b] * s[b]    where mask[b, t] = 1
        R[b, t] = 0                                                                 where mask[b, t] = 0

    s = `scores` (B,): the reward model's score of each response; log pi = `logprobs` (B, T) and
    log pi_ref = `ref_logprobs` (B, T) of the sampled tokens; `mask` (B, T) 1 on the policy's tokens
    (0 on tool output, so the KL is summed over the policy's own tokens: the tool's were not sampled
    from pi); beta = `kl_coef`; last_b is the last position of row b where mask is 1.

    The KL term is the k1 estimate, as in Ziegler et al. (2019, Sec. 2.2) and InstructGPT (Ouyang et al.
    2022, Eq. 2): summed over a response it is the sequence-level log-ratio of the paper's
    R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)), spread over the tokens so that GAE can credit
    each one. A row with an empty mask gets no score (all zeros).

    Returns a (B, T) tensor.
    """
    T = logprobs.shape[1]
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, "k1") * mask  # (B, T)
    positions = torch.arange(T, device=mask.device)  # (T,)
    # An empty row has no last position (last_index gives T - 1 there): multiplying by the mask drops
    # its score instead of placing it on padding.
    is_last = (positions[None, :] == last_index(mask)[:, None]).to(mask.dtype) * mask  # (B, T)
    return rewards + scores.to(rewards.dtype)[:, None] * is_last


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------

def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the response tokens (Schulman et al. 2016, Sec. 3).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}       (i.e. sum_l (gamma * lam)^l * delta_{t+l})
        G_t     = A_t + V_t                             (the lambda-return: the critic's target)

    r = `rewards` (B, T), V = `values` (B, T) of the critic, `mask` (B, T) 1 on the policy's tokens;
    gamma = `gamma`, lam = `lam`. A row's valid positions may start and end anywhere in [0, T). After
    the last one the episode is over: V_{t+1} = 0 and A_{t+1} = 0, also for a response cut off at the
    length limit (we do not bootstrap from the critic there: the reward model has scored the response
    as it is, so there is no future reward to estimate).

    A response with tool output has holes: mask-0 positions between two of the policy's tokens. The
    tool's tokens are not actions but part of what the policy sees next, so the recursion skips them:
    t + 1 above is the row's next mask-1 position (V_{t+1} is the critic's value there, which has read
    the tool's output), and gamma discounts per action, not per token. Rewards at mask-0 positions are
    ignored. A contiguous mask gives exactly what it gave before holes were allowed.

    The loop runs over time only (T is short, B is the batch); the recursion is sequential in t.

    Returns (advantages, returns), each (B, T), 0 where `mask` is 0.
    """
    B, T = rewards.shape
    valid = mask.bool()
    # holes: mask 0 with a valid position on both sides (cumsums count the valid ones up to t, from t on)
    hole = ~valid & (valid.long().cumsum(1) > 0) & (valid.long().flip(1).cumsum(1).flip(1) > 0)  # (B, T)
    mask = mask.to(values.dtype)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # V_{t+1} (B,)
    next_advantage = torch.zeros_like(next_value)  # A_{t+1} (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Zeroing A_t where mask is 0 is what stops the recursion at the row's last valid position: the
        # step after it is padding, whose A (and V, below) is 0, so nothing from beyond flows back.
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages_reversed.append(advantage)
        # a hole hands on the V and A of the policy's next token unchanged, to the token before it
        next_value = torch.where(hole[:, t], next_value, values[:, t] * mask[:, t])
        next_advantage = torch.where(hole[:, t], next_advantage, advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# The PPO losses
# ---------------------------------------------------------------------------------------------------

def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """PPO's clipped surrogate objective, as a loss (Schulman et al. 2017, Eq. 7, negated).

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L     = masked mean over t of  max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    log pi = `logprobs` (B, T) of the policy being updated; log pi_old = `old_logprobs` (B, T) recorded
    at rollout time; A = `advantages` (B, T); `mask` (B, T); eps = `clip_eps`. The mean pools all
    masked tokens of the batch.

    max of the negated terms is min of the paper's: a pessimistic bound. Once rho has moved past
    1 + eps with A > 0 (or below 1 - eps with A < 0) the clipped term wins, it is constant in the
    parameters, and that token's gradient is exactly 0; moves that make the objective worse are never
    clipped.

    Returns a scalar.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


@torch.no_grad()
def ppo_policy_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> dict[str, torch.Tensor]:
    """Diagnostics of a PPO update, masked means over the (B, T) tokens (no gradient).

    approx_kl: KL(pi_old || pi) by the k3 estimator on the rollout tokens (sampled from pi_old):
               (rho - 1) - log rho with rho = pi / pi_old. Exactly 0 before the first update.
    clipfrac:  the fraction of tokens whose clipped term is strictly the larger in `ppo_policy_loss`,
               i.e. whose gradient the clip has set to 0. (A looser, also common definition counts every
               |rho - 1| > eps, including tokens where the unclipped term still wins.)

    Arguments as in `ppo_policy_loss`. Returns {"approx_kl": scalar, "clipfrac": scalar}.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return {
        "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask),
        "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
    }


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """Clipped value loss of the critic.

        V_clip = V_old + clip(V - V_old, -eps, eps)
        L      = 0.5 * masked mean over t of  max((V_t - G_t)**2, (V_clip_t - G_t)**2)

    V = `values` (B, T) of the critic being updated; V_old = `old_values` (B, T) at rollout time;
    G = `returns` (B, T) from `gae`; `mask` (B, T); eps = `clip_eps` (in units of the value itself).

    The squared error is the L^VF term of Schulman et al. 2017, Eq. 9; the clipping is not in the paper
    but in OpenAI's PPO implementations, used for language models since Ziegler et al. 2019. As with the
    policy, the max is pessimistic: once V has moved more than eps from V_old and the clipped prediction
    is the worse one, the token's gradient is 0.

    Returns a scalar.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    losses = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


@torch.no_grad()
def ppo_value_stats(values, old_values, returns, mask, clip_eps: float) -> dict[str, torch.Tensor]:
    """Diagnostics of the value update, masked means over the (B, T) tokens; arguments as in
    `ppo_value_loss`.

    vf_clipfrac: the fraction of tokens whose clipped squared error is strictly the larger, i.e. whose
                 value gradient the clip has set to 0;
    value_error: the mean of V_t - G_t (the critic's bias; 0 on average once it has learned).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped_wins = (values_clipped - returns) ** 2 > (values - returns) ** 2
    return {"vf_clipfrac": masked_mean(clipped_wins.to(values.dtype), mask),
            "value_error": masked_mean(values - returns, mask)}


# ---------------------------------------------------------------------------------------------------
# The KL coefficient
# ---------------------------------------------------------------------------------------------------

class AdaptiveKLController:
    """Adapts the KL coefficient beta to keep the measured KL near a target (Ziegler et al. 2019, Sec. 2.2).

        e     = clip(KL / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    `init_kl_coef` is the starting beta, `target` is KL_target, `horizon` sets the speed: n_steps /
    horizon is the paper's K_beta per step. The clip bounds one update to a relative change of
    0.2 * n_steps / horizon, so one noisy KL estimate cannot swing beta.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl`: the KL(pi || pi_ref) just measured; `n_steps`: samples (or steps) since the last."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass



def critic_from_reward_model(rm) -> ScalarHead:
    """A trainable copy of reward model `rm` whose output is on the scale of the reward PPO optimises.

    The reward is w * (s - mean) / std (minirlhf.reward), not the raw score s. A plain copy would start
    the critic off by a factor std / w and an offset mean, which its first updates would spend undoing.
    Folding the affine map into the head, w' = W * w / std and b' = (b - mean) * w / std, makes the
    copy's output at the last response token exactly the (single) reward model's term of the reward.
    """
    critic = copy.deepcopy(rm.model)
    scale = rm.weight / rm.std
    with torch.no_grad():
        critic.head.weight.mul_(scale)
        critic.head.bias.sub_(rm.mean).mul_(scale)
    return critic.requires_grad_(True)


def broken_calls(texts: list[str], with_tool: bool) -> torch.Tensor:
    """(B,) bool: the response holds a malformed calculator call (`task.call_stats`: "<calc>" never closed,
    or a call the calculator answered "error"); all False without the tool."""
    return torch.tensor([with_tool and task.call_stats(t)[1] > 0 for t in texts], dtype=torch.bool)


def rule_penalties(has_eos: torch.Tensor, broken: torch.Tensor, args) -> torch.Tensor:
    """(B,) what each response's score loses by rules that need no reward model: `missing_eos_penalty` if it
    never emitted EOS (`has_eos` (B,) bool), `malformed_call_penalty` if it holds a malformed call
    (`broken` (B,) bool, `broken_calls`). The sampler knows when a call went unanswered; the reward model
    sees only text, and on the built-in task it scores a call begun and never closed far above a guess
    (README, Results)."""
    return args.missing_eos_penalty * (~has_eos).float() + args.malformed_call_penalty * broken.float()


@torch.no_grad()
def rollout(policy, ref, critic, rms, enc, prompts, args, kl_coef, generator, tool=None):
    """Sample responses and compute everything the update needs; nothing here has a gradient.

    With a `tool`, its output is in `attn` but not in `mask` (the policy's tokens): the reward model and
    the critic read it, the KL penalty, GAE and the losses skip it."""
    device = next(policy.parameters()).device
    policy.eval()
    ids, _ = encode_prompts(enc, prompts, policy.config.block_size - args.max_new_tokens)
    idx, pmask = left_pad(ids, eos_id(enc))
    t0 = time.time()
    seqs, attn, mask = generate(policy, idx.to(device), pmask.to(device), args.max_new_tokens, eos_id(enc),
                                temperature=args.temperature, generator=generator, tool=tool)
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait, so that the time is the sampling's
    sample_seconds = time.time() - t0
    logprobs, entropy = policy_forward(policy, seqs, attn, args.temperature)
    ref_logprobs, _ = policy_forward(ref, seqs, attn, args.temperature)
    values = critic_forward(critic, seqs, attn)
    P = idx.size(1)
    # what the judge and the verifier read: every response token, the tool's output included (attn, not mask)
    texts = [decode_response(enc, row[a.bool()].tolist()) for row, a in zip(seqs[:, P:], attn[:, P:])]
    scores = combined_reward(rms, seqs, attn, mask)                          # (B,) at the last response token
    has_eos = seqs.gather(1, last_index(mask)[:, None]).squeeze(1) == eos_id(enc)
    broken = broken_calls(texts, tool is not None).to(device)
    scores = scores - rule_penalties(has_eos, broken, args)
    rewards = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)   # -beta kl_t (+ score at the end)
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)   # returns taken before whitening
    # whitened with the mean and std of the whole batch's tokens, every rank's (dist.gather), not this rank's
    advantages = dist.shard(masked_whiten(dist.gather(advantages), dist.gather(mask)))[:, :mask.size(1)]
    return dict(seqs=seqs, attn=attn, mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                advantages=advantages, returns=returns, scores=scores, entropy=entropy, has_eos=has_eos,
                broken=broken, texts=texts, sample_seconds=sample_seconds)


if __name__ == "__main__":
    args = parse_args(Args)

    # ---- device, dtype, seed ----------------------------------------------------------------------
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init(device)  # under torchrun: join the process group; cuda becomes cuda:LOCAL_RANK
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=(dtype == "bfloat16"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_rng = random.Random(args.seed)                           # which prompts each rollout
    # sampling and minibatch order: each rank samples its own prompts' responses with its own generator
    generator = torch.Generator(device=device).manual_seed(args.seed + dist.RANK)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models: policy, reference, reward model(s), critic ---------------------------------------
    policy, ck = load_model(args.init, device, kind="lm")
    enc = load_tokenizer(ck)
    tool = task.calculator_tool(enc) if args.tool else None  # the sampler's calculator; None: --no-tool
    block_size = policy.config.block_size
    require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens} must leave room for a "
            f"prompt in the context of {block_size} tokens")
    policy.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rms = load_reward_models(args.reward_model, device, tokenizer=enc.name, block_size=block_size)
    critic = (critic_from_reward_model(rms[0]) if args.critic_init == "rm"
              else ScalarHead(copy.deepcopy(policy)))
    critic.to(device)
    # The reference and reward models must never change: keep a copy of their weights to check at the end.
    frozen = [ref] + [rm.model for rm in rms]
    frozen_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    builtin = not args.data  # the gold judge and the held-out prompts: built-in task only
    print(f"policy/reference {policy.num_params() / 1e6:.2f}M parameters, tokenizer {enc.name}, device "
          f"{device}, dtype {dtype} | {len(rms)} reward model(s), critic from {args.critic_init}")

    # ---- data: prompts ----------------------------------------------------------------------------
    prompts = [r.prompt for r in read_jsonl(args.data, "auto")] if args.data else task.train_prompts()
    n_long = encode_prompts(enc, prompts, block_size - args.max_new_tokens)[1]
    if n_long:  # the rollout cuts them from the left, keeping the question's end and the "Assistant:" cue
        print(f"prompts: {n_long} of {len(prompts)} are longer than the {block_size - args.max_new_tokens} "
              "tokens the context leaves them, and lose their start")
    require(args.batch_size % args.minibatch_size == 0,
            f"--batch-size {args.batch_size} is not a multiple of --minibatch-size {args.minibatch_size}")
    # each of the W ranks rolls out B = batch_size / W prompts and updates on minibatches of M of them
    B, M = dist.split(args.batch_size, "--batch-size"), dist.split(args.minibatch_size, "--minibatch-size")

    # ---- optimizer --------------------------------------------------------------------------------
    fused = device.startswith("cuda")
    policy_opt = torch.optim.Adam(policy.parameters(), lr=args.lr, eps=1e-5, fused=fused)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5, fused=fused)
    kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.kl_target > 0
              else FixedKLController(args.kl_coef))
    # --compile speeds up the update's forwards only: the sampler feeds the model a new shape each step.
    # The rollout's log-probs stay eager, so the first ratio is 1 up to the compiled kernels' rounding.
    update_policy_forward = torch.compile(policy_forward) if args.compile else policy_forward
    update_critic_forward = torch.compile(critic_forward) if args.compile else critic_forward
    # under torchrun, DDP for the update (backward averages the gradients over the ranks); the rollout
    # samples and scores with the models themselves
    train_policy, train_critic = dist.wrap(policy), dist.wrap(critic)
    # what --resume restores besides the policy's weights
    state = dict(critic=critic, policy_opt=policy_opt, critic_opt=critic_opt, generator=generator,
                 data_rng=data_rng)
    start, saved = dist.resume_or_start(args, policy, state)
    kl_ctl.value = saved.get("kl_coef", kl_ctl.value)
    log = Log(args.out, first_step=start) if dist.is_main else dist.skip

    # ---- training loop ----------------------------------------------------------------------------
    last = args.max_steps - 1
    t_start = time.time()
    for step in tqdm(range(start, args.max_steps), "ppo", initial=start, total=args.max_steps,
                     disable=dist.tqdm_disable):
        t0 = time.time()
        batch_prompts = [prompts[data_rng.randrange(len(prompts))] for _ in range(args.batch_size)]
        batch_prompts = dist.shard(batch_prompts)  # this rank's B of the same global batch
        with autocast:
            b = rollout(policy, ref, critic, rms, enc, batch_prompts, args, kl_ctl.value, generator, tool)
        mask = b["mask"]
        t_rollout = time.time() - t0

        # PPO update: several epochs of shuffled minibatches over the same rollout
        policy.train()
        critic.train()
        stats = {}  # per minibatch: the two losses and what their stats twins report
        for epoch in range(args.ppo_epochs):
            perm = torch.randperm(B, generator=generator, device=device)
            for mb in perm.split(M):
                m = mask[mb]
                with autocast:
                    tokens, attn = b["seqs"][mb], b["attn"][mb]
                    logprobs, _ = update_policy_forward(train_policy, tokens, attn, args.temperature)
                    values = update_critic_forward(train_critic, tokens, attn)
                # token means over the minibatch's tokens on every rank (dist.batch_mean), of:
                # L_pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 +- eps)),  rho_t = pi / pi_old
                pg_loss = ppo_policy_loss(logprobs, b["logprobs"][mb], b["advantages"][mb], m, args.clip_eps)
                pg_loss = dist.batch_mean(pg_loss, m.sum())
                # L_vf = 0.5 mean_t max((V_t - G_t)^2, (V_old + clip(V_t - V_old) - G_t)^2)
                vf_loss = ppo_value_loss(values, b["values"][mb], b["returns"][mb], m, args.vf_clip_eps)
                vf_loss = dist.batch_mean(vf_loss, m.sum())
                check_finite(pg_loss + vf_loss, step, args.out)
                policy_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                (pg_loss + vf_loss).backward()   # separate models, so the sum just backpropagates both
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
                policy_opt.step()
                critic_opt.step()
                s = {**ppo_policy_stats(logprobs, b["logprobs"][mb], b["advantages"][mb], m, args.clip_eps),
                     **ppo_value_stats(values, b["values"][mb], b["returns"][mb], m, args.vf_clip_eps)}
                s = dist.batch_stats(s, m.sum())  # means over the minibatch's tokens, every rank's
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), *s.items()):
                    stats.setdefault(k, []).append(v.item())

        # the rollout's numbers are the whole batch's: every rank's rows (dist.gather), as one process's
        mask, entropy, scores, has_eos = (dist.gather(b[k]) for k in ("mask", "entropy", "scores", "has_eos"))
        # KL(pi || pi_ref) of this rollout, per response (summed over its tokens, k1); drives the controller
        kl = dist.gather(((b["logprobs"] - b["ref_logprobs"]) * b["mask"]).sum(1)).mean().item()
        kl_ctl.update(kl, args.batch_size)
        returns, old_values = dist.gather(b["returns"]), dist.gather(b["values"])
        explained_var = 1 - masked_var(returns - old_values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        metrics = dict(rm_reward=scores.mean(), kl=kl, kl_coef=kl_ctl.value,
                       entropy=masked_mean(entropy, mask), **{k: sum(v) / len(v) for k, v in stats.items()},
                       explained_var=explained_var, response_len=mask.sum(1).float().mean(),
                       eos_rate=has_eos.float().mean(),
                       first_approx_kl=stats["approx_kl"][0], rollout_ms=b["sample_seconds"] * 1000,
                       score_ms=(t_rollout - b["sample_seconds"]) * 1000, ms=(time.time() - t0) * 1000)
        if builtin:  # the gold reward of the rollout (the simulated human: training never sees it)
            gold = dist.gather_list([task.judge(p, t) for p, t in zip(batch_prompts, b["texts"])])
            metrics["gold_reward"] = sum(gold) / len(gold)
        if tool is not None:  # share of responses holding a malformed call (what malformed_call_penalty hits)
            metrics["malformed_call_rate"] = dist.gather(b["broken"]).float().mean()
        log(step, **metrics)
        evaluate_now = step % args.eval_interval == 0 or step == last
        if evaluate_now:
            for p, t in list(zip(batch_prompts, b["texts"]))[:3]:
                print(f"    {p!r:42} -> {t!r}")
        if (step + 1) % args.ckpt_interval == 0 and step < last:
            dist.save_resume(args.out, policy, enc.name, args, step + 1, state, kl_coef=kl_ctl.value)
    train_seconds = time.time() - t_start
    if not dist.is_main:  # rank 0 alone evaluates and writes the result; the others wait for it
        dist.barrier()
        sys.exit()

    # ---- final evaluation and save ----------------------------------------------------------------
    for before, m in zip(frozen_before, frozen):
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), "a frozen model changed"
    print("reference and reward models unchanged: ok")
    policy.eval()
    extra = dict(train_seconds=train_seconds, peak_memory_mb=peak_memory_mb(device),
                 models_in_memory=3 + len(rms), kl_coef=kl_ctl.value, world_size=dist.WORLD_SIZE)
    # the result is saved before anything that could fail, then again with the evaluation's numbers
    save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    if builtin and args.eval_prompts:
        prompts = task.heldout_prompts()[: args.eval_prompts]
        metrics, samples = evaluate(policy, enc, prompts, args.max_new_tokens, rms=rms, ref=ref,
                                    seed=args.seed, device=device, tool=tool)
        print_samples(samples)
        print(summary_line(metrics))
        save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, {**extra, **metrics})
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training")
    dist.barrier()  # the other ranks exit with this one
