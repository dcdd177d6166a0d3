"""Smoke test of bench.py: `--quick` runs every section on a tiny model and prints the expected tables.

Checks that each row is there with a number in it (not what the numbers are: timings are not tests),
that every sampling method generated the full length (bench.py asserts it), and that the methods
section ran train_ppo.py and train_rrhf.py (and train_grpo.py, when it is there and runs) and read back
their logged phase times, the models they hold and their peak memory. CPU, one thread: about 35 s of
CPU time, most of it four processes importing torch (the three scripts run side by side); about 70 s of
wall time when the two cores are shared.

Run: python -m pytest -q tests/test_bench.py
"""

import re

from conftest import run_script

NUMBER = re.compile(r"^[\d,.]+")


def sections(stdout):
    """{"Sampling": {first cell: [other cells]}, ...}: each `## Title: ...` section's table rows, without
    the header row (the one above `|---|`)."""
    out, rows = {}, None
    lines = stdout.splitlines() + [""]
    for line, below in zip(lines, lines[1:]):
        if line.startswith("## "):
            rows = out.setdefault(line[3:].split(":")[0], {})
        elif line.startswith("| ") and not below.startswith("|---") and rows is not None:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1:]
    return out


def test_bench_quick_prints_every_row():
    out = run_script("bench.py", "--quick", "--device", "cpu", timeout=240).stdout
    tables = sections(out)

    sampling = tables["Sampling"]
    for name in ["KV cache (`generate`)", "static KV cache (`generate_static`)",
                 "full recompute (`use_cache=False`)"]:
        batch, rate, ratio = sampling[name]
        assert batch == "4" and NUMBER.match(rate) and ratio.endswith("x")
    assert sampling["KV cache (`generate`)"][2] == "1.00x"
    assert "Hugging Face `generate`" in sampling  # measured, or a line saying transformers is not installed

    tokens_s, ms, _, mfu = tables["Training"]["eager"]
    assert NUMBER.match(tokens_s) and NUMBER.match(ms) and mfu.endswith("%")
    assert "FLOPs per token 6N + 12·L·H·Q·T" in out

    steps, memory = tables["Methods"], tables["Memory"]
    assert {"PPO", "RRHF"} <= set(steps) and set(steps) == set(memory)
    for name in ["PPO", "RRHF"]:  # both log their sampling and scoring apart from the step
        _, rollout, scoring, update, total = steps[name]
        assert all(NUMBER.match(x) and x.endswith("%)") for x in (rollout, scoring, update))
        assert NUMBER.match(total)
    assert steps["RRHF"][0] == "2 prompts x K=4 candidates"
    if "GRPO" in steps:  # train_grpo.py is there and ran: its step time at least
        assert NUMBER.match(steps["GRPO"][-1])
    for _, _, state, peak in memory.values():
        assert state.endswith(" MB") and peak.endswith(" MB") and NUMBER.match(peak)
    assert memory["PPO"][0].startswith("4: ") and memory["RRHF"][0].startswith("2: ")
    assert memory["PPO"][1] == "2 Adam" and memory["RRHF"][1] == "1 AdamW"
