"""The evaluation's own measurements against independent references.

- `sequence_kl` at temperature T: its k1 is the summed log-ratio of the two models' temperature-T
  distributions on the sampled tokens, its k3 the summed (r - 1) - log r, r = pi_ref / pi (a float64
  softmax per position as the reference for both); k3 is never negative where k1 is; a model against
  itself gives exactly 0; and both are unbiased: weighted by the policy's probability of every possible
  one-token response, each equals the exact KL of that position.
- `correct_rate_by_kind` on hand-graded answers; `evaluate(..., greedy=True)` adds the greedy rates.
- best-of-n reports its analytic KL as an upper bound (`kl_to_sft_bound`).
- the pipeline's report explains why its k1 "KL to SFT" can read below 0, and shows k3 beside it.
- the report tables the reward model's mean score of each kind of reply to the hard questions.

Run: python -m pytest -q tests/test_evaluate.py
"""

import math

import torch

from minirlhf import task
from minirlhf.evaluate import best_of_n, correct_rate_by_kind, evaluate, sequence_kl
from minirlhf.model import GPT, GPTConfig, ScalarHead
from minirlhf.reward import RewardModel
from minirlhf.sampling import sample_responses
from minirlhf.tokenizer import decode_response, encode_prompt, encode_response, get_encoding


def tiny(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()


def naive_kl(policy, ref, enc, prompt, response, T):
    """(k1, k3) of one row, float64: the sums over response tokens y of d = log softmax(z / T)[y] -
    log softmax(z_ref / T)[y] and of r - 1 - log r with r = exp(-d)."""
    p, r = encode_prompt(enc, prompt), encode_response(enc, response)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        z, z_ref = policy(ids)[0].double(), ref(ids)[0].double()
    k1 = k3 = 0.0
    for t in range(len(p), len(p) + len(r)):  # token t is scored by the logits at t - 1
        y = ids[0, t]
        d = (torch.log_softmax(z[t - 1] / T, -1)[y] - torch.log_softmax(z_ref[t - 1] / T, -1)[y]).item()
        ratio = math.exp(-d)
        k1, k3 = k1 + d, k3 + ratio - 1 - math.log(ratio)
    return k1, k3


def test_sequence_kl_is_taken_at_the_sampling_temperature():
    policy, ref, enc = tiny(0), tiny(1), get_encoding("bytes")
    prompts = ["What is 2 + 3?", "Spell 'cat' backwards."]
    responses = ["Sure! 5", "tac"]
    ids = [encode_response(enc, r) for r in responses]
    for T in (1.0, 0.5, 1.7):
        k1, k3 = sequence_kl(policy, ref, enc, prompts, ids, 48, temperature=T)
        for a1, a3, p, r in zip(k1, k3, prompts, responses):
            n1, n3 = naive_kl(policy, ref, enc, p, r, T)
            assert math.isclose(a1.item(), n1, rel_tol=1e-4, abs_tol=1e-4)
            assert math.isclose(a3.item(), n3, rel_tol=1e-4, abs_tol=1e-4)
    assert all((k == 0).all() for k in sequence_kl(policy, policy, enc, prompts, ids, 48, temperature=0.5))
    # the temperature matters: at T = 0.5 the log-ratio is not the T = 1 one
    assert not torch.allclose(sequence_kl(policy, ref, enc, prompts, ids, 48, temperature=0.5)[0],
                              sequence_kl(policy, ref, enc, prompts, ids, 48)[0])


def test_k3_is_never_negative_where_k1_is():
    policy, ref, enc = tiny(0), tiny(1), get_encoding("bytes")
    texts = ["Sure! 5", "tac", "4", "I don't know.", "PLUM", "no", "Of course! 12", "x"]
    prompts = ["What is 2 + 3?"] * len(texts)
    k1, k3 = sequence_kl(policy, ref, enc, prompts, [encode_response(enc, t) for t in texts], 48)
    assert (k1 < 0).any() and (k3 >= 0).all()  # these samples were not drawn from the policy: k1 < 0 shows
    for a3, t in zip(k3, texts):
        assert math.isclose(a3.item(), naive_kl(policy, ref, enc, prompts[0], t, 1.0)[1], rel_tol=1e-4)


def test_k1_and_k3_are_unbiased_exactly_over_one_token():
    """Both estimators weighted by pi(y) over every one-token response y: the exact KL at that position,
    sum_y pi(y) log(pi(y) / pi_ref(y)), float64."""
    policy, ref, enc = tiny(0), tiny(1), get_encoding("bytes")
    prompt = "What is 2 + 3?"
    ids = torch.tensor([encode_prompt(enc, prompt)])
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids)[0, -1].double(), -1)
        logq = torch.log_softmax(ref(ids)[0, -1].double(), -1)
    exact = (logp.exp() * (logp - logq)).sum().item()
    k1, k3 = sequence_kl(policy, ref, enc, [prompt] * enc.n_vocab, [[y] for y in range(enc.n_vocab)], 48)
    weights = logp.exp()
    assert exact > 0.01
    assert math.isclose((weights * k1.double()).sum().item(), exact, rel_tol=1e-4)
    assert math.isclose((weights * k3.double()).sum().item(), exact, rel_tol=1e-4)


def test_the_report_shows_k3_beside_a_negative_k1():
    from pipeline import METHODS, markdown_table
    report = {m: {"kl_to_sft": -0.01, "kl_to_sft_k3": 0.02} for m in METHODS}
    report["rm"] = {"accuracy_vs_gold": 0.8, "accuracy_vs_labels": 0.7}
    note = next(line for line in markdown_table(report).splitlines() if line.startswith("KL to SFT is k1"))
    assert "below 0" in note and note.endswith(", ".join(f"{m} 0.02" for m in METHODS))


def test_the_report_tables_the_reward_models_score_of_each_kind_of_hard_reply():
    from pipeline import METHODS, markdown_table
    report = {m: {} for m in METHODS}
    report["ppo"]["hard_replies"] = {"right": {"rate": 0.5, "rm_score": 2.68},
                                     "broken call": {"rate": 0.5, "rm_score": -1.371}}
    report["rm"] = {"accuracy_vs_gold": 0.8, "accuracy_vs_labels": 0.7}
    lines = markdown_table(report).splitlines()
    assert "| method | right | broken call |" in lines                # the kinds seen, in HARD_REPLIES order
    assert "| ppo | 0.50 (+2.68) | 0.50 (-1.37) |" in lines and "| sft | - | - |" in lines
    assert "the reward model on the replies" not in markdown_table({**report, "ppo": {}})  # none: no table


def test_correct_rate_by_kind_on_hand_graded_answers():
    prompts = ["What is 2 + 3?", "What is 2 + 3?", "Spell 'cat' backwards.", "What is 1234 * 567?",
               "What is 1234 * 567?", "Tell me a joke."]
    texts = ["Sure! 5", "6", "tac", str(1234 * 567), "I don't know.", "no"]
    rates = correct_rate_by_kind(prompts, texts)
    # an abstention is not right; an unknown prompt has no kind and is skipped
    assert rates == {"add": 0.5, "reverse": 1.0, "hard": 0.5}
    assert list(rates) == [k for k in task.KINDS if k in rates]  # the task's order of kinds


def test_evaluate_greedy_rates_and_best_of_n_bound():
    model, enc = tiny(2), get_encoding("bytes")
    prompts = task.heldout_prompts()[:12]
    m, samples = evaluate(model, enc, prompts, 8, greedy=True, seed=1)
    assert set(m["greedy_correct_rate_by_kind"]) == {task.prompt_kind(p) for p in prompts}
    assert set(m["correct_rate_by_kind"]) == {task.prompt_kind(p) for p in prompts}
    greedy = [decode_response(enc, r) for _, r in sample_responses(model, enc, prompts, 8, greedy=True)]
    assert m["greedy_correct_rate_by_kind"] == correct_rate_by_kind(prompts, greedy)
    rm = RewardModel(ScalarHead(tiny(3)).eval(), 1.0, 0.0, 1.0, "rm", "bytes")
    b, _ = best_of_n(model, enc, prompts[:4], 8, [rm], n=4)
    assert b["kl_to_sft_bound"] == b["kl_to_sft"] == math.log(4) - 3 / 4
