"""Data parallelism over torchrun: the one file that knows about ranks.

    torchrun --standalone --nproc_per_node N train_sft.py ...     # N processes (gloo on CPUs, nccl on GPUs)

Each of the W processes (ranks) draws the same global batch of --batch-size rows and takes its slice
(`shard`); what trains is wrapped in DistributedDataParallel (`wrap`), whose backward averages the
gradients over the ranks, so every rank takes the same optimizer step. Losses, whitening and logged
metrics are over the global batch (`batch_mean`, `batch_stats`, `gather`). Rank 0 alone prints, logs,
evaluates and writes. Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) there is one process
and no process group, and every function here returns its input: a script runs exactly as before.
"""

import atexit
import os
import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from minirlhf import checkpoint
from minirlhf.cli import require

RANK = int(os.environ.get("RANK", 0))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
is_main = RANK == 0
tqdm_disable = None if is_main else True  # tqdm(disable=...): a bar on rank 0's terminal only
_device = "cpu"


def skip(*args, **kwargs):
    """What the other ranks do instead of rank 0's work: `log = Log(...) if dist.is_main else dist.skip`."""


def init(device: str) -> str:
    """Join torchrun's process group (nccl on CUDA, gloo otherwise) -> this rank's device: "cuda" (or any
    cuda:N) becomes cuda:LOCAL_RANK. Ranks other than 0 print nothing (stdout goes to /dev/null; errors
    still reach stderr). Without torchrun: `device`, unchanged."""
    global _device
    if "RANK" not in os.environ:
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{LOCAL_RANK}"
        torch.cuda.set_device(device)
    hook = sys.excepthook
    tdist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    sys.excepthook = hook  # torch's own buffers stderr, and loses the one-line errors of cli's, which exit
    atexit.register(shutdown)  # also after an error: the other ranks see the group close and stop
    if not is_main:
        sys.stdout = open(os.devnull, "w")
    _device = device
    return device


def shutdown():
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier():
    """Wait here for every rank (where rank 0 has work the others must not run ahead of)."""
    if WORLD_SIZE > 1:
        tdist.barrier()


def split(n: int, flag: str) -> int:
    """A rank's share n / W of a global count; a one-line error (exit status 2) if W does not divide n."""
    require(n % WORLD_SIZE == 0, f"{flag} {n} does not split over {WORLD_SIZE} processes: "
            f"use a multiple of {WORLD_SIZE}")
    return n // WORLD_SIZE


def shard(rows):
    """This rank's contiguous slice of a global batch (a list, or a tensor's rows), rank 0's first."""
    n = len(rows)
    return rows[RANK * n // WORLD_SIZE:(RANK + 1) * n // WORLD_SIZE]


def wrap(model):
    """DistributedDataParallel(model) under torchrun, the model itself otherwise. Train through what this
    returns; sample, evaluate and save `model` itself (DDP adds nothing there)."""
    if WORLD_SIZE == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[LOCAL_RANK] if "cuda" in _device
                                                     else None)


def all_reduce(x):
    """The sum over ranks of a tensor (a copy; `x` is left as it is)."""
    x = torch.as_tensor(x, device=_device).clone()
    if WORLD_SIZE > 1:
        tdist.all_reduce(x)
    return x


def rank_share(loss, count, total, world_size: int):
    """A rank's mean `loss` over its `count` items -> what it backpropagates so that DDP's gradient is the
    gradient of the mean over all `total` items of the global batch.

    Rank r holds S_r / n_r, with S_r the sum of its n_r items' losses; the global batch's mean is S / N,
    S = sum_r S_r and N = sum_r n_r. DDP averages the W ranks' gradients, so rank r returns

        L_r = W * (n_r / N) * (S_r / n_r) = W * S_r / N,    and then    (1 / W) * sum_r L_r = S / N.

    Normalising by its own n_r instead would weigh an item by how many others share its rank.
    """
    count, total = (torch.as_tensor(n, dtype=torch.float64) for n in (count, total))
    return loss * (world_size * count / total).to(loss.dtype)


def batch_mean(loss, count):
    """This rank's mean `loss` over its `count` items (tokens, pairs, prompts) -> the global batch's mean.

    The value returned is S / N, the same on every rank (what the log and `check_finite` read); its
    gradient is that of `rank_share`, W * S_r / N. One all-reduce, of (S_r, n_r)."""
    if WORLD_SIZE == 1:
        return loss
    count = torch.as_tensor(count, dtype=torch.float64, device=loss.device)
    s, n = all_reduce(torch.stack([loss.detach().double() * count, count])).unbind()
    share = rank_share(loss, count, n.clamp(min=1), WORLD_SIZE)
    return share + (s / n.clamp(min=1) - share).detach().to(loss.dtype)


def batch_stats(stats: dict, weight, sums=()) -> dict:
    """The global batch's value of each statistic: a rank's mean x_r over its `weight` w_r items becomes
    sum_r w_r x_r / sum_r w_r; those named in `sums` (counts) are summed. One all-reduce."""
    if WORLD_SIZE == 1:
        return stats
    w = torch.as_tensor(weight, dtype=torch.float64, device=_device)
    x = [torch.as_tensor(v, dtype=torch.float64, device=_device) for v in stats.values()]
    x = all_reduce(torch.stack([v if k in sums else torch.where(w > 0, v * w, 0) for k, v in zip(stats, x)]
                               + [w]))
    return {k: (v if k in sums else v / x[-1].clamp(min=1)).to(torch.as_tensor(stats[k]).dtype)
            for k, v in zip(stats, x)}


def gather(x):
    """Every rank's rows of `x`, rank 0's first: (B_r, ...) -> (W * B_r, ...), the global batch in the order
    one process holds it (ranks hold equal rows). Dimensions after the first are right-padded with zeros
    to their largest size over the ranks (a (B, T) batch's T differs by rank): pass the mask along."""
    if WORLD_SIZE == 1:
        return x
    x = x.detach()
    if x.dim() > 1:
        size = torch.tensor(x.shape[1:], device=x.device)
        tdist.all_reduce(size, tdist.ReduceOp.MAX)
        x = F.pad(x, [p for d in range(x.dim() - 1, 0, -1) for p in (0, int(size[d - 1]) - x.size(d))])
    parts = [torch.empty_like(x) for _ in range(WORLD_SIZE)]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_list(rows):
    """Every rank's list (or tensor rows, any number per rank) concatenated in rank order."""
    if WORLD_SIZE == 1:
        return rows
    parts = [None] * WORLD_SIZE
    tdist.all_gather_object(parts, rows)
    return torch.cat(parts) if torch.is_tensor(rows) else [r for part in parts for r in part]


# ----------------------------------------------------------------------------------------------------
# --resume under torchrun: every rank restores the same resume.pt, each its own sampling generator


def save_resume(out_dir, model, tokenizer, args, step, state: dict, **values):
    """checkpoint.save_resume, written by rank 0 with every rank's state of the torch.Generators in `state`
    (each rank samples with its own); the other ranks wait."""
    rank_generators = {k: gather_list([g.get_state()]) for k, g in state.items()
                       if isinstance(g, torch.Generator)}
    if is_main:
        checkpoint.save_resume(out_dir, model, tokenizer, args, step, state, rank_generators=rank_generators,
                               **values)
    barrier()


def resume_or_start(args, model, state: dict):
    """checkpoint.resume_or_start on every rank: rank 0 first, alone taking --out's run.lock (it holds it
    for the whole job) and making the checks; then the others restore the same file. Each rank's
    torch.Generators get their own state back, so a resumed run samples what an unbroken one would."""
    failure = [None]
    if is_main:
        try:
            start, values = checkpoint.resume_or_start(args, model, state)
        except checkpoint.CheckpointError as e:
            failure = [e]
    if WORLD_SIZE > 1:
        tdist.broadcast_object_list(failure)  # a failed check stops every rank with the same one line
    if failure[0]:
        raise failure[0]
    if not is_main:
        start, values = checkpoint.resume_or_start(args, model, state, lock=False)  # rank 0's lock holds
    for name, states in values.pop("rank_generators", {}).items():
        require(len(states) == WORLD_SIZE, f"{args.out}: the run was saved by {len(states)} process(es), "
                f"each sampling with its own generator: resume it with --nproc_per_node {len(states)}")
        state[name].set_state(states[RANK])
    return start, values
