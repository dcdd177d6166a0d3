"""Tests of data parallelism (minirlhf/dist.py): N processes under torchrun give the result of one.

- The arithmetic, in float64 and without processes: each rank's token mean (SFT) or pair mean (DPO),
  rescaled by `dist.rank_share` with the global count, averages over the ranks (as DDP averages
  gradients) to the full batch's mean, in value and gradient; normalising by the rank's own count does
  not. Without torchrun every helper hands its input back untouched.
- SFT, RM and DPO under `torchrun --nproc_per_node 2` (gloo, one thread each) end with the weights of
  one process given the same arguments, to float32 rounding; so does RRHF on candidates read from a
  file (nothing sampled, so nothing depends on the ranks' generators).
- PPO and GRPO, which sample with a generator per rank, run under 2 processes and write one checkpoint
  with extra.world_size == 2 and one metrics.jsonl; a --batch-size 2 processes cannot split is a
  one-line error.

    python -m pytest -q tests/test_dist.py       # about 60 s on 2 CPU cores (torchrun: ~5 s a launch)
"""

import json
import os
import random

import pytest
import torch

from conftest import TINY_RM, TINY_SFT, run_script
from minirlhf import dist, task
from minirlhf.checkpoint import load_checkpoint
from minirlhf.data import write_jsonl
from train_dpo import dpo_loss
from train_sft import sft_loss

F64 = torch.float64
ONE_THREAD = ["--threads", "1", "--seed", "0"]


def torchrun(script, *flags, check=True):
    """`torchrun --standalone --nproc_per_node 2 script flags...` from the repository root."""
    return run_script("-m torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *flags,
                      check=check)


def weight_diff(a, b, skip=()):
    """The largest |difference| between two checkpoints' weights, over the tensors not in `skip`."""
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa if k not in skip)


def logged(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def one_vs_two(script, flags, tmp_path, one=None):
    """Run `script` as one process (unless `one` is that run already) and as two (torchrun)
    -> (out of one, out of two)."""
    two = str(tmp_path / "two")
    if one is None:
        one = str(tmp_path / "one")
        run_script(script, *flags, *ONE_THREAD, "--out", one)
    torchrun(script, *flags, *ONE_THREAD, "--out", two)
    assert [load_checkpoint(out)["extra"]["world_size"] for out in (one, two)] == [1, 2]
    assert len(logged(one)) == len(logged(two))  # rank 0 alone logs
    for a, b in zip(logged(one), logged(two)):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    return one, two


@pytest.fixture(scope="module")
def ranked_file(tmp_path_factory):
    """16 prompts with 3 fixed, distinct responses each, ranked: DPO's and RRHF's data, nothing sampled."""
    prompts = task.train_prompts()[:16]
    records = [{"prompt": p, "responses": [task.demonstration(p, random.Random(i)), "I do not know.", "No."],
                "ranks": [0, 1, 2]} for i, p in enumerate(prompts)]
    path = tmp_path_factory.mktemp("data") / "ranked.jsonl"
    write_jsonl(str(path), records)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# The arithmetic, without processes


def split_rows(n_rows, sizes):
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    assert bounds[-1] == n_rows
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def test_rank_share_of_token_means_is_the_full_batch_mean():
    """3 ranks of 2 sequences each with 9, 3 and 5 response tokens: sum_r rank_share / W is sft_loss of
    the whole batch, value and gradient; the mean of the ranks' own token means is not."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 11, dtype=F64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (6, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    W, parts = 3, split_rows(6, [2, 2, 2])
    counts = [mask[r].sum() for r in parts]
    assert [c.item() for c in counts] == [9, 3, 5]
    full = sft_loss(logits, targets, mask)
    (full_grad,) = torch.autograd.grad(full, logits)

    shares = [dist.rank_share(sft_loss(logits[r], targets[r], mask[r]), n, sum(counts), W)
              for r, n in zip(parts, counts)]
    # DDP: every rank backpropagates its own share, and the gradients are averaged over the W ranks
    grad = sum(torch.autograd.grad(s, logits)[0] for s in shares) / W
    assert abs(sum(shares).item() / W - full.item()) < 1e-12
    assert torch.allclose(grad, full_grad, rtol=0, atol=1e-12)
    own = sum(sft_loss(logits[r], targets[r], mask[r]) for r in parts) / W
    assert abs(own.item() - full.item()) > 1e-3  # a rank's own count weighs its tokens wrongly


def test_rank_share_of_pair_means_is_the_full_batch_mean():
    """DPO's pairs fall unevenly on the ranks (3, 1 and 2 pairs): the same arithmetic, a mean over pairs."""
    g = torch.Generator().manual_seed(1)
    lp_c, lp_r, ref_c, ref_r = (torch.randn(6, dtype=F64, generator=g) * 3 for _ in range(4))
    lp_c.requires_grad_(True)
    W, parts = 3, split_rows(6, [3, 1, 2])
    full = dpo_loss(lp_c, lp_r, ref_c, ref_r, 0.3)
    (full_grad,) = torch.autograd.grad(full, lp_c)
    shares = [dist.rank_share(dpo_loss(lp_c[r], lp_r[r], ref_c[r], ref_r[r], 0.3), r.stop - r.start, 6, W)
              for r in parts]
    assert abs(sum(shares).item() / W - full.item()) < 1e-12
    grad = sum(torch.autograd.grad(s, lp_c)[0] for s in shares) / W
    assert torch.allclose(grad, full_grad, rtol=0, atol=1e-12)


def test_one_process_helpers_hand_back_their_input():
    """Without torchrun (this process) nothing is rescaled, gathered or split: bit-for-bit as before."""
    assert dist.WORLD_SIZE == 1 and dist.is_main
    x, stats, rows = torch.randn(3, 4), {"acc": torch.tensor(0.5)}, [1, 2, 3]
    assert dist.batch_mean(x, 7) is x and dist.gather(x) is x and dist.batch_stats(stats, 4) is stats
    assert dist.shard(rows) == rows and dist.gather_list(rows) is rows and dist.split(6, "--batch-size") == 6
    assert dist.wrap(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


# ----------------------------------------------------------------------------------------------------
# One process against two


def test_sft_two_processes_same_weights(tiny_chain, tmp_path):
    """Against the session's tiny SFT run (one process, the same flags): 3 steps of 32 sequences."""
    one, two = one_vs_two("train_sft.py", TINY_SFT, tmp_path, one=tiny_chain["sft"])
    # measured: 1.7e-6 on one coordinate of h.0.mlp.c_fc, at most 1e-7 elsewhere (each rank packs its own
    # slice into rows, so the sums run in another order; where a gradient is near 0, Adam's normalised
    # step turns that rounding into a visible difference)
    assert weight_diff(one, two) < 1e-5


def test_rm_two_processes_same_weights(tiny_chain, tmp_path):
    """Against the session's tiny reward model (one process, the same flags): 2 steps of 4 prompts."""
    flags = ["--init", tiny_chain["sft"], *TINY_RM]
    one, two = one_vs_two("train_rm.py", flags, tmp_path, one=tiny_chain["rm"])
    # The ranking loss sees differences of rewards only, so the head's bias and the last LayerNorm's bias
    # (which shift every reward alike) have a gradient of exactly 0: what they get is rounding, which Adam
    # scales up to steps of about lr, in either run. Measured: 8.6e-8 on the other weights; 5.7e-6 and
    # 2.3e-6 on those two.
    assert weight_diff(one, two, skip=("head.bias", "gpt.transformer.ln_f.bias")) < 1e-6
    assert weight_diff(one, two) < 2 * 3e-4  # those two: at most about lr (3e-4) per step, 2 steps
    made = [open(os.path.join(out, "comparisons.jsonl")).read() for out in (one, two)]
    assert made[0] == made[1]  # every rank sampled the same candidates, as the one process did


def test_dpo_two_processes_same_weights(tiny_chain, ranked_file, tmp_path):
    flags = ["--init", tiny_chain["sft"], "--data", ranked_file, "--max-steps", "3", "--batch-size", "4",
             "--max-new-tokens", "8", "--eval-prompts", "0"]
    one, two = one_vs_two("train_dpo.py", flags, tmp_path)
    assert weight_diff(one, two) < 1e-6  # measured: 2.0e-8


def test_rrhf_on_file_candidates_two_processes_same_weights(tiny_chain, ranked_file, tmp_path):
    """Every candidate from the file (K = 3, --k 3): each rank scores its share of the pool, all hold all."""
    flags = ["--init", tiny_chain["sft"], "--reward-model", tiny_chain["rm"], "--data", ranked_file,
             "--k", "3", "--n-prompts", "8", "--max-steps", "3", "--batch-size", "4", "--max-new-tokens", "8",
             "--eval-prompts", "0"]
    one, two = one_vs_two("train_rrhf.py", flags, tmp_path)
    assert weight_diff(one, two) < 1e-6  # measured: 1.8e-8


# ----------------------------------------------------------------------------------------------------
# The sampling stages under two processes


@pytest.mark.parametrize("script,flags", [
    ("train_ppo.py", ["--batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "1"]),
    ("train_grpo.py", ["--batch-size", "2", "--minibatch-size", "2", "--group-size", "2",
                       "--monitor-prompts", "4"]),
])
def test_sampling_stages_write_one_checkpoint(tiny_chain, tmp_path, script, flags):
    out = tmp_path / "out"
    torchrun(script, "--init", tiny_chain["sft"], "--reward-model", tiny_chain["rm"], *flags,
             "--max-steps", "2", "--max-new-tokens", "8", "--eval-prompts", "0", *ONE_THREAD, "--out", out)
    assert load_checkpoint(str(out))["extra"]["world_size"] == 2
    assert [r["step"] for r in logged(out)] == [0, 1]  # one row per step: rank 0's
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]  # no resume.pt, no lock left


def test_batch_that_does_not_split_is_an_error(tmp_path):
    proc = torchrun("train_sft.py", *TINY_SFT, "--batch-size", "7", "--out", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert ("train_sft.py: error: --batch-size 7 does not split over 2 processes: use a multiple of 2"
            in proc.stderr)
