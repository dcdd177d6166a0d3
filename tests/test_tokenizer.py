"""Tokenizers: GPT-2's ranks from a local file give GPT-2's ids; "bytes" round-trips any Unicode; the
chat template and EOS are the same for every stage.

Run: python -m pytest -q tests/test_tokenizer.py
"""

import os

import pytest

from minirlhf.tokenizer import (decode_response, encode_prompt, encode_response, eos_id, format_prompt,
                                get_encoding)


def test_gpt2_from_local_file(shared_data):
    enc = get_encoding("gpt2", os.path.join(shared_data, "gpt2.tiktoken"))
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert eos_id(enc) == 50256 and enc.n_vocab == 50257
    text = "RLHF: rewards, KL penalties & GAE -- with ünïcödé and 🙂."
    assert enc.decode(enc.encode_ordinary(text)) == text
    # a path ending in .tiktoken works as the name too
    by_path = get_encoding(os.path.join(shared_data, "gpt2.tiktoken"))
    assert by_path.encode_ordinary("Hello world") == [15496, 995]


def test_bytes_round_trip_any_unicode():
    enc = get_encoding("bytes")
    assert enc.n_vocab == 257 and eos_id(enc) == 256
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


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'gtp2'"):
        get_encoding("gtp2")
