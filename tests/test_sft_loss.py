"""Tests of `sft_loss` in train_sft.py.

Checks: the loss against a float64 loop over tokens and against F.cross_entropy on the selected
tokens; a float64 gradient check; masked positions get exactly zero gradient and do not change the
loss; the EOS target counts (changing only the logits at the EOS position changes the loss).

Run: python -m pytest -q tests/test_sft_loss.py
"""

import math

import torch
import torch.nn.functional as F

from train_sft import sft_loss, sft_stats


def reference_sft_loss(logits, targets, mask):
    """Token-level mean NLL, one token at a time in float64."""
    total, count = 0.0, 0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                row = [float(x) for x in logits[b, t]]
                top = max(row)
                log_z = top + math.log(sum(math.exp(x - top) for x in row))
                total += log_z - row[int(targets[b, t])]
                count += 1
    return total / count


def make_batch(B=3, T=7, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2.0
    targets = torch.randint(0, V, (B, T), generator=g)
    # Response masks of different lengths starting after prompts of different lengths.
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0, 2:7] = 1
    mask[1, 4:6] = 1
    mask[2, 1:2] = 1
    return logits, targets, mask


def test_matches_float64_loop():
    logits, targets, mask = make_batch()
    got = sft_loss(logits, targets, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - reference_sft_loss(logits, targets, mask)) < 1e-5


def test_matches_cross_entropy_on_selected_tokens():
    logits, targets, mask = make_batch(seed=1)
    sel = mask.bool()
    expected = F.cross_entropy(logits[sel], targets[sel])  # pooled over the batch's tokens
    torch.testing.assert_close(sft_loss(logits, targets, mask), expected)


def test_targets_at_masked_positions_are_ignored():
    logits, targets, mask = make_batch(seed=2)
    garbage = torch.where(mask.bool(), targets, torch.full_like(targets, -1))  # -1 is not a valid id
    torch.testing.assert_close(sft_loss(logits, garbage, mask), sft_loss(logits, targets, mask))


def test_does_not_mutate_inputs():
    logits, targets, mask = make_batch(seed=3)
    copies = [x.clone() for x in (logits, targets, mask)]
    sft_loss(logits, targets, mask)
    for x, c in zip((logits, targets, mask), copies):
        assert torch.equal(x, c)


def test_gradcheck():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    assert torch.autograd.gradcheck(lambda z: sft_loss(z, targets, mask), (logits,))


def test_masked_positions_get_zero_gradient():
    logits, targets, mask = make_batch(seed=5)
    logits.requires_grad_(True)
    sft_loss(logits, targets, mask).backward()
    masked = ~mask.bool()
    assert torch.all(logits.grad[masked] == 0)
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    # and changing the logits there leaves the loss unchanged
    perturbed = logits.detach().clone()
    perturbed[masked] += 5.0 * torch.randn_like(perturbed[masked])
    torch.testing.assert_close(sft_loss(perturbed, targets, mask), sft_loss(logits.detach(), targets, mask))


def test_eos_target_counts():
    eos = 10
    logits, targets, mask = make_batch(seed=6)
    targets = targets.clone()
    targets[0, 6] = eos  # the last response token of row 0 is EOS, and mask[0, 6] = 1
    base = sft_loss(logits, targets, mask)
    changed = logits.clone()
    changed[0, 6, eos] += 3.0  # only the logits at the EOS position
    assert sft_loss(changed, targets, mask) < base - 1e-3


def test_empty_mask_gives_zero_with_grad():
    logits, targets, mask = make_batch(seed=7)
    logits.requires_grad_(True)
    loss = sft_loss(logits, targets, torch.zeros_like(mask))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_stats_count_the_masked_tokens_and_their_argmax_hits():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])  # argmax 0, 1, 2
    targets = torch.tensor([[0, 2, 2]])
    s = sft_stats(logits, targets, torch.tensor([[0, 1, 1]]))  # position 0 is prompt: not counted
    assert s["tokens"].item() == 2 and s["token_acc"].item() == 0.5
    assert sft_stats(logits, targets, torch.zeros(1, 3))["token_acc"].item() == 0.0  # no tokens: 0, not NaN


def test_packed_batch_is_the_padded_batch():
    """train_sft packs demonstrations end to end (data.packed_sft_batch, GPT(doc_ids=...)); in float64
    its loss and every parameter's gradient equal those of the right-padded batch (data.sft_batch)."""
    from minirlhf.data import packed_sft_batch, sft_batch
    from minirlhf.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=17, n_layer=2, n_head=2, n_embd=16)).double()
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 2), (7, 5), (1, 1), (12, 9), (4, 20), (2, 3), (30, 4)]  # (prompt, response); some cut
    prompts = [torch.randint(1, 17, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(1, 17, (r,), generator=g).tolist() + [0] for _, r in lengths]

    def loss_and_grads(logits_of):
        model.zero_grad()
        loss = logits_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    tokens, attn, mask, _ = sft_batch(prompts, responses, 0, 24)
    padded = loss_and_grads(lambda: sft_loss(model(tokens[:, :-1]), tokens[:, 1:], mask[:, 1:]))
    inputs, targets, pmask, docs = packed_sft_batch(prompts, responses, 0, 24)
    assert inputs.shape[0] < len(lengths) and inputs.shape[1] == 24   # fewer rows than demonstrations
    assert pmask.sum() == mask[:, 1:].sum() and docs.max() == len(lengths) - 1
    packed = loss_and_grads(lambda: sft_loss(model(inputs, doc_ids=docs), targets, pmask))
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(packed[1], padded[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_packed_batch_keeps_the_tool_mask():
    """A response's tool tokens (mask 0 from data.tool_mask) stay out of the packed loss mask."""
    from minirlhf.data import packed_sft_batch
    prompts, responses = [[5, 6, 7], [8, 9]], [[1, 2, 3, 4, 0], [3, 3, 0]]
    masks = [[1, 0, 0, 1, 1], [1, 1, 1]]  # the first response's tokens 2, 3 are a tool's output
    inputs, targets, mask, docs = packed_sft_batch(prompts, responses, 0, 16, masks)
    assert inputs.shape == (1, 16)
    assert targets[0, :6].tolist() == [6, 7, 1, 2, 3, 4] and mask[0, :6].tolist() == [0, 0, 1, 0, 0, 1]
    assert mask[0, 6:11].tolist() == [1, 0, 1, 1, 1] and docs[0, :11].tolist() == [0] * 7 + [1] * 4
