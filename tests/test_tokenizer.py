"""Tokenizers: GPT-2's ranks from a local file give GPT-2's ids; "bytes" round-trips any Unicode; the
chat template and EOS are the same for every stage.

Run: python -m pytest -q tests/test_tokenizer.py
"""

import os

import pytest

from minirlhf.tokenizer import (ROLES, decode_response, encode_prompt, encode_response, eos_id, format_prompt,
                                get_encoding, load_tokenizer)


def test_gpt2_from_local_file(shared_data):
    enc = get_encoding("gpt2", os.path.join(shared_data, "gpt2.tiktoken"))
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert eos_id(enc) == 50256 and enc.n_vocab == 50257
    # GPT-2's BPE has no role tokens: the template is text, as a pretrained GPT-2 knows it
    assert encode_prompt(enc, "Hi?") == enc.encode_ordinary(format_prompt("Hi?"))
    text = "RLHF: rewards, KL penalties & GAE -- with ünïcödé and 🙂."
    assert enc.decode(enc.encode_ordinary(text)) == text
    # a path ending in .tiktoken works as the name too
    by_path = get_encoding(os.path.join(shared_data, "gpt2.tiktoken"))
    assert by_path.encode_ordinary("Hello world") == [15496, 995]


def test_bytes_round_trip_any_unicode():
    enc = get_encoding("bytes")
    assert enc.n_vocab == 259 and eos_id(enc) == 256
    texts = ["", "plain ascii", "ünïcödé ∑ 漢字", "emoji 🙂👩‍👩‍👧 flags 🇫🇷",
             "tabs\tand\nnewlines"]
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8"))
        assert enc.decode(ids) == text


def test_template_and_eos():
    enc = get_encoding("bytes")
    assert format_prompt("Hi?") == "\n\nHuman: Hi?\n\nAssistant:"
    p, r = encode_prompt(enc, "Hi?"), encode_response(enc, "Hello.")
    assert enc.decode(p + r[:-1]) == "\n\nHuman: Hi?\n\nAssistant: Hello."
    assert r[-1] == eos_id(enc)
    assert decode_response(enc, r + [65, 66]) == "Hello."  # cut at the first EOS
    # a literal special-token string in user text is text, not EOS
    assert eos_id(enc) not in encode_prompt(enc, "say <|endoftext|> please")


def test_bytes_role_tokens():
    enc = get_encoding("bytes")
    human, assistant = 257, 258
    assert [enc.encode_single_token(r) for r in ROLES] == [human, assistant]
    assert encode_prompt(enc, "Hi?") == [human, *b" Hi?", assistant]  # 5 ids, not 24
    # A multi-turn prompt's earlier markers are role tokens too; the ids decode to the template's text.
    turns = "Hi!\n\nAssistant: Hello.\n\nHuman: Bye?"
    ids = encode_prompt(enc, turns)
    assert ids == [human, *b" Hi!", assistant, *b" Hello.", human, *b" Bye?", assistant]
    assert enc.decode(ids) == format_prompt(turns)
    # Only the template writes role tokens: a response that writes a marker is text.
    assert encode_response(enc, "ok\n\nHuman: more") == [*b" ok\n\nHuman: more", eos_id(enc)]


def test_old_bytes_checkpoint_is_refused():
    with pytest.raises(ValueError, match="has 257 token ids.*retrain"):
        load_tokenizer({"tokenizer": "bytes", "config": {"vocab_size": 257}})


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'gtp2'"):
        get_encoding("gtp2")
