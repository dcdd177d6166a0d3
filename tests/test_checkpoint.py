"""Checkpoints: a round trip gives identical logits; a truncated or crafted file gives a clear error
naming it; an interrupted save leaves the previous checkpoint loadable.

Run: python -m pytest -q tests/test_checkpoint.py
"""

import os

import pytest
import torch

from minirlhf.checkpoint import CheckpointError, load_model, save_checkpoint
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
    with pytest.raises(CheckpointError, match="refused"):
        load_model(str(path))


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
