"""Tokenizers and the one chat template every stage uses.

Every encoding is a `tiktoken.Encoding`:

- "bytes": one token per byte (ids 0..255) plus the special tokens. It needs no download, has a
  vocabulary of 257, and is the default for the built-in task: a tiny model learns it in minutes.
- "gpt2": GPT-2's byte-pair encoding (50,257 tokens). `tiktoken.get_encoding("gpt2")` downloads the
  ranks once; offline, pass the path of a local `.tiktoken` file instead (`get_encoding("gpt2", path)`,
  or a path ending in `.tiktoken` as the name).

The chat template is Anthropic HH-RLHF's, so that their data needs no conversion:

    "\\n\\nHuman: {prompt}\\n\\nAssistant:" + " {response}" + EOS

The response is encoded with its leading space and always ends with the EOS token, which the SFT loss
trains and the reward model reads its score at. User text is encoded with `encode_ordinary`, so a
literal "<|endoftext|>" inside a prompt is just text and can never end a sequence early.
"""

import os

import tiktoken
import tiktoken.load

EOS = "<|endoftext|>"
PROMPT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"
# GPT-2's pre-tokenisation regex (splits text into words, numbers, punctuation and spaces before BPE).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS_ID = 50256
ENCODINGS = ("bytes", "gpt2")


class TokenizerError(ValueError):
    """An unknown tokenizer name or a missing ranks file: reported as one line, not a traceback."""


def bytes_encoding() -> tiktoken.Encoding:
    # With only single-byte ranks there is nothing to merge: BPE leaves every byte as its own token.
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOS: 256})


def gpt2_encoding(path: str | None = None) -> tiktoken.Encoding:
    if path is None:
        return tiktoken.get_encoding("gpt2")  # downloads the ranks on first use
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: GPT-2 BPE ranks file not found")
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOS: GPT2_EOS_ID}, explicit_n_vocab=GPT2_EOS_ID + 1)


def get_encoding(name: str = "bytes", path: str | None = None) -> tiktoken.Encoding:
    """"bytes", "gpt2" (optionally with a local ranks `path`), or a path to a GPT-2 `.tiktoken` file."""
    if name == "bytes":
        return bytes_encoding()
    if name == "gpt2":
        return gpt2_encoding(path)
    if name.endswith(".tiktoken"):
        return gpt2_encoding(name)
    raise TokenizerError(f"unknown tokenizer {name!r}: expected one of {', '.join(ENCODINGS)} or a path to a .tiktoken file")


def encoding_name(enc: tiktoken.Encoding) -> str:
    """The name a checkpoint stores: "bytes" or "gpt2" (a local GPT-2 file is the same encoding)."""
    return enc.name


def eos_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def encode_prompt(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    return enc.encode_ordinary(format_prompt(prompt))


def encode_response(enc: tiktoken.Encoding, response: str) -> list[int]:
    return enc.encode_ordinary(" " + response) + [eos_id(enc)]


def decode_response(enc: tiktoken.Encoding, ids) -> str:
    """Generated ids -> text: cut at the first EOS, drop the template's leading space."""
    ids = [int(i) for i in ids]
    eos = eos_id(enc)
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return enc.decode(ids, errors="replace").strip()
