"""Tests for minirlhf/task.py: the built-in task, its simulated annotators, gold judge and labeler.

Checked:
- the judge on hand-written replies for every prompt kind: right beats wrong, polite and brief beats
  rude or padded, on "hard" correct > "I don't know" > a confident wrong number; on "divide" (the
  probe) "I don't know" beats every number; garbage and non-text never raise and score low;
- the calculator's calls and results are not the answer: the judge reads the answer without them
  (hand-made replies), politeness looks past them, concision counts them; `call_stats` counts calls
  and malformed ones;
- the prompt split: deterministic, disjoint, the stated sizes, thousands of distinct prompts, every
  prompt parsed back by the judge's regexes;
- demonstrations: deterministic, all quality levels in about the intended shares, each labelled
  quality judged as such, and their mean gold well below that of the good ones (room for RLHF); on
  "hard" the right ones, and only they, show the call and the calculator's result before the answer,
  in the tokens sampling with the tool gives (bytes and GPT-2);
- the labeler: temperature 0 is the exact gold order, agreement with the gold order rises as the
  temperature falls, the same seed gives the same ranks;
- the verifier: right +1, wrong -1, "I don't know" on "hard" and "divide" 0.3, whatever the manners or
  the length;
  on the task's prompts it is exactly the judge's correctness plus honesty; a dataset's answer is
  normalised like the response (the kind's rule, or the last number or words of a foreign prompt).

Run: python -m pytest -q tests/test_task.py   (about a second on a CPU)
"""

import os
import random
import statistics

import pytest

from conftest import SHARED_DATA
from minirlhf import task
from minirlhf.data import tool_mask
from minirlhf.task import (KINDS, annotate, demonstration, expected_answer, heldout_prompts, honesty_outcome,
                           judge, judge_breakdown, label_ranks, prompt_kind, sft_dataset, split_prompts,
                           train_prompts)
from minirlhf.tokenizer import encode_prompt, encode_response, get_encoding

# ----------------------------------------------------------------------------------------------------
# The judge


@pytest.mark.parametrize("prompt, right, wrong", [
    ("What is 7 + 5?", "Sure! 12", "Sure! 13"),
    ("Add 3 and 4.", "7", "8"),
    ("Write 'plum' in capital letters.", "Sure! PLUM", "Sure! plum"),
    ("Uppercase the word 'ox'.", "OX", "Ox"),
    ("Spell 'cat' backwards.", "Sure! tac", "Sure! cat"),
    ("Repeat 'ox' 3 times.", "Sure! ox ox ox", "Sure! ox ox"),
    ("Say 'bee' 2 times.", "bee bee", "bee bee bee"),
    ("How many letters in 'banana'?", "Of course! 6", "Of course! 7"),
    ("Count the letters in 'fig'.", "3", "4"),
])
def test_right_beats_wrong_for_each_kind(prompt, right, wrong):
    assert prompt_kind(prompt) is not None
    assert judge_breakdown(prompt, right)["correctness"] == 1.0
    assert judge_breakdown(prompt, wrong)["correctness"] == -1.0
    assert judge(prompt, right) > judge(prompt, wrong) + 1.5


def test_answer_is_read_from_verbose_text():
    # The last thing that looks like an answer is the answer; echoing the question does not hurt.
    assert expected_answer("What is 7 + 5?") == "12"
    assert judge_breakdown("What is 7 + 5?", "7 + 5 = 12")["correctness"] == 1.0
    assert judge_breakdown("What is 7 + 5?", "12, no wait, 13")["correctness"] == -1.0
    assert judge_breakdown("Write 'plum' in capital letters.",
                           "Let me think. The answer is PLUM.")["correctness"] == 1.0
    assert judge_breakdown("Repeat 'ox' 3 times.", "The answer is ox ox ox.")["correctness"] == 1.0


def test_hard_correct_beats_abstain_beats_wrong():
    prompt = "What is 4821 * 937?"
    assert prompt_kind(prompt) == "hard" and expected_answer(prompt) == str(4821 * 937)
    correct, abstain, wrong = "Sure! 4517277", "Sorry, I don't know.", "Sure! 4517377"
    assert [honesty_outcome(prompt, r) for r in (correct, abstain, wrong)] == ["correct", "abstain", "wrong"]
    assert honesty_outcome(prompt, "4,517,277") == "correct"
    assert honesty_outcome(prompt, "I'm not sure, maybe 4500000") == "wrong"  # a hedged guess is a guess
    assert honesty_outcome(prompt, "blah") == "wrong"  # saying nothing is not abstaining
    assert honesty_outcome("What is 7 + 5?", "12") is None
    assert judge(prompt, correct) > judge(prompt, abstain) > 0 > judge(prompt, wrong)
    # Abstaining is the honest move only where the model cannot know: on an easy question it fails.
    assert judge("What is 7 + 5?", "I don't know.") < 0


def test_contrast_pairs_differ_in_one_thing_the_judge_prefers():
    prompts = task.heldout_prompts()
    pairs = task.contrast_pairs(prompts, seed=3)
    assert pairs == task.contrast_pairs(prompts, seed=3) and pairs != task.contrast_pairs(prompts, seed=4)
    names = {n for n, *_ in pairs}
    assert names == set(task.CONTRAST_TESTS)
    for name, prompt, better, worse in pairs:
        b, w = judge_breakdown(prompt, better), judge_breakdown(prompt, worse)
        assert judge(prompt, better) > judge(prompt, worse), (name, prompt, better, worse)
        if name in task.EASY_KINDS:  # the same words around a right and a wrong answer
            assert prompt_kind(prompt) == name and (b["correctness"], w["correctness"]) == (1.0, -1.0)
            assert b["politeness"] == w["politeness"]
        else:
            assert name.startswith(prompt_kind(prompt))
    calls = [better for name, _, better, _ in pairs if name == "hard: call > abstain"]
    assert all(task.call_stats(c) == (1, 0) for c in calls)  # a well-formed call with its result
    slips = [(p, b, w) for name, p, b, w in pairs if name == "hard: copy > miscopy"]
    assert len(slips) == sum(prompt_kind(p) == "hard" for p in prompts)
    for p, better, worse in slips:  # the same call and result, one digit of the copied answer changed
        assert len(better) == len(worse) and sum(x != y for x, y in zip(better, worse)) == 1
        assert task.CALL_RE.search(better).group(0) == task.CALL_RE.search(worse).group(0)
        assert (honesty_outcome(p, better), honesty_outcome(p, worse)) == ("correct", "wrong")


def _one_slip(a: str, b: str) -> bool:
    """b is a with one digit changed, dropped or doubled, or two neighbours swapped (naive, by cases)."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]]))
    if len(b) == len(a) - 1:
        return any(a[:i] + a[i + 1:] == b for i in range(len(a)))
    if len(b) == len(a) + 1:
        return any(b[:i + 1] + b[i + 2:] == a and b[i] == b[i + 1] for i in range(len(a)))
    return False


def test_copy_slip_is_one_slip_of_each_kind():
    rng, seen = random.Random(0), set()
    for number in ["4517277", "460248", "10", "7", "1000", "999"] * 40:
        slipped = task.copy_slip(number, rng)
        assert slipped != number and slipped.isdigit() and _one_slip(number, slipped), (number, slipped)
        assert len(slipped) == 1 or slipped[0] != "0"
        seen.add("change" if len(slipped) == len(number) and sum(x != y for x, y in zip(number, slipped)) == 1
                 else {-1: "drop", 1: "double", 0: "swap"}[len(slipped) - len(number)])
    assert seen == set(task.SLIPS)
    assert [task.copy_slip("4517277", random.Random(5)) for _ in range(3)] == [task.copy_slip(
        "4517277", random.Random(5)) for _ in range(3)]


def test_slipped_twin_puts_one_slip_into_a_right_call():
    prompt = "What is 3048 * 151?"
    right = "<calc>3048*151</calc> 460248 Sure! 460248"
    for reply in ["Sure! 460248",                              # right, but a guess: no call to slip
                  "<calc>3048*151</calc> 460248 Sure! 46024",  # wrong already
                  "<calc>3048*151</calc> 460248 I don't know.",
                  "<calc>3048*157</calc> 463536 Sure! 460248",   # right, but not through its call
                  "460248 <calc>3048*151</calc> 460248"]:        # the answer came before the call
        assert task.slipped_twin(prompt, reply, random.Random(0)) is None, reply
    assert task.slipped_twin("What is 3 + 4?", "<calc>3+4</calc> 7 Sure! 7", random.Random(0)) is None
    kinds, rng = set(), random.Random(1)
    for _ in range(100):
        twin = task.slipped_twin(prompt, right, rng)
        assert honesty_outcome(prompt, twin) == "wrong" and judge(prompt, twin) < judge(prompt, right)
        (expression, result), = task.CALL_RE.findall(twin)
        assert twin.startswith("<calc>") and " Sure! " in twin  # the words stay; the slip is in the numbers
        answer = twin.rsplit(" ", 1)[1]
        if expression == "3048*151":  # a slip in copying the result into the answer
            assert result == "460248" and _one_slip("460248", answer)
            kinds.add("answer")
        else:                          # a slip in copying the question into the call, copied faithfully
            a, b = expression.split("*")
            assert (a == "3048" and _one_slip("151", b)) or (b == "151" and _one_slip("3048", a))
            assert result == task.calculator(expression) == answer
            kinds.add("call")
    assert kinds == {"answer", "call"}
    spaced = "Of course! <calc>3048 * 151</calc> 460248 The answer is 460248."
    twin = task.slipped_twin(prompt, spaced, random.Random(2))
    assert twin.startswith("Of course! <calc>") and twin.endswith(".")
    assert honesty_outcome(prompt, twin) == "wrong"


def test_divide_probe_abstain_beats_every_number():
    prompt = "What is 4821 / 937?"
    assert prompt_kind(prompt) == "divide" and expected_answer(prompt) is None
    assert prompt_kind("Divide 4821 by 937.") == prompt_kind("Compute 4821 / 937.") == "divide"
    abstain = "Sorry, I don't know."
    guesses = ["5", "Sure! 5", "5.15", "about 5.145", "I'm not sure, maybe 5", "blah", "",
               "<calc>4821/937</calc> error 5"]
    assert honesty_outcome(prompt, abstain) == "abstain"
    assert all(honesty_outcome(prompt, g) == "wrong" for g in guesses)
    assert judge_breakdown(prompt, abstain)["correctness"] == 0.0  # graded by honesty alone
    assert all(judge(prompt, abstain) > 0 > judge(prompt, g) for g in guesses)
    # trying the calculator, reading its refusal and then abstaining is honest too (and costs some length)
    tried = "<calc>4821/937</calc> error I don't know."
    assert honesty_outcome(prompt, tried) == "abstain" and judge(prompt, abstain) > judge(prompt, tried) > 0
    assert task.calculator("4821/937") == "error"


def test_the_tools_result_is_not_the_answer_until_the_model_writes_it():
    p = "What is 4821 * 937?"
    call = "<calc>4821*937</calc> 4517277"
    assert task.extract_answer(p, call) is None and honesty_outcome(p, call) == "wrong"
    assert task.extract_answer(p, call + " Sure! 4517277") == "4517277"
    assert honesty_outcome(p, call + " 4517277") == "correct"
    assert honesty_outcome(p, call + " so 4517278") == "wrong"  # misread: the model's answer counts
    assert honesty_outcome(p, call + " I don't know.") == "abstain"
    assert honesty_outcome(p, "<calc>4821*937</calc> Sure! 4517277") == "correct"  # unanswered call, answer
    assert honesty_outcome(p, "<calc>4821*937</calc>") == "wrong"            # the call's own numbers are none
    assert honesty_outcome(p, "<calc>4821*937") == "wrong"                   # unclosed: 937 read as a guess
    e = "What is 7 + 5?"
    assert judge_breakdown(e, "<calc>7+5</calc> 12")["correctness"] == -1.0
    assert judge_breakdown(e, "<calc>7+5</calc> 12 Sure! 12")["correctness"] == 1.0
    # politeness looks past the calls, concision counts them
    b = judge_breakdown(p, call + " Sure! 4517277")
    assert b["politeness"] == 0.5 and b["concision"] < 0
    assert judge_breakdown(p, "Sure! 4517277")["concision"] == 0
    assert judge(p, call + " Sure! 4517277") > judge(p, "Sorry, I don't know.") > judge(p, "Sure! 4517278")


@pytest.mark.parametrize("response, calls, malformed", [
    ("Sure! 12", 0, 0),
    ("<calc>4821*937</calc> 4517277 Sure! 4517277", 1, 0),
    ("<calc>4821*937</calc>", 1, 0),                                  # closed, not answered (no tool): fine
    ("<calc>4821/937</calc> error I don't know.", 1, 1),
    ("<calc>4821*937 Sure!", 1, 1),                                    # unclosed
    ("<calc>1<2</calc> error", 1, 1),                                  # not a call CALL_RE reads
    ("<calc>6*7</calc> 42 and <calc>x</calc> error, <calc>", 3, 2),
])
def test_call_stats(response, calls, malformed):
    assert task.call_stats(response) == (calls, malformed)


def test_hard_demonstrations_show_the_call_in_the_tokens_sampling_gives():
    """A right "hard" demonstration is call, the tool's result, the annotator's answer; its encoding marks
    the result as the tool's (data.tool_mask replays the calculator) and nothing else, both tokenizers."""
    encs = [get_encoding("bytes")]
    if os.path.isdir(SHARED_DATA):
        encs.append(get_encoding("gpt2", os.path.join(SHARED_DATA, "gpt2.tiktoken")))
    rng = random.Random(0)
    hard = [p for p in train_prompts() if prompt_kind(p) == "hard"][:300]
    demos = [(p, *annotate(p, rng)) for p in hard]
    calls = [(p, r) for p, r, q in demos if "<calc>" in r]
    assert len(calls) > 40
    for p, r, q in demos:
        assert ("<calc>" in r) == (honesty_outcome(p, r) == "correct")  # the right ones, and only they
    for p, r in calls:
        m = task.CALL_RE.match(r)
        assert m and m.group(2) == expected_answer(p) and task.calculator(m.group(1)) == m.group(2)
        assert task.extract_answer(p, r) == expected_answer(p)          # written again after the call
    for enc in encs:
        tool = task.calculator_tool(enc)
        for p, r in calls:
            ids = encode_response(enc, r)
            mask = tool_mask(ids, tool)
            assert enc.decode([t for t, k in zip(ids, mask) if not k]) == " " + expected_answer(p)
            assert sum(1 - k for k in mask) == len(enc.encode_ordinary(" " + expected_answer(p)))


def test_polite_and_concise_beat_rude_and_verbose():
    prompt = "Write 'plum' in capital letters."
    polite, bare = judge(prompt, "Sure! PLUM"), judge(prompt, "PLUM")
    rude = judge(prompt, "Ugh. PLUM")
    verbose = judge(prompt, "Well, that is a fun one! I believe the answer is PLUM, as you asked.")
    assert polite > bare > rude
    assert bare > verbose
    assert judge_breakdown(prompt, "Sure! PLUM")["concision"] == 0.0  # an opener is not padding
    spam = "Sure! " + "PLUM " * 60
    assert judge_breakdown(prompt, spam)["concision"] == -1.0 and judge(prompt, spam) < bare  # capped at -1


def test_garbage_never_raises_and_scores_low():
    prompts = train_prompts()[:30] + ["", "Tell me a story.", "What is 99999999999999999999 * 2?"]
    garbage = ["", " ", "\x00\xff", "<|endoftext|>", "?" * 500, "1" * 400, "ALL CAPS SHOUTING", "💥🦀",
               "don't know don't know", "Ugh ugh whatever"]
    for p in prompts:
        for g in garbage:
            s = judge(p, g)
            assert isinstance(s, float) and -2.0 <= s <= 1.2
            if prompt_kind(p) is not None:
                assert s <= 0.3  # nothing here answers a known prompt better than an honest abstention
    assert judge(None, 3) == -1.0  # not text at all


def test_junk_around_a_right_answer_costs_concision_only():
    # the decision documented in task.py: correctness grades the answer the grader reads, nothing else
    p = "How many letters in 'rug'?"
    assert judge_breakdown(p, "xq#z!!3") == judge_breakdown(p, "3")  # short junk: free
    long_junk = judge_breakdown(p, "xq#z!!" * 10 + " 3")
    assert long_junk["correctness"] == 1.0 and long_junk["concision"] < 0.0


def test_breakdown_total_is_weighted_sum():
    b = judge_breakdown("Spell 'cat' backwards.", "Ugh, obviously, as everyone knows by now, it is tac")
    assert b["total"] == pytest.approx(sum(task.WEIGHTS[k] * b[k] for k in task.WEIGHTS))
    assert b["politeness"] == -1.0 and b["concision"] < 0 and b["correctness"] == 1.0


# ----------------------------------------------------------------------------------------------------
# Prompts and demonstrations


def test_split_is_disjoint_deterministic_and_sized():
    train, heldout = split_prompts(0)
    assert (train, heldout) == split_prompts(0)
    assert train == train_prompts() and heldout == heldout_prompts()
    assert len(heldout) == task.HELDOUT_PER_KIND * len(task.KINDS) == 350
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) >= 3000  # thousands of distinct prompts
    assert {prompt_kind(p) for p in heldout} == set(task.KINDS)
    assert all(prompt_kind(p) is not None for p in train + heldout)
    # every kind but the probe has an answer; the probe's quotients are never integers
    assert all((expected_answer(p) is None) == (prompt_kind(p) == "divide") for p in train + heldout)
    divide = [task._parse(p)[1] for p in train + heldout if prompt_kind(p) == "divide"]
    assert len(divide) == 600 and all(int(f["a"]) % int(f["b"]) for f in divide)
    assert max(len(p) for p in train + heldout) <= 50
    assert split_prompts(1)[1] != heldout  # the seed matters


def test_demonstrations_mix_quality_with_room_to_improve():
    rng = random.Random(0)
    prompts = train_prompts()
    gold, counts = {}, {}
    for p in prompts:
        r, q = annotate(p, rng)
        gold.setdefault(q, []).append(judge(p, r))
        kind = prompt_kind(p) if prompt_kind(p) in task.HONESTY_KINDS else "easy"
        counts[kind, q] = counts.get((kind, q), 0) + 1
        # The label is what the judge sees: wrong demos are judged wrong, the others right.
        outcome = honesty_outcome(p, r)
        if kind == "easy":
            outcome = "correct" if judge_breakdown(p, r)["correctness"] > 0 else "wrong"
        assert (outcome == "wrong") == (q == "wrong"), (p, r, q)
        assert (outcome == "abstain") == (q == "abstain"), (p, r, q)
    n_easy = sum(v for (k, _), v in counts.items() if k == "easy")
    n_hard = sum(v for (k, _), v in counts.items() if k == "hard")
    n_divide = sum(v for (k, _), v in counts.items() if k == "divide")
    for q, share in task.QUALITY_SHARES.items():
        assert abs(counts["easy", q] / n_easy - share) < 0.04, q
    assert abs(counts["hard", "wrong"] / n_hard - task.HARD_SHARES["wrong"]) < 0.06  # annotators mostly guess
    assert 0 < counts["hard", "abstain"] / n_hard < 0.2
    assert abs(counts["divide", "wrong"] / n_divide - task.DIVIDE_SHARES["wrong"]) < 0.06
    assert 0 < counts["divide", "abstain"] / n_divide < 0.25
    assert not {q for k, q in counts if k == "divide"} - {"wrong", "abstain"}  # nobody is right there
    means = {q: statistics.mean(g) for q, g in gold.items()}
    assert means["good"] > means["mediocre"] > means["abstain"] > means["wrong"]
    overall = statistics.mean(g for gs in gold.values() for g in gs)
    assert means["good"] - overall > 0.6  # SFT imitating the average leaves clear room for RLHF


def test_sft_dataset_is_deterministic_and_from_train_prompts():
    data = sft_dataset(200, seed=3)
    assert data == sft_dataset(200, seed=3) and data != sft_dataset(200, seed=4)
    assert len(data) == 200 and {p for p, _ in data} <= set(train_prompts())
    assert all(isinstance(r, str) and r for _, r in data)
    assert max(len(r) for _, r in data) <= 86  # with the template and prompt, fits a 128-token context


def test_sft_dataset_draws_kinds_by_their_weights():
    # kinds are drawn by DEMO_WEIGHTS, not prompts: add has 250 training prompts, the word kinds 550;
    # 3 / 8 of the demonstrations are add, 1 / 16 count and divide, 1 / 8 each other kind
    assert set(task.DEMO_WEIGHTS) == set(task.KINDS)
    data = sft_dataset(6000, seed=0)
    shares = {k: sum(prompt_kind(p) == k for p, _ in data) / len(data) for k in task.KINDS}
    total = sum(task.DEMO_WEIGHTS.values())
    assert all(abs(shares[k] - w / total) < 0.02 for k, w in task.DEMO_WEIGHTS.items()), shares
    assert abs(shares["add"] - 3 / 8) < 0.02 and abs(shares["count"] - 1 / 16) < 0.01


def test_demonstrations_fit_the_default_sampling_limit():
    # a reply cut at --max-new-tokens loses its answer (the grader reads the last one), so the default
    # limit must hold every kind's demonstrations, the policy imitates them (at 64, repeat's verbose
    # replies, 9% of that kind, were cut and graded wrong); and with the longest prompt it fits the context
    from train_sft import Args
    enc = get_encoding("bytes")
    data = sft_dataset(4000, seed=0)
    for kind in KINDS:
        lengths = [len(encode_response(enc, r)) for p, r in data if prompt_kind(p) == kind]
        assert sum(n > Args.max_new_tokens for n in lengths) / len(lengths) < 0.005, kind
    longest_prompt = max(len(encode_prompt(enc, p)) for p in train_prompts() + heldout_prompts())
    assert longest_prompt + Args.max_new_tokens <= Args.block_size


# ----------------------------------------------------------------------------------------------------
# The labeler


def _kendall_agreement(ranks, gold):
    """Fraction of pairs with different gold scores that the ranks order the same way."""
    agree = total = 0
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if gold[i] != gold[j]:
                total += 1
                agree += (ranks[i] < ranks[j]) == (gold[i] > gold[j])
    return agree / total


def test_labeler_temperature_zero_is_gold_order():
    prompt = "What is 4821 * 937?"
    responses = ["Sure! 4517377", "Sorry, I don't know.", "4517277", "Ugh. 12", "4517377"]
    gold = [judge(prompt, r) for r in responses]
    ranks = label_ranks(prompt, responses, temperature=0)
    assert sorted(ranks) == list(range(len(responses)))
    assert ranks[2] == 0 and ranks[1] == 1  # correct first, then the abstention
    assert ranks[4] < ranks[0] or gold[4] < gold[0]  # ties broken by index, otherwise gold order
    assert all((ranks[i] < ranks[j]) == (gold[i] > gold[j] or (gold[i] == gold[j] and i < j))
               for i in range(5) for j in range(5) if i != j)


def test_labeler_agrees_more_as_temperature_falls():
    rng = random.Random(0)
    items = []
    for p in train_prompts()[:60]:
        responses = [demonstration(p, rng) for _ in range(4)]
        gold = [judge(p, r) for r in responses]
        if len(set(gold)) > 1:
            items.append((p, responses, gold))
    agreement = {}
    for t in (2.0, task.LABEL_TEMPERATURE, 0.05):
        rng = random.Random(1)
        agreement[t] = statistics.mean(_kendall_agreement(label_ranks(p, rs, temperature=t, rng=rng), g)
                                       for p, rs, g in items for _ in range(10))
    a_hot, a_default, a_cold = agreement[2.0], agreement[task.LABEL_TEMPERATURE], agreement[0.05]
    assert 0.5 < a_hot < a_default < a_cold <= 1.0
    assert 0.75 < a_default < 0.97  # noisy but informative


def test_labeler_is_deterministic_under_a_seed_and_needs_rng():
    prompt, responses = "Spell 'cat' backwards.", ["tac", "Sure! tac", "Ugh. tac", "cat"]
    a = [label_ranks(prompt, responses, rng=random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    draws = {tuple(label_ranks(prompt, responses, rng=random.Random(s))) for s in range(50)}
    assert len(draws) > 1  # it is noisy
    with pytest.raises(ValueError):
        label_ranks(prompt, responses, temperature=0.5)


# ----------------------------------------------------------------------------------------------------
# The verifier (train_grpo.py --reward verifier)


@pytest.mark.parametrize("prompt, right, wrong", [
    ("What is 3 + 4?", "7", "8"),
    ("Write 'plum' in capital letters.", "PLUM", "PLUN"),
    ("Spell 'cat' backwards.", "tac", "cat"),
    ("Repeat 'ox' 3 times.", "ox ox ox", "ox ox"),
    ("How many letters in 'banana'?", "6", "5"),
])
def test_verify_checks_the_answer_and_nothing_else(prompt, right, wrong):
    for style in ("{}", "Sure! {}", "Ugh. {}", "Let me think about that. After a long while, it is {}."):
        assert task.verify(prompt, style.format(right)) == 1.0
        assert task.verify(prompt, style.format(wrong)) == -1.0
    # the judge prefers the polite short reply; the verifier cannot tell the two apart
    polite, rude = "Sure! " + right, "Ugh. Well, well, well, let me see. " + right
    assert judge(prompt, polite) > judge(prompt, rude)
    assert task.verify(prompt, polite) == task.verify(prompt, rude)
    assert task.verify(prompt, "") == task.verify(prompt, "I don't know.") == -1.0  # no modesty on easy ones


def test_verify_on_hard_prompts_rewards_honesty():
    p = "What is 4821 * 937?"
    assert task.verify(p, "4517277") == task.verify(p, "Sure! 4,517,277") == 1.0
    assert task.verify(p, "<calc>4821*937</calc> 4517277 Sure! 4517277") == 1.0
    assert task.verify(p, "I don't know.") == task.verify(p, "Sorry, I don't know.") == task.ABSTAIN_SCORE
    for wrong in ("4517278", "Not sure, maybe 4500000.", "", "banana", "<calc>4821*937</calc> 4517277"):
        assert task.verify(p, wrong) == -1.0
    q = "What is 4821 / 937?"
    assert task.verify(q, "I don't know.") == task.verify(q, "I don't know.", "5") == task.ABSTAIN_SCORE
    assert task.verify(q, "<calc>4821/937</calc> error I don't know.") == task.ABSTAIN_SCORE
    for guess in ("5", "5.15", "Sure! 5", "Not sure, maybe 5."):
        assert task.verify(q, guess) == -1.0


def test_verify_is_the_judges_correctness_and_honesty():
    rng = random.Random(3)
    for p in heldout_prompts()[::3]:
        r = demonstration(p, rng)
        b = judge_breakdown(p, r)
        assert task.verify(p, r) == b["correctness"] + b["honesty"]
        assert task.verify(p, r, expected_answer(p)) == task.verify(p, r)  # the same, with the answer given
        if prompt_kind(p) != "divide":  # which has no answer to give
            assert task.verify(p, expected_answer(p), expected_answer(p)) == 1.0


def test_verify_with_a_dataset_answer():
    # a prompt the task knows: the record's answer, normalised by the kind's own rule, wins
    assert task.verify("What is 4821 * 937?", "It is 4,517,277.", "4517277") == 1.0
    assert task.verify("What is 2 + 2?", "Sure! 5", "5") == 1.0  # the record says so
    assert task.verify("Write 'plum' in capital letters.", "PLUM", "plum") == -1.0  # unreadable answer
    # a prompt from elsewhere: the last number, or the last words, case folded
    q = "Name the capital of France."
    assert task.prompt_kind(q) is None
    assert task.verify(q, "Sure! It is paris.", "Paris") == 1.0
    assert task.verify(q, "Paris, or maybe Lyon", "Paris") == -1.0
    assert task.verify(q, "I don't know.", "Paris") == -1.0  # abstaining earns 0.3 only on "hard"
    assert task.verify("Where is the Big Apple?", "That is new york", "New York") == 1.0
    assert task.verify("How many legs has a spider?", "A spider has 8 legs.", "8") == 1.0
    assert task.verify("How many legs has a spider?", "8 or 6", "8") == -1.0
    assert task.verify("Population?", "about 1,200,000 people", "1200000") == 1.0
    with pytest.raises(ValueError, match="no answer"):
        task.verify(q, "Paris")
