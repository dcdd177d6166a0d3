"""The GPT, its GPT-2 import and KV-cache sampling, each checked against a reference.

- GPT-2 import: logits equal Hugging Face transformers' for the tiny GPT-2 in ../shared/data (both key
  layouts, both file formats) within 1e-4; skipped where ../shared is absent.
- KV cache: incremental logits equal the full forward's; greedy with the cache equals greedy by
  repeated full forwards.
- Padding: a prompt's outputs do not depend on the left padding or on the other prompts of the batch.
- Sampling: a seed reproduces a sample; top_k=1 is greedy; EOS stops one row while others go on.

Run: python -m pytest -q tests/test_model.py
"""

import os

import numpy as np
import pytest
import torch

from minirlhf.data import left_pad  # the package's collation, tested in test_data.py
from minirlhf.model import GPT, GPTConfig, ScalarHead, generate, load_hf_gpt2, read_safetensors, sample_next


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


# ---- GPT-2 import --------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_gpt2_import_matches_transformers(shared_data, tmp_path, weights):
    src = os.path.join(shared_data, "tiny-gpt2")
    # one folder per file format, so each loader path is exercised on its own
    os.symlink(os.path.join(src, "config.json"), tmp_path / "config.json")
    os.symlink(os.path.join(src, weights), tmp_path / weights)
    model = load_hf_gpt2(str(tmp_path)).eval()
    idx = torch.from_numpy(np.load(os.path.join(src, "input_ids.npy")))
    expected = torch.from_numpy(np.load(os.path.join(src, "expected_logits.npy")))
    with torch.no_grad():
        logits = model(idx)[0]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_gpt2_import_detects_wrong_transpose(shared_data, tmp_path):
    """The test above can fail: loading without the Conv1D transpose gives different logits."""
    src = os.path.join(shared_data, "tiny-gpt2")
    sd = read_safetensors(os.path.join(src, "model.safetensors"))
    model = load_hf_gpt2(src).eval()
    w = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(w, sd["h.0.mlp.c_fc.weight"].t())
    with torch.no_grad():
        # the square attention projection loads either way round; only the transpose is right
        model.transformer.h[0].attn.c_proj.weight.copy_(sd["h.0.attn.c_proj.weight"])
        logits = model(torch.from_numpy(np.load(os.path.join(src, "input_ids.npy"))))[0]
    expected = torch.from_numpy(np.load(os.path.join(src, "expected_logits.npy")))
    assert (logits - expected).abs().max().item() > 1e-3


# ---- KV cache ------------------------------------------------------------------------------------

def test_incremental_logits_equal_full_forward():
    model = tiny()
    idx = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3, 20)
        steps = [model(idx[:, :8], None, cache)]
        for t in range(8, 20):
            steps.append(model(idx[:, t:t + 1], None, cache))
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() < 1e-5


def test_greedy_with_cache_equals_full_recompute():
    model = tiny(1)
    idx, mask = left_pad([[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]], 0)
    a = generate(model, idx, mask, 30, eos_id=49, greedy=True)
    b = generate(model, idx, mask, 30, eos_id=49, greedy=True, use_cache=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_padded_batch_equals_each_prompt_alone():
    model = tiny(2)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    idx, mask = left_pad(prompts, 0)
    seqs, _, rmask = generate(model, idx, mask, 25, eos_id=49, greedy=True)
    P = idx.size(1)
    with torch.no_grad():
        batch_logits = model(idx, mask)
    for i, p in enumerate(prompts):
        one, m1 = left_pad([p], 0)
        s1, _, r1 = generate(model, one, m1, 25, eos_id=49, greedy=True)
        n1 = int(r1.sum())
        assert seqs[i, P:P + n1].tolist() == s1[0, len(p):len(p) + n1].tolist()
        assert int(rmask[i].sum()) == n1
        with torch.no_grad():
            alone = model(one, m1)[0]
        assert (batch_logits[i, P - len(p):] - alone).abs().max().item() < 1e-5


def test_scalar_head_ignores_padding_and_batch():
    torch.manual_seed(0)
    rm = ScalarHead(tiny(3)).eval()
    prompts = [[3, 4, 5, 6], [10, 11]]
    idx, mask = left_pad(prompts, 0)
    with torch.no_grad():
        both = rm(idx, mask)
        alone = rm(*left_pad([prompts[1]], 0))
    assert (both[1, -2:] - alone[0]).abs().max().item() < 1e-5


# ---- sampling ------------------------------------------------------------------------------------

def test_seed_reproduces_sample_and_top_k_1_is_greedy():
    model = tiny(4)
    idx, mask = left_pad([[1, 2, 3], [4, 5, 6, 7]], 0)
    g = lambda s: torch.Generator().manual_seed(s)
    a = generate(model, idx, mask, 20, eos_id=49, generator=g(7))[0]
    b = generate(model, idx, mask, 20, eos_id=49, generator=g(7))[0]
    c = generate(model, idx, mask, 20, eos_id=49, generator=g(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    k1 = generate(model, idx, mask, 20, eos_id=49, top_k=1, generator=g(9))[0]
    greedy = generate(model, idx, mask, 20, eos_id=49, greedy=True)[0]
    assert torch.equal(k1, greedy)


def test_top_p_keeps_smallest_covering_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, top_p=0.7, generator=torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 so the second token is needed; the third is not
    seen = {int(sample_next(logits, top_k=3, generator=torch.Generator().manual_seed(s))) for s in range(300)}
    assert seen == {0, 1, 2}


def test_eos_stops_one_row_while_others_go_on():
    model = tiny(5)
    eos = 49
    orig = model.forward

    def forced(i, m=None, c=None):
        logits = orig(i, m, c)
        hit = (i[:, -1] == 1)[:, None]  # after emitting token 1, the next token is EOS
        logits[:, -1] = torch.where(hit, torch.nn.functional.one_hot(torch.tensor(eos), 50).float() * 1e4,
                                    logits[:, -1])
        return logits

    model.forward = forced
    idx = torch.tensor([[5, 1], [5, 6]])
    mask = torch.ones_like(idx)
    seqs, amask, rmask = generate(model, idx, mask, 10, eos_id=eos, greedy=True)
    assert seqs[0, 2].item() == eos and rmask[0].tolist() == [0, 0, 1] + [0] * (seqs.size(1) - 3)
    assert rmask[1, 2:].sum().item() == seqs.size(1) - 2  # row 1 never emitted EOS: all generated
    assert seqs.size(1) == 12
    assert torch.equal(amask[:, 2:], rmask[:, 2:])


def test_generate_refuses_too_long():
    model = tiny()
    idx, mask = left_pad([[1] * 60], 0)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, idx, mask, 10, eos_id=49)
