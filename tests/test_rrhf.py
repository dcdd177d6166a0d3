"""Smoke test of the RRHF stage: train_rrhf.py runs end to end after SFT and a reward model.

Chains tiny runs through a temporary folder (SFT -> reward model -> RRHF) as subprocesses, the way a
user runs them, and checks that the RRHF checkpoint loads as a language model with its evaluation
metrics, and that metrics.jsonl holds the logged keys. A second RRHF run takes its prompts from a k-way
JSONL file with 3 and 2 responses per record (so prompts get different numbers of policy samples to
reach the same K) and sums two weighted reward models (the same one twice). The math itself is tested in
tests/test_rrhf_loss.py. About 20 s on 2 busy CPU cores.

Run: python -m pytest -q tests/test_rrhf.py
"""

import json
import os
import subprocess
import sys

from minirlhf.checkpoint import load_model
from minirlhf.data import write_jsonl
from minirlhf.model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max-new-tokens", "8", "--seed", "0"]


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the tiny models gain nothing from threads
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rrhf_after_sft_and_rm(tmp_path):
    sft, rm, rrhf = str(tmp_path / "sft"), str(tmp_path / "rm"), str(tmp_path / "rrhf")
    run("train_sft.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-steps", "3", "--n-demos", "64",
        "--eval-prompts", "8", "--out", sft, *TINY)
    run("train_rm.py", "--init", sft, "--n-prompts", "8", "--eval-prompts", "4", "--max-steps", "2", "--batch-size", "4",
        "--out", rm, *TINY)

    stdout = run("train_rrhf.py", "--init", sft, "--reward-model", rm, "--out", rrhf, "--max-steps", "4",
                 "--rounds", "2", "--batch-size", "2", "--k", "3", "--n-prompts", "4",
                 "--eval-interval", "2", "--monitor-prompts", "4", "--eval-prompts", "6", *TINY)
    assert stdout.count("round ") >= 2 and "held-out gold reward" in stdout

    model, ck = load_model(rrhf)
    assert isinstance(model, GPT) and ck["kind"] == "lm" and ck["step"] == 4
    for key in ("gold_reward_mean", "gold_reward_sem", "rm_reward_mean", "kl_to_sft", "train_seconds", "peak_memory_mb"):
        assert key in ck["extra"] and ck["extra"][key] == ck["extra"][key], key  # present and not NaN
    assert ck["args"]["init"] == sft and ck["args"]["reward_model"] == [rm]
    assert ck["extra"]["models_in_memory"] == 3 and ck["extra"]["models_needed"] == 2  # + the SFT copy for KL

    metrics = read_metrics(os.path.join(rrhf, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 2, 3]  # every 10th step, every eval step, the last step
    for m in metrics:
        assert {"loss", "rank_loss", "sft_loss", "rank_acc", "rm_reward", "gold_reward", "gold_reward_best", "lr"} <= set(m)
        assert abs(m["loss"] - (m["rank_loss"] + m["sft_loss"])) < 1e-4 and m["rank_loss"] >= -1e-6
        assert {"eval_gold_reward", "eval_rm_reward", "kl"} <= set(m)  # all three are eval steps here

    # Prompts from a k-way file whose records hold 3 or 2 responses, topped up with 1 or 2 samples to K = 4; two RMs.
    data = str(tmp_path / "kway.jsonl")
    write_jsonl(data, [{"prompt": "What is 2 + 3?", "responses": ["5", "Sure! 5", "6"], "ranks": [1, 0, 2]},
                       {"prompt": "Spell 'cat' backwards.", "responses": ["tac", "Ugh. tac"], "ranks": [0, 1]}])
    stdout = run("train_rrhf.py", "--init", sft, "--reward-model", rm + ":0.5", "--reward-model", rm,
                 "--data", data, "--out", str(tmp_path / "rrhf_data"), "--max-steps", "2", "--batch-size", "2",
                 "--k", "4", *TINY)
    assert "K = 4 candidates" in stdout
    metrics = read_metrics(os.path.join(tmp_path, "rrhf_data", "metrics.jsonl"))
    assert "gold_reward" not in metrics[0] and "kl" not in metrics[0]  # no gold judge or KL reference off the built-in task
    model, ck = load_model(str(tmp_path / "rrhf_data"))
    assert "gold_reward_mean" not in ck["extra"] and ck["extra"]["train_seconds"] > 0
    assert ck["extra"]["models_in_memory"] == ck["extra"]["models_needed"] == 3  # policy + 2 RMs, no SFT copy
    assert ck["args"]["reward_model"] == [rm + ":0.5", rm]
