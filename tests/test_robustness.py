"""Robustness of the stage scripts: what a user's mistake or a killed run must never cost.

- Bad input: each case (a line that is not JSON, a missing, misspelled or wrongly typed field, an empty
  file, an empty prompt or response, bytes that are not UTF-8, K-way ranks that do not match the
  responses, an identical pairwise record, an unknown tokenizer, an --init or reward model that does
  not fit, arguments that cannot work together) ends the script with exit status 2 and one line on
  stderr naming the file, the line and the field, and no traceback; a prompt longer than the context
  is cut and counted in the log. These run the real scripts in this process (fast), passing what they
  raise to the hook the script installed, as the interpreter would; `test_exit_status_end_to_end` checks
  once, in a subprocess, that the interpreter really does.
- The commands around the stages (MISUSES): chat.py, `python -m minirlhf.evaluate` and pipeline.py refuse
  bad values, paths, kinds and contexts the same way, before any model or stage starts; a file that is
  no checkpoint is called that; their --help gives every flag a text and its default; a stopped
  pipeline's advice names flags pipeline.py has.
- Kill and resume: a run killed with SIGKILL right after its mid-run checkpoint, then resumed with
  --resume, ends with exactly the weights (and log) of a run never stopped: SFT, RM, PPO and RRHF.
- A kill in the middle of writing a checkpoint leaves the previous one loadable, and resuming from it
  still ends with the uninterrupted run's weights.
- A loss that becomes NaN (a learning rate of 1e30) stops the run at that step, exit status 2, without
  touching the checkpoints.
- A checkpoint crafted to run code when unpickled is refused, and its code never runs.

The kills are real SIGKILLs, sent by the process to itself at an exact moment: the test starts the
script through a few lines (KILLER) that wrap os.replace (the rename that publishes a checkpoint) or
torch.save (the write before it). Nothing in the scripts knows about the tests.

Run: python -m pytest -q tests/test_robustness.py   (about 65 CPU-seconds)
"""

import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
import warnings

import pytest
import torch

from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.model import GPT, GPTConfig, ScalarHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(vocab_size=259, n_layer=1, n_head=2, n_embd=32)
# Tiny runs of each stage: a few steps of 1-layer, 32-wide models, a context of 64 tokens.
SFT_TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--n-demos", "64",
            "--eval-prompts", "4", "--max-new-tokens", "8", "--batch-size", "4", "--eval-interval", "2"]
RM_TINY = ["--n-prompts", "8", "--eval-prompts", "4", "--k", "2", "--batch-size", "3",
           "--max-new-tokens", "8", "--max-steps", "6", "--eval-interval", "3"]
PPO_TINY = ["--batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "8",
            "--eval-prompts", "4", "--max-steps", "4", "--eval-interval", "2"]
RRHF_TINY = ["--rounds", "2", "--max-steps", "4", "--batch-size", "2", "--k", "2", "--n-prompts", "4",
             "--max-new-tokens", "8", "--eval-interval", "2", "--monitor-prompts", "4", "--eval-prompts", "4"]


def run_here(script, *flags):
    """Run a script (or "-m module") in this process -> (exit status, stdout, stderr).

    An exception that escapes the script goes to sys.excepthook, exactly as the interpreter would pass it;
    the script's own hook (installed by parse_args) decides the exit status and what stderr shows.
    """
    argv, hook = sys.argv, sys.excepthook
    out, err = io.StringIO(), io.StringIO()
    module = script[3:] if script.startswith("-m ") else None
    path = os.path.join(ROOT, *module.split(".")) + ".py" if module else os.path.join(ROOT, script)
    sys.argv = [path, *map(str, flags)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if module:
                    with warnings.catch_warnings():  # "found in sys.modules": this process imported it
                        warnings.simplefilter("ignore", RuntimeWarning)
                        runpy.run_module(module, run_name="__main__")
                else:
                    runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                code = e.code
            except Exception as e:  # what the interpreter does with an exception nothing caught
                try:
                    sys.excepthook(type(e), e, e.__traceback__)
                    code = 1
                except SystemExit as exit_:
                    code = exit_.code
    finally:
        sys.argv, sys.excepthook = argv, hook
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result, *fragments):
    code, _, err = result
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# Checkpoints to start from: tiny random models, saved directly (no training needed to test plumbing)


def tiny_checkpoint(path, kind="lm", tokenizer="bytes", block_size=64, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=block_size, **CFG))
    model = ScalarHead(gpt) if kind == "scalar" else gpt
    extra = {"reward_mean": 0.0, "reward_std": 1.0} if kind == "scalar" else {}
    save_checkpoint(str(path), model, tokenizer, {}, 0, extra)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return dict(sft=tiny_checkpoint(d / "sft"), rm=tiny_checkpoint(d / "rm", "scalar", seed=1),
                sft_gpt2=tiny_checkpoint(d / "sft_gpt2", tokenizer="gpt2"),
                rm_gpt2=tiny_checkpoint(d / "rm_gpt2", "scalar", tokenizer="gpt2"),
                rm_short=tiny_checkpoint(d / "rm_short", "scalar", block_size=32),
                junk=write_lines(d / "junk.pt", [bytes(range(7, 256)) * 4]))  # binary, not a checkpoint


def write_lines(path, lines):
    """Lines as given: dicts become JSON, str and bytes are written raw."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


GOOD = {"prompt": "What is 1 + 2?", "response": "3"}

# ----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the file, line and field; exit status 2


@pytest.mark.parametrize("line, fragments", [
    ('{"prompt": "What is 2 + 2?", "response": ', [":2:", "not JSON"]),
    ({"prompt": "What is 2 + 2?"}, [":2:", "field 'response'", "missing"]),
    ({"prompt": "What is 2 + 2?", "respnse": "4"}, [":2:", "field 'response'", "'respnse'"]),
    ({"prompt": 4, "response": "4"}, [":2:", "field 'prompt'", "expected a string, got int"]),
    ({"prompt": "  ", "response": "4"}, [":2:", "field 'prompt'", "empty"]),
    ({"prompt": "What is 2 + 2?", "response": ""}, [":2:", "field 'response'", "empty"]),
    (b'{"prompt": "What is 2 + 2?", "response": "\xff4"}', [":2:", "not valid UTF-8"]),
    ({"prompt": "What is 2 + 2?", "response": "4" * 300}, [":2:", "field 'response'", "longer by itself"]),
], ids=["not-json", "missing-field", "misspelled-field", "wrong-type", "empty-prompt", "empty-response",
        "not-utf8", "response-beyond-context"])
def test_bad_sft_record(tmp_path, line, fragments):
    data = write_lines(tmp_path / "data.jsonl", [GOOD, line])
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--data", data, "--out", tmp_path / "out"),
                      data, *fragments)


def test_empty_file(tmp_path):
    data = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--data", data, "--out", tmp_path / "out"),
                      data, "empty file")


def test_missing_data_file(tmp_path):
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--data", tmp_path / "nope.jsonl",
                               "--out", tmp_path / "out"), "nope.jsonl: no such file")


def test_kway_ranks_do_not_match_responses(tmp_path, ckpts):
    data = write_lines(tmp_path / "kway.jsonl",
                       [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},
                        {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1]}])
    assert_user_error(run_here("train_rm.py", *RM_TINY, "--init", ckpts["sft"], "--data", data,
                               "--out", tmp_path / "rm"),
                      data + ":2:", "field 'ranks'", "2 items for 3 responses")


def test_pairwise_chosen_identical_to_rejected(tmp_path, ckpts):
    data = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert_user_error(run_here("train_rm.py", *RM_TINY, "--init", ckpts["sft"], "--data", data,
                               "--out", tmp_path / "rm"),
                      data + ":2:", "field 'rejected'", "identical")


@pytest.mark.parametrize("script, expected", [
    ("train_sft.py", r"; [23] longer than the context \(64\) lose the start of their prompt"),  # of 5 rows
    ("train_rm.py", r"note: \d+ training rows were truncated to fit block_size 64"),
    ("train_ppo.py", r"prompts: 3 of 6 are longer than the 56 tokens the context leaves them, "
                     r"and lose their start"),
    ("train_rrhf.py", r"; 3 longer than the 56 tokens the context leaves them lose their start"),
])
def test_prompt_longer_than_the_context_is_cut_and_counted(tmp_path, ckpts, script, expected):
    long = "Please " * 40 + "what is 1 + 2?"  # ~300 bytes, the context is 64
    data = write_lines(tmp_path / "long.jsonl",
                       [{"prompt": long, "chosen": "3", "rejected": "4"},
                        {"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"}] * 3)
    flags = {"train_sft.py": SFT_TINY, "train_rm.py": ["--init", ckpts["sft"], *RM_TINY],
             "train_ppo.py": ["--init", ckpts["sft"], "--reward-model", ckpts["rm"], *PPO_TINY],
             "train_rrhf.py": ["--init", ckpts["sft"], "--reward-model", ckpts["rm"], *RRHF_TINY]}[script]
    code, out, err = run_here(script, *flags, "--max-steps", "2", "--data", data, "--out", tmp_path / "out")
    assert code == 0, err[-3000:]
    assert re.search(expected, out), out[-3000:]


def test_unknown_tokenizer(tmp_path):
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--tokenizer", "gtp2", "--out", tmp_path / "out"),
                      "unknown tokenizer 'gtp2'")


def test_init_with_another_tokenizer(tmp_path, ckpts):
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--init", ckpts["sft_gpt2"], "--tokenizer", "bytes",
                               "--out", tmp_path / "out"), "--tokenizer bytes", ckpts["sft_gpt2"], "(gpt2)")


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py", "train_ppo.py", "train_rrhf.py"])
def test_init_of_the_wrong_kind(tmp_path, ckpts, script):
    flags = (SFT_TINY if script == "train_sft.py" else [] if script == "train_rm.py"
             else ["--reward-model", ckpts["rm"]])
    assert_user_error(run_here(script, *flags, "--init", ckpts["rm"], "--out", tmp_path / "out"),
                      os.path.join(ckpts["rm"], "ckpt.pt"), "a reward model", "where a language model")


def test_init_that_does_not_exist(tmp_path):
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--init", tmp_path / "nope",
                               "--out", tmp_path / "out"), "--init", "no such checkpoint or folder")


@pytest.mark.parametrize("script", ["train_ppo.py", "train_rrhf.py"])
@pytest.mark.parametrize("rm, fragments", [
    ("rm_gpt2", ["uses tokenizer 'gpt2', the policy 'bytes'"]),
    ("rm_short", ["reads 32 tokens, shorter than the policy's context of 64"]),
])
def test_reward_model_that_does_not_fit_the_policy(tmp_path, ckpts, script, rm, fragments):
    tiny = PPO_TINY if script == "train_ppo.py" else RRHF_TINY
    assert_user_error(run_here(script, *tiny, "--init", ckpts["sft"], "--reward-model", ckpts[rm],
                               "--out", tmp_path / "out"), os.path.join(ckpts[rm], "ckpt.pt"), *fragments)


@pytest.mark.parametrize("script, flags, fragments", [
    ("train_ppo.py", ["--batch-size", "6", "--minibatch-size", "4"],
     ["--batch-size 6 is not a multiple of --minibatch-size 4"]),
    ("train_ppo.py", ["--max-new-tokens", "64"], ["--max-new-tokens 64", "context of 64 tokens"]),
    ("train_rm.py", ["--max-new-tokens", "80"], ["--max-new-tokens 80", "context of 64 tokens"]),
    ("train_sft.py", ["--block-size", "8"], ["--max-new-tokens 8", "context of 8 tokens"]),
], ids=["minibatches", "ppo-context", "rm-context", "sft-context"])
def test_arguments_that_cannot_work_together(tmp_path, ckpts, script, flags, fragments):
    tiny = {"train_sft.py": SFT_TINY, "train_rm.py": ["--init", ckpts["sft"], *RM_TINY],
            "train_ppo.py": ["--init", ckpts["sft"], "--reward-model", ckpts["rm"], *PPO_TINY]}[script]
    assert_user_error(run_here(script, *tiny, *flags, "--out", tmp_path / "out"), *fragments)


# Bad values caught by the one validation pass, before any model is built: (script, flags, the message).
# A new script adds rows, not code.
BAD_ARGUMENTS = [
    (script, flags, fragment)
    for script in ("train_sft.py", "train_rm.py", "train_ppo.py", "train_rrhf.py", "train_dpo.py",
                   "train_grpo.py")
    for flags, fragment in [
        (["--lr", "-1"], "--lr -1.0: must be positive"),
        (["--lr", "nan"], "--lr nan: must be a finite number"),
        (["--device", "tpu"], "--device tpu: expected cpu, cuda, cuda:N or auto"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
        (["--dtype", "float16"], "--dtype float16: expected float32, bfloat16 or auto"),
        (["--max-steps", "0"], "--max-steps 0: must be positive"),
        (["--ckpt-interval", "-2"], "--ckpt-interval -2: must be positive"),
        (["--threads", "-1"], "--threads -1: must be >= 0"),
    ]
] + [
    ("train_sft.py", ["--n-layer", "0"], "--n-layer 0: must be positive"),
    ("train_sft.py", ["--n-head", "3", "--n-embd", "32"], "--n-embd 32 is not a multiple of --n-head 3"),
    ("train_sft.py", ["--n-demos", "0"], "--n-demos 0: must be positive"),
    ("train_rm.py", ["--k", "1"], "--k 1: must be at least 2"),
    ("train_rm.py", ["--label-temperature", "-1"], "--label-temperature -1.0: must be >= 0"),
    ("train_rm.py", ["--eval-prompts", "0"], "--eval-prompts 0: must be positive"),
    ("train_ppo.py", ["--temperature", "0"], "--temperature 0.0: must be positive"),
    ("train_ppo.py", ["--clip-eps", "-1"], "--clip-eps -1.0: must be positive"),
    ("train_ppo.py", ["--gamma", "2"], "--gamma 2.0: must be in [0, 1]"),
    ("train_ppo.py", ["--critic-init", "ref"], "--critic-init ref: expected one of rm, sft"),
    ("train_rrhf.py", ["--temperature", "-1"], "--temperature -1.0: must be positive"),
    ("train_rrhf.py", ["--warmup-steps", "-5"], "--warmup-steps -5: must be >= 0"),
    ("train_dpo.py", ["--beta", "0"], "--beta 0.0: must be positive"),
    ("train_dpo.py", ["--label-smoothing", "0.7"], "--label-smoothing 0.7: must be in [0, 0.5]"),
]


@pytest.mark.parametrize("script, flags, fragment", BAD_ARGUMENTS,
                         ids=[f"{s[6:-3]}{'-'.join(f)}" for s, f, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_before_any_model(tmp_path, ckpts, script, flags, fragment):
    # --init a folder that does not exist: a check that passed would fail later, on the missing checkpoint
    init = [] if script == "train_sft.py" else ["--init", tmp_path / "no-such-checkpoint"]
    assert_user_error(run_here(script, *init, *flags, "--out", tmp_path / "out"), fragment)


# The commands around the stages (chat, evaluate, the pipeline), and a file that is no checkpoint: one line
# and exit status 2, before any model is built. In the flags, {sft} and {rm} are tiny checkpoints with a
# context of 64, {junk} a binary file, {tmp} the test's folder. A new misuse adds a row, not code.
EVALUATE = "-m minirlhf.evaluate"
MISUSES = [
    ("chat.py", ["{sft}", "hi", "--samples", "0"], "--samples 0: must be positive"),
    ("chat.py", ["{sft}", "hi", "--max-new-tokens", "1000"],
     "--max-new-tokens 1000: must leave room for a prompt in the context of 64 tokens of {sft}"),
    ("chat.py", ["{tmp}/nope", "hi"], "{tmp}/nope: no such checkpoint"),
    ("chat.py", ["hello"], "hello: no such checkpoint; the arguments are checkpoint folders, then"),
    ("chat.py", ["{sft}", "hello", "again", "--max-new-tokens", "8"],  # a stray word before the prompt
     "hello: no such checkpoint"),
    ("chat.py", ["{sft}", "hi", "--temperature", "0"], "--temperature 0.0: must be positive"),
    ("chat.py", ["{sft}", "hi", "--temperature", "-1"], "--temperature -1.0: must be positive"),
    ("chat.py", ["{rm}", "hi"], "{rm}/ckpt.pt: a reward model (train_rm.py), where a language model"),
    ("chat.py", ["{junk}", "hi"], "{junk}: not a torch checkpoint: neither a zip archive"),
    (EVALUATE, ["{sft}", "--n-prompts", "0"], "--n-prompts 0: must be positive"),
    (EVALUATE, ["{rm}"], "{rm}/ckpt.pt: a reward model (train_rm.py), where a language model"),
    (EVALUATE, ["{sft}", "--ref", "{rm}", "--max-new-tokens", "8"], "--ref {rm}/ckpt.pt: a reward model"),
    (EVALUATE, ["{sft}", "--max-new-tokens", "500"], "--max-new-tokens 500: must leave room for a prompt"),
    (EVALUATE, ["{sft}", "--reward-model", "{sft}", "--max-new-tokens", "8"],
     "where a reward model (train_rm.py) is needed"),
    (EVALUATE, ["{sft}", "--best-of-n", "4"], "--best-of-n 4: needs --reward-model"),
    (EVALUATE, ["{sft}", "--best-of-n", "-1"], "--best-of-n -1: must be >= 0"),
    (EVALUATE, ["{sft}", "--json", "{tmp}/no/eval.json"], "--json {tmp}/no/eval.json: no such folder"),
    (EVALUATE, ["{sft}", "--temperature", "nan"], "--temperature nan: must be a finite number"),
    ("pipeline.py", ["--out", "{tmp}/out", "--ppo", "--lr -1"],
     "--ppo '--lr -1': train_ppo.py: --lr -1.0: must be positive"),
    ("pipeline.py", ["--out", "{tmp}/out", "--ppo", "--max-stpes 3"],
     "--ppo '--max-stpes 3': train_ppo.py: unrecognized arguments: --max-stpes 3"),
    ("pipeline.py", ["--out", "{tmp}/out", "--rm", "--k '1"], "--rm \"--k '1\": No closing quotation"),
    ("pipeline.py", ["--out", "{tmp}/out", "--sft", "--device tpu"], "train_sft.py: --device tpu: expected"),
    ("pipeline.py", ["--out", "{tmp}/out", "--eval", "--n-prompts 0"],
     "--eval '--n-prompts 0': minirlhf.evaluate: --n-prompts 0: must be positive"),
    ("pipeline.py", ["--out", "{tmp}/out", "--best-of-n", "--best-of-n 0"], "--best-of-n 2 or more"),
    ("pipeline.py", ["--out", "{junk}"], "--out {junk}: a file, where a folder is needed"),
    ("train_ppo.py", ["--init", "{junk}", "--reward-model", "{rm}", "--out", "{tmp}/out"],
     "{junk}: not a torch checkpoint"),
]


@pytest.mark.parametrize("script, flags, fragment", MISUSES,
                         ids=[f"{s.split('.')[-2]}{'-'.join(f)}" for s, f, _ in MISUSES])
def test_misuse_is_one_line_before_any_model(tmp_path, ckpts, script, flags, fragment):
    fill = lambda text: text.format(tmp=tmp_path, **ckpts)
    assert_user_error(run_here(script, *map(fill, flags)), fill(fragment))
    assert not os.path.exists(tmp_path / "out")  # nothing was started


@pytest.mark.parametrize("script", ["chat.py", EVALUATE, "pipeline.py"])
def test_help_gives_every_flag_a_text_and_its_default(script):
    code, out, _ = run_here(script, "--help")
    entries = re.split(r"\n  (?=-)", out.split("options:")[1])[1:]  # one per flag
    assert code == 0 and len(entries) > 5
    for entry in entries:
        text = " ".join(entry.split())
        if not text.startswith("-h"):
            assert "default: " in text and len(re.split(r"\(.*default: ", text)[0].split()) > 2, text


def test_more_prompts_than_exist_is_a_printed_note(tmp_path, ckpts):
    data = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 2?"}, {"prompt": "Hi!"}])
    code, out, err = run_here(EVALUATE, ckpts["sft"], "--prompts", data, "--n-prompts", 5000,
                              "--samples-per-prompt", 1, "--max-new-tokens", 4)
    assert code == 0, err[-3000:]
    assert f"note: --n-prompts 5000: {data} holds 2 prompts; evaluating on all of them" in out


def test_pipeline_advice_names_the_pipeline_s_own_flags(tmp_path):
    """What a stopped pipeline tells the user to type is a pipeline.py command: its flags exist."""
    _, help_, _ = run_here("pipeline.py", "--help")
    (tmp_path / "out" / "ppo").mkdir(parents=True)
    (tmp_path / "out" / "ppo" / "resume.pt").write_bytes(b"")  # a pipeline stopped in PPO
    over = assert_user_error(run_here("pipeline.py", "--out", tmp_path / "out"),
                             "unfinished ppo stage is saved here; continue it with `python pipeline.py --out")
    failed = assert_user_error(run_here("pipeline.py", "--out", tmp_path / "new", "--fast", "--sft",
                                        "--init no-such-checkpoint"), "sft failed (exit 2)", "with --resume")
    for advice in (over, failed):
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", advice.split("error: ", 1)[1]):
            assert flag in help_, (flag, advice)


def test_finished_run_is_not_overwritten_and_a_running_one_is_locked(tmp_path):
    out = tmp_path / "sft"
    tiny_checkpoint(out)  # a finished run
    before = (out / "ckpt.pt").read_bytes()
    assert_user_error(run_here("train_sft.py", *SFT_TINY, "--max-steps", "2", "--out", out),
                      "a finished run is saved here; pass --overwrite")
    assert (out / "ckpt.pt").read_bytes() == before
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(str(sleeper.pid))  # another process, alive, holds the folder
        result = run_here("train_sft.py", *SFT_TINY, "--max-steps", "2", "--overwrite", "--out", out)
        assert_user_error(result, f"another run (pid {sleeper.pid}) is writing to")
    finally:
        sleeper.kill()
        sleeper.wait()
    code, _, err = run_here("train_sft.py", *SFT_TINY, "--max-steps", "2", "--overwrite", "--out", out)
    assert code == 0, err[-2000:]  # the stale lock of a dead process is taken over
    assert (out / "ckpt.pt").read_bytes() != before


def test_exit_status_end_to_end(tmp_path):
    """The interpreter, not just this test's stand-in, turns a user error into exit status 2 and one line."""
    data = write_lines(tmp_path / "data.jsonl", [GOOD, {"prompt": "What is 2 + 2?", "respnse": "4"}])
    p = subprocess.run([sys.executable, "train_sft.py", *SFT_TINY, "--data", data,
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (f"train_sft.py: error: {data}:2: field 'response': missing "
                                                 "(found 'respnse': a misspelling?)")


# ----------------------------------------------------------------------------------------------------
# Kill and resume

# Runs a script, sending SIGKILL to itself right after ("after") or in the middle of ("during") its N-th
# write of resume.pt. A real kill at an exact moment, so the test never races the run.
KILLER = r"""
import io, os, runpy, signal, sys
import torch
mode, n, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real_replace, real_save, saves = os.replace, torch.save, [0]

def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if str(dst).endswith("resume.pt"):
        saves[0] += 1
        if mode == "after" and saves[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

def save(obj, f, *a, **k):
    if mode == "during" and "resume.pt.tmp" in getattr(f, "name", "") and saves[0] + 1 == n:
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half of the checkpoint reaches the disk...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)                  # ...and the process dies
    return real_save(obj, f, *a, **k)

os.replace, torch.save = replace, save
sys.argv = sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def run(script, *flags, kill=None):
    """Run a script in a subprocess -> CompletedProcess; kill=("after" | "during", N) kills it at
    its N-th resume.pt."""
    cmd = [sys.executable, script, *map(str, flags)]
    if kill:
        cmd = [sys.executable, "-c", KILLER, kill[0], str(kill[1]), script, *map(str, flags)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if kill:
        assert p.returncode == -9, f"the run was not killed (exit {p.returncode}): " + p.stderr[-3000:]
    else:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def weights(out):
    return load_checkpoint(out)["model"]


def logged(out):
    """metrics.jsonl without the timings (`ms`, `rollout_ms`, `score_ms`, ...): the run's numbers."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "ms" and not k.endswith("_ms")} for r in rows]


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "the weights differ"
    assert logged(a) == logged(b)
    assert not os.path.exists(os.path.join(b, "resume.pt"))  # a finished run leaves only its result


def kill_and_resume(script, flags, tmp_path, kill, full=None):
    """The uninterrupted run (or `full`, one already made), the killed one, its resumption;
    -> the resume.pt it used."""
    cut = tmp_path / "cut"
    if full is None:
        full = tmp_path / "full"
        run(script, *flags, "--out", full)
    run(script, *flags, "--out", cut, kill=kill)
    ckpt = load_checkpoint(str(cut / "resume.pt"))
    run(script, *flags, "--out", cut, "--resume")
    assert_same_run(str(full), str(cut))
    return ckpt


@pytest.fixture(scope="module")
def sft_full(tmp_path_factory):
    """An uninterrupted 6-step SFT run; --ckpt-interval does not change what a run computes, so it
    serves both tests."""
    out = tmp_path_factory.mktemp("sft") / "full"
    run("train_sft.py", *SFT_TINY, "--max-steps", "6", "--out", out)
    return out


def test_sft_kill_and_resume(tmp_path, sft_full):
    flags = [*SFT_TINY, "--max-steps", "6", "--ckpt-interval", "3"]
    ckpt = kill_and_resume("train_sft.py", flags, tmp_path, kill=("after", 1), full=sft_full)
    assert ckpt["step"] == 3 and ckpt["extra"]["resume"]["optimizer"]["state"]  # halfway, with Adam's moments


def test_sft_killed_while_saving(tmp_path, sft_full):
    """Killed halfway through writing the step-4 checkpoint: the step-2 one stays whole, resumes exactly."""
    flags = [*SFT_TINY, "--max-steps", "6", "--ckpt-interval", "2"]
    ckpt = kill_and_resume("train_sft.py", flags, tmp_path, kill=("during", 2), full=sft_full)
    assert ckpt["step"] == 2
    assert not [f for f in os.listdir(tmp_path / "cut") if ".tmp" in f]  # the half-written file is cleaned up


# One row per resumable stage: its tiny flags (given the tiny checkpoints), the --ckpt-interval at which it
# is killed after its first resume.pt, and what that resume.pt must hold. A new method adds a row.
RESUME_CASES = {
    # 8 prompts in batches of 3: the epoch under way at the kill (its order) must carry over
    "train_rm.py": (lambda c: [*RM_TINY, "--init", c["sft"]], 3,
                    lambda ck: ck["step"] == 3 and len(ck["extra"]["order"]) == 8 + 8 - 3 * 3),
    # the adaptive KL controller with a short horizon, so the KL coefficient moves and must be restored
    "train_ppo.py": (lambda c: [*PPO_TINY, "--init", c["sft"], "--reward-model", c["rm"],
                                "--kl-coef", "0.05", "--kl-target", "4", "--kl-horizon", "10"], 2,
                     lambda ck: ck["step"] == 2 and ck["extra"]["kl_coef"] != 0.05
                     and {"critic", "policy_opt", "critic_opt", "generator",
                          "data_rng"} <= set(ck["extra"]["resume"])),
    # killed in the second round, whose candidates were sampled from the trained policy: they must come back
    "train_rrhf.py": (lambda c: [*RRHF_TINY, "--init", c["sft"], "--reward-model", c["rm"]], 3,
                      lambda ck: ck["step"] == 3 and ck["extra"]["round"] == 1
                      and len(ck["extra"]["response_ids"]) == 8),
}


@pytest.mark.parametrize("script", list(RESUME_CASES))
def test_kill_and_resume(tmp_path, ckpts, script):
    flags, interval, check = RESUME_CASES[script]
    ckpt = kill_and_resume(script, [*flags(ckpts), "--ckpt-interval", str(interval)], tmp_path,
                           kill=("after", 1))
    assert check(ckpt), {k: ckpt["extra"].get(k) for k in ("round", "kl_coef")}


def test_resume_refuses_other_arguments_and_fresh_runs_over_it(tmp_path):
    flags = [*SFT_TINY, "--max-steps", "4", "--ckpt-interval", "2", "--lr", "0.002",
             "--out", tmp_path / "sft"]
    run("train_sft.py", *flags, "--overwrite", kill=("after", 1))  # as pipeline.py starts a stage
    assert_user_error(run_here("train_sft.py", *flags, "--lr", "0.01", "--resume"),
                      "cannot resume with other arguments", "--lr was 0.002, now 0.01")
    assert_user_error(run_here("train_sft.py", *flags), "an unfinished run is saved here; pass --resume")
    assert_user_error(run_here("train_sft.py", *flags[:-1], tmp_path / "elsewhere", "--resume"),
                      "nothing to resume")
    code, _, err = run_here("train_sft.py", *flags, "--resume")  # --overwrite is no argument of the run's
    assert code == 0, err[-3000:]


# ----------------------------------------------------------------------------------------------------
# The NaN guard and the crafted checkpoint


def test_nan_loss_stops_the_run_and_keeps_the_checkpoints(tmp_path):
    out = tmp_path / "sft"
    tiny_checkpoint(out)  # the result of an earlier, good run in the same folder
    before = (out / "ckpt.pt").read_bytes()
    result = run_here("train_sft.py", *SFT_TINY, "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "6",
                      "--ckpt-interval", "1", "--overwrite", "--out", out)
    line = assert_user_error(result, "loss is nan", f"the last good checkpoint in {out} stays")
    step = int(line.split("error: step ")[1].split(":")[0])
    assert (out / "ckpt.pt").read_bytes() == before
    assert load_checkpoint(str(out / "resume.pt"))["step"] == step  # the last finite step's, still loadable


class Evil:
    def __reduce__(self):  # unpickling calls os.system(...): code execution from a "checkpoint"
        return (os.system, (f"touch {Evil.marker}",))


def test_crafted_checkpoint_is_refused(tmp_path, ckpts):
    evil = tmp_path / "evil"
    evil.mkdir()
    Evil.marker = str(tmp_path / "pwned")
    torch.save({"kind": "lm", "config": {}, "tokenizer": "bytes", "model": Evil()}, evil / "ckpt.pt")
    p = subprocess.run([sys.executable, "train_ppo.py", "--init", str(evil), "--reward-model", ckpts["rm"],
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert str(evil / "ckpt.pt") in p.stderr and "refused" in p.stderr
    assert not os.path.exists(Evil.marker)  # the payload never ran
