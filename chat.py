"""Talk to a checkpoint: a prompt in, the model's answer out.

    python chat.py out/ppo "What is 4821 * 937?"          # one prompt, one answer
    python chat.py out/ppo                                # interactive: a prompt per line, Ctrl-D to quit
    python chat.py out/sft out/ppo "Spell 'owl' backwards." --samples 3   # compare checkpoints

Each answer is sampled with the stage scripts' template and sampler (temperature 1 by default, as the
evaluation samples); on the built-in task's prompts the gold judge's score is printed beside it. A
checkpoint trained with the calculator (`--tool`, saved in its arguments) answers with it, and the call
and the tool's result show in-line, the result in brackets (the judge reads the answer without them):

    out/ppo: <calc>4821*937</calc> [4517277] Sure! 4517277  (gold +0.85)

Every argument is checked against every checkpoint before a model is built; a mistake is one line and
exit 2.
"""

import os
import sys
from dataclasses import dataclass

import torch

from minirlhf import task
from minirlhf.checkpoint import load_checkpoint, load_model
from minirlhf.cli import arg, parse_args, positive, require
from minirlhf.sampling import sample_responses
from minirlhf.tokenizer import load_tokenizer


@dataclass
class Args:
    """Sample answers from one or more checkpoints."""
    checkpoints: list = arg([], "checkpoint folders (out/sft, out/ppo, ...), then optionally the prompt; "
                            "without one, prompts are read from stdin, one per line", positional=True)
    samples: int = arg(1, "answers per checkpoint and prompt", positive)
    temperature: float = arg(1.0, "sampling temperature", positive)
    greedy: bool = arg(False, "the most likely answer instead of a sample (--temperature is then unused)")
    max_new_tokens: int = arg(88, "answer length limit in tokens; must leave room for a prompt in the "
                              "checkpoint's context", positive)
    seed: int = arg(0, "random seed of the sampler")


def show_tool_output(text: str) -> str:
    """The tool's result after each answered call in brackets: "<calc>6*7</calc> [42] Sure! 42"."""
    return task.CALL_RE.sub(lambda m: m.group(0) if m.group(2) is None else
                            f"<calc>{m.group(1)}</calc> [{m.group(2)}]", text)


def answer(models, prompt, args, generator):
    for path, (model, enc, tool) in models.items():
        for text, _ in sample_responses(model, enc, [prompt] * args.samples, args.max_new_tokens,
                                        temperature=args.temperature, greedy=args.greedy,
                                        generator=generator, tool=tool):
            gold = f"  (gold {task.judge(prompt, text):+.2f})" if task.prompt_kind(prompt) else ""
            print(f"{path}: {show_tool_output(text) if tool else text}{gold}", flush=True)


def main(argv=None):
    args = parse_args(Args, argv)
    paths, prompt = args.checkpoints, None
    if len(paths) > 1 and not os.path.exists(paths[-1]):  # the last argument is a prompt, not a checkpoint
        paths, prompt = paths[:-1], paths[-1]
    for path in paths:  # every checkpoint is checked, and fits --max-new-tokens, before any model is built
        require(os.path.exists(path), f"{path}: no such checkpoint; the arguments are checkpoint folders, "
                "then optionally one prompt in quotes: chat.py out/sft \"What is 2 + 3?\"")
        block_size = load_checkpoint(path, kind="lm", mmap=True)["config"]["block_size"]
        require(args.max_new_tokens < block_size, f"--max-new-tokens {args.max_new_tokens}: must leave room "
                f"for a prompt in the context of {block_size} tokens of {path}")
    models = {}
    for path in paths:
        model, ck = load_model(path, kind="lm")
        enc = load_tokenizer(ck)
        # the calculator when the checkpoint was trained with it (older checkpoints: without)
        models[path] = (model, enc, task.calculator_tool(enc) if ck["args"].get("tool") else None)
    generator = torch.Generator().manual_seed(args.seed)
    if prompt is not None:
        answer(models, prompt, args, generator)
        return
    if sys.stdin.isatty():
        print("a prompt per line; Ctrl-D to quit. Try: What is 4821 * 937?")
    try:
        for line in sys.stdin:
            if line.strip():
                answer(models, line.strip(), args, generator)
    except KeyboardInterrupt:  # Ctrl-C quits too: there is nothing to save
        sys.exit(130)


if __name__ == "__main__":
    main()
