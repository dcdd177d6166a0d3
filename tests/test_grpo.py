"""GRPO on real (tiny) models, and smoke runs of train_grpo.py after the tiny SFT -> RM chain.

- The rollout lays each prompt's G responses out contiguously, and the reward is the reward model's
  or, with no reward model, the verifier's (task.verify, here with a missing-EOS penalty);
- before the first update the policy is the rollout policy: on a minibatch of whole groups, in train
  mode, the log-probs are exactly the rollout's (ratio 1, approx KL 0, no clipping);
- subprocess runs of train_grpo.py from `tiny_chain`: with the reward model (two epochs of minibatches,
  so the clip path runs) and with `--reward verifier` (no reward model is loaded: a wrong path is never
  read); the checkpoint loads as kind "lm" with its evaluation and the models it held; metrics.jsonl has
  every documented key; the script's own check that the reference (and reward model) never changed
  passes; `--data` prompts with "answer" fields train with the verifier, and without them the run stops
  with one line naming the file and the field.

The math is tested in tests/test_grpo_loss.py; the verifier in tests/test_task.py.
Run: python -m pytest -q tests/test_grpo.py   (about 30 s on 2 busy CPU cores, the tiny chain included)
"""

import copy
import json
import os
from types import SimpleNamespace

import torch

from conftest import run_script
from minirlhf import task
from minirlhf.checkpoint import load_model
from minirlhf.data import write_jsonl
from minirlhf.model import GPT, GPTConfig, ScalarHead
from minirlhf.reward import RewardModel
from minirlhf.tokenizer import get_encoding
from train_grpo import Args, by_reward, grpo_stats, policy_forward, rollout

PROMPTS = ["What is 2 + 3?", "Spell 'cat' backwards.", "Say 'ox' 3 times."]


def tiny_models(seed=0):
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=32))
    rm = ScalarHead(GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=32))).eval()
    return policy, copy.deepcopy(policy).eval(), [RewardModel(rm, 1.0, 0.0, 1.0, "rm", "bytes")]


def args(**kw):
    a = dict(group_size=4, max_new_tokens=10, temperature=1.0, missing_eos_penalty=1.0, scale_by_std=True)
    return SimpleNamespace(**{**a, **kw})


def test_rollout_groups_and_rewards():
    policy, ref, rms = tiny_models()
    enc = get_encoding("bytes")
    gen = torch.Generator().manual_seed(0)
    b = rollout(policy, ref, rms, enc, PROMPTS, [None] * 3, args(), gen)
    assert b["prompts"] == [p for p in PROMPTS for _ in range(4)] and b["seqs"].shape[0] == 12
    assert torch.equal(b["logprobs"], b["ref_logprobs"])  # the policy is still its reference
    assert b["advantages"].view(3, 4).sum(1).abs().max() < 1e-5  # centred within each group
    # no reward model: the verifier, minus the penalty for a response cut off before its EOS
    b = rollout(policy, ref, [], enc, PROMPTS, [None] * 3, args(), gen)
    want = [task.verify(p, t) - (0.0 if eos else 1.0) for p, t, eos in zip(b["prompts"], b["texts"],
                                                                            b["has_eos"])]
    assert b["scores"].tolist() == want


def test_ratio_is_exactly_one_before_the_first_update():
    policy, ref, rms = tiny_models(1)
    enc = get_encoding("bytes")
    b = rollout(policy, ref, rms, enc, PROMPTS, [None] * 3, args(), torch.Generator().manual_seed(1))
    policy.train()  # the update runs in train mode: with dropout 0 it must not matter
    G = 4
    mb = (torch.tensor([2, 0])[:, None] * G + torch.arange(G)).view(-1)  # groups 2 and 0, whole
    logprobs, _ = policy_forward(policy, b["seqs"][mb], b["attn"][mb], 1.0)
    m = b["mask"][mb]
    assert torch.equal(logprobs * m, b["logprobs"][mb] * m)
    s = grpo_stats(logprobs, b["logprobs"][mb], b["ref_logprobs"][mb], b["advantages"][mb], m, 0.2)
    assert s["approx_kl"].item() == 0.0 and s["clipfrac"].item() == 0.0 and s["kl"].item() == 0.0


TINY_GRPO = ["--max-steps", "2", "--batch-size", "2", "--group-size", "3", "--minibatch-size", "1",
             "--max-new-tokens", "8", "--eval-interval", "1", "--monitor-prompts", "4", "--eval-prompts", "4",
             "--seed", "0"]
STEP_KEYS = {"loss", "pg_loss", "kl", "approx_kl", "clipfrac", "ratio_mean", "ratio_min", "ratio_max",
             "adv_mean", "adv_std", "adv_abs_max", "first_approx_kl", "reward", "reward_std",
             "group_reward_std", "zero_var_groups", "response_len", "entropy", "eos_rate", "gold_reward",
             "grad_norm", "lr", "ms"}
EVAL_KEYS = {"eval_gold_reward", "kl_to_sft"}  # and eval_correct_<kind> for the kinds the prompts hold
EXTRA_KEYS = ("gold_reward_mean", "gold_reward_sem", "kl_to_sft", "hard_correct_rate", "hard_abstain_rate",
              "gold_correctness", "gold_honesty", "gold_politeness", "gold_concision", "train_seconds",
              "peak_memory_mb")


def check_run(out, models):
    model, ck = load_model(out)
    assert isinstance(model, GPT) and ck["kind"] == "lm" and ck["step"] == 2
    for key in EXTRA_KEYS:
        assert key in ck["extra"], key
        # not NaN; the hard-prompt rates are NaN when the 4 prompts hold no hard one
        assert key.startswith("hard_") or ck["extra"][key] == ck["extra"][key], key
    assert ck["extra"]["models_in_memory"] == models
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert STEP_KEYS | EVAL_KEYS <= set(r), (STEP_KEYS | EVAL_KEYS) - set(r)
        assert 0 <= r["zero_var_groups"] <= 1 and 0 <= r["clipfrac"] <= 1
        kinds = {k.removeprefix("eval_correct_") for k in r if k.startswith("eval_correct_")}
        assert kinds and kinds <= set(task.KINDS)
    assert rows[0]["first_approx_kl"] == 0.0  # the first minibatch sees the rollout policy itself
    assert not os.path.exists(os.path.join(out, "resume.pt"))
    return ck, rows


def test_smoke_grpo_with_the_reward_model(tiny_chain, tmp_path):
    out = str(tmp_path / "grpo")
    proc = run_script("train_grpo.py", "--init", tiny_chain["sft"], "--reward-model", tiny_chain["rm"],
                      "--ppo-epochs", "2", "--loss-agg", "token", *TINY_GRPO, "--out", out)
    assert "reference and reward models unchanged: ok" in proc.stdout
    assert "held-out gold reward" in proc.stdout and "gold reward by criterion" in proc.stdout
    ck, _ = check_run(out, models=3)
    assert "rm_reward_mean" in ck["extra"] and ck["args"]["reward_model"] == [tiny_chain["rm"]]
    assert ck["args"]["kl_coef"] == 0.4  # --kl-coef's default by --reward: the tighter leash for a model


def test_smoke_grpo_with_the_verifier(tiny_chain, tmp_path):
    out = str(tmp_path / "grpo_verifier")
    proc = run_script("train_grpo.py", "--init", tiny_chain["sft"], "--reward", "verifier", "--reward-model",
                      str(tmp_path / "no_such_rm"), "--no-scale-by-std", "--loss-agg", "dr_grpo", *TINY_GRPO,
                      "--out", out)
    assert "reward: the verifier" in proc.stdout and "reference unchanged: ok" in proc.stdout
    ck, rows = check_run(out, models=2)
    assert "rm_reward_mean" not in ck["extra"] and ck["args"]["kl_coef"] == 0.04  # the paper's, by --reward
    # the verifier's rewards are -1, 0.3 or +1, less 1 for a response that never emitted EOS
    assert all(-2.0 <= r["reward"] <= 1.0 for r in rows)


def test_verifier_on_data_prompts_needs_answers(tiny_chain, tmp_path):
    good = str(tmp_path / "qa.jsonl")
    write_jsonl(good, [{"prompt": "What is 2 + 3?", "answer": "5"},
                       {"prompt": "Name the capital of France.", "answer": "Paris"}])
    out = str(tmp_path / "grpo_data")
    run_script("train_grpo.py", "--init", tiny_chain["sft"], "--reward", "verifier", "--data", good,
               "--max-steps", "1", "--batch-size", "2", "--group-size", "2", "--minibatch-size", "2",
               "--max-new-tokens", "8", "--out", out)
    model, ck = load_model(out)
    assert ck["kind"] == "lm" and "gold_reward_mean" not in ck["extra"]  # no gold judge off the built-in task

    bad = str(tmp_path / "no_answers.jsonl")
    write_jsonl(bad, [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "Name a fruit."}])
    proc = run_script("train_grpo.py", "--init", tiny_chain["sft"], "--reward", "verifier", "--data", bad,
                      "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"{bad}: record 2: field 'answer': missing" in line and "--reward verifier" in line


def test_beta_and_steps_default_by_reward():
    # -1 resolves by --reward: a learned reward gets the tighter leash and fewer steps; a value given is kept
    rm, verifier = by_reward(Args()), by_reward(Args(reward="verifier"))
    assert (rm.kl_coef, rm.max_steps) == (0.4, 270) and (verifier.kl_coef, verifier.max_steps) == (0.04, 400)
    given = by_reward(Args(kl_coef=0.0, max_steps=7))
    assert (given.kl_coef, given.max_steps) == (0.0, 7)
