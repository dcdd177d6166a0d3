"""Benchmark: how fast minirlhf samples and trains, and what each RLHF method's step costs, in one report.

    python bench.py                  # CPU: the task's model (4 layers, 4 heads, 128 wide, vocab 259)
    python bench.py --device cuda    # GPU: GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50257)
    python bench.py --quick          # a tiny model and sizes, seconds: the smoke test runs this

Random weights throughout. Sections (`--sections sampling,training,methods`):

- Sampling: new tokens per second at batch 64 (and 256 on a GPU), prompt 64, 256 new tokens, for
  `generate` with the KV cache, the static-cache fast path `generate_static` (and on a GPU the same
  under torch.compile, which records the decode step as a CUDA graph), `generate(use_cache=False)`
  (recompute the whole sequence every step), and Hugging Face `GPT2LMHeadModel.generate` on the same
  weights when `transformers` is installed (an optional extra: `pip install transformers`). Every row
  is also a ratio to the KV-cache row. The EOS id passed to our sampler is `vocab_size`, an id no
  model can emit, and Hugging Face is given `min_new_tokens=256`: no row stops early, so every method
  does the same work. Random prompts, temperature 1, no top-k or top-p.
- Training: tokens per second of one SFT step (forward, the mean token cross-entropy in float32, which
  is train_sft.py's loss when every token is a response token, backward, gradient clipping, AdamW) and
  model FLOP/s, as a fraction of the peak of a large matrix product measured in the same run (MFU: bf16
  on a GPU; on the CPU the fp32 peak of one process, shown for scale only). FLOPs per token are
  6N + 12·L·H·Q·T (Kaplan et al. 2020 and PaLM's appendix B, as nanoGPT counts): N = every parameter
  but the position embeddings, L layers, H heads of size Q, T tokens of context. The token embedding
  is in N because it is also the output layer, a real matrix product; the attention term counts the
  full T x T score matrix, as that formula does, not the causal half.
- Methods: the stage scripts themselves, nothing copied from them. bench.py writes a random SFT
  checkpoint, a random reward model and a prompts file (random words, longer than the prompt length,
  so every script cuts each prompt to its last 48 tokens, 64 on a GPU; with `--data` no script runs its
  gold evaluation), then runs `train_ppo.py`, `train_rrhf.py` and `train_grpo.py` (when present) for
  `--steps` steps, each in a process of its own, and reads what they write: the phase times each step
  logs in metrics.jsonl (`rollout_ms`: sampling; `score_ms`: the forwards that score the samples;
  `ms`: the step) and `peak_memory_mb` and `models_in_memory` from the checkpoint's `extra`. The
  scripts run at their defaults (PPO: 64 prompts, 4 epochs of 2 minibatches of 32; RRHF: 8 prompts x
  K = 4; GRPO: 8 prompts x G = 8), with 48 new tokens (256 on a GPU). RRHF samples and scores once per
  round: here every step is a round of one batch (`--rounds` = steps, `--n-prompts` = batch), so its
  step is sampling, scoring and update as PPO's is (its `ms` is the update alone). A script that logs
  no `score_ms` gets its whole step only. Memory is counted two ways: the bytes of weights, gradients
  and optimizer state (exact, from the parameter counts), and the peak the script reports:
  torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident set size, which
  includes Python and torch (the report gives a bare `import torch` process's for scale).

Timings: sampling and training are the fastest of up to 3 runs after a warm-up (fewer when a run takes
over 10 s; for training each run is several steps), with torch.cuda.synchronize() around each on CUDA.
A method's row is the step whose time is the median of the steps after the first (the first pays for
warm-up: allocations, kernel choices), the faster of the middle two for an even count: one step's
phases, which add up. On a GPU, sampling runs on a bf16 copy of the weights, training under bf16
autocast with TF32 on, as the stage scripts do. Sizes are flags; see --help.
"""

import json
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.cli import arg, parse_args
from minirlhf.data import write_jsonl
from minirlhf.fast_decode import StaticDecoder, generate_static
from minirlhf.model import GPT, GPTConfig, ScalarHead, generate
from minirlhf.tokenizer import get_encoding

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("sampling", "training", "methods")
# On the CPU a script reports its peak as ru_maxrss, which Linux starts at the high-water mark of the
# process that launched it (carried across fork and exec): this one's, after the sampling section, is
# larger than a script's own. Each script is started from a fresh, small Python instead, as from a shell.
LAUNCHER = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]


@dataclass
class Args:
    """Benchmark sampling, training and the RLHF methods' steps; prints markdown tables."""
    device: str = arg("auto", "cpu | cuda | auto")
    quick: bool = arg(False, "tiny model and sizes: a smoke run of every row in seconds")
    sections: str = arg(",".join(SECTIONS), "which sections to run, comma-separated")
    batch_sizes: str = arg("", "sampling batch sizes, comma-separated ('' = 64 on the CPU, 64,256 on a GPU)")
    prompt_len: int = arg(64, "sampling: prompt tokens")
    new_tokens: int = arg(256, "sampling: new tokens per row")
    compile: bool = arg(None, "add torch.compile rows (default: on CUDA only; a CPU compile takes minutes)")
    hf: bool = arg(True, "add the Hugging Face generate row when transformers is importable")
    sft_batch: int = arg(0, "training: sequences per step (0 = 64 on the CPU, 16 on a GPU)")
    sft_len: int = arg(0, "training: tokens per sequence (0 = 128 on the CPU, 1024 on a GPU)")
    method_prompt_len: int = arg(0, "methods: prompt tokens (0 = 48 on the CPU, 64 on a GPU)")
    method_new_tokens: int = arg(0, "methods: response tokens (0: 48 on the CPU, 256 on a GPU)")
    steps: int = arg(0, "methods: steps each script runs, the first a warm-up (0 = 3 with --quick, else 4)")
    tokenizer: str = arg("", "methods: '' = bytes for vocab 259, gpt2 for 50257; or a gpt2.tiktoken path")
    seed: int = arg(1337, "random seed")


# ---------------------------------------------------------------------------------------------------
# Sizes and timing
# ---------------------------------------------------------------------------------------------------

def model_config(args, device, block_size):
    """The model every section uses, with a block size that fits the section's sequences."""
    if args.quick:
        return GPTConfig(block_size=block_size, vocab_size=259, n_layer=2, n_head=2, n_embd=64)
    if device == "cuda":  # GPT-2 124M
        return GPTConfig(block_size=max(block_size, 1024), vocab_size=50257, n_layer=12, n_head=12,
                         n_embd=768)
    return GPTConfig(block_size=block_size, vocab_size=259, n_layer=4, n_head=4, n_embd=128)  # train_sft's


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, result) of one call, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def fastest(fn, device, runs=3, budget_s=10.0):
    """(seconds, result) of the fastest of up to `runs` calls, stopping once `budget_s` is spent.

    On a shared machine the other processes only ever slow a run down, so the fastest is the least
    disturbed; a slow method (full recompute on a CPU) runs once."""
    best, spent = float("inf"), 0.0
    for _ in range(runs):
        seconds, out = timed(fn, device)
        best, spent = min(best, seconds), spent + seconds
        if spent > budget_s:
            break
    return best, out


def autocast(device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=(device == "cuda"))


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def fmt_rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

def hf_gpt2(model: GPT):
    """Hugging Face GPT2LMHeadModel with the same config and our weights (None without transformers).

    Parameter names are the same by design (GPT-2's); only the four Conv1D matrices per block are
    stored (in, out) there and (out, in) here, so they are transposed. Checked by comparing logits."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    layer_norm_epsilon=c.layer_norm_eps, bos_token_id=c.vocab_size - 1,
                                    eos_token_id=c.vocab_size - 1, pad_token_id=c.vocab_size - 1))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    theirs = hf.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            theirs[k].copy_(v.t() if k.endswith(conv1d) else v)
    hf = hf.to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype).eval()
    idx = torch.randint(0, c.vocab_size, (2, 16), device=hf.device)
    with torch.no_grad():
        err = (hf(idx).logits.float() - model(idx).float()).abs().max().item()
    tol = 1e-3 if model.lm_head.weight.dtype == torch.float32 else 0.3  # bf16: two kernels' rounding
    assert err < tol, f"Hugging Face GPT-2 built from our weights disagrees: max logit difference {err}"
    return hf


def bench_sampling(args, device, batch_sizes, use_compile):
    P, N = args.prompt_len, args.new_tokens
    cfg = model_config(args, device, P + N)
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device).eval()
    if device == "cuda":
        model = model.to(torch.bfloat16)  # sampling needs no fp32 master weights
    V = cfg.vocab_size
    no_eos = V  # an id the model cannot emit (ids run 0..V-1): every row runs all N steps
    hf = hf_gpt2(model) if args.hf else None
    print(f"\n## Sampling: prompt {P}, {N} new tokens, new tokens per second\n")
    print(f"{describe(model)}; weights {str(next(model.parameters()).dtype).removeprefix('torch.')}; "
          f"temperature 1, no EOS (every row generates {N} tokens)\n")
    rows = []
    for B in batch_sizes:
        idx = torch.randint(0, V, (B, P), device=device)
        mask = torch.ones_like(idx)
        g = torch.Generator(device=device)

        def ours(n, **kw):
            return lambda: generate(model, idx, mask, n, no_eos, generator=g.manual_seed(args.seed), **kw)

        def static(decoder, n):
            return lambda: generate_static(decoder, idx, mask, n, no_eos, generator=g.manual_seed(args.seed))

        dec = StaticDecoder(model, B, P + N)
        methods = [("KV cache (`generate`)", ours(8), ours(N)),
                   ("static KV cache (`generate_static`)", static(dec, 8), static(dec, N))]
        if use_compile:
            dec = StaticDecoder(model, B, P + N, compile=True)
            # the warm-up must be full length: torch.compile records the step's graph on its first calls
            methods.append(("static KV cache + torch.compile", static(dec, N), static(dec, N)))
        methods.append(("full recompute (`use_cache=False`)", ours(8, use_cache=False),
                        ours(N, use_cache=False)))
        if hf is not None:
            def hf_run(n):
                return lambda: hf.generate(input_ids=idx, attention_mask=mask, do_sample=True,
                                           max_new_tokens=n, min_new_tokens=n, top_k=0, top_p=1.0,
                                           temperature=1.0, pad_token_id=V - 1, eos_token_id=V - 1)
            methods.append(("Hugging Face `generate`", hf_run(8), hf_run(N)))
        base = None
        for name, warmup, run in methods:
            timed(warmup, device)
            seconds, out = fastest(run, device)
            seqs = out[0] if isinstance(out, tuple) else out
            assert seqs.shape == (B, P + N), f"{name}: {tuple(seqs.shape)}, expected {N} steps in every row"
            rate = B * N / seconds
            base = base or rate  # the first row is the KV cache
            rows.append((name, B, fmt_rate(rate), f"{rate / base:.2f}x"))
    if hf is None:
        why = "not run: transformers is not installed" if args.hf else "not run (--no-hf)"
        rows.append(("Hugging Face `generate`", "-", why, "-"))
    print(table(["method", "batch", "new tokens/s", "vs KV cache"], rows))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def matmul_peak(device):
    """FLOP/s of a large matrix product in the dtype the model trains in: the peak MFU is measured against."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds, _ = fastest(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / seconds, f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def flops_per_token(model: GPT, T: int):
    """6N + 12·L·H·Q·T: forward and backward of the weights' matmuls, plus attention's scores and mix."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T


def bench_training(args, device, use_compile):
    B = args.sft_batch or (4 if args.quick else 16 if device == "cuda" else 64)
    T = args.sft_len or (32 if args.quick else 1024 if device == "cuda" else 128)
    steps = 2 if args.quick else 10 if device == "cuda" else 3
    peak, peak_what = matmul_peak(device)
    print(f"\n## Training: one SFT step (forward, loss, backward, clip, AdamW), {B} x {T} tokens\n")
    rows = []
    for compiled in [False, True] if use_compile else [False]:
        torch.manual_seed(args.seed)
        model = GPT(model_config(args, device, T)).to(device).train()
        if not compiled:
            print(f"{describe(model)}; FLOPs per token 6N + 12·L·H·Q·T = "
                  f"{flops_per_token(model, T) / 1e6:.1f}M with N = {model.num_params() / 1e6:.2f}M "
                  "(all parameters but the position embeddings)\n")
        decay = [p for p in model.parameters() if p.dim() >= 2]  # as train_sft.py builds it
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=1e-4, betas=(0.9, 0.95), fused=(device == "cuda"))
        train_model = torch.compile(model) if compiled else model
        tokens = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)

        def step():
            with autocast(device):
                logits = train_model(tokens[:, :-1])                              # (B, T, V)
            # every token is a response token here, so the SFT loss is the plain mean cross-entropy
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        for _ in range(2):  # warm-up: kernels chosen, optimizer state allocated, graphs compiled
            step()
        seconds, _ = fastest(lambda: [step() for _ in range(steps)], device)
        tok_s = B * T * steps / seconds
        flops = tok_s * flops_per_token(model, T)
        rows.append(("torch.compile" if compiled else "eager", fmt_rate(tok_s),
                     f"{seconds / steps * 1000:.1f}", f"{flops / 1e12:.3g}", f"{100 * flops / peak:.1f}%"))
    print(table(["model", "tokens/s", "ms/step", "model TFLOP/s", "MFU"], rows))
    note = "" if device == "cuda" else " (CPU: one process's fp32 peak, for scale; MFU is a GPU measure)"
    print(f"\nMFU against {peak / 1e12:.3g} TFLOP/s, a {peak_what} measured in this run{note}.")


# ---------------------------------------------------------------------------------------------------
# The methods: each stage script run for a few steps in a process of its own, read from its files
# ---------------------------------------------------------------------------------------------------

def state_bytes(trained, frozen, optimizers):
    """Bytes of weights (all models), gradients (trained models) and Adam's two moments (per optimizer)."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    return (sum(size(m) for m in trained + frozen) + sum(size(m) for m in trained)
            + 2 * sum(size(m) for m in optimizers))


def method_sizes(args, device):
    """(prompt tokens, response tokens) of the methods' runs."""
    if args.quick:
        return 8, 8
    return (args.method_prompt_len or (64 if device == "cuda" else 48),
            args.method_new_tokens or (256 if device == "cuda" else 48))


def write_prompts(path, n, P, seed):
    """n prompts of P random words each: longer than P tokens in either tokenizer, so each script keeps
    the last P tokens of every templated prompt (the "Assistant:" cue included): batches P wide."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
    write_jsonl(path, [{"prompt": " ".join(word() for _ in range(P))} for _ in range(n)])


def run_all(cmds, parallel):
    """Run each command in a fresh process -> [(exit status, stdout, stderr)], in order.

    One after the other, so that each has the machine to itself; side by side with --quick, where only
    the smoke test's wall time matters. Each process's peak memory is its own either way."""
    start = lambda cmd: subprocess.Popen(LAUNCHER + cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    started = [start(cmd) for cmd in cmds] if parallel else [None] * len(cmds)
    results = []
    for cmd, proc in zip(cmds, started):
        proc = proc or start(cmd)
        stdout, stderr = proc.communicate()
        results.append((proc.returncode, stdout, stderr))
    return results


def epochs(a, n):
    """'E epochs x M minibatches' of a PPO-style update over n rows (a: the script's arguments)."""
    e, m = a["ppo_epochs"], n // a["minibatch_size"]
    return f"{e} epoch{'s' * (e != 1)} x {m} minibatch{'es' * (m != 1)}"


def median_step(rows, total):
    """Of the logged steps after the first, the one whose total(step) is the median (the lower median)."""
    after_first = sorted((r for r in rows if r["step"] > 0), key=total)
    if not after_first:
        raise RuntimeError("no step after the first was logged: run at least 2 --steps")
    return after_first[(len(after_first) - 1) // 2]


def bench_methods(args, device, imported_mb):
    if device == "cuda":
        torch.cuda.empty_cache()  # what the sections before cached goes back to the GPU, for the scripts
    P, N = method_sizes(args, device)
    S = args.steps or (3 if args.quick else 4)
    cfg = model_config(args, device, P + N)
    enc = get_encoding(args.tokenizer or ("bytes" if cfg.vocab_size == 259 else "gpt2"))
    assert enc.n_vocab == cfg.vocab_size, f"{enc.name} has {enc.n_vocab} ids, the model {cfg.vocab_size}"
    torch.manual_seed(args.seed)
    lm, rm = GPT(cfg), ScalarHead(GPT(cfg))  # a reference is the size of the policy, a critic of the RM
    q = args.quick
    b = 2 if q else 8  # RRHF's batch, train_rrhf's default: one round of one batch per step
    methods = [  # what each script holds: the models (trained + frozen) and the optimizers' models
        dict(name="PPO", script="train_ppo.py",
             flags=["--batch-size", 8, "--minibatch-size", 4, "--ppo-epochs", 1] if q else [],
             models="policy, reference, reward, critic", optimizers="2 Adam",
             state=state_bytes([lm, rm], [lm, rm], [lm, rm]),
             sequences=lambda a: f"{a['batch_size']} responses, " + epochs(a, a["batch_size"])),
        dict(name="RRHF", script="train_rrhf.py", flags=["--batch-size", b, "--n-prompts", b, "--rounds", S],
             models="policy, reward", optimizers="1 AdamW", state=state_bytes([lm], [rm], [lm]),
             ms_is_update=True, sequences=lambda a: f"{a['batch_size']} prompts x K={a['k']} candidates"),
        dict(name="GRPO", script="train_grpo.py", optional=True,
             flags=["--batch-size", 2, "--group-size", 2, "--minibatch-size", 1] if q else [],
             models="policy, reference, reward", optimizers="1 Adam", state=state_bytes([lm], [lm, rm], [lm]),
             sequences=lambda a: f"{a['batch_size']} prompts x G={a['group_size']}, "
                                 + epochs(a, a["batch_size"])),
    ]
    notes = []
    for m in [m for m in methods if not os.path.exists(os.path.join(ROOT, m["script"]))]:
        notes.append(f"{m['name']}: not run, {m['script']} is absent.")
        methods.remove(m)

    with tempfile.TemporaryDirectory(prefix="minirlhf-bench-") as tmp:
        sft, rm_dir, prompts = (os.path.join(tmp, name) for name in ("sft", "rm", "prompts.jsonl"))
        save_checkpoint(sft, lm, enc.name, {}, 0)
        # train_rm.py records its scores' mean and std, by which the stages normalise: 0 and 1 keep them
        save_checkpoint(rm_dir, rm, enc.name, {}, 0, {"reward_mean": 0.0, "reward_std": 1.0})
        write_prompts(prompts, 256, P, args.seed)
        common = ["--init", sft, "--reward-model", rm_dir, "--data", prompts, "--device", device,
                  "--seed", args.seed, "--max-steps", S, "--max-new-tokens", N]
        cmds = [[sys.executable, os.path.join(ROOT, m["script"]), *map(str, common + m["flags"]),
                 "--out", os.path.join(tmp, m["name"].lower())] for m in methods]
        results = run_all(cmds, parallel=args.quick)
        ran = []
        for m, cmd, (status, _, stderr) in zip(methods, cmds, results):
            if status != 0:
                why = (stderr.strip().splitlines() or ["no output"])[-1]
                if not m.get("optional"):
                    raise RuntimeError(f"{' '.join(cmd)} failed (exit {status}):\n{stderr[-3000:]}")
                notes.append(f"{m['name']}: {m['script']} failed (exit {status}): {why}")
                continue
            out = cmd[-1]
            with open(os.path.join(out, "metrics.jsonl")) as f:
                logged = [json.loads(line) for line in f]
            ck = load_checkpoint(out)
            ran.append((m, logged, ck["args"], ck["extra"]))

    print(f"\n## Methods: one step of each script, {P} prompt + {N} response tokens\n")
    print(f"{describe(lm)}; each script ran {S} steps in a process of its own; shown: the step whose time "
          "is the median of those after the first (the faster middle one of an even count)\n")
    rows, memory = [], []
    for m, logged, a, extra in ran:
        split = all("rollout_ms" in r and "score_ms" in r for r in logged)
        # RRHF logs the update as `ms`, its round's sampling and scoring beside it; the others the whole step
        if split and m.get("ms_is_update"):
            total = lambda r: r["rollout_ms"] + r["score_ms"] + r["ms"]
        else:
            total = lambda r: r["ms"]
        r = median_step(logged, total)
        step_ms = total(r)
        if split:
            phases = (r["rollout_ms"], r["score_ms"], step_ms - r["rollout_ms"] - r["score_ms"])
            phases = [f"{x:,.1f} ({100 * x / step_ms:.0f}%)" for x in phases]
        else:
            phases = ["-", "-", "-"]
            notes.append(f"{m['script']} logs no `score_ms`, so its sampling and scoring are not apart: "
                         "its whole step (`ms`) only.")
        rows.append((m["name"], m["sequences"](a), *phases, f"{step_ms:,.1f}"))
        held = extra["models_in_memory"]
        assert held == len(m["models"].split(", ")), \
            f"{m['script']} holds {held} models, bench.py counts the bytes of {m['models']}: update its table"
        memory.append((m["name"], f"{held}: {m['models']}", m["optimizers"], mb(m["state"]),
                       f"{extra['peak_memory_mb']:,.1f} MB"))
    print(table(["method", "sequences per step", "rollout (sampling), ms", "scoring, ms", "update, ms",
                 "step, ms"], rows))
    notes.append("Scoring: the forwards over the samples (PPO: policy, reference, critic and reward model; "
                 "GRPO: policy, reference, reward model; RRHF: reward model), then rewards and advantages; "
                 "update: the rest of the step. RRHF samples and scores once a round: here every step is "
                 "a round of one batch.")

    measured = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the process"
    print("\n## Memory: the models each method holds, and the peak its script reports\n")
    print(table(["method", "models held", "optimizers", "weights + grads + optimizer state",
                 f"measured peak ({measured})"], memory))
    if device == "cpu" and imported_mb is not None:
        notes.append(f"On the CPU a peak includes Python and torch: bench.py's own process peaked at "
                     f"{imported_mb:,.0f} MB once it had imported them, before it ran anything.")
    print("\n" + "\n".join(f"- {n}" for n in notes))


# ---------------------------------------------------------------------------------------------------

def mb(n_bytes):
    return f"{n_bytes / 2**20:,.1f} MB"


def peak_rss_mb():
    """This process's peak resident size so far (Linux's VmHWM, which starts afresh at exec); else None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))  # kB
    except (OSError, StopIteration):
        return None


def cpu_name():
    try:  # Linux names the model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe(model):
    c = model.config
    return (f"model: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, vocab {c.vocab_size}, "
            f"{model.num_params() / 1e6:.2f}M parameters")


if __name__ == "__main__":
    imported_mb = peak_rss_mb()  # Python, torch and minirlhf loaded, nothing run yet
    args = parse_args(Args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        sys.exit(f"bench.py: error: --sections {args.sections}: expected some of {','.join(SECTIONS)}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.quick:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 8), min(args.new_tokens, 16)

    use_compile = device == "cuda" if args.compile is None else args.compile
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else \
        [4] if args.quick else [64, 256] if device == "cuda" else [64]
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    threads = torch.get_num_threads()
    print(f"# minirlhf bench{' (--quick)' if args.quick else ''}: {name}, torch {torch.__version__}"
          + ("" if device == "cuda" else f", {threads} thread{'s' * (threads > 1)}"))
    if "sampling" in sections:
        bench_sampling(args, device, batch_sizes, use_compile)
    if "training" in sections:
        bench_training(args, device, use_compile)
    if "methods" in sections:
        bench_methods(args, device, imported_mb)
