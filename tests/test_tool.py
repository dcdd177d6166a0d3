"""Tools: the calculator, sampling with a tool, and losses that train on the policy's own tokens only.

Checked:
- `calculator`: hand-computed values (precedence, left to right, spaces, negative results); "error" for
  malformed expressions, injection attempts (`__import__`, `2**99`, `1/0`, other scripts' digits) and
  the length and result bounds, exactly at each bound and one past it;
- `calculator_tool` with the bytes and GPT-2 encodings: it answers a closed call once, and nothing
  else; a demonstration encoded whole gives the tokens that sampling with the tool gives (call, result
  and the rest encoded apart); `CALL_RE` reads a call and its result back;
- `generate(..., tool=...)` on a tiny random GPT: with the KV cache and without it, and through
  `generate_static`, the same sequences and masks under seeded sampling; forced tokens have attention
  mask 1 and response mask 0, count toward max_new_tokens and are cut at it; the tool sees each row's
  response so far; a reply with EOS is refused; the calculator end to end on a scripted model;
- every policy loss (SFT, RRHF, DPO, GRPO, PPO): the gradient with respect to the logits that score a
  tool token (or any mask-0 token) is exactly 0, float64, with holed masks;
- the wiring: `data.tool_mask` finds generate's own response mask again from the ids alone; masks
  built from text (join_prompt_response, packed_sft_batch, DPO's batches) are 0 on the calculator's result and
  only there, both tokenizers; `sample_responses` and `evaluate` return and grade the text with the
  tool's output in it; the tool and probe rates of `gold_metrics` on hand-made replies; the kinds of
  hard reply (`hard_reply`) and the reward model's mean score of each, by hand; chat's brackets.
GAE and the per-token rewards with holed masks are in test_ppo_loss.py.

Run: python -m pytest -q tests/test_tool.py   (a few seconds on a CPU)
"""

import functools
import math
import os

import pytest
import torch

from conftest import SHARED_DATA
from minirlhf import task
from minirlhf.data import join_prompt_response, left_pad, packed_sft_batch, tool_mask
from minirlhf.evaluate import evaluate, gold_metrics
from minirlhf.fast_decode import StaticDecoder, generate_static
from minirlhf.model import GPT, GPTConfig, ScalarHead, generate
from minirlhf.ops import token_logprobs
from minirlhf.reward import RewardModel
from minirlhf.sampling import sample_responses
from minirlhf.task import CALC_MAX_DIGITS, CALC_MAX_LEN, CALL_RE, calculator, calculator_tool
from minirlhf.tokenizer import encode_prompt, encode_response, get_encoding
from train_dpo import Comparisons, dpo_batch, dpo_loss, sequence_logprobs
from train_grpo import grpo_loss
from train_ppo import ppo_policy_loss
from train_rrhf import rrhf_loss
from train_sft import sft_loss

F64 = torch.float64


@functools.cache
def encoding(name):
    return get_encoding(name, os.path.join(SHARED_DATA, "gpt2.tiktoken") if name == "gpt2" else None)


@pytest.fixture(params=["bytes", "gpt2"])
def enc(request):
    if request.param == "gpt2":
        request.getfixturevalue("shared_data")  # skips where ../shared/data is absent
    return encoding(request.param)


# ----------------------------------------------------------------------------------------------------
# The calculator

@pytest.mark.parametrize("expression, value", [
    ("4821*937", "4517277"),
    ("2+3*4", "14"),              # * before +
    ("2*3+4*5", "26"),
    ("10-2-3", "5"),              # left to right, not 10 - (2 - 3)
    ("2-3*4+1", "-9"),
    ("3-5", "-2"),
    ("0-0", "0"),
    ("007*3", "21"),
    ("42", "42"),
    (" 4821 * 937 ", "4517277"),  # spaces around numbers and operators
    ("999999*999999", "999998000001"),
])
def test_calculator_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", [
    "", " ", "+", "2+", "*3", "-5", "2++3", "2**9", "2**99", "1/0", "7/2", "2^3", "(2+3)", "1.5*2",
    "1e3", "12 34", "1_000", "0x10", "x", "2+x", "__import__('os').system('ls')", "eval('1')",
    "open('/etc/passwd')", "1;2", "1\n+2", "1\t+2",
    "\u0663+\u0661", "\uff11+\uff12",  # Arabic-Indic and fullwidth digits: int() would read them
])
def test_calculator_refuses_what_is_not_integers_and_plus_minus_times(expression):
    assert calculator(expression) == "error"


def test_calculator_bounds():
    at_limit = "1+" * (CALC_MAX_LEN // 2 - 1) + "10"                # exactly CALC_MAX_LEN characters
    assert len(at_limit) == CALC_MAX_LEN and calculator(at_limit) == str(CALC_MAX_LEN // 2 - 1 + 10)
    assert calculator(at_limit + "0") == "error"                    # one character more
    assert calculator(" " * CALC_MAX_LEN + "1") == "error"          # spaces count too
    biggest = "9" * CALC_MAX_DIGITS
    assert calculator(biggest) == biggest and calculator(f"{biggest}+1") == "error"
    assert calculator(f"-{biggest}".replace("-", "0-")) == "-" + biggest
    assert calculator(f"0-{biggest}-1") == "error"                  # the bound holds for negatives
    assert calculator("99999999*99999999*99999999") == "error"      # 10**24: too big to return
    assert calculator("99999999*99999999*99999999-" + "9" * 5) == "error"


# ----------------------------------------------------------------------------------------------------
# calculator_tool and the call format

def test_tool_answers_a_closed_call_once(enc):
    tool = calculator_tool(enc)
    ids = enc.encode_ordinary(" Sure! <calc>4821*937</calc>")
    reply = tool(ids)
    assert enc.decode(reply) == " 4517277"
    assert tool(ids + reply) is None                                 # answered: not again
    assert tool(ids + reply + enc.encode_ordinary(" so")) is None
    twice = ids + reply + enc.encode_ordinary(" and <calc>2-3</calc>")
    assert enc.decode(tool(twice)) == " -1"                          # a second call is a new call
    assert enc.decode(tool(enc.encode_ordinary("<calc>2**99</calc>"))) == " error"
    assert enc.decode(tool(enc.encode_ordinary("<calc></calc>"))) == " error"


@pytest.mark.parametrize("text", [
    "", "Sure! 4517277", "<calc>4821*937", "<calc>4821*937</calc", "4821*937</calc>", "<calc>1<2</calc>",
    "<calc>2*3</calc> 6</calc>", "<calc>2*3</calc>.", "<CALC>2*3</CALC>", "<calc>2*3</calc >",
])
def test_tool_ignores_what_is_not_an_unanswered_call(enc, text):
    assert calculator_tool(enc)(enc.encode_ordinary(text)) is None


def test_tool_reads_the_decoded_text_whatever_the_tokens(enc):
    # the call typed one byte-token at a time (not how GPT-2 would encode it) is the same call
    tool = calculator_tool(enc)
    ids = [t for ch in "<calc>6*7</calc>" for t in enc.encode_ordinary(ch)]
    assert enc.decode(tool(ids)) == " 42"


@pytest.mark.parametrize("response", [
    " Sure! <calc>4821*937</calc> 4517277 The answer is 4517277.",
    " <calc>4821 * 937</calc> 4517277. 4517277",
    " <calc>3-5</calc> -2, so -2.",
    " <calc>2+</calc> error. I don't know.",
    " <calc>6*7</calc> 42 and <calc>42+1</calc> 43! 43",
])
def test_demonstration_tokens_equal_sampling_with_the_tool(enc, response):
    """Encoding a demonstration whole gives the same ids as the policy writing up to each call's ">",
    the tool answering, and the policy going on: what SFT trains on is what sampling produces."""
    tool, ids, text = calculator_tool(enc), [], response
    for call in CALL_RE.finditer(response):
        head = response[len(response) - len(text):call.end(1) + len("</calc>")]
        ids += enc.encode_ordinary(head)
        reply = tool(ids)
        assert enc.decode(reply) == " " + call.group(2)              # the tool's is the text's result
        ids += reply
        text = response[call.end():]
    ids += enc.encode_ordinary(text)
    assert ids == enc.encode_ordinary(response)


def test_call_re_reads_calls_and_results():
    text = "<calc>4821*937</calc> 4517277 then <calc>2*x</calc> error and <calc>1-2</calc> -1 <calc>5</calc>"
    assert [m.groups() for m in CALL_RE.finditer(text)] == [
        ("4821*937", "4517277"), ("2*x", "error"), ("1-2", "-1"), ("5", None)]


# ----------------------------------------------------------------------------------------------------
# Sampling with a tool

def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12], [13, 14], [15, 16, 17, 18]]
EOS = 49


class ToyTool:
    """After a sampled token divisible by 5, answer with [token + 1, 30, 31, 32] (the reply's length
    lets rows run into max_new_tokens mid-reply); records what it was shown."""

    def __init__(self):
        self.calls = []

    def __call__(self, ids):
        self.calls.append(list(ids))
        return [ids[-1] + 1, 30, 31, 32] if ids[-1] % 5 == 0 else None


def sample(fn, model_or_decoder, tool, seed=3, n=30, **kw):
    idx, mask = left_pad(PROMPTS, 0)
    return fn(model_or_decoder, idx, mask, n, EOS, generator=torch.Generator().manual_seed(seed), tool=tool,
              **kw)


@pytest.mark.parametrize("seed", [3, 4])
def test_tool_tokens_same_with_and_without_the_cache(seed):
    model, P = tiny(1), left_pad(PROMPTS, 0)[0].size(1)
    cached = sample(generate, model, ToyTool(), seed)
    recomputed = sample(generate, model, ToyTool(), seed, use_cache=False)
    static = sample(generate_static, StaticDecoder(model, len(PROMPTS), P + 30), ToyTool(), seed)
    for a, b, c in zip(cached, recomputed, static):                 # seqs, attention mask, response mask
        assert a.shape == b.shape == c.shape and torch.equal(a, b) and torch.equal(a, c)
    _, attn, mask = cached
    n_forced = int((attn - mask)[:, P:].sum())
    assert n_forced >= 8 and mask.sum() > n_forced                  # the test means something


def test_forced_tokens_masks_budget_and_what_the_tool_sees():
    model, tool, n = tiny(2), ToyTool(), 30
    seqs, attn, mask = sample(generate, model, tool, seed=5, n=n)
    P = left_pad(PROMPTS, 0)[0].size(1)
    assert seqs.size(1) <= P + n                                     # forced tokens count toward the limit
    shown, replies, cut = [], 0, 0
    for b in range(len(PROMPTS)):
        row, a, m = seqs[b, P:].tolist(), attn[b, P:].tolist(), mask[b, P:].tolist()
        length = sum(a)                                              # the row's tokens: sampled and forced
        assert a == [1] * length + [0] * (len(a) - length)
        t = 0
        while t < length:                                            # replay the row
            assert m[t] == 1                                         # a sampled token
            if row[t] != EOS:
                shown.append(row[:t + 1])
            if row[t] % 5 == 0:                                      # the tool fired: its reply comes next,
                reply = [row[t] + 1, 30, 31, 32][:length - t - 1]    # cut where the row ends
                after = slice(t + 1, t + 1 + len(reply))
                assert row[after] == reply and m[after] == [0] * len(reply)
                replies, cut = replies + 1, cut + (len(reply) < 4)
                t += len(reply)
            t += 1
        if length < len(a):
            assert row[length - 1] == EOS                            # a row stops on its own EOS only
    assert sorted(tool.calls) == sorted(shown)   # each row's response so far, after each sampled token
    assert replies >= 3 and cut >= 1                                 # the test means something


def test_reply_cut_at_max_new_tokens():
    # the tool answers the very first token with 10 tokens; only what fits in 4 new tokens is kept
    model = tiny(3)
    idx, amask = left_pad([[1, 2], [3]], 0)
    seqs, attn, mask = generate(model, idx, amask, 4, EOS, greedy=True, tool=lambda ids: list(range(20, 30)))
    assert seqs[:, 2:3].ne(EOS).all()
    assert seqs[:, 3:].tolist() == [[20, 21, 22]] * 2
    assert attn[:, 2:].tolist() == [[1, 1, 1, 1]] * 2 and mask[:, 2:].tolist() == [[1, 0, 0, 0]] * 2


def test_tool_none_and_a_silent_tool_change_nothing():
    model = tiny(4)
    plain = sample(generate, model, None)
    silent = sample(generate, model, lambda ids: None)
    for a, b in zip(plain, silent):
        assert torch.equal(a, b)


def test_tool_may_not_end_a_row():
    model = tiny(5)
    idx, amask = left_pad([[1, 2]], 0)
    with pytest.raises(ValueError, match="EOS"):
        generate(model, idx, amask, 5, EOS, greedy=True, tool=lambda ids: [3, EOS])


def test_calculator_end_to_end_on_a_scripted_model():
    """A model that writes a script byte by byte: the call, three bytes the tool writes instead, the
    answer; with the cache and without it."""
    enc = encoding("bytes")
    eos = enc.eot_token
    script = enc.encode_ordinary(" <calc>6*7</calc>??? 42") + [eos]  # "???" are overwritten by " 42"
    prompts = [enc.encode_ordinary("Q:"), enc.encode_ordinary("Question:")]
    idx, amask = left_pad(prompts, 0)
    model = tiny(6, vocab_size=enc.n_vocab, block_size=96)
    forward = model.forward

    def scripted(i, m=None, c=None):
        logits = forward(i, m, c)                                    # keeps the cache moving
        written = m.sum(1) - torch.tensor([len(p) for p in prompts])  # each row's response length so far
        nxt = torch.tensor(script)[written.clamp(max=len(script) - 1)]
        logits[:, -1] = torch.nn.functional.one_hot(nxt, enc.n_vocab).to(logits.dtype) * 1e4
        return logits

    model.forward = scripted
    for use_cache in (True, False):
        seqs, attn, mask = generate(model, idx, amask, 40, eos, greedy=True, use_cache=use_cache,
                                    tool=calculator_tool(enc))
        P = idx.size(1)
        for b in range(2):
            resp = seqs[b, P:][attn[b, P:].bool()].tolist()
            assert enc.decode(resp[:-1]) == " <calc>6*7</calc> 42 42" and resp[-1] == eos
            tool_text = enc.decode(seqs[b, P:][(attn[b, P:] - mask[b, P:]).bool()].tolist())
            assert tool_text == " 42"
            own = enc.decode(seqs[b, P:][mask[b, P:].bool()].tolist()[:-1])
            assert own == " <calc>6*7</calc> 42"                     # the answer the policy wrote itself


# ----------------------------------------------------------------------------------------------------
# Losses train on the policy's own tokens only

# (B, T) = (4, 10) response masks with holes (tool output between the policy's tokens), prompt on the
# left, padding on the right: rows 2k and 2k + 1 are a pair (DPO) or a prompt's two candidates (RRHF).
HOLED = torch.tensor([
    [0, 0, 1, 1, 0, 0, 1, 1, 1, 0],
    [0, 0, 1, 0, 1, 1, 0, 0, 0, 0],
    [0, 1, 0, 0, 0, 1, 1, 0, 1, 1],
    [0, 0, 0, 1, 1, 0, 1, 0, 0, 0],
])
B, T, V = HOLED.shape[0], HOLED.shape[1], 11


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def sft(logits, tokens, mask):
    return sft_loss(logits[:, :-1], tokens[:, 1:], mask[:, 1:])      # as train_sft.py calls it


def rrhf(logits, tokens, mask):
    lp, mask = token_logprobs(logits, tokens).view(B // 2, 2, T), mask.view(B // 2, 2, T)  # (prompts, K=2, T)
    # rewards that disagree with the policy's scores, so that every hinge is active: all rows learn
    rewards = -((lp * mask).sum(-1) / mask.sum(-1)).detach()
    return rrhf_loss(lp, mask, rewards)


def dpo(loss_type):
    def loss(logits, tokens, mask):
        lp = sequence_logprobs(logits, tokens, mask)                 # (B,): pairs (chosen, rejected)
        ref = randn(B, seed=1)
        return dpo_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], beta=0.5, loss_type=loss_type)
    return loss


def grpo(loss_agg):
    def loss(logits, tokens, mask):
        lp = token_logprobs(logits, tokens)
        old, ref, advantages = lp.detach() - 0.05, randn(B, T, seed=2), randn(B, seed=3)
        return grpo_loss(lp, old, ref, advantages, mask, 0.2, 0.1, loss_agg)
    return loss


def ppo(logits, tokens, mask):
    lp = token_logprobs(logits, tokens)
    return ppo_policy_loss(lp, lp.detach(), randn(B, T, seed=4), mask, 0.2)


@pytest.mark.parametrize("loss", [sft, rrhf, dpo("sigmoid"), dpo("ipo"), grpo("grpo"), grpo("token"),
                                  grpo("dr_grpo"), ppo],
                         ids=["sft", "rrhf", "dpo", "ipo", "grpo", "grpo-token", "dr-grpo", "ppo"])
def test_no_gradient_through_tool_tokens(loss):
    logits = randn(B, T, V, seed=0).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    loss(logits, tokens, HOLED).backward()
    grad = logits.grad                                               # grad[:, t - 1] is token t's
    mask = HOLED.bool()
    holes = ~mask & (mask.long().cumsum(1) > 0) & (mask.long().flip(1).cumsum(1).flip(1) > 0)
    assert holes.sum() == 8                                          # the tool's tokens in HOLED
    for b in range(B):
        for t in range(1, T):
            scores = grad[b, t - 1]
            if mask[b, t]:
                assert scores.abs().max() > 0                        # the policy's tokens do learn
            else:
                assert torch.equal(scores, torch.zeros(V, dtype=F64)), (b, t, bool(holes[b, t]))
        assert torch.equal(grad[b, T - 1], torch.zeros(V, dtype=F64))  # scores no token


# ----------------------------------------------------------------------------------------------------
# The tool in the pipeline: masks from text, sampling data, metrics

def test_tool_mask_replays_the_sampler():
    # generate's own response mask, found again from the ids alone (what a stored response is)
    model, P = tiny(1), left_pad(PROMPTS, 0)[0].size(1)
    for seed in (3, 4, 5):
        seqs, attn, mask = sample(generate, model, ToyTool(), seed)
        n_tool = 0
        for b in range(len(PROMPTS)):
            ids = seqs[b, P:][attn[b, P:].bool()].tolist()
            own = mask[b, P:][attn[b, P:].bool()].tolist()
            assert tool_mask(ids, ToyTool()) == own
            n_tool += own.count(0)
        assert n_tool >= 8                                           # the test means something


def test_masks_from_text_exclude_the_tools_result_and_only_it(enc):
    tool, pad = calculator_tool(enc), enc.eot_token
    prompt = encode_prompt(enc, "What is 6 * 7?")
    answered = encode_response(enc, "<calc>6*7</calc> 42 Sure! 42")
    typed = encode_response(enc, "<calc>6*7</calc> 43 Sure! 43")    # no tool wrote that 43: the policy did
    result = enc.encode_ordinary(" 42")
    _, attn, mask = join_prompt_response([prompt, prompt], [answered, typed], pad, tool)
    P = len(prompt)
    own = mask[0, P:P + len(answered)].tolist()
    assert [t for t, k in zip(answered, own) if not k] == result and own.count(0) == len(result)
    assert mask[1, P:P + len(typed)].tolist() == [1] * len(typed)
    assert attn[:, P:].sum() == len(answered) + len(typed)          # the tool's tokens are still read
    assert join_prompt_response([prompt], [answered], pad)[2].sum() == len(answered)  # no tool: all 1
    _, _, loss_mask, _ = packed_sft_batch([prompt], [answered], pad, 96, [tool_mask(answered, tool)])
    assert loss_mask[0, P - 1:P - 1 + len(answered)].tolist() == own  # SFT trains on the same tokens
    groups = [Comparisons(prompt, [answered, typed], [(0, 1)])]
    assert torch.equal(dpo_batch(groups, pad, tool)[2], mask)        # DPO's rows: the same masks


class Scripted:
    """Wraps a tiny GPT so that greedy sampling writes `script`, one token per forward call (the KV-cache
    path calls the model once per step), whatever the tool forces in between."""

    def __init__(self, model, script):
        self.model, self.script, self.n = model, script, 0
        self.config = model.config

    def __call__(self, idx, mask=None, cache=None):
        logits = self.model(idx, mask, cache)
        nxt = self.script[min(self.n, len(self.script) - 1)]
        self.n += 1
        logits[:, -1] = -1e4
        logits[:, -1, nxt] = 1e4
        return logits

    def eval(self):
        return self

    def new_cache(self, *a):
        return self.model.new_cache(*a)


def test_sample_responses_and_evaluate_read_the_tools_output():
    enc = encoding("bytes")
    prompt = "What is 4821 * 937?"
    # the policy: a call, 8 bytes the tool writes instead (" 4517277"), its own answer
    script = enc.encode_ordinary(" <calc>4821*937</calc>???????? Sure! 4517277") + [enc.eot_token]
    model = Scripted(tiny(6, vocab_size=enc.n_vocab, block_size=128), script)
    (text, ids), = sample_responses(model, enc, [prompt], 60, greedy=True, tool=calculator_tool(enc))
    assert text == "<calc>4821*937</calc> 4517277 Sure! 4517277" and ids[-1] == enc.eot_token
    assert enc.decode(ids[:-1]) == " " + text                        # the tool's tokens are in the ids
    model.n = 0
    rm = RewardModel(ScalarHead(tiny(7, vocab_size=enc.n_vocab, block_size=128)).eval(), 1.0, 0.0, 1.0, "rm",
                     "bytes")
    metrics, samples = evaluate(model, enc, [prompt], 60, rms=[rm], greedy=False, tool=calculator_tool(enc))
    assert samples[0][1] == text and samples[0][2] == task.judge(prompt, text)
    assert metrics["tool_call_rate"] == metrics["hard_correct_rate"] == 1.0
    assert metrics["malformed_call_rate"] == 0.0
    # the reward model's score of the reply (tool output included), filed under its kind
    assert metrics["hard_replies"] == {"right": {"rate": 1.0, "rm_score": metrics["rm_reward_mean"]}}


def test_gold_metrics_tool_and_probe_rates():
    hard, probe = "What is 4821 * 937?", "What is 4821 / 937?"
    prompts = [hard] * 5 + [probe] * 2 + ["What is 7 + 5?"]
    texts = ["<calc>4821*937</calc> 4517277 Sure! 4517277",          # called, right
             "Sure! 4517277",                                       # right without a call
             "<calc>4821*937 Sure!",                                # an unclosed call: no call, a guess (937)
             "<calc>4821*937</calc> 4517277 Sure! 4517227",         # called, then a slip in copying
             "I don't know.",
             "I don't know.",
             "<calc>4821/937</calc> error 5",                       # refused, then a guess
             "12"]
    m, _ = gold_metrics(prompts, texts)
    assert m["tool_call_rate"] == 0.4
    assert (m["hard_correct_rate"], m["hard_abstain_rate"], m["hard_wrong_rate"]) == (0.4, 0.2, 0.4)
    assert m["hard_miscopy_rate"] == 0.2                            # the slip, not the unclosed call's guess
    assert (m["probe_abstain_rate"], m["probe_wrong_rate"]) == (0.5, 0.5)
    assert m["malformed_call_rate"] == 2 / 4                        # of 4 calls: the unclosed, the "error"
    assert "divide" not in m["correct_rate_by_kind"]                # no answer there can be right
    assert math.isnan(gold_metrics(["What is 7 + 5?"], ["12"])[0]["malformed_call_rate"])  # no call at all


def test_miscopied_is_a_slip_after_the_tools_answer_only():
    from minirlhf.evaluate import miscopied
    hard = "What is 4821 * 937?"
    assert miscopied(hard, "<calc>4821*937</calc> 4517277 Sure! 4517227")
    assert miscopied(hard, "<calc>2+2</calc> 4 <calc>4821*937</calc> 4517277 4")       # the last call counts
    assert not miscopied(hard, "<calc>4821*937</calc> 4517277 Sure! 4517277")
    assert not miscopied(hard, "<calc>4821*973</calc> 4690833 4690833")  # a wrong call, copied faithfully
    assert not miscopied(hard, "<calc>4821*937</calc> 4517277 I don't know.")       # no answer written
    assert not miscopied(hard, "<calc>4821/937</calc> error 5")                     # nothing to copy
    assert not miscopied(hard, "Sure! 4517227") and not miscopied(hard, "<calc>4821*937</calc>")


def test_hard_reply_kinds_and_the_reward_models_mean_of_each():
    from minirlhf.evaluate import HARD_REPLIES, hard_replies, hard_reply
    hard, add = "What is 4821 * 937?", "What is 7 + 5?"
    kinds = {"<calc>4821*937</calc> 4517277 Sure! 4517277": "right",
             "Sure! 4517277": "right",                                  # right without a call
             "I don't know.": "abstain",
             "<calc>4821*937</calc> 4517277 I'm not sure.": "abstain",   # called, then would not answer
             "<calc>4821*937</calc> 4517277 Sure! 4517227": "miscopied",
             "<calc>4821*973</calc> 4690833 4690833": "wrong call",      # another product, copied faithfully
             "<calc>4821*937</calc> 4517277 hmm": "wrong call",          # no number after the call
             "<calc>4821*937</ca Sure! 4517": "broken call",             # never closed
             "<calc>4821/937</calc> error 5": "broken call",             # refused
             "Sure! 4517227": "guess"}
    for text, kind in kinds.items():
        assert hard_reply(hard, text) == kind, text
    assert set(kinds.values()) == set(HARD_REPLIES)
    # shares and mean scores over the hard prompts only, in HARD_REPLIES order, by hand
    prompts = [hard] * 4 + [add]
    texts = ["Sure! 1", "Sure! 4517277", "I don't know.", "<calc>4821*937</calc> 4517277 4517277", "12"]
    got = hard_replies(prompts, texts, [-1.0, 2.0, 0.5, 3.0, 9.0])
    assert got == {"right": {"rate": 0.5, "rm_score": 2.5}, "abstain": {"rate": 0.25, "rm_score": 0.5},
                   "guess": {"rate": 0.25, "rm_score": -1.0}}
    assert list(got) == ["right", "abstain", "guess"]
    assert hard_replies([add], ["12"], [1.0]) == {}


def test_chat_brackets_the_tools_result():
    from chat import show_tool_output
    text = "<calc>4821*937</calc> 4517277 Sure! 4517277 <calc>2+</calc> error <calc>3</calc>"
    shown = "<calc>4821*937</calc> [4517277] Sure! 4517277 <calc>2+</calc> [error] <calc>3</calc>"
    assert show_tool_output(text) == shown                           # an unanswered call stays as it is
