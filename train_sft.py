"""Supervised fine-tuning (SFT): the first stage of RLHF.

Train the policy by maximum likelihood on demonstrations (prompt, response) (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", Sec. 3.5). The loss is taken
on the response tokens only, EOS included: the prompt is given, not something the policy must learn
to write, and the EOS token is how it learns to stop.

Deviations from InstructGPT: no pretraining here by default (a tiny GPT learns the built-in task from
scratch in about two minutes); `--init gpt2` (or a folder with GPT-2 weights) starts from GPT-2.

    python train_sft.py                                      # built-in task, CPU, ~2 minutes
    python train_sft.py --init gpt2 --tokenizer gpt2 --data sft.jsonl --device cuda   # one GPU

Writes out/sft/ckpt.pt and out/sft/metrics.jsonl; on the built-in task, reports the held-out mean gold
reward of its samples (the number RLHF must raise). A stopped run continues with `--resume`.
"""

import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf import task
from minirlhf.checkpoint import ckpt_path, load_model, remove_resume, resume_or_start, save_checkpoint, save_resume
from minirlhf.cli import Log, arg, check_finite, parse_args, peak_memory_mb, require
from minirlhf.data import PairRecord, SFTRecord, read_jsonl, sft_batch
from minirlhf.evaluate import evaluate
from minirlhf.model import GPT, GPT2_NAMES, GPTConfig
from minirlhf.tokenizer import encode_prompt, encode_response, eos_id, get_encoding, load_tokenizer


@dataclass
class Args:
    """Supervised fine-tuning on demonstrations."""
    out: str = arg("out/sft", "output folder for the checkpoint and metrics.jsonl")
    init: str = arg("", "start from: '' (random init), a GPT-2 name or folder, or a minirlhf checkpoint")
    data: str = arg("", "JSONL of {prompt, response} (or HH-RLHF chosen dialogues); '' = the built-in task")
    tokenizer: str = arg("", "bytes | gpt2 | path/to/gpt2.tiktoken; '' = --init's (bytes for a random init)")
    n_layer: int = arg(4, "model size for a random init (--init sets its own)")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(128, "width")
    block_size: int = arg(128, "context length (prompt + response)")
    n_demos: int = arg(20000, "built-in task: how many demonstrations the simulated annotators write")
    seed: int = arg(1337, "random seed")
    device: str = arg("auto", "cpu | cuda | auto")
    dtype: str = arg("auto", "float32 | bfloat16 (autocast, CUDA) | auto")
    compile: bool = arg(False, "torch.compile the model (GPU)")
    lr: float = arg(3e-3, "peak learning rate (linear warmup, cosine decay to lr/10)")
    warmup_steps: int = arg(30, "learning-rate warmup")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, "clip the gradient norm to this")
    batch_size: int = arg(32, "sequences per step")
    max_steps: int = arg(800, "optimisation steps")
    eval_interval: int = arg(200, "held-out loss and a sample every this many steps")
    ckpt_interval: int = arg(100, "save out/sft/resume.pt every this many steps, for --resume")
    resume: bool = arg(False, "continue the run saved in --out (same arguments)")
    eval_prompts: int = arg(300, "built-in task: held-out prompts for the final gold-reward evaluation")
    max_new_tokens: int = arg(48, "response length limit when sampling")


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


if __name__ == "__main__":
    args = parse_args(Args)

    # ---- device, dtype, seed ----------------------------------------------------------------------
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    dtype = ("bfloat16" if device == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=(dtype == "bfloat16" and device == "cuda"))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- model and tokenizer ----------------------------------------------------------------------
    if args.init and os.path.exists(ckpt_path(args.init)):                 # an earlier minirlhf checkpoint
        model, ck = load_model(args.init, kind="lm")
        tok_name = ck["tokenizer"]
        enc = get_encoding(args.tokenizer) if args.tokenizer else load_tokenizer(ck)  # from the ranks it carries
    elif args.init:                                                        # GPT-2 weights
        require(os.path.isdir(args.init) or args.init in GPT2_NAMES,
                f"--init {args.init}: no such checkpoint or folder, and not a GPT-2 name ({', '.join(GPT2_NAMES)})")
        model, tok_name = GPT.from_pretrained(args.init), "gpt2"
        # the folder's own vocab.json + merges.txt when it has them, else tiktoken's GPT-2 (downloaded once)
        enc = get_encoding(args.tokenizer or (args.init if os.path.isdir(args.init) else "gpt2"))
    else:                                                                  # a random init
        enc = get_encoding(args.tokenizer or "bytes")
        model = GPT(GPTConfig(block_size=args.block_size, vocab_size=enc.n_vocab,
                              n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
        tok_name = enc.name
    require(enc.name == tok_name, f"--tokenizer {args.tokenizer} is not the tokenizer of --init {args.init} ({tok_name})")
    require(0 < args.max_new_tokens < model.config.block_size,
            f"--max-new-tokens {args.max_new_tokens} must be positive and leave room for a prompt in the context "
            f"of {model.config.block_size} tokens")
    require(min(args.batch_size, args.max_steps, args.eval_interval, args.ckpt_interval) > 0,
            "--batch-size, --max-steps, --eval-interval and --ckpt-interval must be positive")
    model.to(device).train()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, tokenizer {enc.name}, device {device}, dtype {dtype}")

    # ---- data -------------------------------------------------------------------------------------
    if args.data:
        records = read_jsonl(args.data, "auto")
        require(isinstance(records[0], (SFTRecord, PairRecord)),
                f"{args.data}: {type(records[0]).__name__}s hold no response to imitate: SFT needs "
                "{prompt, response}, pairwise or HH-RLHF records")
        pairs = [(r.prompt, r.response) if isinstance(r, SFTRecord) else (r.prompt, r.chosen) for r in records]
        random.Random(args.seed).shuffle(pairs)
        n_val = max(1, len(pairs) // 20)
        val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]
    else:
        train_pairs = task.sft_dataset(args.n_demos, seed=args.seed)
        val_pairs = [(p, task.demonstration(p, random.Random(i))) for i, p in enumerate(task.heldout_prompts())]
    encode = lambda ps: ([encode_prompt(enc, p) for p, _ in ps], [encode_response(enc, r) for _, r in ps])
    train_p, train_r = encode(train_pairs)
    val_p, val_r = encode(val_pairs)
    # A demonstration longer than the context loses the start of its prompt (see data.sft_batch).
    n_long = sum(len(p) + len(r) > model.config.block_size + 1 for p, r in zip(train_p, train_r))
    print(f"data: {len(train_pairs)} train, {len(val_pairs)} validation demonstrations"
          + (f"; {n_long} longer than the context ({model.config.block_size}) lose the start of their prompt" if n_long else ""))
    data_rng = random.Random(args.seed)

    def get_batch(P, R, idx):
        tokens, attn, mask, _ = sft_batch([P[i] for i in idx], [R[i] for i in idx], eos_id(enc), model.config.block_size)
        return tokens.to(device), mask.to(device)

    @torch.no_grad()
    def val_loss():
        model.eval()
        total, n = 0.0, 0
        for i in range(0, len(val_p), args.batch_size):
            tokens, mask = get_batch(val_p, val_r, range(i, min(i + args.batch_size, len(val_p))))
            with autocast:
                logits = model(tokens[:, :-1])
            k = mask[:, 1:].sum().item()
            total += sft_loss(logits, tokens[:, 1:], mask[:, 1:]).item() * k
            n += k
        model.train()
        return total / n

    # ---- optimizer --------------------------------------------------------------------------------
    decay = [p for p in model.parameters() if p.dim() >= 2]       # matrices and embeddings decay,
    no_decay = [p for p in model.parameters() if p.dim() < 2]     # biases and LayerNorm gains do not
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=(device == "cuda"))

    def lr_at(step):
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    train_model = torch.compile(model) if args.compile else model
    # what --resume restores besides the weights: the optimizer and the RNGs (the batches drawn so far)
    state = dict(optimizer=optimizer, data_rng=data_rng)
    start, _ = resume_or_start(args, model, state)
    log = Log(args.out, first_step=start)

    # ---- training loop ----------------------------------------------------------------------------
    t_start = time.time()
    for step in tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="sft", dynamic_ncols=True, disable=None):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        tokens, mask = get_batch(train_p, train_r, [data_rng.randrange(len(train_p)) for _ in range(args.batch_size)])
        with autocast:
            logits = train_model(tokens[:, :-1])          # right padding: causal attention never reads it
        # logits[:, t] scores tokens[:, t + 1]; the mask keeps response tokens (EOS included)
        loss = sft_loss(logits, tokens[:, 1:], mask[:, 1:])
        check_finite(loss, step, args.out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if step % 10 == 0 or step == args.max_steps - 1:
            metrics = dict(loss=loss.item(), grad_norm=grad_norm.item(), lr=lr_at(step), ms=(time.time() - t0) * 1000)
            if step % args.eval_interval == 0 or step == args.max_steps - 1:
                metrics["val_loss"] = val_loss()
            log(step, print_line=("val_loss" in metrics), **metrics)
        if (step + 1) % args.ckpt_interval == 0 and step + 1 < args.max_steps:
            save_resume(args.out, model, enc.name, args, step + 1, state)
    train_seconds = time.time() - t_start

    # ---- final evaluation and save ----------------------------------------------------------------
    model.eval()
    extra = {"train_seconds": train_seconds, "peak_memory_mb": peak_memory_mb(device), "models_in_memory": 1,
             "val_loss": val_loss()}
    if not args.data:
        metrics, samples = evaluate(model, enc, task.heldout_prompts()[: args.eval_prompts], args.max_new_tokens,
                                    seed=args.seed, device=device)
        extra.update(metrics)
        for p, r, g in samples[:6]:
            print(f"  {p!r:42} -> {r!r} (gold {g:+.2f})")
        print(f"held-out gold reward {metrics['gold_reward_mean']:+.4f} +- {metrics['gold_reward_sem']:.4f} "
              f"| hard: correct {metrics['hard_correct_rate']:.2f} abstain {metrics['hard_abstain_rate']:.2f} "
              f"wrong {metrics['hard_wrong_rate']:.2f}")
    save_checkpoint(args.out, model, enc.name, asdict(args), args.max_steps, extra)
    remove_resume(args.out)
    print(f"saved {args.out}/ckpt.pt after {train_seconds:.0f} s of training")
