"""DPO: Direct Preference Optimization (Rafailov et al. 2023), preference learning without a reward model.

No reward model, no sampling, no critic: the labelled comparisons the reward model learned from become a
classification loss on the policy itself, with the SFT model as the frozen reference (Rafailov et al.
2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Sec. 4).
`dpo_loss` below is the whole algorithm; the rest of the file is plumbing. The derivation, in five lines:

    RLHF's objective      max_pi E_{y ~ pi(.|x)} r(x, y) - beta * KL(pi(.|x) || pi_ref(.|x))          (Eq. 3)
    has the maximiser     pi*(y|x) = pi_ref(y|x) * exp(r(x, y) / beta) / Z(x)                         (Eq. 4)
    so, solved for r,     r(x, y) = beta * log pi*(y|x) / pi_ref(y|x) + beta * log Z(x)                (Eq. 5)
    Bradley-Terry needs only differences, and Z(x) cancels:  p(y_w > y_l | x) = sigmoid(r_w - r_l) (Eqs. 1, 6)
    fitting pi to the labels: L = -E log sigmoid(beta * [log pi/pi_ref (y_w) - log pi/pi_ref (y_l)])  (Eq. 7)

so the policy is its own reward model: beta * log pi(y|x) / pi_ref(y|x) is the implicit reward it learns,
and the reference (which must stay frozen) keeps it near the data the way PPO's KL penalty does.

    for each step: B prompts of the comparisons, all their responses -> policy sequence log-probs (N,),
                   every ranked pair (chosen, rejected) of those prompts -> dpo_loss

The reference's log-probs are precomputed, once, before the first step (`ref_seq`), not per batch: the
data is fixed and the reference frozen, so they are constants, and computing them once costs one
no-grad forward pass per response for the whole run, where per batch it costs one per response per
epoch; each training step then runs one model, not two. (Rounding: under bf16 autocast a response's
log-prob differs in its last bits with the padding of its batch, so at step 0 the loss is log 2 only
to rounding; on CPU in float32 it agrees to about 1e-5, and step 0's reward_acc counts rounding.)

Deviations from the paper:
- The comparisons are K-way rankings (train_rm.py's, K = 4 SFT samples per prompt ranked by the noisy
  labeler): every ranked pair, ties dropped, is one (chosen, rejected) pair, and all pairs of a prompt
  sit in the same batch, so each response goes through the model once for all its pairs (as in
  train_rm.py). The loss is the mean over pairs, so a prompt with more ranked pairs weighs more (the
  reward model weighs prompts equally). The paper's Plackett-Luce loss for rankings (App. A.3) is not used.
- Responses are read as text and encoded again (the sampled ids are not stored), then capped at
  --max-new-tokens tokens, the sampling limit, and prompts at block_size - max_new_tokens (their end),
  so every pair fits any batch; a pair whose two responses are equal after the cap is dropped.
- Sizes for a CPU budget: a 0.8M-parameter policy, the 1,024 prompts' comparisons (about 5,900 pairs)
  seen once, 16 prompts a step, AdamW at lr 3e-4 with warmup and cosine decay (the paper: RMSprop,
  lr 1e-6, 64 pairs a step). beta is 0.3, not the paper's 0.1: on the built-in task both reach the same
  held-out gold reward, 0.1 at over twice the KL to the SFT model; 0.03 drifts further and scores lower.
- Options the paper does not have: `--loss-type ipo` (Azar et al. 2023) and `--label-smoothing`
  (conservative DPO, labels assumed flipped with probability eps; Mitchell 2023, "A note on DPO with
  noisy preferences"), both bounded where sigmoid DPO can drive h to infinity on separable data.

Logged every 10 steps (metrics.jsonl; printed): `loss`; from `dpo_stats`, the batch's implicit rewards
`reward_chosen` and `reward_rejected` (beta * log pi/pi_ref, mean over pairs), `reward_margin` (their
mean difference) and `reward_acc` (the share of pairs whose chosen response has the higher implicit
reward). Every --eval-interval steps, on held-out comparisons: `val_loss` and `val_reward_acc` (the
implicit reward as a reward model; compare train_rm.py's accuracy vs labels); and on the built-in task,
from the policy's own samples on held-out prompts: `eval_gold_reward` and `kl` (the summed log-ratio to
the SFT model per response, a k1 estimate). DPO never samples while it trains: these points are the only
view of what its own samples become.

    python train_dpo.py                                      # built-in task, after train_rm.py; ~1 CPU-minute
    python train_dpo.py --beta 0.1                           # the paper's beta: a looser pull to SFT
    python train_dpo.py --loss-type ipo --beta 0.3           # IPO: a squared loss with a finite target
    python train_dpo.py --init out/sft --data hh.jsonl --device cuda --batch-size 32 --max-steps 2000 \\
        --eval-interval 200 --max-new-tokens 128                                                  # one GPU
    torchrun --standalone --nproc_per_node 8 train_dpo.py --init out/sft --data hh.jsonl ...     # 8 GPUs

Reads out/sft (the policy's start and the reference) and out/rm/comparisons.jsonl with
comparisons_heldout.jsonl beside it (written by train_rm.py on the built-in task), or --data (pairwise,
K-way or HH-RLHF JSONL, 1/20 held out as train_rm.py holds it out; no gold metrics then); writes
out/dpo/ckpt.pt and out/dpo/metrics.jsonl. On the built-in task, reports the held-out mean gold reward
with its standard error and the KL to the SFT model, next to the SFT model's gold. A stopped run
continues with `--resume`.
"""

import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf import dist, task
from minirlhf.checkpoint import load_model, remove_resume, save_checkpoint
from minirlhf.cli import (Log, adamw, arg, check_device, check_dtype, check_finite, nonnegative, one_of,
                          parse_args, peak_memory_mb, positive, require, warmup_cosine)
from minirlhf.data import PairRecord, RankRecord, join_prompt_response, read_jsonl, truncate_prompt
from minirlhf.evaluate import evaluate, print_samples, summary_line
from minirlhf.ops import token_logprobs
from minirlhf.tokenizer import encode_prompt, encode_response, eos_id, load_tokenizer

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class Args:
    """DPO: the policy trained on labelled comparisons, against a frozen reference."""
    # I/O
    out: str = arg("out/dpo", "output folder for the checkpoint and metrics.jsonl")
    init: str = arg("out/sft", "the SFT checkpoint: the policy starts here, and it is the frozen reference")
    data: str = arg("", "JSONL of pairwise, K-way or HH-RLHF records instead of --comparisons (no gold)")
    comparisons: str = arg("out/rm/comparisons.jsonl", "built-in task: the K-way comparisons train_rm.py "
                           "trained on (its *_heldout.jsonl beside it is the held-out set)")
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    overwrite: bool = arg(False, "replace a finished run saved in --out")
    ckpt_interval: int = arg(32, "save out/dpo/resume.pt every this many steps, for --resume", positive)
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
    batch_size: int = arg(16, "prompts per step, each with all its ranked pairs (K (K - 1) / 2 at most)",
                          positive)
    # schedule and evaluation
    max_steps: int = arg(64, "optimisation steps (64 x 16 prompts: one epoch of the default 1024)", positive)
    eval_interval: int = arg(16, "held-out comparisons, and samples for gold and KL, every this many steps",
                             positive)
    eval_prompts: int = arg(300, "held-out prompts for the final evaluation, and comparisons (0: none)",
                            nonnegative)
    max_new_tokens: int = arg(88, "response length limit when sampling; comparisons' responses are cut to it",
                              positive)
    tool: bool = arg(True, "sample with the calculator of minirlhf/task.py, train on the policy's own tokens "
                     "only (--no-tool: without it)")
    monitor_prompts: int = arg(64, "held-out prompts for the interval samples and comparisons", positive)
    gen_batch_size: int = arg(256, "sequences sampled or scored at once (without a gradient)", positive)
    # DPO
    beta: float = arg(0.3, "beta: the KL weight of the objective DPO solves; the implicit reward's scale",
                      positive)
    loss_type: str = arg("sigmoid", "sigmoid (DPO) | ipo (Azar et al. 2023, beta is its tau)",
                         one_of(*LOSS_TYPES))
    label_smoothing: float = arg(0.0, "eps of conservative DPO (sigmoid): labels assumed flipped this often",
                                 lambda v: None if 0 <= v <= 0.5 else "must be in [0, 0.5]")


def dpo_loss(
    logprobs_chosen: torch.Tensor,
    logprobs_rejected: torch.Tensor,
    ref_logprobs_chosen: torch.Tensor,
    ref_logprobs_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO loss on B (chosen, rejected) pairs of sequence log-probabilities.

    With the log-ratio margin of each pair,

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

        "sigmoid":  L = mean_b [ -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h) ]
        "ipo":      L = mean_b [ (h - 1 / (2 * beta))**2 ]

    log pi(y_w|x) = `logprobs_chosen` (B,), log pi(y_l|x) = `logprobs_rejected` (B,): the policy's
    log-probability of the whole preferred (y_w) and dispreferred (y_l) response, the sum over its tokens,
    EOS included; `ref_logprobs_chosen`, `ref_logprobs_rejected` (B,): the same under the frozen reference
    pi_ref; beta = `beta` > 0; eps = `label_smoothing`.

    "sigmoid" with eps = 0 is DPO (Rafailov et al. 2023, Eq. 7): the Bradley-Terry likelihood of the label
    under the implicit reward beta * log pi / pi_ref. eps > 0 is conservative DPO: each label is assumed
    flipped with probability eps, so the loss is the cross-entropy against the soft target 1 - eps and is
    minimised at a finite beta * h = log((1 - eps) / eps) instead of h -> infinity (at eps = 0.5, at h = 0).
    "ipo" (Azar et al. 2023, Eq. 17, with tau = beta) regresses h onto 1 / (2 * beta), a squared loss that
    also stops at a finite margin; it takes no label smoothing (a ValueError says so).

    -log sigmoid(z) is `-F.logsigmoid(z)`, one stable step (softplus(-z)), never log of a sigmoid that has
    rounded to 0: finite with a finite gradient for |beta * h| up to 1e3 and beyond. When the policy equals
    the reference, h = 0 and the sigmoid loss is log 2 for every eps. Returns a scalar.
    """
    h = (logprobs_chosen - ref_logprobs_chosen) - (logprobs_rejected - ref_logprobs_rejected)  # (B,)
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # (B,)
    elif loss_type == "ipo":
        if label_smoothing != 0.0:
            raise ValueError("dpo_loss: label_smoothing applies to the sigmoid loss only, not to ipo")
        losses = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}: expected sigmoid or ipo")
    return losses.mean()


@torch.no_grad()
def dpo_stats(
    logprobs_chosen: torch.Tensor,
    logprobs_rejected: torch.Tensor,
    ref_logprobs_chosen: torch.Tensor,
    ref_logprobs_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Diagnostics of `dpo_loss` from the same quantities (no gradient): the implicit rewards.

    reward_chosen:   mean_b beta * (log pi(y_w|x) - log pi_ref(y_w|x)), the implicit reward of y_w (Eq. 5,
                     without the beta * log Z(x) that cancels in a pair); 0 while pi = pi_ref
    reward_rejected: mean_b beta * (log pi(y_l|x) - log pi_ref(y_l|x))
    reward_margin:   mean_b of their difference, beta * h
    reward_acc:      the share of pairs with reward_chosen > reward_rejected (a tie counts as wrong, as in
                     train_rm.py's pairwise_accuracy: 0 while pi = pi_ref)

    Arguments as in `dpo_loss`. Returns a dict of 0-dim tensors.
    """
    chosen = beta * (logprobs_chosen - ref_logprobs_chosen)  # (B,)
    rejected = beta * (logprobs_rejected - ref_logprobs_rejected)  # (B,)
    return {
        "reward_chosen": chosen.mean(),
        "reward_rejected": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "reward_acc": (chosen > rejected).to(chosen.dtype).mean(),
    }


# ----------------------------------------------------------------------------------------------------
# Plumbing: comparisons -> pairs -> padded batches


@dataclass
class Comparisons:
    """One prompt's responses (token ids, EOS included unless cut) and its ranked pairs."""
    prompt_ids: list[int]
    response_ids: list[list[int]]
    pairs: list[tuple[int, int]]  # (i, j): response i is ranked above response j


def ranked_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """Every (i, j) with ranks[i] < ranks[j] (0 is best): ties form no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def comparisons_of(records: list, enc, max_prompt: int, max_response: int) -> tuple[list[Comparisons], int]:
    """Pairwise, K-way or HH records -> (Comparisons per record, the number of responses cut to fit).

    A prompt keeps its last max_prompt tokens, a response its first max_response (it loses its EOS when
    cut), so prompt + response fits any batch of them; a pair whose responses are equal after the cut
    carries no preference and is dropped. A record with no pair stays in, with pairs = [].
    """
    out, n_cut = [], 0
    for r in records:
        require(isinstance(r, (PairRecord, RankRecord)), f"{type(r).__name__}s carry no preference: DPO "
                "needs pairwise, K-way or HH-RLHF records")
        if isinstance(r, PairRecord):
            responses, ranks = [r.chosen, r.rejected], [0, 1]
        else:
            responses, ranks = r.responses, r.ranks
        full = [encode_response(enc, x) for x in responses]
        ids = [x[:max_response] for x in full]
        n_cut += sum(len(x) > max_response for x in full)
        pairs = [(i, j) for i, j in ranked_pairs(list(ranks)) if ids[i] != ids[j]]
        out.append(Comparisons(truncate_prompt(encode_prompt(enc, r.prompt), max_prompt)[0], ids, pairs))
    return out, n_cut


def pair_rows(groups: list[Comparisons]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> chosen, rejected (P,): for each pair of the groups, the rows of its two responses when all
    the groups' responses are stacked in order (group by group)."""
    chosen, rejected, n = [], [], 0
    for g in groups:
        chosen += [n + i for i, _ in g.pairs]
        rejected += [n + j for _, j in g.pairs]
        n += len(g.response_ids)
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def dpo_batch(groups: list[Comparisons], pad_id: int, tool=None):
    """B prompts' comparisons -> tokens, attn, mask (N, T) over all N responses, chosen, rejected (P,).

    Row n is one response after its prompt, in the layout generation produces (join_prompt_response:
    prompt left-padded, response right-padded, mask 1 on the response tokens but 0 on the output of
    `tool`, if given, which the policy did not write: see data.tool_mask); chosen[p] and rejected[p] are
    the rows of pair p's two responses, so a response shared by several pairs is computed once.
    """
    prompts = [g.prompt_ids for g in groups for _ in g.response_ids]
    responses = [r for g in groups for r in g.response_ids]
    tokens, attn, mask = join_prompt_response(prompts, responses, pad_id, tool)
    return tokens, attn, mask, *pair_rows(groups)


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) of each row's response: sum_t token_logprobs * mask, (N, T, V), (N, T), (N, T) -> (N,)."""
    return (token_logprobs(logits, tokens) * mask).sum(dim=-1)


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
    data_rng = random.Random(args.seed)                           # batch order
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models: the policy and the frozen reference, both the SFT model to begin with --------------
    policy, ck = load_model(args.init, device, kind="lm")
    enc = load_tokenizer(ck)
    tool = task.calculator_tool(enc) if args.tool else None  # the sampler's calculator; None: --no-tool
    block_size = policy.config.block_size
    require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens} must leave room for a "
            f"prompt in the context of {block_size} tokens")
    require(args.loss_type == "sigmoid" or args.label_smoothing == 0,
            f"--label-smoothing {args.label_smoothing}: applies to --loss-type sigmoid, not {args.loss_type}")
    policy.train()
    ref = load_model(args.init, device)[0].requires_grad_(False)  # eval mode, never updated
    builtin = not args.data  # the gold judge and the held-out prompts: built-in task only
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters from {args.init}, tokenizer {enc.name}, "
          f"device {device}, dtype {dtype} | reference: a frozen copy | {args.loss_type}, beta {args.beta:g}")

    # ---- data: every ranked pair of each prompt's responses --------------------------------------------
    if args.data:
        records = read_jsonl(args.data, "auto")
        random.Random(args.seed).shuffle(records)
        n_val = max(1, len(records) // 20)  # what train_rm.py holds out of the same file with the same seed
        require(len(records) > n_val, f"{args.data}: {len(records)} record(s): too few to hold 1 in 20 out")
        train_records, val_records, source = records[n_val:], records[:n_val][: args.eval_prompts], args.data
    else:
        require(os.path.isfile(args.comparisons), f"{args.comparisons}: no such file; train_rm.py writes "
                "it on the built-in task (or pass --data FILE)")
        train_records, source = read_jsonl(args.comparisons, "kway"), args.comparisons
        heldout = args.comparisons.removesuffix(".jsonl") + "_heldout.jsonl"
        val_records = read_jsonl(heldout, "kway")[: args.eval_prompts] if os.path.isfile(heldout) else []
    max_prompt = block_size - args.max_new_tokens  # as sampling cuts prompts
    train_groups, n_cut = comparisons_of(train_records, enc, max_prompt, args.max_new_tokens)
    train_groups = [g for g in train_groups if g.pairs]  # a prompt with only ties has nothing to teach
    val_groups = [g for g in comparisons_of(val_records, enc, max_prompt, args.max_new_tokens)[0] if g.pairs]
    n_pairs = sum(len(g.pairs) for g in train_groups)
    require(n_pairs > 0, f"{source}: no ranked pairs (every ranking is a tie, or every pair is equal): "
            "nothing for DPO to learn")
    n_responses = sum(len(g.response_ids) for g in train_groups)
    print(f"data: {len(train_groups)} prompts, {n_pairs} pairs, {n_responses} responses from {source}; "
          f"{len(val_groups)} held-out prompts"
          + (f"; {n_cut} responses (with EOS) over --max-new-tokens {args.max_new_tokens} keep their start"
             if n_cut else ""))

    def get_batch(groups):
        """-> tokens, attn, mask (N, T) over the groups' responses, chosen, rejected (P,) row indices."""
        return (x.to(device) for x in dpo_batch(groups, eos_id(enc), tool))

    @torch.no_grad()
    def all_logprobs(m, groups):
        """Sequence log-probs of every response of every group under model m, without a gradient:
        one (n_responses,) tensor per group, in batches of about --gen-batch-size responses."""
        was_training, out = m.training, []
        m.eval()
        per_batch = max(1, args.gen_batch_size // max(len(g.response_ids) for g in groups))
        for i in range(0, len(groups), per_batch):
            chunk = groups[i:i + per_batch]
            tokens, attn, mask, _, _ = get_batch(chunk)
            with autocast:
                logits = m(tokens, attn)
            flat = sequence_logprobs(logits, tokens, mask).cpu()  # (N,)
            out += list(flat.split([len(g.response_ids) for g in chunk]))
        m.train(was_training)
        return out

    # ---- optimizer --------------------------------------------------------------------------------
    optimizer = adamw(policy, args.lr, args.weight_decay, device)
    lr_at = lambda step: warmup_cosine(step, args.lr, args.warmup_steps, args.max_steps)  # noqa: E731
    train_policy = dist.wrap(policy)  # under torchrun, DDP: backward averages the gradients over the ranks
    train_policy = torch.compile(train_policy) if args.compile else train_policy
    # what --resume restores besides the weights; the reference's log-probs are computed again, the same
    state = dict(optimizer=optimizer, data_rng=data_rng)
    start, saved = dist.resume_or_start(args, policy, state)
    order = saved.get("order", [])  # the epoch under way
    log = Log(args.out, first_step=start) if dist.is_main else dist.skip

    # The reference's log-probs, once for the whole run (see the module docstring): constants from here on.
    t_start = time.time()  # the training's time includes them
    ref_seq = all_logprobs(ref, train_groups)
    val_ref_seq = all_logprobs(ref, val_groups) if val_groups else []
    n_scored = sum(map(len, ref_seq + val_ref_seq))
    print(f"reference: log-probs of {n_scored} responses, {time.time() - t_start:.1f} s")

    def validate(n):
        """dpo_loss and reward_acc on the pairs of the first n held-out prompts, against the reference."""
        groups = val_groups[:n]
        logprobs, ref_logprobs = torch.cat(all_logprobs(policy, groups)), torch.cat(val_ref_seq[:n])  # (N,)
        c, r = pair_rows(groups)
        pair = (logprobs[c], logprobs[r], ref_logprobs[c], ref_logprobs[r])
        return dict(val_loss=dpo_loss(*pair, args.beta, args.loss_type, args.label_smoothing).item(),
                    val_reward_acc=dpo_stats(*pair, args.beta)["reward_acc"].item())

    # ---- training loop ----------------------------------------------------------------------------
    last = args.max_steps - 1
    for step in tqdm(range(start, args.max_steps), "dpo", initial=start, total=args.max_steps,
                     disable=dist.tqdm_disable):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        if len(order) < args.batch_size:  # epochs: every prompt once, in a fresh order each pass
            order += data_rng.sample(range(len(train_groups)), len(train_groups))
        idx, order = dist.shard(order[: args.batch_size]), order[args.batch_size:]  # this rank's prompts
        tokens, attn, mask, chosen, rejected = get_batch([train_groups[i] for i in idx])
        ref_logprobs = torch.cat([ref_seq[i] for i in idx]).to(device)     # (N,), precomputed, no gradient
        with autocast:
            logits = train_policy(tokens, attn)                             # (N, T, V)
        logprobs = sequence_logprobs(logits, tokens, mask)                  # (N,): log pi(y|x), EOS included
        pair = (logprobs[chosen], logprobs[rejected], ref_logprobs[chosen], ref_logprobs[rejected])  # (P,)
        # L = -mean log sigmoid(beta * [log pi/pi_ref (chosen) - log pi/pi_ref (rejected)]) over the pairs
        # (the mean over the pairs of the whole batch, every rank's: dist.batch_mean)
        loss = dist.batch_mean(dpo_loss(*pair, args.beta, args.loss_type, args.label_smoothing), len(chosen))
        check_finite(loss, step, args.out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        optimizer.step()

        evaluate_now = step % args.eval_interval == 0 or step == last
        if step % 10 == 0 or evaluate_now:
            stats = dist.batch_stats(dpo_stats(*pair, args.beta), len(chosen))  # means over the batch's pairs
            metrics = dict(loss=loss, **stats, grad_norm=grad_norm, lr=lr_at(step),
                           ms=(time.time() - t0) * 1000)
            evaluate_here = evaluate_now and dist.is_main  # rank 0 alone; the others wait at the next step
            if evaluate_here and val_groups:  # the first --monitor-prompts, the final evaluation all of them
                metrics.update(validate(args.monitor_prompts))
            if evaluate_here and builtin:
                # the policy's own samples on held-out prompts: what training has done so far (same seed
                # every time, so the points differ by the policy, not by the sampling noise)
                m, samples = evaluate(policy, enc, task.heldout_prompts()[: args.monitor_prompts],
                                      args.max_new_tokens, ref=ref, seed=args.seed, device=device, tool=tool)
                policy.train()
                metrics.update(eval_gold_reward=m["gold_reward_mean"], kl=m["kl_to_sft"])
            log(step, **metrics)
            if evaluate_here and builtin:
                print_samples(samples, 2)
        if (step + 1) % args.ckpt_interval == 0 and step < last:
            dist.save_resume(args.out, policy, enc.name, args, step + 1, state, order=order)
    train_seconds = time.time() - t_start
    if not dist.is_main:  # rank 0 alone evaluates and writes the result; the others wait for it
        dist.barrier()
        sys.exit()

    # ---- final evaluation and save ----------------------------------------------------------------
    policy.eval()
    # held and needed: the policy and the reference (its log-probs, once, and the KL of the evaluations)
    extra = dict(train_seconds=train_seconds, peak_memory_mb=peak_memory_mb(device), models_in_memory=2,
                 models_needed=2, world_size=dist.WORLD_SIZE)
    # the result is saved before anything that could fail, then again with the evaluation's numbers
    save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    if val_groups:
        extra.update(validate(len(val_groups)))
        print(f"held-out comparisons: loss {extra['val_loss']:.4f} | implicit reward accuracy "
              f"{extra['val_reward_acc']:.4f} ({len(val_groups)} prompts)")
    if builtin and args.eval_prompts:
        prompts = task.heldout_prompts()[: args.eval_prompts]
        metrics, samples = evaluate(policy, enc, prompts, args.max_new_tokens, ref=ref, seed=args.seed,
                                    device=device, tool=tool)
        extra.update(metrics)
        print_samples(samples)
        print(summary_line(metrics))
        if "gold_reward_mean" in ck["extra"]:
            print(f"SFT, as train_sft.py measured it: {summary_line(ck['extra'])}")
    save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, extra)
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training")
    dist.barrier()  # the other ranks exit with this one
