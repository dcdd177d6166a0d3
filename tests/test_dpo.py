"""The DPO stage and the comparisons train_rm.py writes for it: invariants, then smoke runs.

- train_rm.py's comparison records: absent candidates and empty texts are dropped, ties stay ties, a
  group left with fewer than 2 responses is skipped, and the file reads back with `read_jsonl`; after the
  tiny chain, out/rm/comparisons.jsonl and comparisons_heldout.jsonl hold valid K-way records of the
  right prompts; a run with the exact labeler (--label-temperature 0) writes the labeler's ranks and as
  many pairs as the reward model trained on.
- Pairs and batches: every ranked pair of a K-way record, ties dropped; a pair equal after the length
  cap is dropped; pair rows index the right responses; a response's sequence log-prob does not depend
  on the batch around it (to 1e-5), which precomputing the reference's log-probs relies on.
- The reference never changes: a few DPO steps on a tiny GPT start at loss log 2, lower the loss, move
  the policy and leave the frozen reference bit for bit as it was, with no gradient.
- Subprocess runs of train_dpo.py from `tiny_chain`: on the built-in comparisons (the checkpoint loads
  as kind "lm" with its gold, KL and held-out accuracy; metrics.jsonl has every documented key; step 0
  logs log 2 and zero implicit rewards; the SFT checkpoint is unchanged), on an HH-RLHF file (no gold
  metrics), and on a file with no ranked pair (a one-line error, exit status 2).

The math is tested in tests/test_dpo_loss.py.
Run: python -m pytest -q tests/test_dpo.py   (about 35 s on 2 busy CPU cores, mostly 5 subprocess starts,
plus 20 s for the tiny chain when no earlier test has trained it)
"""

import copy
import hashlib
import json
import math
import os
import re

import pytest
import torch

from conftest import TINY_RM, run_script
from minirlhf import task
from minirlhf.checkpoint import load_model
from minirlhf.cli import UsageError
from minirlhf.data import PairRecord, RankRecord, SFTRecord, read_jsonl, write_jsonl
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import encode_prompt, encode_response, get_encoding
from train_dpo import (Comparisons, comparisons_of, dpo_batch, dpo_loss, pair_rows, ranked_pairs,
                       sequence_logprobs)
from train_rm import Ranked, comparison_records, write_comparisons

ENC = get_encoding("bytes")
PAD = ENC.eot_token
TINY_DPO = ["--max-new-tokens", "8", "--seed", "0", "--batch-size", "2", "--monitor-prompts", "4",
            "--eval-prompts", "6"]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# train_rm.py's comparisons


def test_comparison_records_drop_absent_and_keep_ties(tmp_path):
    groups = [Ranked("p1", [], [], ["a", "b", "a", "c"], [1, 0, -1, 2]),  # a repeat: absent
              Ranked("p2", [], [], ["x", "x"], [0, -1]),                   # one distinct response: skipped
              Ranked("p3", [], [], ["", "y", "z"], [0, 1, 1])]             # an empty text; a tie stays
    path = str(tmp_path / "c.jsonl")
    written = write_comparisons(path, groups)
    assert written == comparison_records(groups) == [
        {"prompt": "p1", "responses": ["a", "b", "c"], "ranks": [1, 0, 2]},
        {"prompt": "p3", "responses": ["y", "z"], "ranks": [1, 1]}]
    assert read_jsonl(path, "kway") == [RankRecord(**r) for r in written]
    assert os.listdir(tmp_path) == ["c.jsonl"]  # the temporary file was renamed into place


def test_rm_writes_its_comparisons(tiny_chain):
    splits = (("comparisons", task.train_prompts(), 8), ("comparisons_heldout", task.heldout_prompts(), 4))
    for name, prompts, n in splits:  # TINY_RM: 8 training and 4 held-out prompts
        records = read_jsonl(os.path.join(tiny_chain["rm"], f"{name}.jsonl"), "kway")  # validates each record
        assert 0 < len(records) <= n
        assert {r.prompt for r in records} <= set(prompts)
        for r in records:
            assert len(set(r.responses)) == len(r.responses) >= 2  # each distinct sample once
            assert len(set(r.ranks)) == len(r.ranks)  # the built-in labeler never ties


def test_rm_comparisons_are_the_labels_it_trained_on(tiny_chain, tmp_path):
    # With labeler noise 0 the ranks are the gold order (ties by position), so they can be checked here.
    out = str(tmp_path / "rm0")
    # (the last --max-steps wins over TINY_RM's)
    proc = run_script("train_rm.py", "--init", tiny_chain["sft"], *TINY_RM, "--max-steps", "1",
                      "--label-temperature", "0", "--out", out)
    trained = int(re.search(r"(\d+) training pairs", proc.stdout).group(1))
    written = int(re.search(r"\((\d+) pairs\) to \S+/comparisons.jsonl", proc.stdout).group(1))
    records = read_jsonl(os.path.join(out, "comparisons.jsonl"), "kway")
    assert written == trained == sum(len(ranked_pairs(r.ranks)) for r in records)
    for r in records:
        dense = [sorted(r.ranks).index(x) for x in r.ranks]  # 0..n-1 once absent candidates are gone
        assert dense == task.label_ranks(r.prompt, r.responses, temperature=0)


# ----------------------------------------------------------------------------------------------------
# Pairs, batches, log-probs


def test_ranked_pairs_and_comparisons():
    assert ranked_pairs([1, 0, 2]) == [(0, 2), (1, 0), (1, 2)]
    assert ranked_pairs([0, 1, 1]) == [(0, 1), (0, 2)]  # the tie (1, 2) forms no pair
    assert ranked_pairs([3, 3]) == []
    records = [PairRecord("What is 2 + 3?", "5", "6"),
               RankRecord("Say 'ox' 2 times.", ["ox ox", "ox", "ox ox ox"], [0, 1, 1]),
               RankRecord("Spell 'cat' backwards.", ["tac" + "!" * 20, "tac" + "!" * 21], [0, 1])]
    groups, n_cut = comparisons_of(records, ENC, max_prompt=12, max_response=10)
    assert [g.pairs for g in groups] == [[(0, 1)], [(0, 1), (0, 2)], []]  # equal once cut to 10: no pair
    assert groups[0].response_ids == [encode_response(ENC, "5"), encode_response(ENC, "6")]  # EOS included
    assert groups[0].prompt_ids == encode_prompt(ENC, "What is 2 + 3?")[-12:]  # the prompt keeps its end
    assert n_cut == 2 and all(len(r) == 10 for r in groups[2].response_ids)
    with pytest.raises(UsageError, match="no preference"):
        comparisons_of([SFTRecord("hi", "hello")], ENC, 12, 10)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=32)).eval()


def random_group(prompt_len, response_lens, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (prompt_len,), generator=g).tolist()
    responses = [torch.randint(0, 256, (n - 1,), generator=g).tolist() + [PAD] for n in response_lens]
    return Comparisons(prompt, responses, ranked_pairs(list(range(len(responses)))))


def test_batch_rows_and_pairs():
    groups = [random_group(4, [2, 3, 5], 0), random_group(6, [1, 4], 1)]
    tokens, attn, mask, chosen, rejected = dpo_batch(groups, PAD)
    assert tokens.shape == (5, 6 + 5) and mask.sum(1).tolist() == [2, 3, 5, 1, 4]
    assert chosen.tolist() == [0, 0, 1, 3] and rejected.tolist() == [1, 2, 2, 4]
    assert [t.tolist() for t in pair_rows(groups)] == [chosen.tolist(), rejected.tolist()]
    for row, r in zip(range(5), [r for g in groups for r in g.response_ids]):
        assert tokens[row][mask[row].bool()].tolist() == r
    assert attn[0, :2].sum() == 0 and attn[0, 2:].sum() == 4 + 2  # the shorter prompt is left-padded


def test_sequence_logprob_does_not_depend_on_the_batch():
    model = tiny_gpt()
    target = random_group(5, [3, 7], 2)
    neighbours = [random_group(17, [9, 2, 14], 3), random_group(2, [20], 4)]

    def logprobs(groups):
        tokens, attn, mask, _, _ = dpo_batch(groups, PAD)
        with torch.no_grad():
            return sequence_logprobs(model(tokens, attn), tokens, mask)

    alone = logprobs([target])
    batched = logprobs([neighbours[0], target, neighbours[1]])[3:5]  # rows 3 and 4: after 3 neighbours
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_reference_never_changes():
    policy = tiny_gpt(seed=1).train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    tokens, attn, mask, chosen, rejected = dpo_batch([random_group(4, [3, 5, 2], s) for s in range(3)], PAD)
    with torch.no_grad():
        ref_logprobs = sequence_logprobs(ref(tokens, attn), tokens, mask)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logprobs = sequence_logprobs(policy(tokens, attn), tokens, mask)
        c, r = chosen, rejected
        loss = dpo_loss(logprobs[c], logprobs[r], ref_logprobs[c], ref_logprobs[r], 0.5)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    assert all(p.grad is None for p in ref.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters()))


# ----------------------------------------------------------------------------------------------------
# Smoke runs


STEP_KEYS = {"loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_acc", "grad_norm", "lr",
             "ms"}


def test_smoke_dpo_on_the_rm_comparisons(tiny_chain, tmp_path):
    sft, out = tiny_chain["sft"], str(tmp_path / "dpo")
    sft_digest = digest(os.path.join(sft, "ckpt.pt"))
    comparisons = os.path.join(tiny_chain["rm"], "comparisons.jsonl")
    proc = run_script("train_dpo.py", "--init", sft, "--comparisons", comparisons, "--out", out,
                      "--max-steps", "4", "--eval-interval", "2", *TINY_DPO)
    assert "held-out gold reward" in proc.stdout and "held-out comparisons" in proc.stdout

    model, ck = load_model(out)
    assert isinstance(model, GPT) and ck["kind"] == "lm" and ck["step"] == 4
    for key in ("gold_reward_mean", "gold_reward_sem", "kl_to_sft", "val_loss", "val_reward_acc",
                "train_seconds", "peak_memory_mb"):
        assert key in ck["extra"] and ck["extra"][key] == ck["extra"][key], key  # present and not NaN
    assert ck["extra"]["models_in_memory"] == 2 and ck["args"]["init"] == sft

    metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 2, 3]  # every 10th step, every eval step, the last step
    for m in metrics:
        assert STEP_KEYS | {"val_loss", "val_reward_acc", "eval_gold_reward", "kl"} <= set(m)  # all evals
        assert 0 <= m["reward_acc"] <= 1 and 0 <= m["val_reward_acc"] <= 1
    # Before its first update the policy is the reference: the precomputed log-probs agree with the batch's.
    first = metrics[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(first["reward_chosen"]) < 1e-5 and abs(first["reward_rejected"]) < 1e-5
    assert digest(os.path.join(sft, "ckpt.pt")) == sft_digest  # the reference's checkpoint is untouched
    sft_model = load_model(sft)[0]
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), sft_model.parameters()))  # trained


def test_smoke_dpo_on_hh_data_and_a_file_without_pairs(tiny_chain, tmp_path):
    data = str(tmp_path / "hh.jsonl")
    qa = [("What is 2 + 3?", "5", "6"), ("Spell 'cat' backwards.", "tac", "cat"),
          ("Say 'ox' 2 times.", "ox ox", "ox"), ("What is 4 + 4?", "8", "9"),
          ("Write 'cow' in capital letters.", "COW", "cow")]
    dialogue = "\n\nHuman: {}\n\nAssistant: {}".format
    write_jsonl(data, [{"chosen": dialogue(q, c), "rejected": dialogue(q, r)} for q, c, r in qa])
    out = str(tmp_path / "dpo_hh")
    proc = run_script("train_dpo.py", "--init", tiny_chain["sft"], "--data", data, "--out", out,
                      "--max-steps", "2", *TINY_DPO)
    assert "4 prompts, 4 pairs" in proc.stdout and "1 held-out prompts" in proc.stdout  # 1 in 20, at least 1
    metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert STEP_KEYS | {"val_loss", "val_reward_acc"} <= set(m)
        assert "eval_gold_reward" not in m and "kl" not in m  # no gold judge off the built-in task
    _, ck = load_model(out)
    assert "gold_reward_mean" not in ck["extra"] and "val_reward_acc" in ck["extra"]
    assert ck["args"]["data"] == data

    ties = str(tmp_path / "ties.jsonl")
    write_jsonl(ties, [{"prompt": f"Say 'ox' {n} times.", "responses": ["ox", "ox ox"], "ranks": [0, 0]}
                       for n in range(3)])
    proc = run_script("train_dpo.py", "--init", tiny_chain["sft"], "--data", ties,
                      "--out", str(tmp_path / "x"), *TINY_DPO, check=False)
    assert proc.returncode == 2 and "no ranked pairs" in proc.stderr and proc.stderr.strip().count("\n") == 0
