"""The whole RLHF pipeline on the built-in task, in one command, measured against the simulated human.

    python pipeline.py                 # 72 minutes on the README's 2-core AMD machine
    python pipeline.py --fast          # a few-step version of every stage: checks the plumbing in ~1 minute

Runs the rows of `STAGES` in order, each as its own process (so its wall time and peak memory are its own):
    sft            train_sft.py    demonstrations -> the SFT policy                          out/sft
    rm             train_rm.py     SFT samples ranked by the noisy labeler -> reward model   out/rm
                                   (and the comparisons it learned from, for DPO)
    best_of_n      evaluate        n SFT samples, the reward model picks one (no training)
    ppo            train_ppo.py    PPO against the reward model, KL to the SFT model         out/ppo
    rrhf           train_rrhf.py   rank the SFT model's own samples by reward, no critic/ref  out/rrhf
    dpo            train_dpo.py    the RM's labelled comparisons as a loss on the policy      out/dpo
    grpo           train_grpo.py   group-relative advantages from the reward model            out/grpo
    grpo_verifier  train_grpo.py   the same, rewarded by a rule that checks the answer  out/grpo_verifier
then one evaluation of every method on the same held-out prompts and seed, and writes out/report.json,
out/report.md (the tables), training curves as PNGs (with matplotlib) and a few sample answers per
method side by side. Any stage's extra flags can be passed through, e.g. `--ppo "--max-steps 100"`.

Every stage's flags, its extra ones included, are checked by that stage's own `Args` before the first
stage starts: a typo in `--ppo "..."` is one line and exit status 2 now, not after SFT trained.
A stopped pipeline (a failed stage, Ctrl-C) continues with the same command and `--resume`.
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from minirlhf.cli import UsageError, parse_args, report_user_errors, require
from minirlhf.evaluate import HARD_REPLIES

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Stage:
    """One row of the pipeline: a script, its inputs, its flags on the default and the --fast run."""
    name: str      # its output folder out/<name> and its row in the report
    script: str    # a stage script, or "-m module"
    inputs: str    # what it reads from the earlier stages ({out} is the output root)
    fast: str      # added with --fast: a few steps, tiny sizes (the plumbing, not the results)
    curves: tuple  # metrics.jsonl keys plotted under out/curves_<name>.png
    method: bool = True  # a row of the results table (the reward model is a stage, not a method)


# Adding a method adds a row. Order matters: every stage reads only what the rows above it wrote.
STAGES = [
    Stage("sft", "train_sft.py", "",
          "--n-layer 1 --n-head 2 --n-embd 32 --max-steps 20 --n-demos 256 --eval-prompts 12 "
          "--max-new-tokens 16 --monitor-prompts 4",
          ("loss", "val_loss", "eval_gold_reward")),
    Stage("rm", "train_rm.py", "--init {out}/sft",
          "--n-prompts 16 --eval-prompts 8 --max-steps 4 --batch-size 4 --max-new-tokens 16",
          ("loss", "acc", "acc_gold"), method=False),
    Stage("best_of_n", "-m minirlhf.evaluate", "{out}/sft --best-of-n 4 --reward-model {out}/rm --json "
          "{out}/best_of_n.json", "--n-prompts 12 --samples-per-prompt 1 --max-new-tokens 16", ()),
    Stage("ppo", "train_ppo.py", "--init {out}/sft --reward-model {out}/rm",
          "--max-steps 2 --batch-size 8 --minibatch-size 4 --ppo-epochs 1 --max-new-tokens 16 "
          "--eval-prompts 8",
          ("rm_reward", "gold_reward", "kl", "entropy")),
    Stage("rrhf", "train_rrhf.py", "--init {out}/sft --reward-model {out}/rm",
          "--n-prompts 8 --max-steps 2 --batch-size 2 --max-new-tokens 16 --eval-prompts 8 "
          "--monitor-prompts 4",
          ("rank_loss", "sft_loss", "eval_gold_reward", "kl")),
    Stage("dpo", "train_dpo.py", "--init {out}/sft --comparisons {out}/rm/comparisons.jsonl",
          "--max-steps 2 --batch-size 2 --max-new-tokens 16 --eval-prompts 8 --monitor-prompts 4",
          ("loss", "reward_acc", "reward_margin", "eval_gold_reward", "kl")),
    Stage("grpo", "train_grpo.py", "--init {out}/sft --reward-model {out}/rm",
          "--max-steps 2 --batch-size 2 --group-size 4 --minibatch-size 1 --max-new-tokens 16 "
          "--eval-prompts 8 --monitor-prompts 4", ("reward", "eval_gold_reward", "kl", "entropy")),
    Stage("grpo_verifier", "train_grpo.py", "--init {out}/sft --reward verifier",
          "--max-steps 2 --batch-size 2 --group-size 4 --minibatch-size 1 --max-new-tokens 16 "
          "--eval-prompts 8 --monitor-prompts 4", ("reward", "eval_gold_reward", "kl", "entropy")),
]
METHODS = [s.name for s in STAGES if s.method]
EVAL_FAST = "--n-prompts 12 --samples-per-prompt 1 --max-new-tokens 16"


class StageFailed(Exception):
    """A stage's process exited with an error (it printed why)."""


def run(name, cmd, log_dir):
    """Run a stage, streaming its output to the terminal and to out/logs/<name>.log; -> wall seconds."""
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(log_dir, f"{name}.log"), "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                logf.write(line)
            proc.wait()
        except KeyboardInterrupt:  # the stage got the same Ctrl-C: let it save and say where it stopped
            rest = proc.communicate()[0]
            sys.stdout.write(rest)
            logf.write(rest)
            raise
    if proc.returncode != 0:
        raise StageFailed(f"{name} failed (exit {proc.returncode}); its output is in {log_dir}/{name}.log")
    return time.time() - t0


def split_flags(option: str, value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as e:  # an unbalanced quote
        raise UsageError(f"{option} {value!r}: {e}") from None


def check_flags(option: str, script: str, flags: list[str]):
    """Parse a stage's whole command line with the stage's own `Args`, as its process will: an unknown
    flag or a bad value (the extra flags of `option`, e.g. --ppo) stops the pipeline before any stage runs.
    Returns the parsed `Args`."""
    module = importlib.import_module(script[3:] if script.startswith("-m ") else script.removesuffix(".py"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(module.Args, flags)
    except SystemExit:  # argparse's own error: an unknown flag, or a value of the wrong type
        why = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise UsageError(f"{option}: {script.removeprefix('-m ')}: {why}") from None
    except UsageError as e:
        raise UsageError(f"{option}: {script.removeprefix('-m ')}: {e}") from None


def plot_curves(out):
    """One PNG per stage from its metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "training curves: matplotlib is not installed (pip install matplotlib), no PNGs written"
    written = []
    for stage in STAGES:
        path = os.path.join(out, stage.name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path)]
        ks = [k for k in stage.curves if any(k in r for r in rows)]
        if not ks:
            continue
        fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3), squeeze=False)
        for ax, k in zip(axes[0], ks):
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(f"{stage.name}: {k}")
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"curves_{stage.name}.png"), dpi=80)
        plt.close(fig)
        written.append(f"curves_{stage.name}.png")
    return "training curves: " + ", ".join(written)


COLUMNS = [("gold_reward_mean", "gold reward", "+.3f"), ("gold_reward_sem", "± sem", ".3f"),
           ("rm_reward_mean", "RM reward", "+.3f"), ("kl_to_sft", "KL to SFT", ".2f"),
           ("gold_correctness", "correct.", "+.3f"), ("gold_honesty", "honesty", "+.3f"),
           ("gold_politeness", "polite.", "+.3f"), ("gold_concision", "concision", "+.3f"),
           ("response_len_mean", "length", ".1f"), ("models_in_memory", "models", "d"),
           ("peak_memory_mb", "peak MB", ".0f"), ("wall_seconds", "wall s", ".0f")]
# the lesson of the tool world: call the calculator where it helps ("hard"), abstain where nothing does
# ("divide", the probe), never guess (see minirlhf/evaluate.py gold_metrics)
TOOL_COLUMNS = [("tool_call_rate", "calls"), ("hard_correct_rate", "correct"),
                ("hard_abstain_rate", "abstain"), ("hard_wrong_rate", "wrong"),
                ("hard_miscopy_rate", "of which miscopied"),
                ("probe_abstain_rate", "probe: abstain"), ("probe_wrong_rate", "probe: wrong"),
                ("malformed_call_rate", "malformed calls")]


def markdown_table(report):
    """The results table, the per-kind correct rates, the calculator and honesty rates, and the reward
    model's accuracy."""
    lines = ["| method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in METHODS:
        r = report[m]
        cells = [format(r[k], f) if isinstance(r.get(k), (int, float)) else "-" for k, _, f in COLUMNS]
        if r.get("models_needed") not in (None, r.get("models_in_memory")):  # RRHF's SFT copy, for the KL
            cells[[c[0] for c in COLUMNS].index("models_in_memory")] += f" ({r['models_needed']} needed)"
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("\ngold criteria columns: each criterion's weighted share of the gold reward (their sum)")
    k3 = {m: report[m]["kl_to_sft_k3"] for m in METHODS if "kl_to_sft_k3" in report[m]}
    if k3:  # why a KL can read below 0, and the estimate that cannot
        lines.append("KL to SFT is k1, the mean of log pi/pi_sft over the samples: unbiased, but its noise "
                     "can take it below 0 near the SFT model; the never negative k3 estimate of the same KL: "
                     + ", ".join(f"{m} {v:.2f}" for m, v in k3.items()))
    if report["best_of_n"].get("kl_to_sft_bound") is not None:
        lines.append("best-of-n's KL is the analytic log n - (n - 1)/n, an upper bound when samples repeat.")
    kinds = list(report[METHODS[0]].get("correct_rate_by_kind", {}))
    if kinds:
        lines += ["", "correct rate by kind (temperature 1, the same samples as the gold reward; hard: the "
                  "right product)", "", "| method | " + " | ".join(kinds) + " |",
                  "|---" * (len(kinds) + 1) + "|"]
        for m in METHODS:
            rates = report[m].get("correct_rate_by_kind", {})
            cells = [f"{rates[k]:.2f}" if k in rates else "-" for k in kinds]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        greedy = report[METHODS[0]].get("greedy_correct_rate_by_kind")
        if greedy:
            cells = [f"{greedy[k]:.2f}" if k in greedy else "-" for k in kinds]
            lines.append("| sft, greedy | " + " | ".join(cells) + " |")
    lines += ["", "the calculator and honesty: on hard (a product the calculator finds) the share of replies "
              "that call it, and that answer right, abstain or guess wrong (of which miscopied: a number "
              "other than the result of the reply's last call, a slip in copying it); on the probe (divide: "
              "no tool helps) those that abstain or guess; of all calls, those unclosed or answered error",
              "",
              "| method | " + " | ".join(c[1] for c in TOOL_COLUMNS) + " |",
              "|---" * (len(TOOL_COLUMNS) + 1) + "|"]
    for m in METHODS:
        cells = [format(report[m][k], ".2f") if isinstance(report[m].get(k), (int, float)) else "-"
                 for k, _ in TOOL_COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    replies = {m: report[m].get("hard_replies") or {} for m in METHODS}
    seen = [k for k in HARD_REPLIES if any(k in r for r in replies.values())]
    if seen:  # where the reward model's blind spots meet the policy's own samples
        lines += ["", "the reward model on the replies to hard questions: each kind's share of them and, in "
                  "brackets, its mean reward-model score (what the RL stages climb); miscopied: another "
                  "number than the call's result; wrong call: a closed call and no right answer after it; "
                  "broken call: unclosed or answered error; guess: no call", "",
                  "| method | " + " | ".join(seen) + " |", "|---" * (len(seen) + 1) + "|"]
        for m in METHODS:
            r = replies[m]
            cells = [f"{r[k]['rate']:.2f} ({r[k]['rm_score']:+.2f})" if k in r else "-" for k in seen]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    rm = report["rm"]
    lines.append(f"\nreward model: held-out accuracy vs gold order {rm['accuracy_vs_gold']:.3f}, "
                 f"vs the noisy labels {rm['accuracy_vs_labels']:.3f}")
    by_kind = rm.get("accuracy_correctness_by_kind")
    if by_kind:
        lines.append("reward model, held-out pairs that differ only in correctness, accuracy by kind: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
    contrast = rm.get("contrast_accuracy")
    if contrast:  # constructed replies that differ in one thing (task.contrast_pairs)
        lines.append("reward model, constructed held-out pairs (task.contrast_pairs), the better reply "
                     "scored higher: " + ", ".join(f"{k} {v:.2f}" for k, v in contrast.items()))
    return "\n".join(lines)


def main():
    sys.excepthook = report_user_errors  # a mistake: one line and exit status 2, as in every stage
    ap = argparse.ArgumentParser(description="SFT -> reward model -> every method -> one report.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="out", help="output folder (stages write out/sft, out/rm, ...)")
    ap.add_argument("--fast", action="store_true", help="a few steps per stage: checks the plumbing")
    ap.add_argument("--seed", type=int, default=1337, help="every stage's --seed")
    ap.add_argument("--resume", action="store_true", help="skip the stages a stopped pipeline finished and "
                    "continue the one it stopped in (same flags)")
    for stage in STAGES:
        ap.add_argument(f"--{stage.name.replace('_', '-')}", default="", metavar="FLAGS",
                        help=f"extra flags for {stage.script.removeprefix('-m ')} ({stage.name}), quoted")
    ap.add_argument("--eval", default="", metavar="FLAGS",
                    help="extra flags for the final evaluation (minirlhf.evaluate), quoted")
    args = ap.parse_args()
    out = args.out
    require(not os.path.isfile(out), f"--out {out}: a file, where a folder is needed")
    p = lambda *parts: os.path.join(out, *parts)
    walls_path = p("logs", "wall_seconds.json")  # each finished stage's wall time, kept for --resume
    wall = json.load(open(walls_path)) if args.resume and os.path.exists(walls_path) else {}
    prog = os.path.basename(sys.argv[0])
    resume_cmd = f"python {shlex.join([prog, *sys.argv[1:]])}" + ("" if args.resume else " --resume")

    # Every command, checked before the first one runs.
    commands = {}
    for stage in STAGES:
        script = stage.script.endswith(".py")
        result = p(stage.name, "ckpt.pt") if script else p(f"{stage.name}.json")
        if args.resume and stage.name in wall and os.path.exists(result):
            print(f"=== {stage.name}: finished in an earlier run ({result}), skipped", flush=True)
            continue
        option = f"--{stage.name.replace('_', '-')}"
        extra = getattr(args, stage.name)
        flags = [*shlex.split(stage.inputs.format(out=out))]
        if script:
            flags += ["--out", p(stage.name), "--seed", str(args.seed)]
            # continue the stage a stopped pipeline left unfinished; replace what an earlier pipeline wrote
            unfinished = os.path.exists(p(stage.name, "resume.pt"))
            require(args.resume or not unfinished, f"{p(stage.name, 'resume.pt')}: a stopped pipeline's "
                    f"unfinished {stage.name} stage is saved here; continue it with `{resume_cmd}`, or "
                    "delete it (or choose another --out) to start over")
            flags.append("--resume" if unfinished else "--overwrite")
        flags += (stage.fast.split() if args.fast else []) + split_flags(option, extra)
        parsed = check_flags(f"{option} {extra!r}", stage.script, flags)
        if stage.name == "best_of_n":
            require(parsed.best_of_n >= 2, f"{option} {extra!r}: the best-of-n baseline needs --best-of-n 2 "
                    f"or more ({parsed.best_of_n} would report plain SFT samples)")
        commands[stage.name] = [sys.executable, *stage.script.split(), *flags]
    trained = [m for m in METHODS if m != "best_of_n"]
    eval_flags = [*[p(m) for m in trained], "--json", p("eval.json"), "--samples-json", p("samples.json"),
                  "--reward-model", p("rm"), "--ref", p("sft"), "--greedy",
                  *(EVAL_FAST.split() if args.fast else []), *split_flags("--eval", args.eval)]
    check_flags(f"--eval {args.eval!r}", "-m minirlhf.evaluate", eval_flags)
    commands["evaluate"] = [sys.executable, "-m", "minirlhf.evaluate", *eval_flags]

    log_dir = p("logs")
    os.makedirs(log_dir, exist_ok=True)
    t_total = time.time()
    name, eval_seconds = None, 0.0
    try:
        for name, cmd in commands.items():
            seconds = run(name, cmd, log_dir)
            if name == "evaluate":
                eval_seconds = seconds
            else:
                wall[name] = seconds
                with open(walls_path, "w") as f:
                    json.dump(wall, f)
    except StageFailed as e:  # the stage printed why; say how to go on
        print(f"{prog}: error: {e}; once that is fixed, the same command with --resume continues from it "
              "and skips the stages before it", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted in {name}; `{resume_cmd}` continues from it", file=sys.stderr)
        sys.exit(130)

    # ---- the report -------------------------------------------------------------------------------
    t_report = time.time()
    from minirlhf.checkpoint import load_checkpoint
    evals = json.load(open(p("eval.json")))
    report = {}
    for m in trained:
        extra = load_checkpoint(p(m))["extra"]
        report[m] = dict(evals[p(m)], wall_seconds=wall[m], peak_memory_mb=extra.get("peak_memory_mb"),
                         models_in_memory=extra.get("models_in_memory"),
                         train_seconds=extra.get("train_seconds"))
        if "models_needed" in extra:
            report[m]["models_needed"] = extra["models_needed"]
    report["best_of_n"] = dict(json.load(open(p("best_of_n.json")))[p("sft")], wall_seconds=wall["best_of_n"])
    rm_extra = load_checkpoint(p("rm"))["extra"]
    rm_keys = ("accuracy_vs_gold", "accuracy_vs_labels", "reward_mean", "reward_std",
               "accuracy_correctness_by_kind", "contrast_accuracy", "hard_candidates", "peak_memory_mb",
               "train_seconds")
    report["rm"] = {k: rm_extra.get(k) for k in rm_keys}
    report["rm"]["wall_seconds"] = wall["rm"]
    # the pipeline's time: each stage's wall, kept over --resume (a stage cut and resumed counts from its
    # resumption), plus this run's evaluation and report; and the time of this invocation alone
    report["total_wall_seconds"] = sum(wall.values()) + eval_seconds + (time.time() - t_report)
    report["invocation_wall_seconds"] = time.time() - t_total
    with open(p("report.json"), "w") as f:
        json.dump(report, f, indent=2)
    samples = json.load(open(p("samples.json")))
    bon_path = p("best_of_n.samples.json")
    bon_samples = json.load(open(bon_path)) if os.path.exists(bon_path) else {}
    table = markdown_table(report)
    lines = ["# minirlhf report", "", table, "", plot_curves(out), "", "## Sample answers", ""]
    by_method = {m: samples[p(m)] for m in trained}
    by_method["best_of_n"] = next(iter(bon_samples.values()), [])
    for i in range(min(6, len(by_method["sft"]))):
        lines.append(f"**{by_method['sft'][i][0]}**")
        for m in METHODS:
            if i < len(by_method.get(m, [])):
                _, text, gold = by_method[m][i]
                lines.append(f"- {m}: `{text}` (gold {gold:+.2f})")
        lines.append("")
    with open(p("report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n" + table)
    this_run = f" (this invocation {report['invocation_wall_seconds']:.0f} s)" if args.resume else ""
    print(f"\nwrote {p('report.json')} and {p('report.md')}; total {report['total_wall_seconds']:.0f} s"
          + this_run)


if __name__ == "__main__":
    main()
