"""Benchmark: how fast minirlhf samples, trains and runs a PPO iteration, as one markdown report.

    python bench.py                  # CPU: the built-in task's model (4 layers, 4 heads, 128 wide, vocab 257)
    python bench.py --device cuda    # GPU: GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50257), random weights
    python bench.py --quick          # a tiny model and sizes, a few seconds: the smoke test runs this

Sections (`--sections sampling,training,ppo`):

- Sampling: new tokens per second at batch 64 (and 256 on a GPU), prompt 64, 256 new tokens, for
  `generate` with the KV cache, the static-cache fast path `generate_static` (and on a GPU the same
  under torch.compile, which records the decode step as a CUDA graph), `generate(use_cache=False)`
  (recompute the whole sequence every step), and Hugging Face `GPT2LMHeadModel.generate` on the same
  weights when `transformers` is installed (an optional extra: `pip install transformers`). Every row
  is also a ratio to the KV-cache row. The EOS id passed to our sampler is `vocab_size`, an id no
  model can emit, and Hugging Face is given `min_new_tokens=256`: no row stops early, so every method
  does the same work. Random prompts, temperature 1, no top-k or top-p.
- Training: tokens per second of one SFT step (forward, the loss of train_sft.py, backward, gradient
  clipping, AdamW) and model FLOP/s, as a fraction of the peak of a large matrix product measured in
  the same run (MFU: bf16 on a GPU; on the CPU the fp32 peak of one process, shown for scale only).
  FLOPs per token are 6N + 12·L·H·Q·T (Kaplan et al. 2020 and PaLM's appendix B, as nanoGPT counts):
  N = every parameter but the position embeddings, L layers, H heads of size Q, T tokens of context.
  The token embedding is in N because it is also the output layer, a real matrix product; the
  attention term counts the full T x T score matrix, as that formula does, not the causal half.
- PPO: one iteration at train_ppo.py's defaults (64 prompts, 4 epochs of 2 minibatches of 32) split
  into rollout (`generate`), scoring (policy and reference log-probs, reward model, critic; per-token
  rewards and GAE) and update, built from train_ppo's own functions; then the memory of that iteration
  (4 models, 2 Adam optimizers) next to one RRHF step of train_rrhf.py (policy and reward model, 1 AdamW,
  K=4 candidates for each prompt of its default batch). Each runs in a fresh process of its own (`--probe`), so that neither
  sees the other's memory. Memory is counted two ways: the bytes of weights, gradients and optimizer
  state (exact, from the parameter counts), and the measured peak: torch.cuda.max_memory_allocated
  on a GPU; on the CPU (Linux) the peak resident set size over the measurement minus the resident
  size at its start, which also counts pages the allocator keeps after a tensor is freed.

Timings are the fastest of up to 3 runs after a warm-up (fewer when a run takes over 10 s; for
training each run is several steps, for PPO one iteration after one warm-up iteration); on CUDA with
torch.cuda.synchronize() around each. On a GPU, sampling runs on a bf16 copy of the weights, training
and PPO under bf16 autocast with TF32 on, as the stage scripts do. Sizes are flags; see --help.
"""

import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from minirlhf.cli import arg, parse_args
from minirlhf.fast_decode import StaticDecoder, generate_static
from minirlhf.model import GPT, GPTConfig, ScalarHead, generate
from minirlhf.ops import gather_last, masked_whiten, token_logprobs
from train_ppo import Args as PPOArgs, critic_forward, gae, policy_forward, ppo_policy_loss, ppo_value_loss, token_rewards
from train_rrhf import Args as RRHFArgs, rrhf_loss
from train_sft import sft_loss


@dataclass
class Args:
    """Benchmark sampling, training and PPO; prints markdown tables."""
    device: str = arg("auto", "cpu | cuda | auto")
    quick: bool = arg(False, "tiny model and sizes: a smoke run of every row in a few seconds")
    sections: str = arg("sampling,training,ppo", "which sections to run, comma-separated")
    batch_sizes: str = arg("", "sampling batch sizes, comma-separated ('' = 64 on the CPU, 64,256 on a GPU)")
    prompt_len: int = arg(64, "sampling: prompt tokens")
    new_tokens: int = arg(256, "sampling: new tokens per row")
    compile: bool = arg(None, "add torch.compile rows (default: on CUDA only; a CPU compile takes minutes)")
    hf: bool = arg(True, "add the Hugging Face generate row when transformers is importable")
    sft_batch: int = arg(0, "training: sequences per step (0 = 64 on the CPU, 16 on a GPU)")
    sft_len: int = arg(0, "training: tokens per sequence (0 = 128 on the CPU, 1024 on a GPU)")
    ppo_prompt_len: int = arg(0, "PPO and RRHF: prompt tokens (0 = 48 on the CPU, 64 on a GPU)")
    ppo_new_tokens: int = arg(0, "PPO and RRHF: response tokens (0 = train_ppo's 48 on the CPU, 256 on a GPU)")
    seed: int = arg(1337, "random seed")
    probe: str = arg("", "internal: 'ppo' or 'rrhf' runs that measurement in this process and prints JSON")


# ---------------------------------------------------------------------------------------------------
# Sizes and timing
# ---------------------------------------------------------------------------------------------------

def model_config(args, device, block_size):
    """The model every section uses, with a block size that fits the section's sequences."""
    if args.quick:
        return GPTConfig(block_size=block_size, vocab_size=257, n_layer=2, n_head=2, n_embd=64)
    if device == "cuda":  # GPT-2 124M
        return GPTConfig(block_size=max(block_size, 1024), vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    return GPTConfig(block_size=block_size, vocab_size=257, n_layer=4, n_head=4, n_embd=128)  # train_sft's default


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
        methods.append(("full recompute (`use_cache=False`)", ours(8, use_cache=False), ours(N, use_cache=False)))
        if hf is not None:
            def hf_run(n):
                return lambda: hf.generate(input_ids=idx, attention_mask=mask, do_sample=True, max_new_tokens=n,
                                           min_new_tokens=n, top_k=0, top_p=1.0, temperature=1.0,
                                           pad_token_id=V - 1, eos_token_id=V - 1)
            methods.append(("Hugging Face `generate`", hf_run(8), hf_run(N)))
        base = None
        for name, warmup, run in methods:
            timed(warmup, device)
            seconds, out = fastest(run, device)
            seqs = out[0] if isinstance(out, tuple) else out
            assert seqs.shape == (B, P + N), f"{name}: {tuple(seqs.shape)}, expected every row to run {N} steps"
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
            print(f"{describe(model)}; FLOPs per token 6N + 12·L·H·Q·T = {flops_per_token(model, T) / 1e6:.1f}M "
                  f"with N = {model.num_params() / 1e6:.2f}M (all parameters but the position embeddings)\n")
        decay = [p for p in model.parameters() if p.dim() >= 2]  # as train_sft.py builds it
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=1e-4, betas=(0.9, 0.95), fused=(device == "cuda"))
        train_model = torch.compile(model) if compiled else model
        tokens = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)
        mask = torch.ones(B, T, device=device)

        def step():
            with autocast(device):
                logits = train_model(tokens[:, :-1])
            loss = sft_loss(logits, tokens[:, 1:], mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        for _ in range(2):  # warm-up: kernels chosen, optimizer state allocated, graphs compiled
            step()
        seconds, _ = fastest(lambda: [step() for _ in range(steps)], device)
        tok_s = B * T * steps / seconds
        flops = tok_s * flops_per_token(model, T)
        rows.append(("torch.compile" if compiled else "eager", fmt_rate(tok_s), f"{seconds / steps * 1000:.1f}",
                     f"{flops / 1e12:.3g}", f"{100 * flops / peak:.1f}%"))
    print(table(["model", "tokens/s", "ms/step", "model TFLOP/s", "MFU"], rows))
    note = "" if device == "cuda" else " (CPU: one process's fp32 peak, for scale; MFU is a GPU measure)"
    print(f"\nMFU against {peak / 1e12:.3g} TFLOP/s, a {peak_what} measured in this run{note}.")


# ---------------------------------------------------------------------------------------------------
# PPO and RRHF: each measured in a fresh process (--probe)
# ---------------------------------------------------------------------------------------------------

def state_bytes(trained, frozen, optimizers):
    """Bytes of weights (all models), gradients (trained models) and Adam's two moments (per optimizer)."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    return sum(size(m) for m in trained + frozen) + sum(size(m) for m in trained) + 2 * sum(size(m) for m in optimizers)


def probe_ppo(args, device):
    """One PPO iteration of train_ppo.py (after one warm-up iteration): times of its three phases."""
    a = PPOArgs()
    B, mb, epochs = (8, 4, 1) if args.quick else (a.batch_size, a.minibatch_size, a.ppo_epochs)
    P, N = ppo_sizes(args, device)
    cfg = model_config(args, device, P + N)
    torch.manual_seed(args.seed)
    policy = GPT(cfg).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = ScalarHead(GPT(cfg)).to(device).eval().requires_grad_(False)
    critic = copy.deepcopy(reward_model).requires_grad_(True)  # --critic-init rm, the default
    policy_opt = torch.optim.Adam(policy.parameters(), lr=a.lr, eps=1e-5, fused=(device == "cuda"))
    critic_opt = torch.optim.Adam(critic.parameters(), lr=a.critic_lr, eps=1e-5, fused=(device == "cuda"))
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompts = torch.randint(0, cfg.vocab_size, (B, P), device=device)
    pmask = torch.ones_like(prompts)

    def iteration():
        times = {}
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(device):
            policy.eval()
            seqs, attn, mask = generate(policy, prompts, pmask, N, cfg.vocab_size, temperature=a.temperature, generator=g)
            sync(device)
            times["rollout"] = time.perf_counter() - t0
            logprobs, _ = policy_forward(policy, seqs, attn, a.temperature)
            ref_logprobs, _ = policy_forward(ref, seqs, attn, a.temperature)
            values = critic_forward(critic, seqs, attn)
            scores = gather_last(reward_model(seqs, attn), mask).float()
            rewards = token_rewards(scores, logprobs, ref_logprobs, mask, a.kl_coef)
            advantages, returns = gae(rewards, values, mask, a.gamma, a.lam)
            advantages = masked_whiten(advantages, mask)
            sync(device)
            times["scoring"] = time.perf_counter() - t0 - times["rollout"]
        policy.train()
        critic.train()
        for _ in range(epochs):
            for i in torch.randperm(B, generator=g, device=device).split(mb):
                with autocast(device):
                    new_logprobs, _ = policy_forward(policy, seqs[i], attn[i], a.temperature)
                    new_values = critic_forward(critic, seqs[i], attn[i])
                loss = (ppo_policy_loss(new_logprobs, logprobs[i], advantages[i], mask[i], a.clip_eps)
                        + ppo_value_loss(new_values, values[i], returns[i], mask[i], a.vf_clip_eps))
                policy_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), a.grad_clip)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), a.grad_clip)
                policy_opt.step()
                critic_opt.step()
        sync(device)
        times["update"] = time.perf_counter() - t0 - times["rollout"] - times["scoring"]
        return times

    iteration()
    times = iteration()
    return dict(times, batch=B, minibatch=mb, epochs=epochs, prompt=P, new=N,
                state_bytes=state_bytes([policy, critic], [ref, reward_model], [policy, critic]))


def probe_rrhf(args, device):
    """One RRHF step of train_rrhf.py: sample K candidates per prompt, score them, one update."""
    a = RRHFArgs()
    K = 4  # candidates per prompt, train_rrhf's default
    B = 2 if args.quick else a.batch_size
    P, N = ppo_sizes(args, device)
    cfg = model_config(args, device, P + N)
    torch.manual_seed(args.seed)
    policy = GPT(cfg).to(device)
    reward_model = ScalarHead(GPT(cfg)).to(device).eval().requires_grad_(False)
    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=a.lr, betas=(0.9, 0.95), fused=(device == "cuda"))
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompts = torch.randint(0, cfg.vocab_size, (B, P), device=device).repeat_interleave(K, dim=0)  # (B*K, P)

    def step():
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(device):
            policy.eval()
            seqs, attn, mask = generate(policy, prompts, torch.ones_like(prompts), N, cfg.vocab_size,
                                        temperature=a.temperature, generator=g)
            rewards = gather_last(reward_model(seqs, attn), mask).float().view(B, K)
        policy.train()
        with autocast(device):
            logits = policy(seqs, attn)                                          # (B*K, T, V)
        logprobs = token_logprobs(logits, seqs).view(B, K, -1)                   # (B, K, T)
        loss = rrhf_loss(logprobs, mask.view(B, K, -1), rewards, a.length_penalty)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), a.grad_clip)
        optimizer.step()
        sync(device)
        return time.perf_counter() - t0

    step()
    return dict(total=step(), batch=B, K=K, prompt=P, new=N, state_bytes=state_bytes([policy], [reward_model], [policy]))


def ppo_sizes(args, device):
    if args.quick:
        return 8, 8
    P = args.ppo_prompt_len or (64 if device == "cuda" else 48)
    N = args.ppo_new_tokens or (256 if device == "cuda" else 48)
    return P, N


def run_probe(args, device):
    """Body of `bench.py --probe ppo|rrhf`: measure, then print one JSON line with the peak memory."""
    # torch loads modules (an optimizer imports torch._dynamo, some 80 MB) and sets up pools on first
    # use: do all that with a tiny model before the baseline, so that it is not counted
    tiny = GPT(GPTConfig(block_size=8, vocab_size=8, n_layer=1, n_head=1, n_embd=8)).to(device)
    opt = torch.optim.Adam(tiny.parameters(), fused=(device == "cuda"))
    tiny(torch.zeros(1, 4, dtype=torch.long, device=device)).sum().backward()
    opt.step()
    del tiny, opt
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one, the
        # CPU's reset_peak_memory_stats; the imports' own transient peak would otherwise hide ours
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_before = proc_status("VmRSS")
    out = probe_ppo(args, device) if args.probe == "ppo" else probe_rrhf(args, device)
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else proc_status("VmHWM") - rss_before
    print(json.dumps(out))


def proc_status(key):
    """A size from /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))  # given in kB


def probes(kinds, device, parallel):
    """Run `bench.py --probe KIND` for each kind in a fresh process; their JSON results.

    One after the other, so that each process has the machine to itself; side by side with --quick,
    where only the smoke test's wall time matters."""
    cmds = [[sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--device", device, "--probe", kind] for kind in kinds]
    start = lambda cmd: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = [start(cmd) for cmd in cmds] if parallel else [None] * len(cmds)
    results = []
    for cmd, proc in zip(cmds, started):
        proc = proc or start(cmd)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def bench_ppo(device, quick):
    ppo, rrhf = probes(["ppo", "rrhf"], device, parallel=quick)
    total = ppo["rollout"] + ppo["scoring"] + ppo["update"]
    print(f"\n## PPO: one iteration, {ppo['batch']} prompts x ({ppo['prompt']} + {ppo['new']} tokens), "
          f"{ppo['epochs']} epochs of minibatches of {ppo['minibatch']}\n")
    phases = [("rollout (`generate`, KV cache)", "rollout"),
              ("scoring (policy, reference, reward, critic forwards; rewards, GAE)", "scoring"),
              ("update (PPO epochs: policy and critic forward, backward, Adam)", "update")]
    rows = [(name, f"{ppo[k]:.3f}", f"{100 * ppo[k] / total:.0f}%") for name, k in phases] + [("total", f"{total:.3f}", "100%")]
    print(table(["phase", "seconds", "share"], rows))
    print("\n## Memory: a PPO iteration next to an RRHF step\n")
    mb = lambda b: f"{b / 2**20:,.1f} MB"
    measured = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS - RSS before"
    rows = [("PPO iteration", "4: policy, reference, reward, critic", "2 Adam", f"{ppo['batch']} responses",
             mb(ppo["state_bytes"]), mb(ppo["peak_bytes"]), f"{total:.3f}"),
            (f"RRHF step (K={rrhf['K']})", "2: policy, reward", "1 AdamW", f"{rrhf['batch']} prompts x {rrhf['K']}",
             mb(rrhf["state_bytes"]), mb(rrhf["peak_bytes"]), f"{rrhf['total']:.3f}")]
    header = ["", "models", "optimizers", "sequences", "weights + grads + optimizer state", f"measured peak ({measured})", "seconds"]
    print(table(header, rows))
    print("\nEach measured in a fresh process; the RRHF step includes sampling and scoring its candidates.")


# ---------------------------------------------------------------------------------------------------

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
    args = parse_args(Args)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.quick:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 8), min(args.new_tokens, 16)
    if args.probe:
        run_probe(args, device)
        sys.exit(0)

    use_compile = device == "cuda" if args.compile is None else args.compile
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else \
        [4] if args.quick else [64, 256] if device == "cuda" else [64]
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    threads = torch.get_num_threads()
    print(f"# minirlhf bench{' (--quick)' if args.quick else ''}: {name}, torch {torch.__version__}"
          + ("" if device == "cuda" else f", {threads} thread{'s' * (threads > 1)}"))
    sections = args.sections.split(",")
    if "sampling" in sections:
        bench_sampling(args, device, batch_sizes, use_compile)
    if "training" in sections:
        bench_training(args, device, use_compile)
    if "ppo" in sections:
        bench_ppo(device, args.quick)
