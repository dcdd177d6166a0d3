"""Plumbing every stage script shares: command-line arguments from an `Args` dataclass, and the log.

Each script declares its hyperparameters once, as a dataclass whose fields carry their defaults and a
docstring-style comment; `parse_args` turns the fields into `--kebab-case` flags. The log writes one
greppable line per step (`step 00050 | loss 1.2345 | ...`) and the same numbers to `metrics.jsonl`.
"""

import argparse
import dataclasses
import json
import os
import time


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass's fields and return an instance of it.

    bool fields become --flag / --no-flag; list fields are repeatable flags (given ones replace the default).
    """
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0])
    types = {"int": int, "float": float, "str": str, "bool": bool, "list": list}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = types.get(f.type, f.type) if isinstance(f.type, str) else f.type
        help_ = f.metadata.get("help", "")
        if typ is bool:
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=help_)
        elif typ is list:
            parser.add_argument(flag, default=None, action="append", help=f"{help_} (repeatable)")
        else:
            parser.add_argument(flag, default=f.default, type=typ, help=f"{help_} (default: {f.default})")
    ns = vars(parser.parse_args(argv))
    lists = {f.name: f.default_factory() for f in dataclasses.fields(cls) if ns[f.name] is None and
             f.default_factory is not dataclasses.MISSING}
    return cls(**{**ns, **lists})


def arg(default, help: str):
    """A dataclass field with a help string: `lr: float = arg(1e-3, "peak learning rate")`."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class Log:
    """Prints `step 00050 | key value | ...` and appends {"step": 50, ...} to out/metrics.jsonl."""

    def __init__(self, out_dir: str, resume: bool = False):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        self.t0 = time.time()

    def __call__(self, step: int, print_line=True, **metrics):
        metrics = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if print_line:
            parts = [f"step {step:05d}"] + [f"{k} {fmt(v)}" for k, v in metrics.items()]
            print(" | ".join(parts), flush=True)


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
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
