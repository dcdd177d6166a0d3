"""The main command end to end, shrunk: `pipeline.py --fast` runs every stage with a tiny config and
writes a report with every documented field; the evaluation of a fixed checkpoint is deterministic.

Run: python -m pytest -q tests/test_pipeline.py
"""

import json
import math
import os
import subprocess
import sys

import torch

from conftest import run_script
from minirlhf import task
from minirlhf.evaluate import HARD_REPLIES, evaluate
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import get_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_FIELDS = ("gold_reward_mean", "gold_reward_sem", "rm_reward_mean", "kl_to_sft", "response_len_mean",
                 "wall_seconds", "peak_memory_mb", "models_in_memory")
# the tool world's rates (NaN where a --fast evaluation met no such prompt or call)
TOOL_FIELDS = ("tool_call_rate", "hard_correct_rate", "hard_abstain_rate", "hard_wrong_rate",
               "hard_miscopy_rate", "probe_abstain_rate", "probe_wrong_rate", "malformed_call_rate")


def test_fast_pipeline_writes_full_report(tmp_path):
    from pipeline import METHODS
    out = tmp_path / "out"
    proc = run_script("pipeline.py", "--fast", "--out", out, timeout=900)
    report = json.load(open(out / "report.json"))
    assert set(METHODS) == {"sft", "best_of_n", "ppo", "rrhf", "dpo", "grpo", "grpo_verifier"}
    for method in METHODS:
        for field in METHOD_FIELDS:
            assert isinstance(report[method].get(field), (int, float)), (method, field)
        for field in TOOL_FIELDS:
            assert isinstance(report[method].get(field), float), (method, field)
        assert set(report[method]["correct_rate_by_kind"]) <= set(task.KINDS)
        # the fast evaluation's 12 prompts hold a hard one: the reward model's score of each kind of reply
        assert set(report[method]["hard_replies"]) <= set(HARD_REPLIES), method
        assert math.isclose(sum(r["rate"] for r in report[method]["hard_replies"].values()), 1.0)
    assert set(report["sft"]["greedy_correct_rate_by_kind"]) <= set(task.KINDS)
    assert report["ppo"]["models_in_memory"] == 4 and report["best_of_n"]["models_in_memory"] == 2
    assert report["grpo"]["models_in_memory"] == 3 and report["grpo_verifier"]["models_in_memory"] == 2
    assert report["dpo"]["models_in_memory"] == 2
    for field in ("accuracy_vs_gold", "accuracy_vs_labels"):
        assert 0.0 <= report["rm"][field] <= 1.0
    table = (out / "report.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and "## Sample answers" in table
    assert "correct rate by kind" in table and "the calculator and honesty" in table
    assert "the reward model on the replies to hard questions" in table
    assert set(report["rm"]["contrast_accuracy"]) <= set(task.CONTRAST_TESTS) and "constructed" in table
    assert set(report["rm"]["hard_candidates"]) <= {"call", "abstain", "answer"}
    assert "| grpo_verifier |" in proc.stdout  # the table is printed too
    # --resume of a finished pipeline skips every stage, evaluates again, and counts the stages' time
    walls = json.load(open(out / "logs" / "wall_seconds.json"))
    assert set(walls) == set(METHODS) | {"rm"}
    proc = run_script("pipeline.py", "--fast", "--out", out, "--resume", timeout=900)
    assert proc.stdout.count("finished in an earlier run") == len(walls)
    again = json.load(open(out / "report.json"))
    assert again["total_wall_seconds"] >= sum(walls.values()) > again["invocation_wall_seconds"]
    assert again["ppo"]["gold_reward_mean"] == report["ppo"]["gold_reward_mean"]  # the same evaluation


def test_evaluation_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    enc = get_encoding("bytes")
    prompts = task.heldout_prompts()[:12]
    a, sa = evaluate(model, enc, prompts, 12, ref=model, seed=3)
    b, sb = evaluate(model, enc, prompts, 12, ref=model, seed=3)
    _, sc = evaluate(model, enc, prompts, 12, seed=4)
    assert a == b and sa == sb
    assert a["kl_to_sft"] == 0.0  # a policy measured against itself
    assert [s[1] for s in sa] != [s[1] for s in sc]  # another seed, other samples: the seed fixes them


def test_chat_answers_one_prompt(tmp_path):
    from minirlhf.checkpoint import save_checkpoint
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path), GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)),
                    "bytes", {"tool": True}, 0)  # trained with the calculator: chat samples with it
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), str(tmp_path), "What is 2 + 3?",
                           "--max-new-tokens", "8", "--samples", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{tmp_path}: ") and "(gold " in line for line in lines)


def test_standard_error_counts_prompts_not_samples():
    from minirlhf.evaluate import gold_metrics, mean_sem
    prompts = ["What is 1 + 1?", "What is 1 + 1?", "What is 2 + 2?", "What is 2 + 2?",
               "What is 3 + 3?", "What is 3 + 3?"]
    texts = ["2", "2", "5", "5", "6", "1"]
    m, _ = gold_metrics(prompts, texts, samples_per_prompt=2)
    gold = [task.judge(p, t) for p, t in zip(prompts, texts)]
    per_prompt = [(gold[0] + gold[1]) / 2, (gold[2] + gold[3]) / 2, (gold[4] + gold[5]) / 2]
    assert m["gold_reward_mean"] == sum(gold) / 6
    assert m["gold_reward_sem"] == mean_sem(per_prompt)[1]
    assert m["gold_reward_sem"] > mean_sem(gold)[1]  # six correlated samples are not six draws
    shares = sum(m[f"gold_{c}"] for c in task.WEIGHTS)
    assert abs(shares - m["gold_reward_mean"]) < 1e-12  # the per-criterion shares add up to the mean
