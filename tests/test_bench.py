"""Smoke test of bench.py: `--quick` runs every section on a tiny model and prints the expected tables.

Checks that each row is there with a number in it (not what the numbers are: timings are not tests),
that every sampling method generated the full length (bench.py asserts it), and that the PPO and RRHF
probes ran in their own processes and reported memory. CPU, one thread; a few seconds on an idle
machine (about 20 s when the cores are shared).

Run: python -m pytest -q tests/test_bench.py
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_prints_every_row():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    number = re.compile(r"^[\d,.]+")

    for name in ["KV cache (`generate`)", "static KV cache (`generate_static`)", "full recompute (`use_cache=False`)"]:
        batch, rate, ratio = rows[name]
        assert batch == "4" and number.match(rate) and ratio.endswith("x")
    assert rows["KV cache (`generate`)"][2] == "1.00x"
    assert "Hugging Face `generate`" in rows  # measured, or a line saying transformers is not installed

    tokens_s, ms, tflops, mfu = rows["eager"]
    assert number.match(tokens_s) and mfu.endswith("%")
    assert "FLOPs per token 6N + 12·L·H·Q·T" in out.stdout

    for phase in ["rollout (`generate`, KV cache)", "total"]:
        assert number.match(rows[phase][0])
    assert any(k.startswith("scoring") for k in rows) and any(k.startswith("update") for k in rows)
    for name in ["PPO iteration", "RRHF step (K=4)"]:
        models, optimizers, sequences, state, peak, seconds = rows[name]
        assert state.endswith(" MB") and peak.endswith(" MB") and number.match(seconds)
    assert rows["PPO iteration"][0].startswith("4") and rows["RRHF step (K=4)"][0].startswith("2")
