"""Tests for minirlhf/data.py: JSONL readers, validation errors, collation.

Checked:
- every format parses, explicitly and with kind="auto", blank lines skipped and extra keys ignored,
  a UTF-8 byte order mark at the start of the file skipped;
  HH-RLHF dialogues (multi-turn included) split at the last assistant turn so that the chat template
  rebuilds the original dialogue exactly;
- each kind of bad record (not JSON, not UTF-8, missing or misspelled field, wrong type, empty text,
  rank list mismatch, identical pair, HH prompts that differ, empty file) raises DataError naming the
  file, the line number and the field; so does a response longer than the context by itself
  (`responses_fit`, a check the caller passes);
- a prompts record's optional "answer": read when present, None when absent or null, a non-empty
  string or a DataError;
- collation on small hand cases: left padding, the prompt + response layout of generation, prompt
  truncation, SFT batches and their truncation to block_size + 1; inputs are never mutated.

Run: python -m pytest -q tests/test_data.py   (about a second on a CPU)
"""

import json

import pytest
import torch

from minirlhf.data import (DataError, PairRecord, PromptRecord, RankRecord, SFTRecord, detect_kind,
                           join_prompt_response, left_pad, read_jsonl, responses_fit, sft_batch,
                           truncate_prompt, write_jsonl)
from minirlhf.tokenizer import encode_prompt, encode_response, format_prompt, get_encoding


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n",
                    encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# Formats that parse

HH_SINGLE = {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5, I think."}
HH_MULTI = {
    "chosen": ("\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?"
               "\n\nHuman: Name a fruit.\n\nAssistant: A plum."),
    "rejected": ("\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?"
                 "\n\nHuman: Name a fruit.\n\nAssistant: No."),
}


@pytest.mark.parametrize("kind, lines, expected", [
    ("sft", [{"prompt": "p", "response": "r", "id": 7}], [SFTRecord("p", "r")]),
    ("pairwise", [{"prompt": "p", "chosen": "a", "rejected": "b"}], [PairRecord("p", "a", "b")]),
    ("kway", [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}],
     [RankRecord("p", ["a", "b", "c"], [1, 0, 1])]),
    ("prompts", [{"prompt": "p"}, {"prompt": "q"}], [PromptRecord("p"), PromptRecord("q")]),
    ("hh", [HH_SINGLE], [PairRecord("What is 2 + 2?", "4", "5, I think.")]),
])
def test_each_format_parses_explicitly_and_auto(tmp_path, kind, lines, expected):
    path = _write(tmp_path, ["", *lines, "   "])  # blank lines anywhere are skipped
    assert read_jsonl(path, kind) == expected
    assert read_jsonl(path) == expected  # kind="auto"
    assert detect_kind(lines[0]) == kind


def test_hh_multi_turn_round_trips_through_the_template(tmp_path):
    [rec] = read_jsonl(_write(tmp_path, [HH_MULTI]), "hh")
    assert rec.prompt == "Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Name a fruit."
    assert (rec.chosen, rec.rejected) == ("A plum.", "No.")
    # The tokenizer's template plus the response's leading space rebuilds each dialogue exactly.
    assert format_prompt(rec.prompt) + " " + rec.chosen == HH_MULTI["chosen"]
    assert format_prompt(rec.prompt) + " " + rec.rejected == HH_MULTI["rejected"]
    # And so do the token ids the stages train on: they decode to the dialogue, then EOS.
    enc = get_encoding("bytes")
    ids = encode_prompt(enc, rec.prompt) + encode_response(enc, rec.chosen)
    assert enc.decode(ids[:-1]) == HH_MULTI["chosen"] and ids[-1] == enc.eot_token


def test_write_jsonl_round_trips(tmp_path):
    records = [RankRecord("p", ["a", "b"], [0, 1]), RankRecord("q", ["x", "y", "z"], [2, 0, 0])]
    write_jsonl(tmp_path / "k.jsonl", records)
    assert read_jsonl(tmp_path / "k.jsonl") == records


# ----------------------------------------------------------------------------------------------------
# Bad records

GOOD_SFT = {"prompt": "What is 1 + 2?", "response": "3"}


@pytest.mark.parametrize("kind, bad, field, words", [
    ("sft", '{"prompt": "p", "response": ', None, "not JSON"),
    ("sft", '["prompt", "response"]', None, "JSON object"),
    ("sft", {"prompt": "p", "respnse": "r"}, "response", "respnse"),  # misspelled: the close name is named
    ("sft", {"prompt": "p"}, "response", "missing"),
    ("sft", {"prompt": 3, "response": "r"}, "prompt", "string"),
    ("sft", {"prompt": "p", "response": "  "}, "response", "empty"),
    ("prompts", {"prompt": ""}, "prompt", "empty"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejeted": "b"}, "rejected", "rejeted"),
    ("kway", {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "ranks", "2 responses"),
    ("kway", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]}, "ranks", "int"),
    ("kway", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, True]}, "ranks", "int"),
    ("kway", {"prompt": "p", "responses": ["a", "b"], "ranks": "01"}, "ranks", "list"),
    ("kway", {"prompt": "p", "responses": ["a"], "ranks": [0]}, "responses", "at least 2"),
    ("kway", {"prompt": "p", "responses": ["a", 5], "ranks": [0, 1]}, "responses", "item 1"),
    ("hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "chosen", "Assistant"),
    ("hh", {"chosen": "Q: hi\n\nAssistant: a", "rejected": "Q: hi\n\nAssistant: b"}, "chosen", "Human"),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: b"},
     "rejected", "differs"),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: a"},
     "rejected", "identical"),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant:"},
     "rejected", "empty"),
])
def test_bad_record_names_line_and_field(tmp_path, kind, bad, field, words):
    good = {"sft": {"prompt": "p", "response": "r"}, "prompts": {"prompt": "p"},
            "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "kway": {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]},
            "hh": HH_SINGLE}[kind]
    path = _write(tmp_path, [good, "", bad, good])  # the bad record is on line 3
    for k in (kind, "auto"):  # auto: the good first line fixes the format
        with pytest.raises(DataError) as e:
            read_jsonl(path, k)
        msg = str(e.value)
        assert msg.startswith(f"{path}:3: " + (f"field '{field}': " if field else "")), msg
        assert words in msg, msg
        assert isinstance(e.value, ValueError)


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        read_jsonl(path, "prompts")
    for text in ("", "\n\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match="empty file"):
            read_jsonl(tmp_path / "empty.jsonl")


def test_utf8_bom_at_the_start_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"  # what Notepad and Excel's "UTF-8" export write
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_SFT).encode() + b"\n" + json.dumps(GOOD_SFT).encode())
    assert read_jsonl(path) == [SFTRecord(**GOOD_SFT)] * 2


@pytest.mark.parametrize("good, bad, field", [
    # a response is encoded as its leading space, its bytes and EOS: 62 bytes fill a context of 64
    ({"prompt": "p", "response": "x" * 62}, {"prompt": "p", "response": "x" * 63}, "response"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "y" * 99},
     "rejected"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]},
     {"prompt": "p", "responses": ["a", "z" * 70], "ranks": [0, 1]}, "responses"),
])
def test_a_response_longer_than_the_context_is_refused_where_it_is(tmp_path, good, bad, field):
    enc = get_encoding("bytes")
    check = responses_fit(lambda t: encode_response(enc, t), block_size=64)
    assert read_jsonl(_write(tmp_path, [good]), check=check)  # 64 tokens fill the context: they fit
    path = _write(tmp_path, [good, bad])
    with pytest.raises(DataError, match=rf"^{path}:2: field '{field}': a response of \d+ tokens, longer by "
                                        "itself than the context of 64"):
        read_jsonl(path, check=check)


def test_auto_detection_sees_through_misspellings(tmp_path):
    # Without the fuzzy match, {"prompt", "respnse"} would pass silently as a prompts file.
    assert detect_kind({"prompt": "p", "respnse": "r"}) == "sft"
    assert detect_kind({"prompt": "p", "chosen": "a", "rejected": "b"}) == "pairwise"
    assert detect_kind({"chosen": "a", "rejected": "b"}) == "hh"
    assert detect_kind({"text": "x"}) is None
    with pytest.raises(DataError, match=r":1: cannot tell the format"):
        read_jsonl(_write(tmp_path, [{"text": "x"}]))
    with pytest.raises(DataError, match=r":1: field 'response': missing \(found 'respnse'"):
        read_jsonl(_write(tmp_path, [{"prompt": "p", "respnse": "r"}]))
    with pytest.raises(ValueError, match="unknown data kind"):
        read_jsonl(_write(tmp_path, [{"prompt": "p"}]), "csv")


# ----------------------------------------------------------------------------------------------------
# Collation

PAD = 99


def test_left_pad():
    seqs = [[1, 2, 3], [4], []]
    ids, mask = left_pad(seqs, PAD)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4], [PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert seqs == [[1, 2, 3], [4], []]  # inputs untouched


def test_join_prompt_response_matches_generation_layout():
    prompts, responses = [[1, 2, 3], [4]], [[5, 0], [6, 7, 0]]  # 0 plays the EOS
    ids, attn, resp = join_prompt_response(prompts, responses, PAD)
    assert ids.shape == attn.shape == resp.shape == (2, 3 + 3)
    assert ids.tolist() == [[1, 2, 3, 5, 0, PAD], [PAD, PAD, 4, 6, 7, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert resp.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]  # EOS included
    # The prompt part is exactly left_pad's output: the layout generation starts from.
    p_ids, p_mask = left_pad(prompts, PAD)
    assert torch.equal(ids[:, :3], p_ids) and torch.equal(attn[:, :3], p_mask)


def test_truncate_prompt():
    assert truncate_prompt([1, 2, 3, 4], 2) == ([3, 4], True)
    assert truncate_prompt([1, 2], 2) == ([1, 2], False)
    assert truncate_prompt([1], 5) == ([1], False)
    with pytest.raises(ValueError):
        truncate_prompt([1, 2], 0)  # ids[-0:] would silently keep everything


def test_sft_batch_layout_and_masks():
    prompts, responses = [[1, 2], [3, 4, 5]], [[6, 0], [7, 0]]
    tokens, attn, mask, n_trunc = sft_batch(prompts, responses, PAD, block_size=16)
    assert tokens.tolist() == [[1, 2, 6, 0, PAD], [3, 4, 5, 7, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert n_trunc == 0
    # The shifted targets the loss sees are exactly the response tokens.
    targets, tmask = tokens[:, 1:], mask[:, 1:]
    assert targets[tmask.bool()].tolist() == [6, 0, 7, 0]


def test_sft_batch_truncates_to_block_size_plus_one():
    prompts, responses = [[1, 2, 3, 4, 5, 6], [1, 2], [1, 2]], [[7, 0], [7, 0], list(range(10, 20))]
    tokens, attn, mask, n_trunc = sft_batch(prompts, responses, PAD, block_size=4)
    assert tokens.shape == (3, 5)  # the model reads tokens[:, :-1]: block_size positions
    # prompt lost its start
    assert tokens[0].tolist() == [4, 5, 6, 7, 0] and mask[0].tolist() == [0, 0, 0, 1, 1]
    assert tokens[1].tolist() == [1, 2, 7, 0, PAD]
    # A response longer than the block keeps its beginning behind one prompt token (its EOS is lost).
    assert tokens[2].tolist() == [2, 10, 11, 12, 13] and mask[2].tolist() == [0, 1, 1, 1, 1]
    assert n_trunc == 2
    assert prompts[0] == [1, 2, 3, 4, 5, 6]  # inputs untouched


# ----------------------------------------------------------------------------------------------------
# The optional answer of a prompts record (a verifier's reference, train_grpo.py --reward verifier)


def test_prompts_records_carry_an_optional_answer(tmp_path):
    lines = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "Name a fruit."},
             {"prompt": "q", "answer": None}]  # null: no answer, as write_jsonl writes a record without one
    want = [PromptRecord("What is 2 + 3?", "5"), PromptRecord("Name a fruit."), PromptRecord("q")]
    assert read_jsonl(_write(tmp_path, lines)) == read_jsonl(_write(tmp_path, lines), "prompts") == want
    assert PromptRecord("p").answer is None and detect_kind(lines[0]) == "prompts"
    write_jsonl(tmp_path / "out.jsonl", want)
    assert read_jsonl(tmp_path / "out.jsonl") == want
    for bad, words in (({"prompt": "p", "answer": 5}, "string"), ({"prompt": "p", "answer": " "}, "empty")):
        path = _write(tmp_path, [{"prompt": "p"}, bad])
        with pytest.raises(DataError, match=rf"^{path}:2: field 'answer': .*{words}"):
            read_jsonl(path)
