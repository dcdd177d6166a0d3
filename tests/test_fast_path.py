"""The static-cache fast path (`StaticDecoder`, `generate_static`) against the plain `generate`.

Both paths must give the same tokens under the same seed: greedy and seeded sampling (temperature,
top-k, top-p), on a left-padded batch, with rows that stop at EOS while others go on, with a batch
that stops early as a whole (also when the stop is checked only every few steps, as on CUDA), and
with one decoder reused for batches of different prompt lengths (whatever an earlier batch left in
the cache must stay masked). The step's logits equal the plain step's to float rounding.

torch.compile of the step is not tested here (it takes a minute on a CPU); bench.py runs it on a GPU.

Run: python -m pytest -q tests/test_fast_path.py
"""

import pytest
import torch

from minirlhf.data import left_pad  # the package's collation, tested in test_data.py
from minirlhf.fast_decode import StaticDecoder, generate_static
from minirlhf.model import GPT, GPTConfig, generate


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12]]


def both(model, prompts, n, eos_id, decoder=None, stop_check_every=None, seed=0, **kw):
    """(plain outputs, static outputs) for the same prompts and seed."""
    idx, mask = left_pad(prompts, 0)
    decoder = decoder or StaticDecoder(model, len(prompts), idx.size(1) + n)
    plain = generate(model, idx, mask, n, eos_id, generator=torch.Generator().manual_seed(seed), **kw)
    fast = generate_static(decoder, idx, mask, n, eos_id, generator=torch.Generator().manual_seed(seed),
                           stop_check_every=stop_check_every, **kw)
    return plain, fast


def assert_same(plain, fast):
    for a, b in zip(plain, fast):  # seqs, attention mask, response mask
        assert a.shape == b.shape and torch.equal(a, b)


def test_step_logits_equal_plain_step():
    model = tiny(1)
    idx, mask = left_pad(PROMPTS, 0)
    decoder = StaticDecoder(model, len(PROMPTS), 30)
    with torch.no_grad():
        cache = model.new_cache(len(PROMPTS), 30)
        plain = model(idx, mask, cache)[:, -1]
        fast = decoder.prefill(idx, mask)
        assert torch.equal(plain, fast)                     # the prefill is the plain forward itself
        for _ in range(20):
            token = plain.argmax(-1)
            mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
            plain, fast = model(token[:, None], mask, cache)[:, -1], decoder(token)
            # not bitwise: attention sums over more (masked, zero-weight) keys in another order
            assert (plain - fast).abs().max().item() < 1e-5


def test_greedy_left_padded_batch():
    plain, fast = both(tiny(2), PROMPTS, 40, eos_id=49, greedy=True)
    assert_same(plain, fast)
    assert plain[0].size(1) == 6 + 40


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=5),
                                dict(top_p=0.8, temperature=1.3)])
def test_seeded_sampling(kw):
    plain, fast = both(tiny(3), PROMPTS, 40, eos_id=49, seed=11, **kw)
    assert_same(plain, fast)


def test_eos_stops_rows_while_others_go_on():
    # vocabulary 50, 40 steps: some rows sample EOS (id 7) early, some never do
    plain, fast = both(tiny(4), PROMPTS * 2, 40, eos_id=7, seed=3)
    assert_same(plain, fast)
    lengths = plain[2].sum(1)
    assert lengths.min() < 40 and lengths.max() == 40       # the test means something: both kinds of row
    assert plain[0].size(1) == 6 + 40


@pytest.mark.parametrize("stop_check_every", [1, 8])
def test_whole_batch_stops_early(stop_check_every):
    # vocabulary 8: every row samples EOS within a few dozen steps, so the batch ends well before 56
    # tokens; checking only every 8 steps must still cut the output back to the same length
    model = tiny(5, vocab_size=8)
    plain, fast = both(model, [[1, 2, 3], [4], [5, 6]], 56, eos_id=7, seed=2,
                       stop_check_every=stop_check_every)
    assert_same(plain, fast)
    n = plain[0].size(1) - 3
    assert 8 < n < 56 and n % 8 != 0                      # stopped early, between two checks


def test_decoder_reused_across_batches():
    model = tiny(6)
    decoder = StaticDecoder(model, 4, 50)
    for prompts, seed in [(PROMPTS, 1), ([[3] * 9, [4, 5], [6], [7, 8, 9]], 2), ([[1], [2], [3], [4]], 3)]:
        plain, fast = both(model, prompts, 40, eos_id=49, decoder=decoder, seed=seed)
        assert_same(plain, fast)


def test_decoder_refuses_what_does_not_fit():
    model = tiny()
    idx, mask = left_pad(PROMPTS, 0)
    with pytest.raises(ValueError, match="does not fit"):
        generate_static(StaticDecoder(model, 4, 20), idx, mask, 20, eos_id=49)
    with pytest.raises(ValueError, match="does not fit"):
        generate_static(StaticDecoder(model, 3, 40), idx, mask, 20, eos_id=49)
    with pytest.raises(ValueError, match="block_size"):
        StaticDecoder(model, 4, 65)
