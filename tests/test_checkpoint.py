"""Checkpoints: a round trip gives identical logits (also read memory-mapped); a truncated or crafted file
gives a clear error naming it, and a file that is no torch checkpoint at all (random bytes, text, empty)
is called that, not a pickle attack; an interrupted save leaves the previous checkpoint loadable.

Run: python -m pytest -q tests/test_checkpoint.py
"""

import os

import pytest
import torch

from minirlhf.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from minirlhf.model import GPT, GPTConfig, ScalarHead

CFG = GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16)


def test_round_trip_identical_logits(tmp_path):
    torch.manual_seed(0)
    for model in (GPT(CFG), ScalarHead(GPT(CFG))):
        save_checkpoint(str(tmp_path), model, "bytes", {"lr": 1e-3}, step=7, extra={"reward_mean": 0.5})
        loaded, ckpt = load_model(str(tmp_path))
        assert type(loaded) is type(model)
        assert ckpt["step"] == 7 and ckpt["tokenizer"] == "bytes" and ckpt["extra"]["reward_mean"] == 0.5
        idx = torch.randint(0, 40, (2, 10))
        with torch.no_grad():
            assert torch.equal(model.eval()(idx), loaded(idx))
        mapped = load_checkpoint(str(tmp_path), mmap=True)  # the config without reading the weights
        assert mapped["config"] == ckpt["config"]
        assert all(torch.equal(mapped["model"][k], v) for k, v in ckpt["model"].items())


def test_truncated_file_names_the_file(tmp_path):
    save_checkpoint(str(tmp_path), GPT(CFG), "bytes", {}, step=1)
    path = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(str(tmp_path))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_pickle_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"kind": "lm", "config": {}, "tokenizer": "bytes", "model": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load: the file holds objects other than tensors"):
        load_model(str(path))


@pytest.mark.parametrize("content, words", [
    (bytes(range(7, 256)) * 40, f"its first bytes are {bytes(range(7, 11))!r}"),  # random-looking binary
    (b"hello, this is a text file\n", "its first bytes are b'hell'"),
    (b"", "an empty file"),
])
def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path, content, words):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a torch checkpoint: neither a zip archive") and words in msg, msg
    assert "refused" not in msg and "code" not in msg  # not a pickle attack


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = GPT(CFG)
    save_checkpoint(str(tmp_path), model, "bytes", {}, step=1)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), GPT(CFG), "bytes", {}, step=2)
    monkeypatch.undo()
    loaded, ckpt = load_model(str(tmp_path))
    assert ckpt["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary file left behind
