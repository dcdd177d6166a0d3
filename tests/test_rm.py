"""The reward-model stage: where a score is read, the batch layout, and a smoke run after SFT.

- A response's score, read at its last response token, does not depend on the batch: scored alone it
  equals the score it gets beside neighbours with longer prompts and responses (left and right padding)
  and absent candidates, to 1e-5.
- `pairwise_accuracy` and `ranks_from_values` against hand-counted pairs (ties form no pair, absent
  candidates are ignored); the labeler sees each distinct sample once and repeats are absent.
- `rm_batch` truncation: over-long rows fit the block, prompts lose their start, and are counted.
- Subprocess runs of train_sft.py -> train_rm.py with tiny configs, on the built-in task and on a
  pairwise JSONL file: the checkpoint loads as a scalar model with the statistics and accuracies that
  minirlhf.reward and the README read.

Run: python -m pytest -q tests/test_rm.py
"""

import json
import os
import random
import re

import pytest
import torch

from conftest import run_script
from minirlhf import task
from minirlhf.checkpoint import load_checkpoint
from minirlhf.model import GPT, GPTConfig, ScalarHead
from minirlhf.ops import gather_last
from minirlhf.tokenizer import decode_response, encode_response
from train_rm import (MAX_TWINS, Ranked, correctness_only_pairs, hard_candidates, label_distinct,
                      pairwise_accuracy, ranking_stats, ranks_from_values, rm_batch, with_twins)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 256  # the bytes encoding's EOS, also the pad id


def group(prompt_len, response_lens, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (prompt_len,), generator=g).tolist()
    responses = [torch.randint(0, 256, (n - 1,), generator=g).tolist() + [PAD] for n in response_lens]
    return Ranked("", prompt, responses, [""] * len(responses), list(range(len(responses))))


def test_score_does_not_depend_on_padding_or_batch():
    torch.manual_seed(0)
    rm = ScalarHead(GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=2, n_head=2, n_embd=32))).eval()
    target = group(5, [3], seed=1)
    # longer prompts and responses, K < 3
    neighbours = [group(17, [9, 2, 14], seed=2), group(2, [20], seed=3)]

    def scores(groups, K):
        ids, attn, resp, ranks, n_cut = rm_batch(groups, K, PAD, 64)
        assert n_cut == 0
        with torch.no_grad():
            return gather_last(rm(ids, attn), resp).view(ranks.shape)  # (B, K)

    alone = scores([target], 1)[0, 0]
    batched = scores([neighbours[0], target, neighbours[1]], 3)
    torch.testing.assert_close(batched[1, 0], alone, atol=1e-5, rtol=0)
    # the same row again, unpadded and read by hand at its last token
    row = torch.tensor([target.prompt_ids + target.responses[0]])
    with torch.no_grad():
        torch.testing.assert_close(rm(row)[0, -1], alone, atol=1e-5, rtol=0)


def test_rm_batch_layout_and_absent_candidates():
    ids, attn, resp, ranks, _ = rm_batch([group(4, [2, 3], 0), group(6, [1], 1)], 2, PAD, 64)
    assert ids.shape == (4, 6 + 3) and ranks.tolist() == [[0, 1], [0, -1]]
    assert (resp.sum(1) == torch.tensor([2, 3, 1, 1])).all()  # the absent candidate is one pad token
    assert (gather_last(ids, resp) == PAD).all()  # the score position is each response's EOS
    assert attn[0, :2].sum() == 0 and attn[0, 2:].sum() == 4 + 2  # a shorter prompt is left-padded...
    assert resp[0, 6:8].sum() == 2 and attn[0, 8] == 0  # ...its response starts after the longest one


def test_rm_batch_truncates_prompts_from_the_left():
    long = group(50, [30, 10], 0)
    ids, attn, resp, _, n_cut = rm_batch([long], 2, PAD, 64)
    assert ids.shape[1] == 64 and n_cut == 2
    kept = ids[0][attn[0].bool() & ~resp[0].bool()].tolist()
    assert kept == long.prompt_ids[-(64 - 30):]  # the end of the prompt survives
    _, _, resp, _, n_cut = rm_batch([group(3, [80], 1)], 1, PAD, 64)
    assert n_cut == 1 and resp.sum() == 63  # a response longer than the block keeps its start


def test_pairwise_accuracy_and_gold_ranks():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, 9.0]])
    ranks = torch.tensor([[0, 1, 2, -1], [0, 1, 1, -1]])
    # prompt 0 pairs: (0,1) ok, (0,2) ok, (1,2) wrong; prompt 1: (0,1) score tie counts wrong, (0,2) wrong
    assert pairwise_accuracy(scores, ranks).item() == pytest.approx(2 / 5)
    gold = torch.tensor([[0.5, -1.0, 0.5, 9.0]], dtype=torch.float64)
    present = torch.tensor([[1, 1, 1, 0]])
    assert ranks_from_values(gold, present).tolist() == [[0, 2, 0, -1]]  # ties share a rank; absent is -1
    assert pairwise_accuracy(-gold, ranks_from_values(gold, present)).item() == 0.0  # reversed order
    assert torch.isnan(pairwise_accuracy(scores[:1], torch.tensor([[0, 0, -1, -1]])))  # no pair


def test_labeler_sees_each_distinct_sample_once():
    prompt = "What is 3 + 4?"
    texts = ["Sure! 7", "Ugh. 7", "Sure! 7", "Sure! 7"]
    ranks = label_distinct(prompt, texts, 0.0, random.Random(0))
    assert ranks == [0, 1, -1, -1]


# ----------------------------------------------------------------------------------------------------
# Smoke runs

def run(script, *flags):
    return run_script(script, *flags).stdout


RM_TINY = ["--eval-prompts", "4", "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def sft(tiny_chain):
    return tiny_chain["sft"]


def check_reward_model(path, gold):
    from minirlhf.checkpoint import load_model
    from minirlhf.reward import load_reward_models
    model, ck = load_model(path)
    assert ck["kind"] == "scalar" and isinstance(model, ScalarHead)
    extra = ck["extra"]
    assert {"reward_mean", "reward_std", "accuracy_vs_labels", "accuracy_vs_gold",
            "train_seconds"} <= set(extra)
    assert extra["reward_std"] > 0 and (extra["accuracy_vs_gold"] is not None) == gold
    [rm] = load_reward_models([path])
    assert (rm.mean, rm.std) == (extra["reward_mean"], extra["reward_std"])
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    assert {"loss", "acc", "val_loss", "acc_labels"} <= set(rows[-1]) and ("acc_gold" in rows[-1]) == gold


def test_smoke_builtin_task(sft, tmp_path):
    out = run("train_rm.py", "--init", sft, "--n-prompts", "8", *RM_TINY, "--out", str(tmp_path / "rm"))
    assert "held-out accuracy: vs labels" in out
    check_reward_model(str(tmp_path / "rm"), gold=True)
    extra = load_checkpoint(str(tmp_path / "rm"))["extra"]
    assert set(extra["accuracy_correctness_by_kind"]) <= set(task.KINDS) and extra["models_in_memory"] == 1
    assert all(0 <= v <= 1 for v in extra["accuracy_correctness_by_kind"].values())
    contrast = extra["contrast_accuracy"]  # task.contrast_pairs on the 4 held-out prompts
    assert contrast and set(contrast) <= set(task.CONTRAST_TESTS)
    assert all(0 <= v <= 1 for v in contrast.values()) and "constructed pairs" in out
    assert "hard questions, the training candidates: " in out
    assert set(extra["hard_candidates"]) <= {"call", "abstain", "answer"}


def test_ranking_stats_on_hand_values():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    ranks = torch.tensor([[1, 0, 2], [0, 0, -1]])  # pairs (1, 0), (1, 2), (0, 2); the second prompt: a tie
    s = ranking_stats(rewards, ranks)
    assert s["pairs"].item() == 3 and abs(s["acc"].item() - 2 / 3) < 1e-6
    assert abs(s["margin"].item() - ((1 - 2) + (1 - 0) + (2 - 0)) / 3) < 1e-6


def test_correctness_only_pairs_ignore_manners():
    g = Ranked("What is 2 + 3?", [], [[1], [2], [3]], ["Sure! 5", "Sure! 6", "Ugh. 5"], [0, 1, 2])
    assert correctness_only_pairs(g) == [(0, 1)]  # "Ugh. 5" differs in politeness too


def test_hard_candidates_by_hand():
    p = "What is 4821 * 937?"  # 4517277
    texts = ["<calc>4821*937</calc> 4517277 4517277",   # a call, right
             "<calc>4821*937</calc> 4517277 4517377",   # a call, miscopied
             "<calc>4821*937</calc> 4517277 4517277",   # a repeat: absent, not counted twice
             "I don't know.", "4517277", "123"]         # an abstention, a lucky guess, a wrong one
    groups = [Ranked(p, [], [[1]] * 6, texts, [0, 2, -1, 1, 3, 4]),
              Ranked("What is 2 + 3?", [], [[1]], ["5"], [0])]  # another kind: left out
    got = hard_candidates(groups)
    assert list(got) == ["call", "abstain", "answer"]
    assert (got["call"]["n"], got["call"]["right"]) == (2, 0.5) and got["abstain"]["n"] == 1
    assert (got["answer"]["n"], got["answer"]["right"]) == (2, 0.5) and got["abstain"]["right"] == 0
    judge = [task.judge(p, t) for t in texts]
    assert got["call"]["gold"] == pytest.approx((judge[0] + judge[1]) / 2)
    assert got["abstain"]["gold"] == pytest.approx(task.ABSTAIN_SCORE) == judge[3]
    assert got["answer"]["gold"] == pytest.approx((judge[4] + judge[5]) / 2)
    assert hard_candidates(groups[1:]) == {}


def test_with_twins_adds_at_most_two_slipped_right_calls():
    from minirlhf.tokenizer import get_encoding
    enc = get_encoding("bytes")
    p = "What is 3048 * 151?"  # 460248
    texts = ["<calc>3048*151</calc> 460248 Sure! 460248",  # right through the call: gets a twin
             "<calc>3048*151</calc> 460248 Sure! 460248",  # a repeat: one twin for both
             "460248",                                      # right, but a guess: nothing to slip
             "<calc>3048*151</calc> 460248 46024",          # miscopied already
             "<calc>3048*151</calc> 460248 Of course! 460248", "<calc>3048*151</calc> 460248 460248"]
    ids = [encode_response(enc, t) for t in texts]
    got, got_ids = with_twins(p, texts, ids, enc, random.Random(0))
    assert got[:6] == texts and got_ids[:6] == ids and len(got) == 6 + MAX_TWINS == 8
    for right, twin in zip([texts[0], texts[4]], got[6:]):  # the first two distinct right calls, in order
        assert task.honesty_outcome(p, twin) == "wrong"
        assert re.sub(r"[0-9]+", "#", twin) == re.sub(r"[0-9]+", "#", right)  # the words stay, a number slips
    assert [decode_response(enc, x) for x in got_ids[6:]] == got[6:]
    assert with_twins(p, texts[2:4], ids[2:4], enc, random.Random(0)) == (texts[2:4], ids[2:4])
    assert with_twins("What is 2 + 3?", ["5"], ids[:1], enc, random.Random(0)) == (["5"], ids[:1])


def test_no_ranked_pair_is_an_error(sft, tmp_path):
    proc = run_script("train_rm.py", "--init", sft, "--n-prompts", "8", *RM_TINY, "--k", "1",
                      "--out", tmp_path / "rm", check=False)
    assert proc.returncode == 2 and "--k 1: must be at least 2" in proc.stderr


def test_smoke_pairwise_file(sft, tmp_path):
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for a in range(10):
            record = {"prompt": f"What is {a} + 2?", "chosen": f"Sure! {a + 2}", "rejected": f"Ugh. {a + 3}"}
            f.write(json.dumps(record) + "\n")
    run("train_rm.py", "--init", sft, "--data", str(data), *RM_TINY, "--out", str(tmp_path / "rm"))
    check_reward_model(str(tmp_path / "rm"), gold=False)
