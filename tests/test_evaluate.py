"""The evaluation's own measurements against independent references.

- `sequence_kl` at temperature T is the summed log-ratio of the two models' temperature-T
  distributions on the sampled tokens (a float64 softmax per position as the reference); at T = 1 it is
  the plain log-ratio, and a model against itself gives exactly 0.
- `correct_rate_by_kind` on hand-graded answers; `evaluate(..., greedy=True)` adds the greedy rates.
- best-of-n reports its analytic KL as an upper bound (`kl_to_sft_bound`).

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
    """sum over response tokens of log softmax(z / T)[y] - log softmax(z_ref / T)[y], float64, one row."""
    p, r = encode_prompt(enc, prompt), encode_response(enc, response)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        z, z_ref = policy(ids)[0].double(), ref(ids)[0].double()
    total = 0.0
    for t in range(len(p), len(p) + len(r)):  # token t is scored by the logits at t - 1
        y = ids[0, t]
        total += (torch.log_softmax(z[t - 1] / T, -1)[y] - torch.log_softmax(z_ref[t - 1] / T, -1)[y]).item()
    return total


def test_sequence_kl_is_taken_at_the_sampling_temperature():
    policy, ref, enc = tiny(0), tiny(1), get_encoding("bytes")
    prompts = ["What is 2 + 3?", "Spell 'cat' backwards."]
    responses = ["Sure! 5", "tac"]
    ids = [encode_response(enc, r) for r in responses]
    for T in (1.0, 0.5, 1.7):
        kl = sequence_kl(policy, ref, enc, prompts, ids, 48, temperature=T)
        for k, p, r in zip(kl, prompts, responses):
            assert math.isclose(k.item(), naive_kl(policy, ref, enc, p, r, T), rel_tol=1e-4, abs_tol=1e-4)
    assert (sequence_kl(policy, policy, enc, prompts, ids, 48, temperature=0.5) == 0).all()
    # the temperature matters: at T = 0.5 the log-ratio is not the T = 1 one
    assert not torch.allclose(sequence_kl(policy, ref, enc, prompts, ids, 48, temperature=0.5),
                              sequence_kl(policy, ref, enc, prompts, ids, 48))


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
