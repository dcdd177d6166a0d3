"""Self-describing checkpoints: `out/<stage>/ckpt.pt` holds everything needed to rebuild the model.

Contents (plain dicts, lists, numbers, strings and tensors only):
  kind       "lm" (a GPT) or "scalar" (a GPT trunk + scalar head: reward model, critic)
  config     the GPTConfig as a dict
  tokenizer  the encoding's name ("bytes" or "gpt2")
  args       the command-line arguments of the run that wrote it
  step       the optimisation step
  model      the state dict
  extra      stage-specific data (reward statistics, resume state, ...)

Writes are atomic: the file is written beside its final name, flushed to disk, then renamed over it,
so a run killed at any moment leaves either the old checkpoint or the new one, never half of one.
Loading uses `torch.load(..., weights_only=True)`: a checkpoint cannot run code when it is opened.
"""

import os
import pickle
from dataclasses import asdict

import torch

from minirlhf.model import GPT, GPTConfig, ScalarHead

CKPT_NAME = "ckpt.pt"


class CheckpointError(Exception):
    pass


def ckpt_path(path: str) -> str:
    """A checkpoint folder or file -> the file."""
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def atomic_save(obj, path: str):
    """torch.save to a temporary file in the same folder, fsync, rename into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str, model, tokenizer: str, args: dict, step: int, extra: dict | None = None):
    """Write `out_dir/ckpt.pt` for a GPT or a ScalarHead."""
    kind = "scalar" if isinstance(model, ScalarHead) else "lm"
    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = dict(kind=kind, config=asdict(config), tokenizer=tokenizer, args=dict(args), step=int(step),
               model=state, extra=extra or {})
    path = os.path.join(out_dir, CKPT_NAME)
    atomic_save(obj, path)
    return path


def safe_load(path: str):
    """torch.load with weights_only=True; any failure becomes a CheckpointError that names the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any object that is not plain data: a crafted pickle stops here
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                              f"data, which could run code when unpickled ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint, it is truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_checkpoint(path: str) -> dict:
    path = ckpt_path(path)
    ckpt = safe_load(path)
    for key in ("kind", "config", "tokenizer", "model"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise CheckpointError(f"{path}: not a minirlhf checkpoint (no {key!r})")
    return ckpt


def build_model(ckpt: dict):
    """The module a checkpoint describes, with its weights loaded."""
    gpt = GPT(GPTConfig(**ckpt["config"]))
    model = ScalarHead(gpt) if ckpt["kind"] == "scalar" else gpt
    model.load_state_dict(ckpt["model"])
    return model


def load_model(path: str, device="cpu"):
    """(model, ckpt) from a checkpoint folder or file; the model is on `device` in eval mode."""
    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{ckpt_path(path)}: weights do not match the stored config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt
