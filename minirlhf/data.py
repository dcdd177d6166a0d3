"""Data in and batches out: JSONL readers with validation, record types, padding and masks.

Formats (one JSON object per line; blank lines are skipped; other keys, such as an "id", are ignored):

    sft       {"prompt": str, "response": str}                        -> SFTRecord
    pairwise  {"prompt": str, "chosen": str, "rejected": str}         -> PairRecord
    kway      {"prompt": str, "responses": [str, ...], "ranks": [int, ...]}  -> RankRecord
              ranks[i] is response i's place, 0 = best; equal ranks are ties
    prompts   {"prompt": str}                                         -> PromptRecord
              optionally {"prompt": str, "answer": str}: the answer a verifier checks (train_grpo.py)
    hh        {"chosen": dialogue, "rejected": dialogue}              -> PairRecord
              Anthropic HH-RLHF, e.g. "\\n\\nHuman: Hi\\n\\nAssistant: Hello"

`read_jsonl(path, kind="auto")` detects the format from the first record's keys. Any bad record
stops the run with a `DataError` that points at it ("data.jsonl:17: field 'response': missing (found
'respnse': a misspelling?)"): a silently skipped or mangled record costs more (a wrong result hours
later) than a clear stop. An HH pair whose two final responses are identical fails too, by
the same rule as pairwise data: filter such pairs out of a raw download first.

HH-RLHF dialogues are split at their last "\\n\\nAssistant:" turn: the response is what follows it
(minus the one space the template adds back), and the prompt is the dialogue before it with the
leading "\\n\\nHuman: " removed. Earlier turns stay inside the prompt text, so that

    format_prompt(prompt) + " " + response == the original dialogue

(tokenizer.format_prompt is "\\n\\nHuman: {prompt}\\n\\nAssistant:") and a multi-turn conversation goes
through the same single-turn template as everything else.

Collation turns already-encoded id lists (plain Python lists) into int64 tensors: left-padded prompts
for generation, prompt + response in the layout generation produces, and right-padded SFT batches.
Given the sampler's `tool`, a response's tool output gets response (loss) mask 0 (`tool_mask`), as in
what `generate(..., tool=...)` returns, so a response read back from text trains on the policy's tokens.
"""

import dataclasses
import difflib
import json
import os

import torch

# ----------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class PairRecord:
    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class RankRecord:
    prompt: str
    responses: list[str]
    ranks: list[int]  # ranks[i] = place of responses[i], 0 = best; equal ranks are ties


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    prompt: str
    answer: str | None = None  # the expected answer, for a verifier (minirlhf.task.verify); optional


class DataError(ValueError):
    """A bad input record: the message starts with "path:line:" so an editor can jump to it."""


# The fields each format requires, in the order they are checked.
FIELDS = {
    "sft": ("prompt", "response"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "kway": ("prompt", "responses", "ranks"),
    "prompts": ("prompt",),
    "hh": ("chosen", "rejected"),
}
KINDS = (*FIELDS, "auto")
KNOWN_FIELDS = sorted({f for fields in FIELDS.values() for f in fields})

HUMAN = "\n\nHuman: "  # the chat template's opening, as in tokenizer.PROMPT_TEMPLATE
ASSISTANT = "\n\nAssistant:"

# ----------------------------------------------------------------------------------------------------
# Reading and validation


def _close(name: str, keys) -> str | None:
    match = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.7)
    return match[0] if match else None


def detect_kind(keys) -> str | None:
    """The format whose required fields best explain `keys` (misspellings included), or None.

    A misspelled key is mapped to the field it nearly names first, so {"prompt", "respnse"} is read as
    "sft" (and then fails with a "did you mean" message) rather than silently as "prompts".
    """
    present = {k if k in KNOWN_FIELDS else (_close(k, KNOWN_FIELDS) or k) for k in keys}
    # Most specific first: a pairwise record also holds an hh record's keys, and everything holds "prompt".
    for kind in ("kway", "pairwise", "sft", "hh", "prompts"):
        if set(FIELDS[kind]) <= present:
            return kind
    return None


def _check_text(obj: dict, field: str, fail) -> str:
    value = obj[field]
    if not isinstance(value, str):
        fail(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        fail(field, "empty")
    return value


def _split_hh(dialogue: str, field: str, fail) -> tuple[str, str]:
    """HH dialogue -> (prompt, response), splitting at the last assistant turn (see module docstring)."""
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        fail(field, f"no {ASSISTANT!r} turn in the dialogue")
    if not dialogue.startswith(HUMAN):
        fail(field, f"dialogue does not start with {HUMAN!r}")
    prompt = dialogue[len(HUMAN):cut]
    response = dialogue[cut + len(ASSISTANT):]
    response = response[1:] if response.startswith(" ") else response  # the template adds this space back
    if not prompt.strip():
        fail(field, "empty prompt before the last assistant turn")
    if not response.strip():
        fail(field, "empty response after the last assistant turn")
    return prompt, response


def parse_record(obj: dict, kind: str, fail):
    """One JSON object -> a record of `kind`; `fail(field, problem)` raises with the location."""
    for field in FIELDS[kind]:
        if field not in obj:
            guess = _close(field, [k for k in obj if k not in FIELDS[kind]])
            fail(field, "missing" + (f" (found '{guess}': a misspelling?)" if guess else ""))
    if kind == "sft":
        return SFTRecord(_check_text(obj, "prompt", fail), _check_text(obj, "response", fail))
    if kind == "prompts":
        # optional; null is absent (what write_jsonl writes for a record without one), else non-empty text
        answer = _check_text(obj, "answer", fail) if obj.get("answer") is not None else None
        return PromptRecord(_check_text(obj, "prompt", fail), answer)
    if kind == "pairwise":
        prompt, chosen, rejected = (_check_text(obj, f, fail) for f in FIELDS[kind])
        if chosen == rejected:
            fail("rejected", "identical to 'chosen': the pair carries no preference")
        return PairRecord(prompt, chosen, rejected)
    if kind == "hh":
        prompt, chosen = _split_hh(_check_text(obj, "chosen", fail), "chosen", fail)
        prompt_r, rejected = _split_hh(_check_text(obj, "rejected", fail), "rejected", fail)
        if prompt_r != prompt:
            fail("rejected", "dialogue before the last assistant turn differs from 'chosen'")
        if chosen == rejected:
            fail("rejected", "final response identical to 'chosen': the pair carries no preference")
        return PairRecord(prompt, chosen, rejected)
    # kway
    prompt = _check_text(obj, "prompt", fail)
    responses, ranks = obj["responses"], obj["ranks"]
    if not isinstance(responses, list) or len(responses) < 2:
        fail("responses", "expected a list of at least 2 strings")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            fail("responses", f"item {i} is not a non-empty string")
    if not isinstance(ranks, list):
        fail("ranks", f"expected a list of ints, got {type(ranks).__name__}")
    if len(ranks) != len(responses):
        fail("ranks", f"has {len(ranks)} items for {len(responses)} responses")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:  # bool is an int in Python: rule it out
            fail("ranks", f"item {i} is {r!r}, expected an int >= 0 (0 = best)")
    return RankRecord(prompt, list(responses), list(ranks))


def read_jsonl(path: str | os.PathLike, kind: str = "auto", check=None) -> list:
    """Read and validate a JSONL file of `kind` ("sft", "pairwise", "kway", "prompts", "hh", "auto").

    Returns a list of records; raises DataError "{path}:{lineno}: field '{field}': {problem}" at the
    first bad record, or "{path}: ..." for a file with no records at all. `check(record, fail)`, when
    given, may refuse a well-formed record the caller cannot use (see `responses_fit`) with the same
    message. A UTF-8 byte order mark at the start of the file (as some Windows editors write) is skipped.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, "rb") as f:  # bytes: decode per line so a bad byte is reported with its line number
        for lineno, raw in enumerate(f, start=1):

            def fail(field, problem, lineno=lineno):
                where = f"{path}:{lineno}: " + (f"field '{field}': " if field else "")
                raise DataError(where + problem)

            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                fail(None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                fail(None, f"not JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, dict):
                fail(None, f"expected a JSON object, got {type(obj).__name__}")
            if kind == "auto":
                kind = detect_kind(obj)
                if kind is None:
                    fail(None, f"cannot tell the format from keys {sorted(obj)}; "
                               f"pass kind= one of {', '.join(FIELDS)}")
            records.append(parse_record(obj, kind, fail))
            if check is not None:
                check(records[-1], fail)
    if not records:
        raise DataError(f"{path}: empty file, no records")
    return records


def responses(record) -> list[tuple[str, str]]:
    """The responses a record holds, as (field, text): what a policy is trained on or scored by."""
    if isinstance(record, SFTRecord):
        return [("response", record.response)]
    if isinstance(record, PairRecord):
        return [("chosen", record.chosen), ("rejected", record.rejected)]
    if isinstance(record, RankRecord):
        return [("responses", r) for r in record.responses]
    return []


def responses_fit(encode, block_size: int):
    """A `read_jsonl` check that refuses a record with a response longer than the context by itself.

    `encode(text)` -> the response's ids, EOS included (`lambda t: encode_response(enc, t)`). Such a
    response leaves no room for its prompt: training would see its first block_size tokens after no
    question and never its EOS (`sft_batch`), so the record is an error, reported where it is."""
    def check(record, fail):
        for field, text in responses(record):
            n = len(encode(text))
            if n > block_size:
                fail(field, f"a response of {n} tokens, longer by itself than the context of {block_size}: "
                            "shorten or drop the record, or use a model with a longer context")
    return check


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write records (dataclasses or dicts) one JSON object per line; the inverse of read_jsonl."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r,
                               ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# Collation: id lists in, int64 tensors out. Nothing here relies on pad_id to mean "ignore": every
# function returns the masks that say which positions are real.


def tool_mask(ids: list[int], tool) -> list[int]:
    """1 on the tokens of one response that the policy wrote, 0 on those `tool` wrote (its output).

    The sampler's forcing replayed (minirlhf.model.generate): after each of the policy's tokens the tool
    is shown the response so far, and where it replies and the next tokens are that reply (or its start,
    in a response cut at the length limit), those are the tool's. A reply the text does not carry on with
    marks nothing: that text was not written with this tool. Exact for a sampled response; for one
    encoded from text, exact when its encoding splits at the tool's output as sampling does (the
    calculator's does: see minirlhf/task.py)."""
    mask, i = [], 0
    while i < len(ids):
        mask.append(1)
        i += 1
        reply = list(tool(list(ids[:i])) or [])
        n = min(len(reply), len(ids) - i)
        if reply and list(ids[i:i + n]) == reply[:n]:
            mask += [0] * n
            i += n
    return mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts for batched generation: -> ids (B, P), attention_mask (B, P), P = longest.

    Left padding puts every prompt's last token in the same column, so generation appends to all rows
    at once; the mask (1 = real token) lets the model shift position ids past the padding.
    """
    P = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids, mask


def join_prompt_response(prompt_ids: list[list[int]], response_ids: list[list[int]],
                         pad_id: int, tool=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response in the layout KV-cache generation produces: -> ids, attention_mask,
    response_mask, each (B, P + R).

    Row b is [pad]*(P - len(prompt)) + prompt + response + [pad]*(R - len(response)), with P the longest
    prompt and R the longest response; response_mask is 1 on the response tokens (EOS included), but 0 on
    the output of `tool` (the sampler's, if given: see `tool_mask`).
    Scoring a stored (prompt, response) pair this way gives the same positions as scoring it fresh
    from generation, so rewards and log-probs line up in both cases.
    """
    assert len(prompt_ids) == len(response_ids), "one response per prompt"
    P = max((len(p) for p in prompt_ids), default=0)
    R = max((len(r) for r in response_ids), default=0)
    B = len(prompt_ids)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, P + R), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        row = list(p) + list(r)
        start = P - len(p)
        if row:
            ids[b, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, start:P + len(r)] = 1
        response_mask[b, P:P + len(r)] = torch.tensor(tool_mask(r, tool) if tool else [1] * len(r))
    return ids, attention_mask, response_mask


def truncate_prompt(ids: list[int], max_len: int) -> tuple[list[int], bool]:
    """Keep the last max_len tokens -> (ids, truncated). The end of a prompt (the question and the
    "Assistant:" cue) matters most, so an over-long prompt loses its beginning; callers count it."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")  # ids[-0:] would keep everything
    return list(ids[-max_len:]), len(ids) > max_len


def _sft_row(p: list[int], full_r: list[int], block_size: int) -> tuple[list[int], list[int], bool]:
    """One demonstration cut to at most block_size + 1 tokens -> (prompt, response, cut): the prompt loses
    its start; a response longer than block_size keeps its first block_size tokens (and loses its EOS)
    behind a single prompt token, which predicts r[0]."""
    r = list(full_r[:block_size])
    p, cut = truncate_prompt(p, block_size + 1 - len(r))
    return p, r, cut or len(r) < len(full_r)


def sft_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded prompt + response rows for teacher forcing: -> tokens (B, T), attention_mask (B, T),
    loss_mask (B, T), n_truncated. The plain layout, and the reference that `packed_sft_batch` (what
    train_sft.py trains on) must reproduce.

    Each row is prompt + response, at most block_size + 1 tokens (`_sft_row`), because the model reads
    tokens[:, :-1] (at most block_size) and predicts tokens[:, 1:]:

        logits = model(tokens[:, :-1], attention_mask[:, :-1])
        loss = sft_loss(logits, tokens[:, 1:], loss_mask[:, 1:])

    loss_mask is 1 on response tokens (EOS included), so only the response is trained. n_truncated
    counts the rows cut. Padding sits on the right, after every real token, so causal attention never
    reads it.
    """
    assert len(prompt_ids) == len(response_ids), "one response per prompt"
    rows = [_sft_row(p, r, block_size) for p, r in zip(prompt_ids, response_ids)]
    T = max(len(p) + len(r) for p, r, _ in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    for b, (p, r, _) in enumerate(rows):
        n = len(p) + len(r)
        tokens[b, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, len(p):n] = 1
    return tokens, attention_mask, loss_mask, sum(cut for _, _, cut in rows)


def packed_sft_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                     block_size: int, response_masks: list[list[int]] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of `sft_batch`, packed end to end into rows of block_size positions instead of padded
    each to the longest: -> inputs, targets, loss_mask, doc_ids, each (R, block_size).

    Each demonstration d (cut as `sft_batch` cuts it) contributes its inputs d[:-1] and targets d[1:],
    shifted within itself, so no position predicts the next demonstration's first token. They are
    placed in order, a new row starting when the next one does not fit. doc_ids numbers them (0, 1, ...
    across the batch; -1 on the padding that ends a row): with `GPT(..., doc_ids=doc_ids)` a token
    attends only to its own demonstration, at positions that restart at 0 in each, so the logits, the
    loss and its gradient are those of the padded batch (to float rounding: `tests/test_sft_loss.py`),
    on about 1.6x fewer positions for the built-in task's mix of short and long replies.

        logits = model(inputs, doc_ids=doc_ids)
        loss = sft_loss(logits, targets, loss_mask)

    response_masks: 1 on each response's tokens the policy wrote, 0 on a tool's output (`tool_mask`,
    computed once per demonstration by the caller); None: every response token is the policy's.
    """
    assert len(prompt_ids) == len(response_ids), "one response per prompt"
    rows, row, used = [], [], 0
    for d, (p, full_r) in enumerate(zip(prompt_ids, response_ids)):
        p, r, _ = _sft_row(p, full_r, block_size)
        seq = p + r
        m = response_masks[d][:len(r)] if response_masks else [1] * len(r)
        doc = (seq[:-1], seq[1:], [0] * (len(p) - 1) + list(m), [d] * (len(seq) - 1))
        if used + len(seq) - 1 > block_size:
            rows.append(row)
            row, used = [], 0
        row.append(doc)
        used += len(seq) - 1
    rows.append(row)
    out = [torch.full((len(rows), block_size), fill, dtype=torch.long) for fill in (pad_id, pad_id, 0, -1)]
    for b, docs in enumerate(rows):
        for field, x in zip(out, zip(*docs)):
            flat = [v for part in x for v in part]
            field[b, :len(flat)] = torch.tensor(flat, dtype=torch.long)
    return tuple(out)
