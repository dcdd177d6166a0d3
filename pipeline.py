"""The whole RLHF pipeline on the built-in task, in one command, measured against the simulated human.

    python pipeline.py                 # about 10 minutes on a 2-core CPU
    python pipeline.py --fast          # a few-step version of every stage: checks the plumbing in ~1 minute

Runs, each as its own process (so its wall time and peak memory are its own):
    1. train_sft.py    demonstrations -> the SFT policy                        out/sft
    2. train_rm.py     SFT samples ranked by the noisy labeler -> reward model   out/rm
    3. train_ppo.py    PPO against the reward model, KL to the SFT model        out/ppo
    4. train_rrhf.py   RRHF: rank the SFT model's own samples, no critic/ref     out/rrhf
    5. best-of-n       n samples from the SFT model, the reward model picks one (no training)
    6. one evaluation of every method on the same held-out prompts and seed
and writes out/report.json, out/report.md (the table), training curves as PNGs (with matplotlib) and
a few sample answers per method side by side. Any stage's extra flags can be passed through, e.g.
`--ppo "--max-steps 100"`.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("sft", "best_of_n", "ppo", "rrhf")
FAST = {  # every stage shrunk to a few steps: the pipeline's plumbing, not its results
    "sft": "--n-layer 1 --n-head 2 --n-embd 32 --max-steps 20 --n-demos 256 --eval-prompts 12 --max-new-tokens 16",
    "rm": "--n-prompts 16 --eval-prompts 8 --max-steps 4 --batch-size 4 --max-new-tokens 16",
    "ppo": "--max-steps 2 --batch-size 8 --minibatch-size 4 --ppo-epochs 1 --max-new-tokens 16 --eval-prompts 8",
    "rrhf": "--n-prompts 8 --max-steps 2 --batch-size 2 --max-new-tokens 16 --eval-prompts 8 --monitor-prompts 4",
    "eval": "--n-prompts 12 --samples-per-prompt 1 --max-new-tokens 16",
}


def run(name, cmd, log_dir):
    """Run a stage, streaming its output to the terminal and to out/logs/<name>.log; -> wall seconds."""
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(log_dir, f"{name}.log"), "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            logf.write(line)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); its output is in {log_dir}/{name}.log")
    return time.time() - t0


def plot_curves(out, stages):
    """One PNG per stage from its metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "training curves: matplotlib is not installed (pip install matplotlib), no PNGs written"
    keys = {"sft": ["loss", "val_loss"], "rm": ["loss", "acc", "acc_gold"], "ppo": ["rm_reward", "gold_reward", "kl", "entropy"],
            "rrhf": ["rank_loss", "sft_loss", "eval_gold_reward", "kl"]}
    written = []
    for stage in stages:
        path = os.path.join(out, stage, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path)]
        ks = [k for k in keys.get(stage, []) if any(k in r for r in rows)]
        if not ks:
            continue
        fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3), squeeze=False)
        for ax, k in zip(axes[0], ks):
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(f"{stage}: {k}")
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"curves_{stage}.png"), dpi=80)
        plt.close(fig)
        written.append(f"curves_{stage}.png")
    return "training curves: " + ", ".join(written)


def markdown_table(report):
    cols = [("gold_reward_mean", "gold reward", "+.3f"), ("gold_reward_sem", "± sem", ".3f"),
            ("rm_reward_mean", "RM reward", "+.3f"), ("kl_to_sft", "KL to SFT", ".2f"),
            ("hard_abstain_rate", "abstain (hard)", ".2f"), ("hard_wrong_rate", "wrong (hard)", ".2f"),
            ("response_len_mean", "length", ".1f"), ("models_in_memory", "models", "d"),
            ("peak_memory_mb", "peak MB", ".0f"), ("wall_seconds", "wall s", ".0f")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in METHODS:
        r = report[m]
        cells = [format(r[k], f) if isinstance(r.get(k), (int, float)) else "-" for k, _, f in cols]
        if r.get("models_needed") not in (None, r.get("models_in_memory")):  # RRHF holds an SFT copy to report KL
            cells[[c[0] for c in cols].index("models_in_memory")] += f" ({r['models_needed']} needed)"
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    rm = report["rm"]
    lines.append(f"\nreward model: held-out accuracy vs gold order {rm['accuracy_vs_gold']:.3f}, "
                 f"vs the noisy labels {rm['accuracy_vs_labels']:.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="SFT -> reward model -> PPO and RRHF -> report, on the built-in task.")
    ap.add_argument("--out", default="out", help="output folder (stages write out/sft, out/rm, ...)")
    ap.add_argument("--fast", action="store_true", help="a few steps per stage: checks the plumbing")
    ap.add_argument("--best-of-n", type=int, default=4, help="n for the best-of-n baseline")
    ap.add_argument("--seed", type=int, default=1337)
    for stage in ("sft", "rm", "ppo", "rrhf", "eval"):
        ap.add_argument(f"--{stage}", default="", help=f"extra flags for the {stage} stage, quoted")
    args = ap.parse_args()
    out = args.out
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    py = sys.executable
    flags = lambda stage: (FAST[stage].split() if args.fast else []) + shlex.split(getattr(args, stage))
    seed = ["--seed", str(args.seed)]
    p = lambda *parts: os.path.join(out, *parts)

    t_total = time.time()
    wall = {}
    wall["sft"] = run("sft", [py, "train_sft.py", "--out", p("sft"), *seed, *flags("sft")], log_dir)
    wall["rm"] = run("rm", [py, "train_rm.py", "--init", p("sft"), "--out", p("rm"), *seed, *flags("rm")], log_dir)
    wall["ppo"] = run("ppo", [py, "train_ppo.py", "--init", p("sft"), "--reward-model", p("rm"), "--out", p("ppo"),
                              *seed, *flags("ppo")], log_dir)
    wall["rrhf"] = run("rrhf", [py, "train_rrhf.py", "--init", p("sft"), "--reward-model", p("rm"), "--out", p("rrhf"),
                                *seed, *flags("rrhf")], log_dir)
    # best-of-n and the final evaluation: one process each, the same held-out prompts and sampling seed
    eval_common = ["--reward-model", p("rm"), "--ref", p("sft"), *flags("eval")]
    wall["best_of_n"] = run("best_of_n", [py, "-m", "minirlhf.evaluate", p("sft"), "--best-of-n", str(args.best_of_n),
                                          "--json", p("best_of_n.json"), *eval_common], log_dir)
    run("evaluate", [py, "-m", "minirlhf.evaluate", p("sft"), p("ppo"), p("rrhf"), "--json", p("eval.json"),
                     "--samples-json", p("samples.json"), *eval_common], log_dir)

    # ---- the report -------------------------------------------------------------------------------
    from minirlhf.checkpoint import load_checkpoint
    evals = json.load(open(p("eval.json")))
    bon = json.load(open(p("best_of_n.json")))
    report = {}
    for m in ("sft", "ppo", "rrhf"):
        extra = load_checkpoint(p(m))["extra"]
        report[m] = dict(evals[p(m)], wall_seconds=wall[m], peak_memory_mb=extra.get("peak_memory_mb"),
                         models_in_memory=extra.get("models_in_memory"), train_seconds=extra.get("train_seconds"))
        if "models_needed" in extra:
            report[m]["models_needed"] = extra["models_needed"]
    report["best_of_n"] = dict(bon[p("sft")], wall_seconds=wall["best_of_n"])
    rm_extra = load_checkpoint(p("rm"))["extra"]
    report["rm"] = {k: rm_extra.get(k) for k in ("accuracy_vs_gold", "accuracy_vs_labels", "reward_mean", "reward_std",
                                                 "peak_memory_mb", "train_seconds")}
    report["rm"]["wall_seconds"] = wall["rm"]
    report["total_wall_seconds"] = time.time() - t_total
    with open(p("report.json"), "w") as f:
        json.dump(report, f, indent=2)
    samples = json.load(open(p("samples.json")))
    bon_samples = json.load(open(p("best_of_n.samples.json"))) if os.path.exists(p("best_of_n.samples.json")) else {}
    table = markdown_table(report)
    lines = ["# minirlhf report", "", table, "", plot_curves(out, ("sft", "rm", "ppo", "rrhf")), "", "## Sample answers", ""]
    names = {p("sft"): "sft", p("ppo"): "ppo", p("rrhf"): "rrhf"}
    by_method = {names[k]: v for k, v in samples.items()}
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
    print(f"\nwrote {p('report.json')} and {p('report.md')}; total {report['total_wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
