"""Shared test setup.

- The repository root on sys.path, so `from train_ppo import gae` works wherever pytest starts.
- `run_script(script, *flags)`: a stage script as a user runs it, in a subprocess (one thread: the tiny
  models gain nothing from more), asserting exit status 0 unless `check=False`.
- `tiny_chain`: a tiny SFT model and a reward model trained on it, once per test session, for every
  later stage's smoke test to start from (`tiny_chain["sft"]`, `tiny_chain["rm"]`).
- `shared_data`: the read-only reference data in ../shared/data, which a user's clone does not have
  (tests that need it skip).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

# The smallest settings that still run every code path: one layer, 8-token responses.
TINY_SFT = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "96", "--max-steps", "3",
            "--n-demos", "64", "--eval-prompts", "8", "--max-new-tokens", "8", "--seed", "0"]
TINY_RM = ["--n-prompts", "8", "--eval-prompts", "4", "--max-steps", "2", "--batch-size", "4",
           "--max-new-tokens", "8", "--seed", "0"]


def run_script(script, *flags, check=True, timeout=300, env=None):
    """Run `python script flags...` from the repository root -> CompletedProcess (text stdout/stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable,
           *(["-m", script[3:]] if script.startswith("-m ") else [os.path.join(ROOT, script)])]
    proc = subprocess.run([*cmd, *map(str, flags)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"{script} failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """{"sft": path, "rm": path}: the tiny SFT -> RM chain, trained once for the whole session."""
    root = tmp_path_factory.mktemp("chain")
    sft, rm = str(root / "sft"), str(root / "rm")
    run_script("train_sft.py", *TINY_SFT, "--out", sft)
    run_script("train_rm.py", "--init", sft, *TINY_RM, "--out", rm)
    return {"sft": sft, "rm": rm}


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent (a user's clone): reference-data test skipped")
    return SHARED_DATA
