"""Tokenizers and the one chat template every stage uses.

Every encoding is a `tiktoken.Encoding`:

- "bytes": one token per byte (ids 0..255) plus three special tokens: EOS (256) and the chat
  template's two role markers, "\\n\\nHuman:" (257) and "\\n\\nAssistant:" (258). It needs no download,
  has a vocabulary of 259, and is the default for the built-in task: a tiny model learns it in minutes.
- "gpt2": GPT-2's byte-pair encoding (50,257 tokens). `tiktoken.get_encoding("gpt2")` downloads the
  ranks once; offline, pass the path of a local `.tiktoken` file instead (`get_encoding("gpt2", path)`,
  or a path ending in `.tiktoken` as the name), or a Hugging Face GPT-2 folder with `vocab.json` and
  `merges.txt` (the files `python -m minirlhf.export` writes).

A checkpoint carries its tokenizer: `save_checkpoint` stores GPT-2's ranks beside the weights
(`checkpoint_fields`) and every stage rebuilds the encoding from them with `enc = load_tokenizer(ck)`,
with no network. `hf_vocab_and_merges` and `ranks_from_hf` convert between tiktoken's ranks and
Hugging Face's `vocab.json` + `merges.txt`, both ways, offline.

The chat template is Anthropic HH-RLHF's, so that their data needs no conversion:

    "\\n\\nHuman: {prompt}\\n\\nAssistant:" + " {response}" + EOS

The response is encoded with its leading space and always ends with the EOS token, which the SFT loss
trains and the reward model reads its score at. User text is encoded with `encode_ordinary`, so a
literal "<|endoftext|>" inside a prompt is just text and can never end a sequence early.

Role tokens. GPT-2's BPE writes each role marker in 4 tokens; one byte a token, they would be 21 of the
~68 tokens of a built-in task's demonstration, and the tiny model would spend a third of its compute
on them. So the "bytes" encoding gives each marker one id, as chat models give their roles one token
each, and `encode_prompt` writes them wherever the formatted prompt holds them (an HH-RLHF multi-turn
prompt holds its earlier turns' markers too). The text stays the template's: `enc.decode` turns the ids
back into it, so `format_prompt(p) + " " + response` is still the dialogue the ids encode. Only the
template writes role tokens: a response is encoded as ordinary text, markers and all. The "gpt2" encoding
has no role tokens (a pretrained GPT-2 knows the markers as text) and encodes the template as text.
"""

import base64
import binascii
import json
import os
import re

import tiktoken

EOS = "<|endoftext|>"
PROMPT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"
ROLES = ("\n\nHuman:", "\n\nAssistant:")  # the template's role markers: one token each in "bytes"
ROLE_RE = re.compile("(" + "|".join(map(re.escape, ROLES)) + ")")
# GPT-2's pre-tokenisation regex (splits text into words, numbers, punctuation and spaces before BPE).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS_ID = 50256
ENCODINGS = ("bytes", "gpt2")


class TokenizerError(ValueError):
    """An unknown tokenizer name or a missing ranks file: reported as one line, not a traceback."""


def bytes_encoding() -> tiktoken.Encoding:
    # With only single-byte ranks there is nothing to merge: BPE leaves every byte as its own token.
    ranks = {bytes([i]): i for i in range(256)}
    special = {EOS: 256, **{role: 257 + i for i, role in enumerate(ROLES)}}
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens=special)


def gpt2_encoding(path: str | None = None) -> tiktoken.Encoding:
    """GPT-2's BPE from `path`: a `.tiktoken` ranks file, or a Hugging Face folder with vocab.json and
    merges.txt. Without `path`, or from a folder without those files: from tiktoken (cache or download)."""
    if path is not None and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: GPT-2 BPE ranks file not found; pass --tokenizer with the path of "
                                 "GPT-2's ranks in tiktoken's format (gpt2.tiktoken), or of a Hugging Face "
                                 "GPT-2 folder with vocab.json and merges.txt")
        with open(path, "rb") as f:
            return encoding_from_ranks(read_ranks(f.read(), path), path)
    if path is not None and all(os.path.isfile(os.path.join(path, f)) for f in HF_FILES):
        return encoding_from_ranks(ranks_from_hf(path), path)
    try:
        enc = tiktoken.get_encoding("gpt2")  # downloads the ranks on first use
    except Exception as e:  # refused, proxied, no DNS: whatever being offline looks like on this machine
        where = f"{path} has no vocab.json and merges.txt, and " if path else ""
        raise TokenizerError(f"{where}tiktoken could not download GPT-2's BPE ranks ({type(e).__name__}); "
                             "offline, pass --tokenizer path/to/gpt2.tiktoken") from None
    return encoding_from_ranks(ranks_of(enc), "tiktoken")


def get_encoding(name: str = "bytes", path: str | None = None) -> tiktoken.Encoding:
    """"bytes", "gpt2" (optionally with a local ranks `path`), a path to a GPT-2 `.tiktoken` file, or a
    Hugging Face GPT-2 folder (its vocab.json and merges.txt)."""
    if name == "bytes":
        return bytes_encoding()
    if name == "gpt2":
        return gpt2_encoding(path)
    if name.endswith(".tiktoken") or os.path.isdir(name):
        return gpt2_encoding(name)
    raise TokenizerError(f"unknown tokenizer {name!r}: expected one of {', '.join(ENCODINGS)}, a path to a "
                         ".tiktoken file or a Hugging Face GPT-2 folder")


# ----------------------------------------------------------------------------------------------------
# GPT-2's ranks: in a .tiktoken file, in a checkpoint, as Hugging Face's vocab.json + merges.txt

# The ranks of the GPT-2 encoding this process built last, as the bytes of a .tiktoken file. A stage saves
# its checkpoint with the encoding's name (`save_checkpoint(out, model, enc.name, ...)`); this is where
# `checkpoint_fields` finds the ranks to store with it.
_LAST_RANKS: dict[str, bytes] = {}


def read_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """The content of a .tiktoken file (one `base64(token) rank` a line) -> {token bytes: rank}."""
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{source}:{lineno}: not a line of a .tiktoken ranks file "
                                 "('base64(token) rank')") from None
    return ranks


def write_ranks(ranks: dict[bytes, int]) -> bytes:
    """{token bytes: rank} -> the content of a .tiktoken file, in rank order (the inverse of read_ranks)."""
    in_order = sorted(ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in in_order)


def ranks_of(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """An encoding's mergeable ranks {token bytes: rank}, read through tiktoken's public API."""
    return {t: enc.encode_single_token(t) for t in enc.token_byte_values()}


def encoding_from_ranks(ranks: dict[bytes, int], source: str) -> tiktoken.Encoding:
    """GPT-2's encoding from its 50,256 mergeable ranks (ids 0..50255; EOS is 50256)."""
    if sorted(ranks.values()) != list(range(GPT2_EOS_ID)):
        raise TokenizerError(f"{source}: not GPT-2's BPE ranks ({len(ranks)} tokens, expected ranks 0.."
                             f"{GPT2_EOS_ID - 1})")
    _LAST_RANKS["gpt2"] = write_ranks(ranks)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOS: GPT2_EOS_ID}, explicit_n_vocab=GPT2_EOS_ID + 1)


def checkpoint_fields(name: str) -> dict:
    """What a checkpoint stores to rebuild the encoding `name` offline (`load_tokenizer` reads it back).

    "bytes" is built from code: its name is enough. "gpt2" also stores its ranks, the bytes of a .tiktoken
    file (0.8 MB; GPT-2 small's weights are 500 MB, the 2-layer test model's 7 MB), those of the GPT-2
    encoding this process built. Why inside the checkpoint rather than a copy beside it and a hash: a
    checkpoint is one file, copied, moved and passed to the next stage on its own; one that carries its
    tokenizer needs no search order and cannot be separated from it. A process that saves "gpt2" without
    having built it (a test writing a checkpoint by hand) stores the name only, as checkpoints did before.
    """
    ranks = _LAST_RANKS.get(name)
    return dict(tokenizer=name, **({"tokenizer_ranks": ranks} if ranks is not None else {}))


def load_tokenizer(ck: dict) -> tiktoken.Encoding:
    """The tokenizer of a loaded checkpoint, the one call every stage, chat.py, evaluate and export make:

        model, ck = load_model(args.init, device, kind="lm")
        enc = load_tokenizer(ck)

    Built from the ranks the checkpoint carries: no network, no file. A checkpoint that stores the name
    only (written before checkpoints carried their ranks) falls back to `get_encoding(name)`, which for
    "gpt2" is tiktoken's cache or a download.
    """
    name, ranks = ck["tokenizer"], ck.get("tokenizer_ranks")
    vocab = ck.get("config", {}).get("vocab_size")
    if name == "bytes" and vocab is not None and vocab < bytes_encoding().n_vocab:
        raise TokenizerError(f"the checkpoint's model has {vocab} token ids, and the 'bytes' encoding now "
                             f"has {bytes_encoding().n_vocab} (its role tokens came after the checkpoint "
                             "was written): retrain it with train_sft.py")
    if ranks is None:
        try:
            return get_encoding(name)
        except TokenizerError:
            raise TokenizerError(f"the checkpoint names tokenizer {name!r} but carries no ranks (it predates "
                                 "checkpoints that do), and tiktoken could not download them: run once with "
                                 "the network (tiktoken caches them), or retrain from train_sft.py "
                                 "--tokenizer path/to/gpt2.tiktoken") from None
    if name != "gpt2":
        raise TokenizerError(f"the checkpoint carries ranks for tokenizer {name!r}; only 'gpt2' is known")
    return encoding_from_ranks(read_ranks(bytes(ranks), "the checkpoint's tokenizer_ranks"), "the checkpoint")


# GPT-2's Hugging Face tokenizer files: vocab.json ({token string: id}) and merges.txt (one "left right"
# merge a line, in the order they apply), written in the characters of `byte_to_unicode`.
HF_FILES = ("vocab.json", "merges.txt")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table from bytes to the characters its vocab.json and merges.txt are written in.

    A byte that prints as itself (not a space, not a control character) is its own character; the other
    68 bytes become the characters 256, 257, ... in byte order. So every token string is printable and
    holds no space, and merges.txt can separate a merge's two halves with one.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # '!'-'~', '¡'-'¬', '®'-'ÿ'
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def bpe(piece: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """Byte-pair encoding of one piece, the slow reference way: start from single bytes, and join the adjacent
    pair whose joined bytes have the lowest rank (below `max_rank`) until no pair joins into a token."""
    parts = [bytes([b]) for b in piece]
    limit = float("inf") if max_rank is None else max_rank
    while True:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], limit)
            if r < best:  # the lowest rank wins; on a tie, the leftmost pair
                best, at = r, i
        if at < 0:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def hf_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """tiktoken's GPT-2 ranks -> Hugging Face's vocab.json (dict) and merges.txt (lines, without the header).

    The ids are the ranks. tiktoken needs no merge list: it joins the adjacent pair whose joined bytes
    rank lowest. Hugging Face joins the pair that comes first in merges.txt. For GPT-2 these are the
    same rule, because token 256 + i is what merge i makes; so merge i is found by running BPE on the
    bytes of token 256 + i with only the tokens ranked below it, which leaves exactly two parts.
    """
    show = byte_to_unicode()
    text = lambda t: "".join(show[b] for b in t)
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        if rank < 256:
            if len(token) != 1:
                raise TokenizerError(f"rank {rank} is {token!r}: GPT-2's first 256 ranks are single bytes")
            continue
        parts = bpe(token, ranks, max_rank=rank)
        if len(parts) != 2:
            raise TokenizerError(f"token {rank} ({token!r}) is not one merge of two lower-ranked tokens: "
                                 "not a GPT-2-style byte-level BPE")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab[EOS] = GPT2_EOS_ID
    return vocab, merges


def ranks_from_hf(folder: str) -> dict[bytes, int]:
    """A Hugging Face GPT-2 folder's vocab.json + merges.txt -> tiktoken's ranks (the inverse of
    hf_vocab_and_merges): the ranks are vocab.json's ids, checked against merges.txt, whose merge i must
    make token 256 + i (else ranking by id would not be the merge order, and the tokens would differ)."""
    char_byte = {c: b for b, c in byte_to_unicode().items()}
    to_bytes = lambda s: bytes(char_byte[c] for c in s)
    vocab_path, merges_path = (os.path.join(folder, f) for f in HF_FILES)
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        ranks = {to_bytes(s): i for s, i in vocab.items() if s != EOS}
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise TokenizerError(f"{vocab_path}: not a GPT-2 byte-level vocabulary ({type(e).__name__}: "
                             f"{e})") from None
    with open(merges_path, encoding="utf-8") as f:
        lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, start=1)]
    merges = [(n, line) for n, line in lines if line and not (n == 1 and line.startswith("#version"))]
    for i, (n, line) in enumerate(merges):
        left, _, right = line.partition(" ")
        try:
            made = ranks.get(to_bytes(left) + to_bytes(right))
        except KeyError:
            made = None
        if made != 256 + i:
            raise TokenizerError(f"{merges_path}:{n}: merge {line!r} does not make token {256 + i} of "
                                 "vocab.json: not GPT-2's byte-level BPE")
    if len(merges) != len(ranks) - 256:
        raise TokenizerError(f"{merges_path}: {len(merges)} merges for {len(ranks)} tokens in vocab.json "
                             f"(expected {len(ranks) - 256})")
    return ranks


def encoding_name(enc: tiktoken.Encoding) -> str:
    """The name a checkpoint stores: "bytes" or "gpt2" (a local GPT-2 file is the same encoding)."""
    return enc.name


def eos_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def encode_prompt(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    """The formatted prompt's ids: its role markers as role tokens where `enc` has them, the rest as text."""
    text = format_prompt(prompt)
    if not set(ROLES) <= enc.special_tokens_set:
        return enc.encode_ordinary(text)
    pieces = ROLE_RE.split(text)  # text, marker, text, marker, ...: the markers at the odd places
    return [t for i, piece in enumerate(pieces)
            for t in ([enc.encode_single_token(piece)] if i % 2 else enc.encode_ordinary(piece))]


def encode_response(enc: tiktoken.Encoding, response: str) -> list[int]:
    return enc.encode_ordinary(" " + response) + [eos_id(enc)]


def decode_response(enc: tiktoken.Encoding, ids) -> str:
    """Generated ids -> text: cut at the first EOS, drop the template's leading space."""
    ids = [int(i) for i in ids]
    eos = eos_id(enc)
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return enc.decode(ids, errors="replace").strip()
