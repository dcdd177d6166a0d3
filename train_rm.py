"""Reward modelling: the second stage of RLHF.

Train a scalar reward r(x, y) on human rankings of K responses per prompt with the Bradley-Terry
pairwise loss over every ranked pair (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", Sec. 3.5, Eq. 1).

The reward model is the SFT model's trunk plus Linear(n_embd, 1) (`ScalarHead`), read at the last
response token: the EOS token when there is one, the only position whose causal context holds the whole
prompt, the whole response and the fact that it ended. On the built-in task the comparisons are made
here, the way InstructGPT made them: sample K responses per prompt from the SFT model (temperature 1),
have the simulated labeler rank them (`task.label_ranks`, noisy), train on the rankings. With `--data`
the rankings come from a file: pairwise records (K = 2, ranks [0, 1]), K-way rankings, or Anthropic
HH-RLHF dialogues.

All K candidates of a prompt sit in the same batch (B prompts -> B*K sequences, scores reshaped (B, K)),
so one forward pass per response serves all C(K, 2) of its pairs, and a prompt's comparisons never
straddle two steps: InstructGPT found that shuffling the pairs of one ranking into separate batch
elements makes the reward model overfit within an epoch.

Deviations from InstructGPT:
- The reward model is the policy's own size (theirs: 6B reward models for policies up to 175B).
- A small comparison set: by default 1,024 training prompts with K = 4 (theirs: about 33k prompts with
  K from 4 to 9), which fits the CPU budget of the whole pipeline, and seen three times (192 steps of
  16 prompts; InstructGPT trained one epoch on many more). On so few comparisons one pass left the
  model preferring "I don't know" to a right calculator call on 0.98 of the held-out hard questions
  (`task.contrast_pairs`), which taught PPO to abstain; after three passes it prefers the call on 0.68,
  and its held-out accuracy against the labels is highest (0.656, 0.682, 0.674 after 1, 3 and 5
  passes: README, Results).
- Repeated samples: K draws from a small model often repeat a response word for word. The labeler sees
  each distinct response once; a repeat is an absent candidate (rank -1), since an identical pair
  carries no preference (the rule data.py applies to pairwise files).
- Slipped twins (`--copy-twins`, off): the labeler can also rank, beside each right calculator answer
  among a training prompt's candidates, the same reply with one slip in its copying (`task.slipped_twin`),
  to teach the reward model to check a copy. Measured, it does not: the reward model fits the twins it
  saw, stays at chance on held-out ones, and learns that a call is worth less than "I don't know"
  (README, Results).
- Normalisation: InstructGPT adds a bias so that labeler demonstrations score 0 on average. We save the
  mean and standard deviation of the scores on SFT samples (`extra["reward_mean"]`, `["reward_std"]`),
  and minirlhf.reward scales with both, so the PPO stage starts at reward ~ 0 with unit spread.

    python train_rm.py                                       # built-in task, after train_sft.py
    python train_rm.py --data hh.jsonl --device cuda --batch-size 32 --max-steps 2000 --eval-interval 200
    torchrun --standalone --nproc_per_node 8 train_rm.py --data hh.jsonl ...    # 8 GPUs (minirlhf/dist.py)

Reports held-out pairwise accuracy (the preferred response scores higher) against the labeler's noisy
ranks (`acc_labels`), and on the built-in task against the gold judge on the pairs whose gold rewards
differ (`acc_gold`: what the later stages rely on). Writes out/rm/ckpt.pt (kind "scalar") and
out/rm/metrics.jsonl. A stopped run continues with `--resume`.

On the built-in task it also writes the labelled comparisons it trained on, so that an offline method
(train_dpo.py) learns from exactly the labels the reward model saw: out/rm/comparisons.jsonl (the
training prompts) and out/rm/comparisons_heldout.jsonl (the held-out ones), K-way records {prompt,
responses, ranks} as minirlhf.data reads them. Absent candidates (repeats) are left out, and so is an
empty response (a sample that was only EOS: a JSONL record cannot hold it); a prompt left with fewer
than 2 distinct responses is skipped. With --data nothing is written: the file already is the data.
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
from minirlhf.cli import (Log, adamw, arg, check_device, check_dtype, check_finite, nonnegative, parse_args,
                          peak_memory_mb, positive, require, warmup_cosine)
from minirlhf.data import (PairRecord, RankRecord, join_prompt_response, read_jsonl, truncate_prompt,
                           write_jsonl)
from minirlhf.model import ScalarHead
from minirlhf.ops import gather_last
from minirlhf.sampling import encode_prompts, sample_responses
from minirlhf.tokenizer import encode_prompt, encode_response, eos_id, load_tokenizer


@dataclass
class Args:
    """Reward modelling on rankings of K responses per prompt."""
    # I/O
    out: str = arg("out/rm", "output folder for the checkpoint, metrics.jsonl and comparisons.jsonl")
    init: str = arg("out/sft", "the SFT checkpoint: its trunk starts the reward model (and, on the built-in "
                    "task, it writes the candidates)")
    data: str = arg("", "JSONL of pairwise {prompt, chosen, rejected}, K-way {prompt, responses, ranks} or "
                    "HH-RLHF records; '' = the built-in task")
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    overwrite: bool = arg(False, "replace a finished run saved in --out")
    ckpt_interval: int = arg(32, "save out/rm/resume.pt every this many steps, for --resume", positive)
    # system
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu | cuda | cuda:N | auto", check_device)
    dtype: str = arg("auto", "float32 | bfloat16 (autocast, CUDA only) | auto", check_dtype)
    compile: bool = arg(False, "torch.compile the model (GPU)")
    threads: int = arg(0, "CPU threads (0: torch's default); a fixed count is bit-reproducible", nonnegative)
    # optimisation
    lr: float = arg(3e-4, "peak learning rate (linear warmup, cosine decay to lr/10)", positive)
    warmup_steps: int = arg(10, "learning-rate warmup", nonnegative)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", nonnegative)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", positive)
    batch_size: int = arg(16, "prompts per step, each with all its K candidates (B*K sequences)", positive)
    # schedule and evaluation
    max_steps: int = arg(192, "optimisation steps (192 x 16 prompts: three epochs of the default 1024)",
                         positive)
    eval_interval: int = arg(32, "held-out accuracy every this many steps", positive)
    eval_prompts: int = arg(300, "held-out prompts (built-in task) or validation records (--data)", positive)
    max_new_tokens: int = arg(88, "response length limit when sampling", positive)
    tool: bool = arg(True, "sample the candidates with the calculator of minirlhf/task.py (--no-tool: "
                     "without it); the reward model reads its output")
    # the reward model: the comparisons (built-in task)
    k: int = arg(4, "built-in task: responses sampled per prompt and ranked together (at least 2)",
                 lambda v: None if v >= 2 else "must be at least 2: one response forms no comparison")
    n_prompts: int = arg(1024, "built-in task: training prompts to sample and rank K responses for", positive)
    label_temperature: float = arg(task.LABEL_TEMPERATURE, "built-in task: labeler noise (0: the gold order)",
                                   nonnegative)
    temperature: float = arg(1.0, "sampling temperature of the candidates (and of the statistics' samples)",
                             positive)
    copy_twins: bool = arg(False, "built-in task: beside each right calculator answer among a training "
                           "prompt's candidates (at most MAX_TWINS), the labeler also ranks its slipped twin "
                           "(task.slipped_twin: one slip in copying the call or its result)")


MAX_TWINS = 2  # slipped twins per prompt (--copy-twins): a batch holds at most K + 2 candidates a prompt


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss over all ranked pairs of K candidates per prompt.

        loss_b = - (1 / |P_b|) * sum_{(i, j) in P_b} log sigmoid(r[b, i] - r[b, j])
        P_b    = {(i, j) : 0 <= rank[b, i] < rank[b, j]}
        loss   = mean of loss_b over the prompts b with |P_b| > 0

    r = `rewards` (B, K) float: the reward model's score of each candidate; rank = `ranks` (B, K) int64:
    0 is best, a smaller rank is preferred, equal ranks are ties (they form no pair), a negative rank
    marks an absent candidate (it forms no pair; its reward is ignored).

    This is InstructGPT's Eq. 1: with K candidates, all present and no ties, |P_b| = C(K, 2) and the
    1 / |P_b| is its 1 / C(K, 2); with ties or absent candidates we divide by the pairs that exist, so
    every prompt weighs the same. With K = 2 and ranks [0, 1] it is the pairwise loss
    mean_b(-log sigmoid(r_chosen - r_rejected)). All K candidates of a prompt go through the model in
    one batch, as InstructGPT does, so each response's forward pass serves all its pairs.

    -log sigmoid is taken with `logsigmoid`, stable for large margins. If no prompt in the batch has a
    pair the loss is 0, still attached to `rewards` (zero gradient) so `backward()` works.

    Returns a scalar.
    """
    # pairs[b, i, j] = candidate i is ranked strictly above candidate j (both present: rank_i >= 0 and
    # rank_j > rank_i imply rank_j >= 1).
    pairs = (ranks[:, :, None] >= 0) & (ranks[:, :, None] < ranks[:, None, :])  # (B, K, K)
    margins = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    losses = torch.where(pairs, -F.logsigmoid(margins), torch.zeros_like(margins))  # (B, K, K)
    n_pairs = pairs.sum(dim=(1, 2)).to(rewards.dtype)  # (B,)
    per_prompt = losses.sum(dim=(1, 2)) / n_pairs.clamp(min=1.0)  # (B,)
    has_pairs = (n_pairs > 0).to(rewards.dtype)  # (B,)
    return (per_prompt * has_pairs).sum() / has_pairs.sum().clamp(min=1.0)


def pairwise_accuracy(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Fraction of ranked pairs that the scores put in the same order.

        acc = #{(b, i, j) in P : s[b, i] > s[b, j]} / |P|,    P = {(b, i, j) : 0 <= rank[b, i] < rank[b, j]}

    s = `scores` (B, K); rank = `ranks` (B, K) int64 with ranking_loss's conventions (0 is best, equal
    ranks form no pair, negative = absent). Pooled over all pairs of all prompts; a tie in score counts
    as wrong, so a constant model scores 0, not 0.5. NaN when there is no pair. Returns a 0-dim tensor.
    """
    pairs = (ranks[:, :, None] >= 0) & (ranks[:, :, None] < ranks[:, None, :])  # (B, K, K)
    correct = pairs & (scores[:, :, None] > scores[:, None, :])                 # (B, K, K)
    return correct.sum() / pairs.sum()


@torch.no_grad()
def ranking_stats(rewards: torch.Tensor, ranks: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ranking_loss was taken over, for the log; arguments as in `ranking_loss`.

    acc:     the share of the batch's ranked pairs the rewards already order (`pairwise_accuracy`);
    margin:  the mean of r_i - r_j over those pairs (i ranked above j), the quantity in the sigmoid;
    pairs:   how many ranked pairs the batch held;
    prompts: how many of its prompts have one, the prompts the loss averages over.
    """
    pairs = (ranks[:, :, None] >= 0) & (ranks[:, :, None] < ranks[:, None, :])  # (B, K, K), as ranking_loss
    margins = rewards[:, :, None] - rewards[:, None, :]                         # (B, K, K)
    n = pairs.sum()
    return {"acc": pairwise_accuracy(rewards, ranks), "margin": (margins * pairs).sum() / n.clamp(min=1),
            "pairs": n, "prompts": pairs.any(dim=2).any(dim=1).sum()}


def correctness_only_pairs(group) -> list[tuple[int, int]]:
    """(i, j) candidate pairs of a group whose gold breakdowns differ in correctness alone, i right.

    Politeness, concision and honesty equal, the answer right in i and wrong in j: the comparisons a
    reward model must get right for RLHF to teach correctness rather than manners.
    """
    b = [task.judge_breakdown(group.prompt, t) for t in group.texts]
    others = ("politeness", "concision", "honesty")
    return [(i, j) for i in range(len(b)) for j in range(len(b))
            if b[i]["correctness"] > b[j]["correctness"] and all(b[i][c] == b[j][c] for c in others)]


def hard_candidates(groups) -> dict[str, dict[str, float]]:
    """What the labeler ranked on the calculator's questions ("hard"), every distinct candidate once:
    {"call": ..., "abstain": ..., "answer": ...} -> {"n": candidates, "gold": their mean gold reward,
    "right": the share answered right}. "call" holds a closed call (as `tool_call_rate` counts them),
    "abstain" no call and an abstention (`task.honesty_outcome`), "answer" the rest: a number with no call
    (a guess), or neither number nor abstention; an outcome no candidate had is left out.

    A reward model learns the value of calling from these: if it cannot check a call's answer, a call is
    worth to it about the calls' mean gold, and when that is close to the abstentions' mean, it has little
    reason to prefer calling (README, Results)."""
    seen: dict[str, list[tuple[float, bool]]] = {}
    for g in groups:
        if task.prompt_kind(g.prompt) != "hard":
            continue
        for t, rank in zip(g.texts, g.ranks):
            if rank < 0:  # a repeat: the labeler saw it once
                continue
            outcome = task.honesty_outcome(g.prompt, t)
            what = "call" if task.CALL_RE.search(t) else ("abstain" if outcome == "abstain" else "answer")
            seen.setdefault(what, []).append((task.judge(g.prompt, t), outcome == "correct"))
    return {k: {"n": len(v), "gold": sum(x for x, _ in v) / len(v), "right": sum(r for _, r in v) / len(v)}
            for k in ("call", "abstain", "answer") if (v := seen.get(k))}


def ranks_from_values(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Ranks (B, K) of values (B, K), largest first: rank[b, i] = #{present j : v[b, j] > v[b, i]}.

    Equal values share a rank (a tie forms no pair); absent candidates (present = 0) get -1. Turns the
    gold rewards into ranks, so `pairwise_accuracy(scores, ranks_from_values(gold, present))` counts
    exactly the pairs whose gold rewards differ.
    """
    beats = (values[:, None, :] > values[:, :, None]) & present[:, None, :].bool()  # [b, i, j]: v_j > v_i
    return torch.where(present.bool(), beats.sum(-1), -1)


# ----------------------------------------------------------------------------------------------------
# Plumbing: ranked candidates -> padded batches


@dataclass
class Ranked:
    """A prompt with its candidate responses (token ids, EOS included) and their ranks (0 best, -1 absent)."""
    prompt: str
    prompt_ids: list[int]
    responses: list[list[int]]
    texts: list[str]
    ranks: list[int]
    gold: list[float] | None = None  # the judge's rewards (built-in task only)


def rm_batch(groups: list[Ranked], K: int, pad_id: int, block_size: int):
    """B groups -> ids, attention_mask, response_mask (B*K, T), ranks (B, K) int64, n_truncated.

    Row b*K + k is candidate k of prompt b in the layout generation produces (join_prompt_response:
    prompt left-padded, response right-padded), so a response scores the same here as it does straight
    out of sampling in the PPO stage. A group with fewer than K candidates is filled with absent ones (a
    lone pad token under rank -1, which ranking_loss ignores).

    Every row's response starts after the longest prompt, so the batch needs P + R <= block_size: a
    response keeps at most block_size - 1 tokens (its start; it loses its EOS), and every prompt keeps
    at most block_size - R (its end: the question and the "Assistant:" cue matter most). n_truncated
    counts the rows cut either way. Nothing is cut on the built-in task.
    """
    prompts, responses, ranks, n_truncated = [], [], [], 0
    for g in groups:
        fill = K - len(g.responses)
        prompts += [g.prompt_ids] * K
        responses += list(g.responses) + [[pad_id]] * fill
        ranks.append(list(g.ranks) + [-1] * fill)
    R = min(block_size - 1, max(len(r) for r in responses))
    cut_prompts, cut_responses = [], []
    for p, r in zip(prompts, responses):
        p_cut, was_cut = truncate_prompt(p, block_size - R)
        n_truncated += was_cut or len(r) > R
        cut_prompts.append(p_cut)
        cut_responses.append(r[:R])
    ids, attention_mask, response_mask = join_prompt_response(cut_prompts, cut_responses, pad_id)
    return ids, attention_mask, response_mask, torch.tensor(ranks, dtype=torch.long), n_truncated


def label_distinct(prompt: str, texts: list[str], temperature: float, rng: random.Random) -> list[int]:
    """The labeler's ranks of K sampled responses, each distinct text shown once; repeats get -1 (absent)."""
    distinct = list(dict.fromkeys(texts))  # first occurrences, in order
    place = dict(zip(distinct, task.label_ranks(prompt, distinct, temperature, rng)))
    ranks, seen = [], set()
    for t in texts:
        ranks.append(-1 if t in seen else place[t])
        seen.add(t)
    return ranks


def with_twins(prompt: str, texts: list[str], ids: list[list[int]], enc, rng: random.Random):
    """(texts, ids) of a prompt's candidates with the slipped twins (`task.slipped_twin`) of its first
    MAX_TWINS distinct right calculator answers after them; a twin that already is a candidate is not
    added again. A twin's tokens are its text encoded (`encode_response`): with the byte tokenizer exactly
    the tokens sampling would have given it."""
    twins = [x for t in dict.fromkeys(texts) if (x := task.slipped_twin(prompt, t, rng)) is not None]
    twins = [x for x in dict.fromkeys(twins) if x not in texts][:MAX_TWINS]
    return texts + twins, ids + [encode_response(enc, x) for x in twins]


def comparison_records(groups: list[Ranked]) -> list[dict]:
    """The groups as K-way records {prompt, responses, ranks} that `read_jsonl` reads back.

    Absent candidates (rank -1) and empty texts are dropped, the others keep their ranks (ties stay
    ties), and a group left with fewer than 2 distinct responses is skipped: it holds no comparison.
    """
    records = []
    for g in groups:
        kept = [(t, r) for t, r in zip(g.texts, g.ranks) if r >= 0 and t.strip()]
        if len({t for t, _ in kept}) >= 2:
            texts, ranks = zip(*kept)
            records.append({"prompt": g.prompt, "responses": list(texts), "ranks": list(ranks)})
    return records


def write_comparisons(path: str, groups: list[Ranked]) -> list[dict]:
    """Write `comparison_records(groups)` to `path` atomically (a temporary file renamed into place)."""
    records = comparison_records(groups)
    write_jsonl(path + ".tmp", records)
    os.replace(path + ".tmp", path)
    return records


if __name__ == "__main__":
    args = parse_args(Args)
    t_begin = time.time()

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
    # the candidates' sampling: the same seed on every rank, so every rank makes the same comparisons and
    # the result does not depend on the number of processes (the sampling is not split over the ranks)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models: the SFT policy writes the candidates, then its trunk becomes the reward model's -------
    policy, ck = load_model(args.init, device, kind="lm")
    enc = load_tokenizer(ck)
    tool = task.calculator_tool(enc) if args.tool else None  # the sampler's calculator; None: --no-tool
    block_size, pad = policy.config.block_size, eos_id(enc)
    require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens} must leave room for a "
            f"prompt in the context of {block_size} tokens")
    max_prompt = block_size - args.max_new_tokens  # the prompt budget sampling uses, here and in PPO

    def sample_groups(prompts, label_rng, twin_rng=None):
        """K SFT samples per prompt (the tool's output in them: the reward model reads it), ranked by the
        simulated labeler; with twin_rng, each prompt's first MAX_TWINS distinct right calculator answers
        are ranked beside their slipped twins (`task.slipped_twin`), one ranking over all."""
        flat = [p for p in prompts for _ in range(args.k)]
        out = sample_responses(policy, enc, flat, args.max_new_tokens, temperature=args.temperature,
                               generator=generator, device=device, tool=tool)
        prompt_ids, _ = encode_prompts(enc, prompts, max_prompt)  # as sampling cut them (it never does here)
        groups = []
        for b, p in enumerate(prompts):
            candidates = out[b * args.k:(b + 1) * args.k]
            texts, ids = [t for t, _ in candidates], [r for _, r in candidates]
            if twin_rng is not None:
                texts, ids = with_twins(p, texts, ids, enc, twin_rng)
            ranks = label_distinct(p, texts, args.label_temperature, label_rng)
            groups.append(Ranked(p, prompt_ids[b], ids, texts, ranks, [task.judge(p, t) for t in texts]))
        return groups

    def record_group(r):
        require(isinstance(r, (PairRecord, RankRecord)), f"{args.data}: {type(r).__name__}s carry no "
                "preference; the reward model needs pairwise, K-way or HH-RLHF records")
        if isinstance(r, PairRecord):
            responses, ranks = [r.chosen, r.rejected], [0, 1]
        else:
            responses, ranks = r.responses, r.ranks
        ids = [encode_response(enc, x) for x in responses]
        return Ranked(r.prompt, encode_prompt(enc, r.prompt), ids, list(responses), list(ranks))

    # ---- data: K ranked candidates per prompt ------------------------------------------------------
    t0 = time.time()
    policy.eval()
    builtin = not args.data  # the gold judge, the labeler and the held-out prompts: built-in task only
    if args.data:
        records = read_jsonl(args.data, "auto")
        random.Random(args.seed).shuffle(records)
        n_val = max(1, len(records) // 20)
        val_groups = [record_group(r) for r in records[:n_val][: args.eval_prompts]]
        train_groups = [record_group(r) for r in records[n_val:]]
        # The statistics that normalise the reward are taken on what PPO will score: SFT samples, one per
        # prompt of the file. Draw them now, before training turns the policy's trunk into the RM's.
        stat_prompts = [r.prompt for r in records[: args.eval_prompts]]
        samples = sample_responses(policy, enc, stat_prompts, args.max_new_tokens, generator=generator,
                                   temperature=args.temperature, device=device, tool=tool)
        stat_ids, _ = encode_prompts(enc, stat_prompts, max_prompt)
        stat_groups = [Ranked(p, ids, [r], [text], [0])
                       for p, ids, (text, r) in zip(stat_prompts, stat_ids, samples)]
    else:
        pool = task.train_prompts()
        if args.n_prompts > len(pool):
            print(f"note: --n-prompts {args.n_prompts} is more than the task's {len(pool)} training prompts; "
                  f"using all {len(pool)}")
        prompts = random.Random(args.seed).sample(pool, min(args.n_prompts, len(pool)))
        train_groups = sample_groups(prompts, random.Random(args.seed + 1),
                                     random.Random(args.seed + 3) if args.copy_twins else None)
        val_groups = sample_groups(task.heldout_prompts()[: args.eval_prompts], random.Random(args.seed + 2))
        stat_groups = val_groups  # every held-out candidate is an SFT sample, repeats included
    require(train_groups, f"{args.data}: {len(val_groups)} record(s), too few to hold one out and train on")
    K = max(len(g.responses) for g in val_groups)  # candidates a held-out prompt (a training batch: its own)
    sample_seconds = time.time() - t0
    n_pairs = sum(sum(0 <= a < b for a in g.ranks for b in g.ranks) for g in train_groups)
    n_twins = sum(len(g.responses) - args.k for g in train_groups) if builtin else 0
    print(f"data: {len(train_groups)} train, {len(val_groups)} held-out prompts, K = {K}, "
          f"{n_pairs} training pairs ({sample_seconds:.0f} s)"
          + (f"; {n_twins} slipped twins among the candidates" if args.copy_twins and builtin else ""))
    require(n_pairs > 0, "no ranked pair to learn from: every prompt's responses are tied or repeated "
            + ("(in " + args.data + ")" if args.data else f"(--k {args.k}, --n-prompts {args.n_prompts})"))
    val_ranks = torch.tensor([g.ranks + [-1] * (K - len(g.ranks)) for g in val_groups])  # (N, K)
    if builtin:
        # Gold ranks over the same candidates the labeler saw; rounding makes equal-looking totals
        # (different criteria summing to the same reward) tie rather than differ by 1e-16.
        gold = torch.tensor([g.gold for g in val_groups], dtype=torch.float64).round(decimals=6)
        val_gold_ranks = ranks_from_values(gold, val_ranks >= 0)
        # How well the noisy labels themselves follow the gold order: what the reward model learns from.
        labels_vs_gold = pairwise_accuracy(-val_ranks.float(), val_gold_ranks).item()
        print(f"held-out labels agree with the gold order on {labels_vs_gold:.3f} of the pairs gold orders")
        # what a call is worth in the comparisons, against abstaining: the reward model's reason to call
        hard_seen = hard_candidates(train_groups)
        print("hard questions, the training candidates: " + ", ".join(
            f"{k} {v['n']} (right {v['right']:.2f}, gold {v['gold']:+.2f})" for k, v in hard_seen.items())
            + ("" if hard_seen else "none"))

    # ---- the reward model ---------------------------------------------------------------------------
    model = ScalarHead(policy).to(device).train()  # the head is the only new parameter: Linear(n_embd, 1)
    del policy  # its trunk now belongs to the reward model and is trained
    print(f"reward model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, tokenizer "
          f"{enc.name}, device {device}, dtype {dtype}")

    def get_batch(groups, k):
        """B groups -> tokens, attn, mask (B*k, T), ranks (B, k), rows truncated: k candidates a group."""
        tokens, attn, mask, ranks, n_cut = rm_batch(groups, k, pad, block_size)
        return tokens.to(device), attn.to(device), mask.to(device), ranks.to(device), n_cut

    @torch.no_grad()
    def scores_of(groups):
        """Scores (N, k) of every candidate of every group, in batches; k = the most a group holds."""
        model.eval()
        out, k = [], max(len(g.responses) for g in groups)
        for i in range(0, len(groups), args.batch_size):
            tokens, attn, mask, ranks, _ = get_batch(groups[i:i + args.batch_size], k)
            with autocast:
                out.append(gather_last(model(tokens, attn), mask).float().view(ranks.shape).cpu())
        model.train()
        return torch.cat(out)

    def evaluate_rm():
        scores = scores_of(val_groups)
        metrics = dict(val_loss=ranking_loss(scores, val_ranks).item(),
                       acc_labels=pairwise_accuracy(scores, val_ranks).item())
        if builtin:
            metrics["acc_gold"] = pairwise_accuracy(scores, val_gold_ranks).item()
        return metrics, scores

    # ---- optimizer --------------------------------------------------------------------------------
    optimizer = adamw(model, args.lr, args.weight_decay, device)
    lr_at = lambda step: warmup_cosine(step, args.lr, args.warmup_steps, args.max_steps)  # noqa: E731
    train_model = dist.wrap(model)  # under torchrun, DDP: backward averages the gradients over the ranks
    train_model = torch.compile(train_model) if args.compile else train_model
    # what --resume restores besides the weights; the candidates are sampled again, the same from the seed
    state = dict(optimizer=optimizer, data_rng=data_rng)
    start, saved = dist.resume_or_start(args, model, state)
    order, n_truncated = saved.get("order", []), saved.get("n_truncated", 0)  # the epoch under way
    log = Log(args.out, first_step=start) if dist.is_main else dist.skip

    # ---- training loop ----------------------------------------------------------------------------
    last = args.max_steps - 1
    t_start = time.time()
    for step in tqdm(range(start, args.max_steps), "rm", initial=start, total=args.max_steps,
                     disable=dist.tqdm_disable):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        if len(order) < args.batch_size:  # epochs: every prompt once, in a fresh order each pass
            order += data_rng.sample(range(len(train_groups)), len(train_groups))
        batch, order = [train_groups[i] for i in order[:args.batch_size]], order[args.batch_size:]
        batch = dist.shard(batch)  # this rank's slice of the batch, as many candidates as its groups hold
        tokens, attn, mask, ranks, n_cut = get_batch(batch, max(len(g.responses) for g in batch))
        n_truncated += dist.all_reduce(n_cut).item()
        with autocast:
            values = train_model(tokens, attn)                            # (B*K, T): a scalar per position
        # the score of a candidate is its scalar at the last response token (its EOS when it has one)
        rewards = gather_last(values, mask).float().view(ranks.shape)    # (B, K)
        # L = mean over prompts of mean over ranked pairs (i above j) of -log sigmoid(r_i - r_j)
        # (the mean over the prompts of the whole batch, every rank's: dist.batch_mean)
        stats = ranking_stats(rewards, ranks)
        loss = dist.batch_mean(ranking_loss(rewards, ranks), stats["prompts"])
        check_finite(loss, step, args.out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

        evaluate_now = step % args.eval_interval == 0 or step == last
        if step % 10 == 0 or evaluate_now:
            # this rank's pairs -> the batch's: acc and margin are means over pairs, pairs and prompts counts
            stats = dist.batch_stats(stats, stats["pairs"], ("pairs", "prompts"))
            metrics = dict(loss=loss, **stats, grad_norm=grad_norm, lr=lr_at(step),
                           ms=(time.time() - t0) * 1000)
            if evaluate_now and dist.is_main:
                val_metrics, val_scores = evaluate_rm()  # the last step's is the final evaluation
                metrics.update(val_metrics)
            log(step, print_line=evaluate_now, **metrics)
        if (step + 1) % args.ckpt_interval == 0 and step < last:
            dist.save_resume(args.out, model, enc.name, args, step + 1, state, order=order,
                             n_truncated=n_truncated)
    if n_truncated:
        print(f"note: {n_truncated} training rows were truncated to fit block_size {block_size}")
    train_seconds = time.time() - t_start
    epochs = args.max_steps * args.batch_size / len(train_groups)
    if not dist.is_main:  # rank 0 alone evaluates and writes the result; the others wait for it
        dist.barrier()
        sys.exit()

    # ---- final evaluation and save ----------------------------------------------------------------
    stat_scores = val_scores if stat_groups is val_groups else scores_of(stat_groups)[:, :1]
    extra = dict(reward_mean=stat_scores.mean().item(), reward_std=stat_scores.std().item(),
                 accuracy_vs_labels=val_metrics["acc_labels"], accuracy_vs_gold=val_metrics.get("acc_gold"),
                 val_loss=val_metrics["val_loss"], train_seconds=train_seconds, sample_seconds=sample_seconds,
                 epochs=epochs, peak_memory_mb=peak_memory_mb(device), models_in_memory=1,
                 world_size=dist.WORLD_SIZE)
    if builtin:
        extra["labels_vs_gold"] = labels_vs_gold
        extra["hard_candidates"] = hard_seen
        # the pairs that differ in correctness alone, by kind: can the RM teach correctness, not manners?
        right, seen = {}, {}
        for g, s in zip(val_groups, val_scores):
            kind = task.prompt_kind(g.prompt)
            for i, j in correctness_only_pairs(g):
                if g.ranks[i] >= 0 and g.ranks[j] >= 0:
                    right[kind] = right.get(kind, 0) + bool(s[i] > s[j])
                    seen[kind] = seen.get(kind, 0) + 1
        extra["accuracy_correctness_by_kind"] = {k: right[k] / seen[k] for k in task.KINDS if k in seen}
        extra["pairs_correctness_by_kind"] = {k: seen[k] for k in task.KINDS if k in seen}
        # constructed replies that differ in one thing (task.contrast_pairs), on the same held-out prompts:
        # the right answer or a wrong one in the same words; on hard, a right call or "I don't know"
        tests = task.contrast_pairs(task.heldout_prompts()[: args.eval_prompts], seed=args.seed)
        pairs = [Ranked(p, encode_prompt(enc, p), [encode_response(enc, b), encode_response(enc, w)], [b, w],
                        [0, 1]) for _, p, b, w in tests]
        contrast = scores_of(pairs)[:, :2]                                      # (N, 2): better, worse
        wins = {}
        for (name, *_), better_wins in zip(tests, (contrast[:, 0] > contrast[:, 1]).tolist()):
            wins.setdefault(name, []).append(better_wins)
        extra["contrast_accuracy"] = {t: sum(w) / len(w) for t in task.CONTRAST_TESTS if (w := wins.get(t))}
        for g, s in zip(val_groups[:3], val_scores):
            print(f"  {g.prompt!r}")
            for k in sorted(range(len(g.texts)), key=lambda k: -s[k].item()):
                print(f"      score {s[k].item():+.2f}  gold {g.gold[k]:+.2f}  rank {g.ranks[k]:2d}  "
                      f"{g.texts[k]!r}")
    print(f"held-out accuracy: vs labels {val_metrics['acc_labels']:.4f}"
          + (f" | vs gold {val_metrics['acc_gold']:.4f}" if "acc_gold" in val_metrics else "")
          + f" | SFT-sample scores: mean {extra['reward_mean']:+.3f} std {extra['reward_std']:.3f}")
    if not builtin:  # comparisons an earlier built-in run left here would be read by DPO's default
        for name in ("comparisons.jsonl", "comparisons_heldout.jsonl"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    if builtin:
        print("held-out pairs that differ in correctness alone, accuracy by kind: " + ", ".join(
            f"{k} {v:.2f} ({extra['pairs_correctness_by_kind'][k]})"
            for k, v in extra["accuracy_correctness_by_kind"].items()))
        print("constructed pairs (task.contrast_pairs), the better reply scored higher: " + ", ".join(
            f"{k} {v:.2f}" for k, v in extra["contrast_accuracy"].items()))
        for name, groups in (("comparisons", train_groups), ("comparisons_heldout", val_groups)):
            # the labels this model learned from, for the offline methods (train_dpo.py)
            written = write_comparisons(os.path.join(args.out, f"{name}.jsonl"), groups)
            n = sum(sum(0 <= a < b for a in r["ranks"] for b in r["ranks"]) for r in written)
            print(f"wrote {len(written)} ranked prompts ({n} pairs) to {args.out}/{name}.jsonl")
    save_checkpoint(args.out, model, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training ({epochs:.1f} epochs), "
          f"{time.time() - t_begin:.0f} s in all")
    dist.barrier()  # the other ranks exit with this one
