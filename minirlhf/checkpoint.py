"""Self-describing checkpoints: `out/<stage>/ckpt.pt` holds everything needed to rebuild the model.

Contents (plain dicts, lists, numbers, strings and tensors only):
  kind       "lm" (a GPT) or "scalar" (a GPT trunk + scalar head: reward model, critic)
  config     the GPTConfig as a dict
  tokenizer  the encoding's name ("bytes" or "gpt2")
  tokenizer_ranks  for "gpt2": GPT-2's BPE ranks, the bytes of a .tiktoken file (0.8 MB), so that every
             later stage rebuilds the tokenizer offline: `enc = tokenizer.load_tokenizer(ck)` (why inside
             the checkpoint and not beside it: see `tokenizer.checkpoint_fields`)
  args       the command-line arguments of the run that wrote it
  step       the optimisation step
  model      the state dict
  extra      stage-specific data (reward statistics, resume state, ...)

Writes are atomic: the file is written beside its final name, flushed to disk, then renamed over it,
so a run killed at any moment leaves either the old checkpoint or the new one, never half of one.
Loading uses `torch.load(..., weights_only=True)`: a checkpoint cannot run code when it is opened.

Resuming. While a stage trains, it writes `out/<stage>/resume.pt` every `--ckpt-interval` steps: a
checkpoint of the model like `ckpt.pt` (so `load_model` reads it too), whose `extra["resume"]` holds the
rest of the run's state: optimizers, random generators, and the stage's own values (PPO's critic and KL
coefficient, the RM's epoch order). `--resume` restores all of it, so a run stopped at any moment and
resumed ends with the same weights, bit for bit on the CPU, as a run never stopped. A run is defined by its
arguments: resuming with different ones is refused, and so is starting a fresh run over an unfinished
one's resume.pt (it would be overwritten). A finished run deletes its resume.pt: ckpt.pt is the result.
"""

import atexit
import contextlib
import dataclasses
import glob
import os
import pickle
import random
from dataclasses import asdict

import torch

from minirlhf.model import GPT, GPTConfig, ScalarHead
from minirlhf.tokenizer import checkpoint_fields

CKPT_NAME = "ckpt.pt"
RESUME_NAME = "resume.pt"
KINDS = {"lm": "a language model (a policy: train_sft.py, or an RL stage such as train_ppo.py)",
         "scalar": "a reward model (train_rm.py)"}


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
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # the half-written file of a run killed mid-save
        os.remove(stale)
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


def save_checkpoint(out_dir: str, model, tokenizer: str, args: dict, step: int, extra: dict | None = None,
                    name: str = CKPT_NAME):
    """Write `out_dir/ckpt.pt` (or `out_dir/name`) for a GPT or a ScalarHead. `tokenizer` is the encoding's
    name; for "gpt2" the ranks of the GPT-2 encoding this process built are stored with it."""
    kind = "scalar" if isinstance(model, ScalarHead) else "lm"
    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = dict(kind=kind, config=asdict(config), **checkpoint_fields(tokenizer), args=dict(args),
               step=int(step), model=state, extra=extra or {})
    path = os.path.join(out_dir, name)
    atomic_save(obj, path)
    return path


ZIP_MAGIC = b"PK\x03\x04"  # what torch.save writes: a zip archive of a pickle and the tensors' bytes
PICKLE_MAGIC = b"\x80"     # a pickle's PROTO opcode: torch's legacy format, or a bare pickle


def safe_load(path: str, mmap: bool = False):
    """torch.load with weights_only=True; any failure becomes a CheckpointError that names the file.

    With `mmap` the tensors stay on disk until read: a cheap look at a checkpoint's config and kind."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    # A file that is neither of torch's formats would reach the unpickler as garbage and be refused as
    # "unsafe": say what it is instead, and keep that word for a real pickle that holds code.
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        what = "an empty file" if not head else f"its first bytes are {head!r}"
        raise CheckpointError(f"{path}: not a torch checkpoint: neither a zip archive (what torch.save "
                              f"writes) nor a pickle; {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head == ZIP_MAGIC)
    except pickle.UnpicklingError as e:
        # weights_only refuses any object that is not plain data: a crafted pickle stops here
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                              f"data, which could run code when unpickled ({reason.strip()})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint, it is truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_checkpoint(path: str, kind: str | None = None, mmap: bool = False) -> dict:
    """The checkpoint's dict, checked to be one of ours; `kind` ("lm" or "scalar"), when given, is the
    kind the caller needs: another one is refused. `mmap`: see `safe_load`."""
    path = ckpt_path(path)
    ckpt = safe_load(path, mmap)
    for key in ("kind", "config", "tokenizer", "model"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise CheckpointError(f"{path}: not a minirlhf checkpoint (no {key!r})")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: {KINDS.get(ckpt['kind'], repr(ckpt['kind']))}, where {KINDS[kind]} "
                              "is needed")
    return ckpt


def build_model(ckpt: dict):
    """The module a checkpoint describes, with its weights loaded."""
    gpt = GPT(GPTConfig(**ckpt["config"]))
    model = ScalarHead(gpt) if ckpt["kind"] == "scalar" else gpt
    model.load_state_dict(ckpt["model"])
    return model


def load_model(path: str, device="cpu", kind: str | None = None):
    """(model, ckpt) from a checkpoint folder or file; the model is on `device` in eval mode.
    `kind` ("lm" or "scalar"), when given, is the kind the caller needs: another one is refused."""
    ckpt = load_checkpoint(path, kind)
    try:
        model = build_model(ckpt)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{ckpt_path(path)}: weights do not match the stored config "
                              f"({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------
# Resuming a run


def _state_of(obj):
    if isinstance(obj, random.Random):
        return obj.getstate()  # a tuple of ints: plain data, which weights_only loads
    if isinstance(obj, torch.Generator):
        return obj.get_state()  # a uint8 tensor, also for a CUDA generator
    return obj.state_dict()  # a module or an optimizer


def _restore(obj, state):
    if isinstance(obj, random.Random):
        obj.setstate(state)
    elif isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


def save_resume(out_dir: str, model, tokenizer: str, args, step: int, state: dict, **values):
    """Write `out_dir/resume.pt`: `model` as a checkpoint at `step` (the number of steps done), plus the
    states of the objects in `state` (name -> optimizer, module, torch.Generator or random.Random), the
    global torch and Python RNGs, and plain `values` (numbers, lists), which `resume_or_start` returns."""
    resume = {name: _state_of(obj) for name, obj in state.items()}
    resume["torch_rng"] = torch.get_rng_state()
    resume["python_rng"] = random.getstate()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        resume["cuda_rng"] = torch.cuda.get_rng_state_all()
    args = asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    save_checkpoint(out_dir, model, tokenizer, args, step, {**values, "resume": resume}, name=RESUME_NAME)


# Arguments that may change when a run resumes: they do not change what it computes. (--overwrite only says
# what to do with a finished run in --out: pipeline.py starts a stage with it and resumes it without.)
RESUMABLE_CHANGES = ("resume", "overwrite", "ckpt_interval", "out")


def resume_or_start(args, model, state: dict, lock: bool = True) -> tuple[int, dict]:
    """-> (the step to start at, the values saved with `save_resume`).

    A fresh run (args.resume false) starts at 0 with no values, unless `args.out` holds an unfinished
    run's resume.pt: that is refused rather than overwritten. With --resume, `model` and every object in
    `state` are restored in place from args.out/resume.pt, after checking that the run had the same arguments.
    `lock`: take args.out's run.lock first (`take_lock`); under torchrun rank 0's lock stands for all ranks.
    """
    path = os.path.join(args.out, RESUME_NAME)
    if lock:
        take_lock(args.out)
    if not args.resume and not getattr(args, "overwrite", False) and os.path.exists(ckpt_path(args.out)):
        raise CheckpointError(f"{ckpt_path(args.out)}: a finished run is saved here; pass --overwrite to "
                              "replace it, or choose another --out")
    if not args.resume:
        if os.path.exists(path):
            raise CheckpointError(f"{path}: an unfinished run is saved here; pass --resume to continue it, "
                                  "or delete the file (or choose another --out) to start a new one")
        return 0, {}
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file, nothing to resume "
                              f"(a finished run deletes it; --out {args.out}?)")
    ckpt = load_checkpoint(path)
    now = asdict(args)
    changed = [k for k in now if k not in RESUMABLE_CHANGES and ckpt["args"].get(k) != now[k]]
    if changed:
        raise CheckpointError(f"{path}: cannot resume with other arguments than the run's: " + ", ".join(
            f"--{k.replace('_', '-')} was {ckpt['args'].get(k)!r}, now {now[k]!r}" for k in changed))
    try:
        resume = ckpt["extra"]["resume"]
        model.load_state_dict(ckpt["model"])
        for name, obj in state.items():
            _restore(obj, resume[name])
        torch.set_rng_state(resume["torch_rng"])
        random.setstate(resume["python_rng"])
        if "cuda_rng" in resume:
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a resume state of this run ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    values = {k: v for k, v in ckpt["extra"].items() if k != "resume"}
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], values


LOCK_NAME = "run.lock"


def take_lock(out_dir: str):
    """Claim `out_dir` for this process: `out_dir/run.lock` holds its pid until it exits.

    Two runs writing one folder would interleave their metrics.jsonl and race on resume.pt; the second
    is refused while the first is alive. A lock left by a process that died (SIGKILL, a power cut) names
    a pid that no longer runs, and is taken over.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise CheckpointError(f"{path}: another run (pid {pid}) is writing to {out_dir}; "
                                      "wait for it, or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: os.path.exists(path) and open(path).read() == str(os.getpid())
                        and os.remove(path))
        return
    raise CheckpointError(f"{path}: could not take the lock on {out_dir}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_resume(out_dir: str):
    """The run is complete: ckpt.pt is its result, and nothing is left to resume."""
    path = os.path.join(out_dir, RESUME_NAME)
    if os.path.exists(path):
        os.remove(path)
