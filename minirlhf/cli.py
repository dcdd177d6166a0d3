"""Plumbing every stage script shares: command-line arguments from an `Args` dataclass, errors, the log.

Each script declares its hyperparameters once, as a dataclass whose fields carry their defaults and a
docstring-style comment; `parse_args` turns the fields into `--kebab-case` flags. The log writes one
greppable line per step (`step 00050 | loss 1.2345 | ...`) and the same numbers to `metrics.jsonl`.

Errors. A mistake the user can fix (a bad data record, a checkpoint that does not fit, arguments that
cannot work together, a loss that blew up) is reported as one line on stderr with exit status 2, as
argparse reports a bad flag, never as a traceback: `parse_args` installs the hook that does it. Anything
else is a bug and keeps its traceback.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from minirlhf.checkpoint import RESUME_NAME, CheckpointError
from minirlhf.data import DataError
from minirlhf.tokenizer import TokenizerError


class UsageError(Exception):
    """Arguments that cannot work together, or that do not fit the models they are given."""


class LossNotFinite(Exception):
    """The loss became NaN or infinite: the run stops before the update reaches the weights."""


USER_ERRORS = (UsageError, LossNotFinite, DataError, CheckpointError, TokenizerError)


def require(ok: bool, message: str):
    """`require(args.batch_size % args.minibatch_size == 0, "...")`: stop with `message` unless ok."""
    if not ok:
        raise UsageError(message)


def check_finite(loss, step: int, out_dir: str):
    """Stop the run at a NaN or infinite loss, before backward and the optimizer step can spread it into
    the weights, and before anything is saved over the last good checkpoint."""
    value = loss.item()
    if not math.isfinite(value):
        last = os.path.join(out_dir, RESUME_NAME)
        raise LossNotFinite(f"step {step}: loss is {value}; the last good checkpoint in {out_dir} stays"
                            + ("" if os.path.exists(last) else " (this run had not written one yet)"))


_OUT = []  # the running script's --out, for the Ctrl-C message


def report_user_errors(kind, value, tb):
    """sys.excepthook: a user error becomes `script: error: message` and exit status 2; Ctrl-C becomes one
    line naming the last resume point and the command that continues from it, and exit status 130."""
    script = os.path.basename(sys.argv[0])
    if issubclass(kind, KeyboardInterrupt):
        resume = os.path.join(_OUT[0], RESUME_NAME) if _OUT else ""
        if resume and os.path.exists(resume):
            cmd = " ".join(sys.argv) + ("" if "--resume" in sys.argv else " --resume")
            print(f"{script}: interrupted; {resume} holds the last resume point: "
                  f"continue with `python {cmd}`", file=sys.stderr)
        else:
            print(f"{script}: interrupted before its first resume point; nothing to continue from",
                  file=sys.stderr)
        sys.exit(130)
    if issubclass(kind, USER_ERRORS):
        print(f"{script}: error: {value}", file=sys.stderr)
        sys.exit(2)
    sys.__excepthook__(kind, value, tb)


# Checks an `arg` may carry: each returns what is wrong with a value, or None. NaN fails every one.
def positive(v):
    return None if v > 0 else "must be positive"


def nonnegative(v):
    return None if v >= 0 else "must be >= 0"


def fraction(v):
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def one_of(*choices):
    return lambda v: None if v in choices else "expected one of " + ", ".join(map(str, choices))


def check_device(device: str):
    if device in ("auto", "cpu"):
        return None
    if device == "cuda" or device.startswith("cuda:"):
        import torch
        return (None if torch.cuda.is_available()
                else "no CUDA device here (this torch build or machine has none)")
    return "expected cpu, cuda, cuda:N or auto"


def check_dtype(dtype: str):
    return None if dtype in ("auto", "float32", "bfloat16") else "expected float32, bfloat16 or auto"


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass's fields and return an instance of it.

    bool fields become --flag / --no-flag; list fields are repeatable flags (given ones replace the default),
    or the positional arguments when declared `arg(..., positional=True)`. From here on, user errors exit
    with a one-line message (see the module docstring).
    """
    sys.excepthook = report_user_errors
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0])
    types = {"int": int, "float": float, "str": str, "bool": bool, "list": list}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = types.get(f.type, f.type) if isinstance(f.type, str) else f.type
        help_ = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", help=help_)
        elif typ is bool:
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction,
                                help=f"{help_} (default: {f.default})")
        elif typ is list:
            default = ", ".join(map(str, f.default_factory())) or "none"
            parser.add_argument(flag, default=None, action="append",
                                help=f"{help_} (repeatable; default: {default})")
        else:
            parser.add_argument(flag, default=f.default, type=typ, help=f"{help_} (default: {f.default})")
    ns = vars(parser.parse_args(argv))
    lists = {f.name: f.default_factory() for f in dataclasses.fields(cls) if ns[f.name] is None and
             f.default_factory is not dataclasses.MISSING}
    args = cls(**{**ns, **lists})
    # One validation pass before any model is built: every field's own check, then the devices.
    for f in dataclasses.fields(cls):
        value, check = getattr(args, f.name), f.metadata.get("check")
        problem = check(value) if check else None
        if isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number"
        if problem:
            name = "" if f.metadata.get("positional") else f"--{f.name.replace('_', '-')} "
            raise UsageError(f"{name}{value}: {problem}")
    if getattr(args, "dtype", "auto") == "bfloat16" and getattr(args, "device", "cuda") in ("cpu", "auto"):
        import torch
        if args.device == "cpu" or not torch.cuda.is_available():
            raise UsageError("--dtype bfloat16: bf16 autocast runs on CUDA only here; "
                             "the CPU trains in float32")
    if getattr(args, "out", None):
        _OUT[:] = [args.out]
    return args


def arg(default, help: str, check=None, positional: bool = False):
    """A dataclass field with a help string and an optional check (see `positive` and its siblings):
    `lr: float = arg(1e-3, "peak learning rate", positive)`. A `positional` list field takes the
    command's positional arguments (one or more): `checkpoints: list = arg([], "...", positional=True)`."""
    meta = {"help": help, "check": check, "positional": positional}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------
# The optimizer and schedule the AdamW stages share


def adamw(model, lr: float, weight_decay: float, device: str):
    """AdamW with weight decay on matrices and embeddings only (not on biases and LayerNorm gains)."""
    import torch
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=str(device).startswith("cuda"))


def warmup_cosine(step: int, lr: float, warmup_steps: int, max_steps: int, final: float = 0.1) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to lr * `final` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    """Prints `step 00050 | key value | ...` and appends {"step": 50, ...} to out/metrics.jsonl."""

    def __init__(self, out_dir: str, first_step: int = 0):
        """A fresh run (first_step 0) starts an empty metrics.jsonl; a resumed one keeps the rows before its
        first step and drops those that the interrupted run logged after its last checkpoint."""
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        kept = []
        if first_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if _step_of(line) < first_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self.t0 = time.time()

    def __call__(self, step: int, print_line=True, **metrics):
        # int tensors stay ints
        metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if print_line:
            parts = [f"step {step:05d}"] + [f"{k} {fmt(v)}" for k, v in metrics.items()]
            print(" | ".join(parts), flush=True)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: drop it


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def peak_memory_mb(device="cpu") -> float:
    """Peak memory of this process: GPU memory allocated by torch on CUDA, else the peak resident set
    size (which includes Python and torch themselves, a few hundred MB)."""
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM, the peak resident size of this process image. Not ru_maxrss: Linux carries that over from
    # the parent across fork and exec, so a script launched by a large process would report the parent's.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
