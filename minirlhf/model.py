"""GPT-2 in plain PyTorch: the policy, the reference, and (with a scalar head) the reward model and critic.

The architecture is GPT-2's (Radford et al. 2019): learned position embeddings, pre-LayerNorm blocks,
tanh-approximate GELU, input and output embeddings tied. Parameter names follow GPT-2's checkpoint, so
`from_pretrained` maps weights one to one (transposing the Conv1D matrices).

Two things RLHF needs that a pretraining model does not:

- Left padding. Batched generation right-aligns prompts of different lengths, so `forward` takes an
  `attention_mask` (B, T) and derives position ids from it (`cumsum(mask) - 1`): a prompt gets the same
  positions, and hence the same outputs, whatever else is in the batch.
- A KV cache. Sampling appends one token at a time; `KVCache` keeps every layer's keys and values so
  each step runs the new token only. The cache is preallocated to its final length.

`generate` is the readable sampler; given a `tool` (the calculator of minirlhf/task.py), the tool writes
tokens into a response as it is sampled. The fast one, `generate_static` in minirlhf/fast_decode.py,
gives the same results through a decode step that a CUDA graph can capture.
"""

import json
import math
import os
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128      # the longest sequence (prompt + response) the model can see
    vocab_size: int = 259      # 259 = 256 bytes + EOS + 2 role tokens ("bytes" encoding); GPT-2: 50257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0       # RLHF wants 0: dropout makes the PPO ratio differ from 1 at no update
    bias: bool = True          # GPT-2 has biases in linears and LayerNorms
    layer_norm_eps: float = 1e-5


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions; `pos` is how many are filled."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)  # (L, B, nh, T_max, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # write this step's keys and values after the ones already cached, attend to all of them
            end = cache.pos + T
            cache.k[layer, :, :, cache.pos:end] = k
            cache.v[layer, :, :, cache.pos:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, nh, S, hs)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # no padding and no cache: the fused causal kernel (flash attention on GPU)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face's config)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)  # pre-LayerNorm residual blocks
        x = x + self.mlp(self.ln_2(x))
        return x


def attention_bias(attention_mask, T: int):
    """Boolean SDPA mask (B, 1, T, S) for the last T queries over all S keys: causal AND key is not padding.

    attention_mask: (B, S), 1 on real tokens. A padding query (left of its prompt) would see no key at
    all and softmax over nothing gives NaN, so every query may always see itself; those rows are
    garbage by construction and nothing downstream reads them.
    """
    B, S = attention_mask.shape
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]   # (T, 1) absolute query positions
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]           # (1, S)
    causal = k_pos <= q_pos                                                  # (T, S)
    keep = causal[None] & attention_mask[:, None, :].bool()                  # (B, T, S)
    keep = keep | (k_pos == q_pos)[None]                                     # each query sees itself
    return keep[:, None]                                                     # (B, 1, T, S)


def packed_bias(doc_ids):
    """Rows that hold several documents end to end (`data.packed_sft_batch`): -> the boolean SDPA mask
    (B, 1, T, T), causal AND within the query's own document, and the positions (B, T), which restart at
    0 where each document starts. doc_ids (B, T): a document's id on each of its (contiguous) tokens."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]                    # (B, T, T)
    keep = same_doc & (t[:, None] >= t[None, :])[None]                       # and causal
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]                        # a document begins here
    first = torch.where(starts, t, 0).cummax(dim=1).values                   # where each token's began
    return keep[:, None], t - first


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings (GPT-2)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
                # stream's variance does not grow with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, attention_mask=None, cache: KVCache | None = None, doc_ids=None):
        """The final hidden states (B, T, C) after ln_f.

        idx: (B, T) token ids, the new tokens only when a cache is given.
        attention_mask: (B, S) 1 on real tokens, S = tokens in the cache + T. None means no padding.
        doc_ids: (B, T), for rows that pack several documents (`packed_bias`); no mask, no cache then.
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than "
                             f"block_size {self.config.block_size}")
        if doc_ids is not None:
            assert attention_mask is None and cache is None, "packed rows take doc_ids alone"
            mask, pos = packed_bias(doc_ids)
        elif attention_mask is None:
            pos = torch.arange(past, past + T, device=idx.device)[None]      # (1, T)
            # without padding, causal attention needs a mask only when attending to a cache
            mask = None if cache is None else attention_bias(torch.ones(B, past + T, device=idx.device), T)
        else:
            assert attention_mask.shape == (B, past + T), \
                "attention_mask must cover the cache and the new tokens"
            # positions count real tokens only, so left padding does not shift them
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            mask = attention_bias(attention_mask, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, cache: KVCache | None = None, doc_ids=None):
        """Logits (B, T, vocab_size) at every position: logits[:, t] scores token t + 1."""
        return self.lm_head(self.hidden(idx, attention_mask, cache, doc_ids))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str, cache_dir: str | None = None) -> "GPT":
        """A GPT from a Hugging Face GPT-2 checkpoint: a local folder, or a hub name
        ("gpt2", "gpt2-medium", ...)."""
        folder = name_or_path if os.path.isdir(name_or_path) else download_gpt2(name_or_path, cache_dir)
        return load_hf_gpt2(folder)


class ScalarHead(nn.Module):
    """A GPT trunk plus Linear(n_embd, 1): one scalar per position (reward model, critic).

    The reward model is read at the last response token (the EOS token when there is one); the critic at
    every response position. The trunk keeps its (tied, unused) LM head so its weights load unchanged.
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(gpt.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None):
        return self.head(self.gpt.hidden(idx, attention_mask)).squeeze(-1)  # (B, T)


# ----------------------------------------------------------------------------------------------------
# Sampling with the KV cache

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """One token per row from logits (B, V). Greedy ignores the other arguments."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def tool_step(tool, nxt, done, history: list[list[int]], pending: list[list[int]], eos_id: int):
    """The tool's part of one sampling step: Python, row by row, run only when `generate` has a tool.

    A live row with tool tokens pending takes the next one instead of its sample (forced); every other
    live row keeps its sample and, unless it is EOS, shows its response so far to the tool, whose reply
    is fed in the steps that follow. `history` (each row's response ids so far) and `pending` (each row's
    tool tokens not fed yet) are updated in place. nxt, done: (B,). Returns (nxt, forced), each (B,).
    """
    rows, stopped = nxt.tolist(), done.tolist()
    forced = [False] * len(rows)
    for b in range(len(rows)):
        if stopped[b]:
            continue
        if pending[b]:
            rows[b], forced[b] = pending[b].pop(0), True
        history[b].append(rows[b])
        if not forced[b] and rows[b] != eos_id:
            reply = tool(list(history[b]))
            if reply:
                if eos_id in reply:  # the end of a response is the policy's decision, never the tool's
                    raise ValueError(f"the tool returned EOS ({eos_id}): its tokens cannot end a row")
                pending[b] = [int(t) for t in reply]
    return torch.tensor(rows, dtype=nxt.dtype, device=nxt.device), torch.tensor(forced, device=nxt.device)


@torch.no_grad()
def generate(model: GPT, idx, attention_mask, max_new_tokens: int, eos_id: int, temperature=1.0,
             top_k=None, top_p=None, greedy=False, generator=None, use_cache=True, tool=None):
    """Sample responses to a batch of left-padded prompts.

    idx, attention_mask: (B, P) prompts right-aligned, mask 1 on real tokens.
    Returns (seqs, attention_mask, response_mask), each (B, P + N) with N <= max_new_tokens: the
    response mask is 1 on generated tokens up to and including each row's first EOS; a row that has
    stopped is padded with EOS under mask 0 while the others go on. The loop ends when every row has
    stopped. use_cache=False recomputes the whole sequence every step (the slow reference).

    tool: None, or a function called after each token a row samples (EOS excepted) with that row's
    response ids so far (list[int], earlier tool tokens included); it returns None or a list of token
    ids, which the row is then fed one per step instead of its samples (forced tokens) while the other
    rows go on sampling. Forced tokens have attention mask 1 and response mask 0, count toward
    max_new_tokens (a reply longer than what is left is cut), and enter the KV cache like any other
    token. They never end a row: a reply holding EOS is a ValueError. Every row still draws a sample at
    every step, so the draws from `generator`, and hence the output, do not depend on the cache.
    """
    B, P = idx.shape
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {model.config.block_size}")
    attention_mask = attention_mask.long()
    tokens = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=idx.device)
    alive = torch.zeros((B, max_new_tokens), dtype=torch.long, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    if tool is not None:
        forced = torch.zeros((B, max_new_tokens), dtype=torch.long, device=idx.device)  # 1: the tool's
        history, pending = [[] for _ in range(B)], [[] for _ in range(B)]
    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    logits = model(idx, attention_mask, cache)[:, -1]                   # prefill: (B, V)
    mask, seq, n = attention_mask, idx, 0
    for n in range(1, max_new_tokens + 1):
        nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)  # (B,)
        nxt = torch.where(done, eos_id, nxt)
        if tool is not None:  # rows the tool is answering take its tokens instead of their samples
            nxt, by_tool = tool_step(tool, nxt, done, history, pending, eos_id)
            forced[:, n - 1] = by_tool.long()
        tokens[:, n - 1] = nxt
        alive[:, n - 1] = (~done).long()
        done = done | (nxt == eos_id)
        if n == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=idx.device)], dim=1)
        if use_cache:
            logits = model(nxt[:, None], mask, cache)[:, -1]           # one new token over the cache
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = model(seq, mask)[:, -1]
    tokens, alive = tokens[:, :n], alive[:, :n]
    seqs = torch.cat([idx, tokens], dim=1)
    own = alive if tool is None else alive - forced[:, :n]             # the policy's tokens: not the tool's
    response_mask = torch.cat([torch.zeros_like(attention_mask), own], dim=1)
    return seqs, torch.cat([attention_mask, alive], dim=1), response_mask


# ----------------------------------------------------------------------------------------------------
# GPT-2 weights from a Hugging Face checkpoint

HF_URL = "https://huggingface.co/{name}/resolve/main/{file}"
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


def download_gpt2(name: str, cache_dir: str | None = None) -> str:
    """Fetch config.json and model.safetensors of a hub GPT-2 into a local folder (needs the network)."""
    if name not in GPT2_NAMES:
        raise ValueError(f"{name!r} is neither a folder nor a GPT-2 name ({', '.join(GPT2_NAMES)})")
    folder = os.path.join(cache_dir or os.path.expanduser("~/.cache/minirlhf"), name)
    os.makedirs(folder, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        dest = os.path.join(folder, file)
        if not os.path.exists(dest):
            tmp = dest + ".part"
            urllib.request.urlretrieve(HF_URL.format(name=name, file=file), tmp)
            os.replace(tmp, dest)  # never leave a half-downloaded file under the real name
    return folder


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
                      "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict:
    """A minimal safetensors reader: 8-byte little-endian header size, a JSON header, raw tensor bytes.

    Only data is read: unlike a pickle, nothing in the file can run code.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] == "BF16":  # numpy has no bfloat16: go through int16 bits
            start, end = info["data_offsets"]
            bits = np.frombuffer(data[start:end], dtype=np.int16).copy()
            out[key] = torch.from_numpy(bits).view(torch.bfloat16).reshape(info["shape"]).float()
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[key] = torch.from_numpy(arr.copy())
    return out


# Hugging Face GPT-2 config keys whose other values change the computation; the loader refuses them rather
# than build a model that silently computes something else. (reorder_and_upcast_attn is accepted: it only
# computes the same attention in float32 under mixed precision.)
GPT2_CONFIG_CHECKS = {  # key: (the values this model computes, what another value means)
    "model_type": (("gpt2",), "another architecture"),
    "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "an activation other than GPT-2's tanh GELU"),
    "scale_attn_weights": ((True,), "attention scores not divided by sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": ((False,), "layer i's attention scores also divided by i + 1"),
    "add_cross_attention": ((False,), "cross-attention layers (an encoder-decoder)"),
}
GPT2_REQUIRED_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
# GPT-2's linears are Conv1D layers, whose weight is (in, out): the transpose of nn.Linear's (out, in).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(folder: str) -> GPT:
    """Build a GPT from `config.json` plus `model.safetensors` or `pytorch_model.bin`.

    Accepts both key layouts: the original hub checkpoint's (`h.0.attn.c_attn.weight`, causal-mask
    buffers `h.N.attn.bias`, no `lm_head.weight`) and today's transformers' (`transformer.` prefix, a
    tied `lm_head.weight`). GPT-2 stores linears as Conv1D, whose weight is (in, out): transposed here.
    A config this model cannot reproduce (GPT2_CONFIG_CHECKS, an MLP other than 4 * n_embd wide) or a
    missing file or key is a CheckpointError that names the file.
    """
    from minirlhf.checkpoint import CheckpointError  # checkpoint.py imports this module: import late

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face GPT-2 folder holds config.json and "
                              "model.safetensors (or pytorch_model.bin)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({str(e).splitlines()[0]})") from None
    if "n_positions" not in hf and "n_ctx" in hf:  # the older name of the same number
        hf["n_positions"] = hf["n_ctx"]
    missing = [k for k in GPT2_REQUIRED_KEYS if k not in hf]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} (a GPT-2 config needs "
                              f"{', '.join(GPT2_REQUIRED_KEYS)})")
    for key, (allowed, means) in GPT2_CONFIG_CHECKS.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"{path}: {key} = {json.dumps(hf[key])} means {means}, which this GPT-2 "
                                  "does not compute")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointError(f"{path}: n_inner = {hf['n_inner']}: this GPT-2's MLP is 4 * n_embd = "
                              f"{4 * hf['n_embd']} wide")
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0,
                       bias=True, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    st, binf = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(st):
        sd = read_safetensors(st)
    elif os.path.exists(binf):
        sd = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin next to config.json")
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # mask buffers
    lm_head = sd.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in sd and not torch.equal(lm_head, sd["wte.weight"]):
        raise CheckpointError(f"{folder}: lm_head.weight is not tied to wte.weight; GPT-2 ties them")
    model = GPT(config)
    ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = set(ours) - set(sd), set(sd) - set(ours)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match GPT-2: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for k, p in ours.items():
            w = sd[k].t() if k.endswith(GPT2_CONV1D) else sd[k]
            if w.shape != p.shape:
                raise CheckpointError(f"{folder}: {k} has shape {tuple(w.shape)}, expected {tuple(p.shape)} "
                                      "from config.json")
            p.copy_(w)
    return model
