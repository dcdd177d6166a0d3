"""Talk to a checkpoint: a prompt in, the model's answer out.

    python chat.py out/ppo "What is 4821 * 937?"          # one prompt, one answer
    python chat.py out/ppo                                # interactive: a prompt per line, Ctrl-D to quit
    python chat.py out/sft out/ppo "Spell 'owl' backwards." --samples 3   # compare checkpoints

Each answer is sampled with the stage scripts' template and sampler (temperature 1 by default, as the
evaluation samples); on the built-in task's prompts the gold judge's score is printed beside it.
"""

import argparse
import os
import sys

import torch

from minirlhf import task
from minirlhf.checkpoint import load_model
from minirlhf.sampling import sample_responses
from minirlhf.tokenizer import load_tokenizer


def answer(models, prompt, args, generator):
    for path, (model, enc) in models.items():
        for text, _ in sample_responses(model, enc, [prompt] * args.samples, args.max_new_tokens,
                                        temperature=args.temperature, greedy=args.greedy,
                                        generator=generator):
            gold = f"  (gold {task.judge(prompt, text):+.2f})" if task.prompt_kind(prompt) else ""
            print(f"{path}: {text}{gold}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample answers from one or more checkpoints.")
    ap.add_argument("args", nargs="+", help="checkpoint folder(s), then optionally the prompt")
    ap.add_argument("--samples", type=int, default=1, help="answers per checkpoint")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true", help="the most likely answer instead of a sample")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths, prompt = args.args, None
    if len(paths) > 1 and not os.path.exists(paths[-1]):  # the last argument is a prompt, not a checkpoint
        paths, prompt = paths[:-1], paths[-1]
    models = {}
    for path in paths:
        model, ck = load_model(path)
        if ck["kind"] != "lm":
            raise SystemExit(f"{path}: a {ck['kind']} checkpoint cannot answer; pass a policy "
                             "(out/sft, out/ppo, ...)")
        models[path] = (model, load_tokenizer(ck))
    generator = torch.Generator().manual_seed(args.seed)
    if prompt is not None:
        answer(models, prompt, args, generator)
        return
    if sys.stdin.isatty():
        print("a prompt per line; Ctrl-D to quit. Try: What is 4821 * 937?")
    for line in sys.stdin:
        if line.strip():
            answer(models, line.strip(), args, generator)


if __name__ == "__main__":
    main()
