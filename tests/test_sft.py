"""Smoke test of the SFT stage: what train_sft.py leaves behind, on the built-in task and on a JSONL file.

The session's tiny chain (conftest.tiny_chain) has already run train_sft.py as a user would; this
checks its checkpoint (a language model with its evaluation, the model count, no resume.pt or run.lock
left), its log (the keys `sft_stats` adds; the interval evaluation's per-kind correct rates), and a second
run on an SFT JSONL file, which has no gold judge and so no gold metrics nor interval evaluation; and the
learning-rate schedule by hand. The loss itself is tested in tests/test_sft_loss.py.

Run: python -m pytest -q tests/test_sft.py
"""

import json
import math
import os

from conftest import TINY_SFT, run_script
from minirlhf import task
from minirlhf.checkpoint import load_model
from minirlhf.cli import warmup_cosine
from minirlhf.data import write_jsonl
from minirlhf.model import GPT


def test_builtin_task_checkpoint_and_log(tiny_chain):
    sft = tiny_chain["sft"]
    model, ck = load_model(sft)
    assert isinstance(model, GPT) and ck["kind"] == "lm" and ck["step"] == 3 and ck["tokenizer"] == "bytes"
    extra = ck["extra"]
    assert extra["models_in_memory"] == 1 and extra["val_loss"] > 0 and extra["train_seconds"] > 0
    assert set(extra["correct_rate_by_kind"]) <= set(task.KINDS) and "gold_reward_mean" in extra
    assert sorted(os.listdir(sft)) == ["ckpt.pt", "metrics.jsonl"]  # no resume.pt, no run.lock
    rows = [json.loads(line) for line in open(os.path.join(sft, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 2]  # every 10th step and the last
    assert {"loss", "tokens", "token_acc", "grad_norm", "lr", "ms", "val_loss"} <= set(rows[-1])
    assert isinstance(rows[-1]["tokens"], int) and 0 <= rows[-1]["token_acc"] <= 1
    # the interval evaluation: each kind's correct rate sampled and greedy, on the --monitor-prompts
    kinds = {k.removeprefix("eval_correct_") for k in rows[-1] if k.startswith("eval_correct_")}
    assert kinds and kinds <= set(task.KINDS) and "eval_gold_reward" in rows[-1]
    assert all(0 <= rows[-1][f"eval_greedy_{k}"] <= 1 for k in kinds)


def test_jsonl_data_has_no_gold_metrics(tmp_path):
    data = str(tmp_path / "sft.jsonl")
    write_jsonl(data, [{"prompt": f"What is {a} + 1?", "response": f"Sure! {a + 1}"} for a in range(8)])
    out = str(tmp_path / "sft")
    stdout = run_script("train_sft.py", *TINY_SFT, "--data", data, "--out", out).stdout
    assert "data: 7 train, 1 validation demonstrations" in stdout and "held-out gold reward" not in stdout
    _, ck = load_model(out)
    assert "gold_reward_mean" not in ck["extra"] and ck["extra"]["val_loss"] > 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert not any(k.startswith("eval_") for r in rows for k in r)  # no judge, no interval evaluation


def test_warmup_cosine_by_hand():
    lr, warm, steps = 3e-3, 10, 110
    # warmup: linear from lr / warm to lr
    assert warmup_cosine(0, lr, warm, steps) == lr / warm and warmup_cosine(warm - 1, lr, warm, steps) == lr
    # halfway through the decay, the mean of lr and the end; at max_steps, the end
    for final in (0.1, 0.0, 0.5):
        assert math.isclose(warmup_cosine(warm + 50, lr, warm, steps, final), lr * (1 + final) / 2)
        assert math.isclose(warmup_cosine(steps, lr, warm, steps, final), lr * final, abs_tol=1e-18)
        decay = [warmup_cosine(t, lr, warm, steps, final) for t in range(warm, steps + 1)]
        assert all(a >= b for a, b in zip(decay, decay[1:]))
    # SFT decays to 0 (--lr-final 0); every other stage keeps lr / 10, to the bit as before the option
    before = lambda t: lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * ((t - warm) / (steps - warm)))))
    assert all(warmup_cosine(t, lr, warm, steps) == before(t) for t in range(warm, steps + 1))
