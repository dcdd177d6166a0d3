"""PPO invariants on real (tiny) models, and a smoke run of the whole script chained after SFT and RM.

- Before the first update the policy is the rollout policy: the ratio is exactly 1, so approx KL and
  the clip fraction are 0 (dropout is off), and the first minibatch's gradient is the plain policy gradient.
- With the policy equal to the reference, the KL part of every token reward is 0: the rewards are the
  score alone, at each response's last token.
- The values are shifted like the log-probs: values[:, t] is the critic's output at position t - 1.
- The rule penalties: a response without EOS loses missing_eos_penalty, one with a malformed calculator
  call (with the tool) malformed_call_penalty, and the rollout's scores are the reward model's less these.
- The critic copied from the reward model starts on the scale of the normalised, weighted reward.
- A subprocess run of train_ppo.py after the session's tiny SFT -> RM chain (conftest.tiny_chain):
  the checkpoint loads, the log has every documented key, and the script's own check that the
  reference and the reward model did not change passes.

Run: python -m pytest -q tests/test_ppo.py
"""

import copy
import json
import os
from types import SimpleNamespace

import torch

from conftest import run_script
from minirlhf.model import GPT, GPTConfig, ScalarHead
from minirlhf.reward import RewardModel
from minirlhf.tokenizer import get_encoding
from train_ppo import broken_calls, critic_forward, policy_forward, ppo_policy_stats, rollout, rule_penalties



def tiny_models(seed=0):
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=32))
    rm = ScalarHead(GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=32))).eval()
    rms = [RewardModel(rm, 1.0, 0.0, 1.0, "rm", "bytes")]
    return policy, copy.deepcopy(policy).eval(), copy.deepcopy(rm), rms


def args(**kw):
    a = dict(max_new_tokens=12, temperature=1.0, missing_eos_penalty=1.0, malformed_call_penalty=1.0,
             gamma=1.0, lam=0.95, clip_eps=0.2)
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


def test_rule_penalties_by_hand():
    texts = ["<calc>2*3</calc> 6 So 6.", "<calc>2*3</ca 6", "<calc>2/3</calc> error 1", "6", "<calc>2*3"]
    has_eos = torch.tensor([True, True, True, False, False])
    a = args(missing_eos_penalty=0.5, malformed_call_penalty=2.0)
    assert rule_penalties(has_eos, broken_calls(texts, True), a).tolist() == [0.0, 2.0, 2.0, 0.5, 2.5]
    no_tool = broken_calls(texts, False)  # --no-tool: nothing is a call
    assert rule_penalties(has_eos, no_tool, a).tolist() == [0.0, 0.0, 0.0, 0.5, 0.5]


def test_rollout_scores_lose_the_malformed_call_penalty(monkeypatch):
    """With a tool, each response the calculator calls malformed loses exactly malformed_call_penalty:
    the same rollout (same seed), every response made malformed, scores lower by the penalty."""
    import minirlhf.task as task
    policy, ref, critic, rms = tiny_models(3)
    enc = get_encoding("bytes")
    prompts = ["What is 12 * 34?", "Hello there"]

    def run(**kw):
        gen, no_output = torch.Generator().manual_seed(4), lambda ids: None  # a tool that never answers
        return rollout(policy, ref, critic, rms, enc, prompts, args(**kw), 0.1, gen, tool=no_output)["scores"]
    plain = run(malformed_call_penalty=1.5)
    monkeypatch.setattr(task, "call_stats", lambda text: (1, 1))
    assert torch.allclose(run(malformed_call_penalty=1.5), plain - 1.5)
    assert torch.equal(run(malformed_call_penalty=0.0), plain)


def test_values_are_shifted_like_logprobs():
    _, _, critic, _ = tiny_models(2)
    seqs = torch.randint(0, 256, (2, 9))
    attn = torch.ones_like(seqs)
    with torch.no_grad():
        raw = critic(seqs, attn)
        v = critic_forward(critic, seqs, attn)
    assert torch.equal(v[:, 1:], raw[:, :-1]) and (v[:, 0] == 0).all()



def test_critic_from_the_reward_model_reads_the_normalised_weighted_reward():
    # The returns the critic regresses on are built from w * (s - mean) / std: a critic copied from the
    # RM must start on that scale, not the RM's raw one (here std 4, mean 2.5, weight 0.5).
    from minirlhf.reward import combined_reward
    from train_ppo import critic_from_reward_model
    _, _, _, rms = tiny_models(3)
    rm = RewardModel(rms[0].model.requires_grad_(False), 0.5, 2.5, 4.0, "rm", "bytes")  # frozen, as loaded
    critic = critic_from_reward_model(rm)
    seqs = torch.randint(0, 256, (3, 10))
    attn, mask = torch.ones_like(seqs), torch.zeros_like(seqs)
    mask[:, 6:] = 1
    with torch.no_grad():
        assert torch.allclose(critic(seqs, attn)[:, -1], combined_reward([rm], seqs, attn, mask), atol=1e-6)
    assert all(p.requires_grad for p in critic.parameters())
    assert not any(p.requires_grad for p in rm.model.parameters())  # the reward model stays frozen


def test_smoke_sft_rm_ppo(tiny_chain, tmp_path):
    sft, rm, ppo = tiny_chain["sft"], tiny_chain["rm"], str(tmp_path / "ppo")
    out = run_script("train_ppo.py", "--init", sft, "--reward-model", rm, "--max-steps", "2",
                     "--batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "2",
                     "--max-new-tokens", "8", "--eval-prompts", "6", "--out", ppo).stdout
    assert "reference and reward models unchanged: ok" in out
    rows = [json.loads(line) for line in open(os.path.join(ppo, "metrics.jsonl"))]
    keys = {"rm_reward", "gold_reward", "kl", "kl_coef", "entropy", "approx_kl", "clipfrac", "pg_loss",
            "vf_loss", "explained_var", "response_len", "eos_rate", "malformed_call_rate"}
    assert len(rows) == 2 and keys <= set(rows[0])
    assert rows[0]["first_approx_kl"] == 0.0  # the first minibatch sees the rollout policy itself
    from minirlhf.checkpoint import load_model
    model, ck = load_model(ppo)
    assert ck["kind"] == "lm" and "gold_reward_mean" in ck["extra"] and "kl_to_sft" in ck["extra"]
