"""The fast decode path: a GPT's decode step with static shapes, which a CUDA graph can capture.

Kept apart from model.py (which stays the readable model and its plain `generate`), as a serving engine
is kept apart from the model it serves: `generate_static` takes the same arguments as
`minirlhf.model.generate` and returns the same tokens for the same seed, only faster on a GPU.

    decoder = StaticDecoder(model, batch_size, prompt_len + max_new_tokens, compile=True)   # once
    seqs, attn, mask = generate_static(decoder, idx, attention_mask, max_new_tokens, eos_id)  # per batch
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf.model import GPT, CausalSelfAttention, sample_next, tool_step


class StaticDecoder(nn.Module):
    """A GPT's decode step over a preallocated KV cache, with every tensor's shape and address fixed.

    Why a second path: on a GPU, one plain decode step of a small model is some 15 kernel launches per
    layer for very little math, so the step costs what the CPU takes to launch it. A CUDA graph records
    the launches once and replays them in one call, but it replays the same kernels on the same memory:
    shapes cannot change and addresses cannot move. The plain step breaks both (its keys grow by one
    each step, its positions are Python ints). This step instead
      - attends over the whole cache, masking the positions not written yet (`key_mask`): the same
        softmax over the same keys, since masked positions get weight exactly 0;
      - writes the new key and value with `index_copy_` at a position held in a tensor (`write_pos`);
      - advances its own counters (`pos`, `write_pos`, `key_mask`) in place, inside the step.
    The price is attention over all max_len keys every step instead of the filled ones: on a CPU, which
    has no launches to save, this path is a little slower than the plain one.

    Each layer's keys and values are a tensor of their own, (B, nh, max_len, hs), not a slice of one
    (L, ...) tensor as in `KVCache`: torch.compile updates a whole tensor in place, but a write into a
    view of one becomes a copy of the whole cache every step. The tensors live as long as the decoder,
    so a decoder is reused: build one per (batch size, cache length), pass it to `generate_static` for
    every batch. compile=True wraps the step in torch.compile(mode="reduce-overhead"), which on CUDA
    records it as a CUDA graph (on a CPU it only fuses kernels). The prefill, whose length depends on
    the prompts, is the plain forward, run once per batch.

    Tools work as in `generate` (`generate_static(..., tool=...)`): a tool's tokens are fed to the step
    like sampled ones. But the tool reads every row's tokens on the host after every step, so the CPU
    waits for the GPU at each step and the graph saves less.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, compile: bool = False):
        super().__init__()
        c = model.config
        if max_len > c.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {c.block_size}")
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        p = model.transformer.wte.weight
        shape = (batch_size, c.n_head, max_len, c.n_embd // c.n_head)   # (B, nh, max_len, hs) per layer
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layer)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=p.device)  # 1: attend
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=p.device)  # the next token's position id
        self.write_pos = torch.zeros(1, dtype=torch.long, device=p.device)     # the cache column it goes to
        self.compiled = compile
        self.step = self.forward
        if compile:
            # A CUDA graph reads and writes fixed addresses: say which tensors keep theirs, or
            # torch.compile declines to record a graph for a step that mutates its inputs.
            for t in self.k + self.v + [self.key_mask, self.pos, self.write_pos]:
                torch._dynamo.mark_static_address(t)
            self.step = torch.compile(self.forward, mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def prefill(self, idx, attention_mask):
        """Run the prompts (B, P) through the plain forward into the cache; next-token logits (B, V)."""
        B, P = idx.shape
        cache = self.model.new_cache(B, P)
        logits = self.model(idx, attention_mask, cache)[:, -1]
        for i in range(len(self.k)):
            self.k[i][:, :, :P] = cache.k[i]
            self.v[i][:, :, :P] = cache.v[i]
        self.key_mask.zero_()                          # whatever an earlier batch left beyond P is masked
        self.key_mask[:, :P] = attention_mask.bool()
        self.pos.copy_(attention_mask.long().sum(1))   # a row's next position = its count of real tokens
        self.write_pos.fill_(P)                        # prompts are right-aligned: all rows write column P
        return logits

    @torch.no_grad()
    def forward(self, token):
        """Feed one token per row (B,) at the current position; logits (B, V) of the next one."""
        m = self.model
        self.key_mask.index_fill_(1, self.write_pos, True)          # the new token sees itself
        mask = self.key_mask[:, None, None, :]                      # (B, 1, 1, max_len)
        x = m.transformer.wte(token[:, None]) + m.transformer.wpe(self.pos[:, None])  # (B, 1, C)
        for i, block in enumerate(m.transformer.h):
            x = x + self.attend(block.attn, block.ln_1(x), self.k[i], self.v[i], mask)
            x = x + block.mlp(block.ln_2(x))
        self.pos.add_(1)
        self.write_pos.add_(1)
        return m.lm_head(m.transformer.ln_f(x))[:, 0]              # (B, V)

    def attend(self, attn: CausalSelfAttention, x, k_cache, v_cache, mask):
        """CausalSelfAttention.forward for one new token over the whole cache (dropout is off: sampling)."""
        B, T, C = x.shape                                           # T = 1
        nh = attn.n_head
        q, k, v = attn.c_attn(x).split(C, dim=2)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)               # (B, nh, 1, hs)
        k = k.view(B, T, nh, C // nh).transpose(1, 2)               # (B, nh, 1, hs)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)               # (B, nh, 1, hs)
        # the cache keeps the weights' dtype while autocast computes k and v in bf16: cast to store
        k_cache.index_copy_(2, self.write_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, self.write_pos, v.to(v_cache.dtype))
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # (B, nh, 1, hs)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


@torch.no_grad()
def generate_static(decoder: StaticDecoder, idx, attention_mask, max_new_tokens: int, eos_id: int,
                    temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None,
                    stop_check_every=None, tool=None):
    """`generate` through a StaticDecoder: the same arguments, the same returns, the same tokens.

    The sampling loop is the plain one (same `sample_next`, same draws from `generator`) and the step
    computes the same logits up to float rounding (its attention also sums the masked keys' zero
    weights), so a seed gives the same sequences as `generate`: a draw could only differ if it fell
    within rounding of the boundary between two tokens.

    One difference: asking "has every row stopped?" copies a flag to the host and, on a GPU, waits for
    it, which keeps the CPU from queueing the next step while the GPU works. So it is asked every
    `stop_check_every` steps (None: 8 on CUDA, 1 elsewhere) and the output is cut back to the step at
    which the last row stopped: the same output, but the extra steps also draw from `generator`, whose
    state then differs from the plain path's after a batch that ended early.

    tool: as in `generate` (forced tokens, attention mask 1, response mask 0), the same outputs.

    One-off use: generate_static(StaticDecoder(model, B, P + max_new_tokens), idx, attention_mask, ...).
    """
    B, P = idx.shape
    if B != decoder.batch_size or P + max_new_tokens > decoder.max_len:
        raise ValueError(f"batch {B} x ({P} + {max_new_tokens}) tokens does not fit a decoder of batch "
                         f"{decoder.batch_size} x {decoder.max_len}")
    attention_mask = attention_mask.long()
    tokens = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=idx.device)
    alive = torch.zeros((B, max_new_tokens), dtype=torch.long, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    if tool is not None:
        forced = torch.zeros((B, max_new_tokens), dtype=torch.long, device=idx.device)  # 1: the tool's
        history, pending = [[] for _ in range(B)], [[] for _ in range(B)]
    check_every = stop_check_every or (8 if idx.is_cuda else 1)
    logits = decoder.prefill(idx, attention_mask)                    # (B, V)
    for n in range(1, max_new_tokens + 1):
        nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)  # (B,)
        nxt = torch.where(done, eos_id, nxt)
        if tool is not None:  # rows the tool is answering take its tokens instead of their samples
            nxt, by_tool = tool_step(tool, nxt, done, history, pending, eos_id)
            forced[:, n - 1] = by_tool.long()
        tokens[:, n - 1] = nxt
        alive[:, n - 1] = (~done).long()
        done = done | (nxt == eos_id)
        if n == max_new_tokens or (n % check_every == 0 and bool(done.all())):
            break
        if decoder.compiled and idx.is_cuda:
            # the previous step's logits are consumed: the graph may overwrite its outputs in place
            torch.compiler.cudagraph_mark_step_begin()
        logits = decoder.step(nxt)
    n = int(alive.any(0).sum())                                     # the step at which the last row stopped
    tokens, alive = tokens[:, :n], alive[:, :n]
    seqs = torch.cat([idx, tokens], dim=1)
    own = alive if tool is None else alive - forced[:, :n]             # the policy's tokens: not the tool's
    response_mask = torch.cat([torch.zeros_like(attention_mask), own], dim=1)
    return seqs, torch.cat([attention_mask, alive], dim=1), response_mask
