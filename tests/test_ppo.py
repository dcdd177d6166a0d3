"""PPO invariants on real (tiny) models, and a smoke run of the whole script chained after SFT and RM.

- Before the first update the policy is the rollout policy: the ratio is exactly 1, so approx KL and
  the clip fraction are 0 (dropout is off), and the first minibatch's gradient is the plain policy gradient.
- With the policy equal to the reference, the KL part of every token reward is 0: the rewards are the
  score alone, at each response's last token.
- The values are shifted like the log-probs: values[:, t] is the critic's output at position t - 1.
- A subprocess run of train_sft.py -> train_rm.py -> train_ppo.py with tiny configs: the checkpoint
  loads, the log has every documented key, and the script's own check that the reference and the
  reward model did not change passes.

Run: python -m pytest -q tests/test_ppo.py
"""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from minirlhf.model import GPT, GPTConfig, ScalarHead
from minirlhf.reward import RewardModel
from minirlhf.tokenizer import get_encoding
from train_ppo import critic_forward, policy_forward, ppo_policy_stats, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_models(seed=0):
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
    rm = ScalarHead(GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32))).eval()
    return policy, copy.deepcopy(policy).eval(), copy.deepcopy(rm), [RewardModel(rm, 1.0, 0.0, 1.0, "rm", "bytes")]


def args(**kw):
    a = dict(max_new_tokens=12, temperature=1.0, missing_eos_penalty=1.0, gamma=1.0, lam=0.95, clip_eps=0.2)
    a.update(kw)
    return SimpleNamespace(**a)


def test_ratio_is_exactly_one_before_the_first_update():
    policy, ref, critic, rms = tiny_models()
    enc = get_encoding("bytes")
    prompts = ["What is 2 + 3?", "Spell 'cat' backwards.", "Say 'ox' 3 times.", "Hi"]
    b = rollout(policy, ref, critic, rms, enc, prompts, args(), 0.1, torch.Generator().manual_seed(0))
    policy.train()  # the update runs in train mode: with dropout 0 it must not matter
    mb = torch.tensor([2, 0])  # a minibatch in shuffled order, as the update takes it
    logprobs, _ = policy_forward(policy, b["seqs"][mb], b["attn"][mb], 1.0)
    m = b["mask"][mb]
    assert torch.equal(logprobs * m, b["logprobs"][mb] * m)
    s = ppo_policy_stats(logprobs, b["logprobs"][mb], b["advantages"][mb], m, 0.2)
    assert s["approx_kl"].item() == 0.0 and s["clipfrac"].item() == 0.0


def test_policy_equal_to_reference_gives_zero_kl_rewards():
    from train_ppo import token_rewards
    policy, ref, critic, rms = tiny_models(1)
    enc = get_encoding("bytes")
    b = rollout(policy, ref, critic, rms, enc, ["What is 1 + 1?", "Hello there"], args(), 0.5,
                torch.Generator().manual_seed(1))
    assert torch.equal(b["logprobs"], b["ref_logprobs"])
    r = token_rewards(b["scores"], b["logprobs"], b["ref_logprobs"], b["mask"], 0.5)
    assert torch.equal(r.sum(1), b["scores"])  # only the score remains, once per row
    assert ((r != 0).sum(1) <= 1).all()


def test_values_are_shifted_like_logprobs():
    _, _, critic, _ = tiny_models(2)
    seqs = torch.randint(0, 256, (2, 9))
    attn = torch.ones_like(seqs)
    with torch.no_grad():
        raw = critic(seqs, attn)
        v = critic_forward(critic, seqs, attn)
    assert torch.equal(v[:, 1:], raw[:, :-1]) and (v[:, 0] == 0).all()


def run(script, *flags):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "96"]


def test_smoke_sft_rm_ppo(tmp_path):
    sft, rm, ppo = str(tmp_path / "sft"), str(tmp_path / "rm"), str(tmp_path / "ppo")
    run("train_sft.py", *TINY, "--max-steps", "3", "--n-demos", "64", "--eval-prompts", "8",
        "--max-new-tokens", "8", "--batch-size", "8", "--out", sft)
    run("train_rm.py", "--init", sft, "--n-prompts", "8", "--eval-prompts", "4", "--max-steps", "2",
        "--batch-size", "4", "--max-new-tokens", "8", "--out", rm)
    out = run("train_ppo.py", "--init", sft, "--reward-model", rm, "--max-steps", "2", "--batch-size", "8",
              "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8", "--eval-prompts", "6",
              "--out", ppo)
    assert "reference and reward models unchanged: ok" in out
    rows = [json.loads(line) for line in open(os.path.join(ppo, "metrics.jsonl"))]
    keys = {"rm_reward", "gold_reward", "kl", "kl_coef", "entropy", "approx_kl", "clipfrac", "pg_loss", "vf_loss",
            "explained_var", "response_len", "eos_rate"}
    assert len(rows) == 2 and keys <= set(rows[0])
    assert rows[0]["first_approx_kl"] == 0.0  # the first minibatch sees the rollout policy itself
    from minirlhf.checkpoint import load_model
    model, ck = load_model(ppo)
    assert ck["kind"] == "lm" and "gold_reward_mean" in ck["extra"] and "kl_to_sft" in ck["extra"]
