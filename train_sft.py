"""Supervised fine-tuning (SFT): the first stage of RLHF.

Train the policy by maximum likelihood on demonstrations (prompt, response) (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", Sec. 3.5). The loss is taken
on the response tokens only, EOS included: the prompt is given, not something the policy must learn
to write, and the EOS token is how it learns to stop.

Deviations from InstructGPT: no pretraining here by default (a tiny GPT learns the built-in task from
scratch, in 43 minutes on the README's 2-core AMD machine); `--init gpt2` (or a folder with GPT-2
weights) starts from GPT-2.

    python train_sft.py                                      # built-in task, CPU, 43 minutes (2 cores)
    python train_sft.py --init gpt2 --tokenizer gpt2 --data sft.jsonl --device cuda   # one GPU
    torchrun --standalone --nproc_per_node 8 train_sft.py --init gpt2 ...   # 8 GPUs (see minirlhf/dist.py)

Writes out/sft/ckpt.pt and out/sft/metrics.jsonl; on the built-in task, reports the held-out mean gold
reward of its samples (the number RLHF must raise). A stopped run continues with `--resume`.
"""

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf import dist, task
from minirlhf.checkpoint import ckpt_path, load_model, remove_resume, save_checkpoint
from minirlhf.cli import (Log, adamw, arg, check_device, check_dtype, check_finite, nonnegative, parse_args,
                          peak_memory_mb, positive, require, warmup_cosine)
from minirlhf.data import PairRecord, SFTRecord, packed_sft_batch, read_jsonl, responses_fit, tool_mask
from minirlhf.evaluate import evaluate, print_samples, summary_line
from minirlhf.model import GPT, GPT2_NAMES, GPTConfig
from minirlhf.tokenizer import encode_prompt, encode_response, eos_id, get_encoding, load_tokenizer


@dataclass
class Args:
    """Supervised fine-tuning on demonstrations."""
    # I/O
    out: str = arg("out/sft", "output folder for the checkpoint and metrics.jsonl")
    init: str = arg("", "start from: '' (random init), a GPT-2 name or folder, or a minirlhf checkpoint")
    data: str = arg("", "JSONL of {prompt, response} (or HH-RLHF chosen dialogues); '' = the built-in task")
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    overwrite: bool = arg(False, "replace a finished run saved in --out")
    ckpt_interval: int = arg(100, "save out/sft/resume.pt every this many steps, for --resume", positive)
    # system
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu | cuda | cuda:N | auto", check_device)
    dtype: str = arg("auto", "float32 | bfloat16 (autocast, CUDA only) | auto", check_dtype)
    compile: bool = arg(False, "torch.compile the model (GPU)")
    threads: int = arg(0, "CPU threads (0: torch's default); a fixed count is bit-reproducible", nonnegative)
    # optimisation
    lr: float = arg(3e-3, "peak learning rate (linear warmup, cosine decay to lr * --lr-final)", positive)
    lr_final: float = arg(0.0, "the learning rate at the end, a fraction of --lr: on the annotators' noisy "
                          "labels a larger one keeps moving which facts the model holds", nonnegative)
    warmup_steps: int = arg(30, "learning-rate warmup", nonnegative)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", nonnegative)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", positive)
    batch_size: int = arg(32, "sequences per step", positive)
    # schedule and evaluation
    max_steps: int = arg(9600, "optimisation steps", positive)
    eval_interval: int = arg(400, "held-out loss (and the policy's samples) every this many steps", positive)
    eval_prompts: int = arg(300, "held-out prompts for the final evaluation (0: none)", nonnegative)
    monitor_prompts: int = arg(64, "built-in task: held-out prompts for the interval evaluations (0: none)",
                               nonnegative)
    max_new_tokens: int = arg(88, "response length limit when sampling", positive)
    tool: bool = arg(True, "sample with the calculator of minirlhf/task.py, train on the policy's own tokens "
                     "only (--no-tool: without it)")
    # SFT: the model (a random init) and the demonstrations
    tokenizer: str = arg("", "bytes | gpt2 | path/to/gpt2.tiktoken; '' = --init's (bytes for a random init)")
    n_layer: int = arg(4, "model size for a random init (--init sets its own)", positive)
    n_head: int = arg(8, "attention heads", positive)
    n_embd: int = arg(128, "width", positive)
    block_size: int = arg(128, "context length (prompt + response)", positive)
    n_demos: int = arg(320000, "built-in task: demonstrations the simulated annotators write", positive)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level negative log-likelihood of the response tokens.

        L = - (1 / N) * sum_{b, t : m[b, t] = 1} log softmax(z[b, t])[y[b, t]],    N = sum_{b, t} m[b, t]

    z = `logits` (B, T, V): logits[b, t] scores targets[b, t] (the caller has already shifted);
    y = `targets` (B, T) int64; m = `mask` (B, T) of 0/1, 1 on response tokens (EOS included), 0 on
    prompt and padding.

    N pools the tokens of the whole batch: a token-level mean, not a mean of per-sequence means, so a
    long response weighs more than a short one (a mean of means would up-weight the tokens of short
    responses). An all-zero mask gives 0 (N is clamped to 1), still attached to the graph.

    Returns a scalar.
    """
    valid = mask.bool()
    # Masked positions may hold any id (a pad id, -1, -100); gather needs a valid index there, and the
    # mask, not the id, decides what is ignored.
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    # Cross-entropy in at least float32: bf16 log-softmax over a large vocabulary loses the small
    # probabilities the loss is made of. float64 (gradcheck) stays float64.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), safe_targets.flatten(), reduction="none")  # (B*T,)
    nll = nll.view_as(targets)  # (B, T)
    mask = mask.to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def sft_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the loss was taken over, for the log; arguments as in `sft_loss`.

    tokens:    N, the response tokens the loss averaged over;
    token_acc: the share of them whose target is the logits' argmax (what greedy decoding would emit
               given the right prefix), a number the loss alone does not show.
    """
    valid = mask.bool()
    hits = (logits.argmax(-1) == targets) & valid  # (B, T)
    n = valid.sum()
    return {"tokens": n, "token_acc": hits.sum() / n.clamp(min=1)}


if __name__ == "__main__":
    args = parse_args(Args)

    # ---- device, dtype, seed ----------------------------------------------------------------------
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init(device)  # under torchrun: join the process group; cuda becomes cuda:LOCAL_RANK
    dist.split(args.batch_size, "--batch-size")  # each of the W ranks trains on batch_size / W of a batch
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=(dtype == "bfloat16"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_rng = random.Random(args.seed)                           # which demonstrations, in which order
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- models: the policy (and its tokenizer) ---------------------------------------------------
    if args.init and os.path.exists(ckpt_path(args.init)):                 # an earlier minirlhf checkpoint
        policy, ck = load_model(args.init, kind="lm")
        tok_name = ck["tokenizer"]
        enc = get_encoding(args.tokenizer) if args.tokenizer else load_tokenizer(ck)  # the ranks it carries
    elif args.init:                                                        # GPT-2 weights
        require(os.path.isdir(args.init) or args.init in GPT2_NAMES, f"--init {args.init}: no such "
                f"checkpoint or folder, and not a GPT-2 name ({', '.join(GPT2_NAMES)})")
        policy, tok_name = GPT.from_pretrained(args.init), "gpt2"
        # the folder's own vocab.json + merges.txt when it has them, else tiktoken's GPT-2 (downloaded once)
        enc = get_encoding(args.tokenizer or (args.init if os.path.isdir(args.init) else "gpt2"))
    else:                                                                  # a random init
        require(args.n_embd % args.n_head == 0,
                f"--n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
        enc = get_encoding(args.tokenizer or "bytes")
        policy = GPT(GPTConfig(block_size=args.block_size, vocab_size=enc.n_vocab,
                               n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
        tok_name = enc.name
    require(enc.name == tok_name,
            f"--tokenizer {args.tokenizer} is not the tokenizer of --init {args.init} ({tok_name})")
    tool = task.calculator_tool(enc) if args.tool else None  # the sampler's calculator; None: --no-tool
    block_size = policy.config.block_size
    require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens} must leave room for a "
            f"prompt in the context of {block_size} tokens")
    policy.to(device).train()
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters, tokenizer {enc.name}, device {device}, "
          f"dtype {dtype}")

    # ---- data: demonstrations ---------------------------------------------------------------------
    builtin = not args.data  # the gold judge and the held-out prompts: built-in task only
    if args.data:
        # a response longer than the context by itself is an error that names its file, line and field
        fits = responses_fit(lambda text: encode_response(enc, text), block_size)
        records = read_jsonl(args.data, "auto", check=fits)
        require(isinstance(records[0], (SFTRecord, PairRecord)),
                f"{args.data}: {type(records[0]).__name__}s hold no response to imitate: SFT needs "
                "{prompt, response}, pairwise or HH-RLHF records")
        pairs = [(r.prompt, r.response if isinstance(r, SFTRecord) else r.chosen) for r in records]
        random.Random(args.seed).shuffle(pairs)
        n_val = max(1, len(pairs) // 20)
        val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]
    else:
        train_pairs = task.sft_dataset(args.n_demos, seed=args.seed)
        val_pairs = [(p, task.demonstration(p, random.Random(i)))
                     for i, p in enumerate(task.heldout_prompts())]
    require(train_pairs, f"{args.data}: {len(val_pairs)} record(s), too few to hold one out and train on")
    encode = lambda ps: ([encode_prompt(enc, p) for p, _ in ps], [encode_response(enc, r) for _, r in ps])
    train_p, train_r = encode(train_pairs)
    val_p, val_r = encode(val_pairs)
    # which response tokens the policy wrote (1) and which the calculator (0), found once: data.tool_mask
    train_m, val_m = ([tool_mask(r, tool) for r in rs] if tool else None for rs in (train_r, val_r))
    # A demonstration longer than the context loses the start of its prompt (see data.sft_batch).
    n_long = sum(len(p) + len(r) > block_size + 1 for p, r in zip(train_p, train_r))
    print(f"data: {len(train_pairs)} train, {len(val_pairs)} validation demonstrations"
          + (f"; {n_long} longer than the context ({block_size}) lose the start of their prompt"
             if n_long else ""))

    def get_batch(P, R, M, idx):
        """Demonstrations idx -> inputs, targets, mask, doc_ids (R, block_size): packed end to end, each
        attending to itself only, instead of padded to the longest (see data.packed_sft_batch); mask 1
        on response targets and EOS, 0 on the tool's output in them (the policy calls, the tool answers)."""
        masks = [M[i] for i in idx] if M else None
        batch = packed_sft_batch([P[i] for i in idx], [R[i] for i in idx], eos_id(enc), block_size, masks)
        return (x.to(device) for x in batch)

    @torch.no_grad()
    def val_loss():
        policy.eval()
        total, n = 0.0, 0
        for i in range(0, len(val_p), args.batch_size):
            rows = range(i, min(i + args.batch_size, len(val_p)))
            inputs, targets, mask, docs = get_batch(val_p, val_r, val_m, rows)
            with autocast:
                logits = policy(inputs, doc_ids=docs)
            k = mask.sum().item()
            total += sft_loss(logits, targets, mask).item() * k
            n += k
        policy.train()
        return total / n

    # ---- optimizer --------------------------------------------------------------------------------
    optimizer = adamw(policy, args.lr, args.weight_decay, device)
    lr_at = lambda step: warmup_cosine(step, args.lr, args.warmup_steps, args.max_steps,  # noqa: E731
                                       args.lr_final)
    train_policy = dist.wrap(policy)  # under torchrun, DDP: backward averages the gradients over the ranks
    train_policy = torch.compile(train_policy) if args.compile else train_policy
    # what --resume restores besides the weights: the optimizer and the RNGs (the batches drawn so far)
    state = dict(optimizer=optimizer, data_rng=data_rng)
    start, _ = dist.resume_or_start(args, policy, state)
    log = Log(args.out, first_step=start) if dist.is_main else dist.skip

    # ---- training loop ----------------------------------------------------------------------------
    last = args.max_steps - 1
    t_start = time.time()
    for step in tqdm(range(start, args.max_steps), "sft", initial=start, total=args.max_steps,
                     disable=dist.tqdm_disable):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        idx = [data_rng.randrange(len(train_p)) for _ in range(args.batch_size)]  # the same on every rank
        # this rank's slice of the batch
        inputs, targets, mask, docs = get_batch(train_p, train_r, train_m, dist.shard(idx))
        with autocast:
            logits = train_policy(inputs, doc_ids=docs)  # each demonstration sees itself only
        # L = -mean over response tokens of log pi(y_t | x, y_<t); logits[:, t] scores targets[:, t]
        # (the mean over the tokens of the whole batch, every rank's: dist.batch_mean)
        n_tokens = mask.sum()
        loss = dist.batch_mean(sft_loss(logits, targets, mask), n_tokens)
        check_finite(loss, step, args.out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        optimizer.step()

        evaluate_now = step % args.eval_interval == 0 or step == last
        if step % 10 == 0 or evaluate_now:
            # this rank's tokens -> the batch's: token_acc is a mean over tokens, tokens a count
            stats = dist.batch_stats(sft_stats(logits, targets, mask), n_tokens, ("tokens",))
            metrics = dict(loss=loss, **stats, grad_norm=grad_norm, lr=lr_at(step),
                           ms=(time.time() - t0) * 1000)
            if evaluate_now and dist.is_main:
                metrics["val_loss"] = val_loss()
            # (weights this step made non-finite cannot be sampled: the next step's loss check stops the run)
            sane = evaluate_now and dist.is_main and math.isfinite(metrics["val_loss"])
            if sane and builtin and args.monitor_prompts:
                # what the loss does not show: each kind's share of right answers, sampled at T = 1 and
                # greedy (what the model knows, apart from what sampling costs it); the same seed every
                # time, so the points differ by the policy, not by the sampling noise
                m, _ = evaluate(policy, enc, task.heldout_prompts()[: args.monitor_prompts],
                                args.max_new_tokens, seed=args.seed, device=device, greedy=True, tool=tool)
                policy.train()
                metrics.update(eval_gold_reward=m["gold_reward_mean"],
                               **{f"eval_correct_{k}": v for k, v in m["correct_rate_by_kind"].items()},
                               **{f"eval_greedy_{k}": v for k, v in m["greedy_correct_rate_by_kind"].items()})
            log(step, print_line=evaluate_now, **metrics)
        if (step + 1) % args.ckpt_interval == 0 and step < last:
            dist.save_resume(args.out, policy, enc.name, args, step + 1, state)
    train_seconds = time.time() - t_start
    if not dist.is_main:  # rank 0 alone evaluates and writes the result; the others wait for it
        dist.barrier()
        sys.exit()

    # ---- final evaluation and save ----------------------------------------------------------------
    policy.eval()
    extra = dict(train_seconds=train_seconds, peak_memory_mb=peak_memory_mb(device), models_in_memory=1,
                 world_size=dist.WORLD_SIZE, val_loss=val_loss())
    # the result is saved before anything that could fail, then again with the evaluation's numbers
    save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    if builtin and args.eval_prompts:
        prompts = task.heldout_prompts()[: args.eval_prompts]
        metrics, samples = evaluate(policy, enc, prompts, args.max_new_tokens, seed=args.seed, device=device,
                                    tool=tool)
        print_samples(samples)
        print(summary_line(metrics))
        save_checkpoint(args.out, policy, enc.name, asdict(args), args.max_steps, {**extra, **metrics})
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training")
    dist.barrier()  # the other ranks exit with this one
