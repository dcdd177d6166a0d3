"""Smoke test of the RRHF stage: train_rrhf.py runs end to end after SFT and a reward model.

Runs RRHF as a subprocess, the way a user runs it, after the session's tiny SFT -> reward model chain
(conftest.tiny_chain), and checks that the RRHF checkpoint loads as a language model with its evaluation
metrics, and that metrics.jsonl holds the logged keys. A second RRHF run takes its prompts from a k-way
JSONL file with 3 and 2 responses per record (so prompts get different numbers of policy samples to
reach the same K) and sums two weighted reward models (the same one twice). The math itself is tested in
tests/test_rrhf_loss.py. About 20 s on 2 busy CPU cores.

Run: python -m pytest -q tests/test_rrhf.py
"""

import json
import os

from conftest import run_script
from minirlhf.checkpoint import load_model
from minirlhf.data import write_jsonl
from minirlhf.model import GPT

TINY = ["--max-new-tokens", "8", "--seed", "0"]


def run(script, *args):
    return run_script(script, *args).stdout


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rrhf_after_sft_and_rm(tiny_chain, tmp_path):
    sft, rm, rrhf = tiny_chain["sft"], tiny_chain["rm"], str(tmp_path / "rrhf")
    stdout = run("train_rrhf.py", "--init", sft, "--reward-model", rm, "--out", rrhf, "--max-steps", "4",
                 "--rounds", "2", "--batch-size", "2", "--k", "3", "--n-prompts", "4",
                 "--eval-interval", "2", "--monitor-prompts", "4", "--eval-prompts", "6", *TINY)
    assert stdout.count("round ") >= 2 and "held-out gold reward" in stdout

    model, ck = load_model(rrhf)
    assert isinstance(model, GPT) and ck["kind"] == "lm" and ck["step"] == 4
    for key in ("gold_reward_mean", "gold_reward_sem", "rm_reward_mean", "kl_to_sft", "train_seconds",
                "peak_memory_mb"):
        assert key in ck["extra"] and ck["extra"][key] == ck["extra"][key], key  # present and not NaN
    assert ck["args"]["init"] == sft and ck["args"]["reward_model"] == [rm]
    assert ck["extra"]["models_in_memory"] == 3 and ck["extra"]["models_needed"] == 2  # + the SFT copy for KL

    metrics = read_metrics(os.path.join(rrhf, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 2, 3]  # every 10th step, every eval step, the last step
    for m in metrics:
        assert {"loss", "rank_loss", "sft_loss", "rank_acc", "rm_reward", "gold_reward", "gold_reward_best",
                "lr"} <= set(m)
        assert abs(m["loss"] - (m["rank_loss"] + m["sft_loss"])) < 1e-4 and m["rank_loss"] >= -1e-6
        assert {"eval_gold_reward", "eval_rm_reward", "kl"} <= set(m)  # all three are eval steps here

    # Prompts from a k-way file whose records hold 3 or 2 responses, topped up with 1 or 2 samples to
    # K = 4; two RMs.
    data = str(tmp_path / "kway.jsonl")
    write_jsonl(data, [
        {"prompt": "What is 2 + 3?", "responses": ["5", "Sure! 5", "6"], "ranks": [1, 0, 2]},
        {"prompt": "Spell 'cat' backwards.", "responses": ["tac", "Ugh. tac"], "ranks": [0, 1]},
    ])
    stdout = run("train_rrhf.py", "--init", sft, "--reward-model", rm + ":0.5", "--reward-model", rm,
                 "--data", data, "--out", str(tmp_path / "rrhf_data"), "--max-steps", "2",
                 "--batch-size", "2", "--k", "4", *TINY)
    assert "K = 4 candidates" in stdout
    metrics = read_metrics(os.path.join(tmp_path, "rrhf_data", "metrics.jsonl"))
    # no gold judge or KL reference off the built-in task
    assert "gold_reward" not in metrics[0] and "kl" not in metrics[0]
    model, ck = load_model(str(tmp_path / "rrhf_data"))
    assert "gold_reward_mean" not in ck["extra"] and ck["extra"]["train_seconds"] > 0
    assert ck["extra"]["models_in_memory"] == ck["extra"]["models_needed"] == 3  # policy + 2 RMs, no SFT copy
    assert ck["args"]["reward_model"] == [rm + ":0.5", rm]
