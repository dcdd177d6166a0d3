"""Interop: the GPT-2 path runs offline end to end, and a policy leaves in Hugging Face's format.

- Tokenizer: a checkpoint carries GPT-2's ranks, and `load_tokenizer` rebuilds the same encoding from
  them with tiktoken's download made to fail; a missing ranks file, and a name-only checkpoint with no
  network, are one-line TokenizerErrors naming what is missing.
- Hugging Face tokenizer files: vocab.json + merges.txt derived from the ranks read back to the same
  ranks, and a merges-based BPE written here (Hugging Face's rule) gives tiktoken's ids.
- Export: `minirlhf.export` -> `load_hf_gpt2` gives bit-identical logits; transformers'
  GPT2LMHeadModel loads it with no missing or unexpected keys and the same logits to 1e-4, and its
  GPT2Tokenizer the same ids (skipped where transformers is not installed); a reward model is refused.
- The GPT-2 loader refuses what it cannot reproduce (scale_attn_weights false, inverse-layer scaling,
  another activation, another MLP width) and an empty folder or a config missing a key, one line each.
- The user's path, in subprocesses with the network cut (sockets refuse, tiktoken's cache is empty): a
  random GPT-2 folder (2 layers, width 32, GPT-2's 50,257 tokens, weights only) and ../shared's
  gpt2.tiktoken, HH-RLHF records written here (multi-turn included), through train_sft.py ->
  train_rm.py -> train_ppo.py, train_rrhf.py, train_dpo.py, train_grpo.py -> export. The exported
  folder reads back (the weights, and the tokenizer from its own vocab.json + merges.txt, as
  `train_sft.py --init` reads them), evaluate scores the records' prompts without the gold judge, and
  chat.py answers.

Tests that need ../shared/data skip where it is absent (a user's clone).

Run: python -m pytest -q tests/test_interop.py
"""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import regex
import tiktoken
import torch

from conftest import SHARED_DATA, run_script
from minirlhf import tokenizer as tok
from minirlhf.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from minirlhf.evaluate import main as evaluate_main
from minirlhf.export import export, hf_config, hf_state_dict, write_safetensors
from minirlhf.export import main as export_main
from minirlhf.model import GPT, GPTConfig, ScalarHead, load_hf_gpt2, read_safetensors
from minirlhf.tokenizer import GPT2_PAT, TokenizerError, get_encoding, load_tokenizer

TEXTS = ["Hello world", "RLHF: rewards, KL  penalties\n\n& GAE -- it's 2024's ünïcödé 🙂\t!",
         "\n\nHuman: What is 4821 * 937?\n\nAssistant: 4517277", "    indented\r\n code()  "]


def tiny_gpt(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def logits(model, seed=1):
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by tests/test_interop.py")
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def offline(monkeypatch):
    """No network in this process: tiktoken's download and every socket connection fail."""
    no_network(monkeypatch)


@pytest.fixture(scope="module")
def gpt2_file():
    """../shared/data/gpt2.tiktoken, for this module's tests and its module-scoped `chain` (which the
    function-scoped `shared_data` fixture cannot serve)."""
    path = os.path.join(SHARED_DATA, "gpt2.tiktoken")
    if not os.path.isfile(path):
        pytest.skip("../shared/data is absent (a user's clone): GPT-2 tokenizer test skipped")
    return path


# ---- the tokenizer travels with the checkpoint -----------------------------------------------------

def test_tokenizer_rebuilt_offline_from_checkpoint(gpt2_file, tmp_path, offline):
    enc = get_encoding(gpt2_file)
    save_checkpoint(str(tmp_path), tiny_gpt(enc.n_vocab, n_embd=8, n_layer=1), enc.name, {}, 0)
    tok._LAST_RANKS.clear()  # nothing left over in this process: the checkpoint alone must do
    _, ck = load_model(str(tmp_path))
    assert ck["tokenizer"] == "gpt2" and isinstance(ck["tokenizer_ranks"], bytes)
    rebuilt = load_tokenizer(ck)
    assert rebuilt.name == "gpt2" and rebuilt.n_vocab == 50257 and rebuilt.eot_token == 50256
    for text in TEXTS:
        assert rebuilt.encode_ordinary(text) == enc.encode_ordinary(text)
    assert rebuilt.encode_ordinary("Hello world") == [15496, 995]
    # and a checkpoint saved from the rebuilt encoding carries the ranks on
    save_checkpoint(str(tmp_path / "next"), tiny_gpt(enc.n_vocab, n_embd=8, n_layer=1), rebuilt.name, {}, 1)
    assert load_checkpoint(str(tmp_path / "next"))["tokenizer_ranks"] == ck["tokenizer_ranks"]


def test_missing_ranks_file_is_a_clear_error(tmp_path, offline):
    missing = str(tmp_path / "gpt2.tiktoken")
    with pytest.raises(TokenizerError) as e:
        get_encoding(missing)
    assert missing in str(e.value) and "--tokenizer" in str(e.value) and "\n" not in str(e.value)
    # a folder with neither vocab.json/merges.txt nor a network
    with pytest.raises(TokenizerError, match="has no vocab.json and merges.txt.*--tokenizer"):
        get_encoding(str(tmp_path))
    # a checkpoint from before checkpoints carried their ranks, opened offline
    tok._LAST_RANKS.clear()
    save_checkpoint(str(tmp_path / "old"), tiny_gpt(50257, n_embd=8, n_layer=1), "gpt2", {}, 0)
    ck = load_checkpoint(str(tmp_path / "old"))
    assert "tokenizer_ranks" not in ck
    with pytest.raises(TokenizerError, match="carries no ranks.*could not download"):
        load_tokenizer(ck)
    # the bytes tokenizer needs nothing
    assert load_tokenizer({"tokenizer": "bytes"}).n_vocab == 259


# ---- Hugging Face's vocab.json + merges.txt from tiktoken's ranks -----------------------------------

def merges_bpe_ids(text, vocab, merges):
    """Hugging Face's rule, written independently of tokenizer.bpe: split with GPT-2's pattern, map the
    bytes to vocab.json's characters, join the pair that comes first in merges.txt until none applies."""
    show = tok.byte_to_unicode()
    order = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = []
    for piece in regex.findall(GPT2_PAT, text):
        parts = [show[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(order[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in order]
            if not pairs:
                break
            i = min(pairs)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def test_hf_tokenizer_files_round_trip(chain, gpt2_file, tmp_path):
    """The vocab.json + merges.txt that export derived from the chain's checkpoint (see `chain`)."""
    with open(os.path.join(chain["hf"], "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(chain["hf"], "merges.txt"), encoding="utf-8") as f:
        header, *merges = f.read().splitlines()
    enc = get_encoding(gpt2_file)
    assert header == "#version: 0.2" and len(vocab) == 50257 and len(merges) == 50000
    assert vocab["<|endoftext|>"] == 50256 and merges[:3] == ["Ġ t", "Ġ a", "h e"]  # GPT-2's first merges
    for text in TEXTS:
        assert merges_bpe_ids(text, vocab, merges) == enc.encode_ordinary(text), text
    assert tok.ranks_from_hf(chain["hf"]) == tok.ranks_of(enc)  # and back to the ranks
    # merges out of order are refused rather than read as another tokenizer
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    swapped = [header, merges[1], merges[0], *merges[2:]]
    (tmp_path / "merges.txt").write_text("\n".join(swapped), encoding="utf-8")
    with pytest.raises(TokenizerError, match="merges.txt:2: merge 'Ġ a' does not make token 256"):
        tok.ranks_from_hf(str(tmp_path))


def test_transformers_tokenizes_the_export_like_tiktoken(chain, gpt2_file):
    transformers = pytest.importorskip("transformers")
    enc = get_encoding(gpt2_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(chain["hf"])
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == enc.encode_ordinary(text), text


# ---- export --------------------------------------------------------------------------------------

def test_export_reads_back_with_identical_logits(tmp_path):
    model = tiny_gpt(259, block_size=48)
    save_checkpoint(str(tmp_path / "ck"), model, "bytes", {}, 0)
    files, note = export(str(tmp_path / "ck"), str(tmp_path / "hf"))
    assert sorted(os.path.basename(f) for f in files) == ["config.json", "model.safetensors"]
    assert "no tokenizer files" in note
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_positions"] == config["n_ctx"] == 48 and config["vocab_size"] == 259
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["eos_token_id"] == 256
    sd = read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in sd and sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D
    back = load_hf_gpt2(str(tmp_path / "hf")).eval()
    assert torch.equal(logits(back), logits(model))


def test_export_refuses_a_reward_model(tmp_path):
    save_checkpoint(str(tmp_path / "rm"), ScalarHead(tiny_gpt(259)), "bytes", {}, 0)
    with pytest.raises(CheckpointError, match="a reward model .* has no GPT2LMHeadModel form"):
        export(str(tmp_path / "rm"), str(tmp_path / "hf"))


def test_transformers_loads_the_export_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt(259, seed=3)
    with torch.no_grad():  # move every weight off its initial value (zero biases, unit LayerNorms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(str(tmp_path / "ck"), model, "bytes", {}, 0)
    export(str(tmp_path / "ck"), str(tmp_path / "hf"))
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf.eval()(idx).logits - model(idx)).abs().max().item() < 1e-4


# ---- the GPT-2 loader's refusals -------------------------------------------------------------------

def gpt2_folder(path, model, **config_changes):
    """`model` as a weights-only Hugging Face GPT-2 folder, its config.json edited (None deletes a key)."""
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"), hf_state_dict(model), {"format": "pt"})
    config = {**hf_config(model.config, model.config.vocab_size - 1), **config_changes}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)
    return str(path)


@pytest.mark.parametrize("change, message", [
    (dict(scale_attn_weights=False), "scale_attn_weights = false means attention scores not divided"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx = true"),
    (dict(activation_function="relu"), 'activation_function = "relu" means an activation other'),
    (dict(n_inner=64), "n_inner = 64"),
    (dict(n_embd=None), "missing key 'n_embd'"),
])
def test_loader_refuses_what_it_cannot_reproduce(tmp_path, change, message):
    folder = gpt2_folder(tmp_path / "m", tiny_gpt(50), **change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_hf_gpt2(folder)
    assert str(e.value).startswith(os.path.join(folder, "config.json")) and "\n" not in str(e.value)


def test_loader_accepts_what_it_reproduces(tmp_path):
    model = tiny_gpt(50)
    folder = gpt2_folder(tmp_path / "m", model, reorder_and_upcast_attn=True,  # float32 attention: same math
                         activation_function="gelu_pytorch_tanh", n_positions=None)  # n_ctx alone names it
    assert torch.equal(logits(load_hf_gpt2(folder).eval()), logits(model))


def test_an_empty_init_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json") as e:
        load_hf_gpt2(str(tmp_path / "empty"))
    assert str(e.value).startswith(str(tmp_path / "empty")) and "\n" not in str(e.value)


# ---- the user's path, offline ----------------------------------------------------------------------

HH = [("What is the capital of France?", "Paris is the capital of France.", "I do not know."),
      ("Hi there!\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.",
       "Why did the chicken cross the road? To get to the other side.", "No."),
      ("Can you spell cat backwards?", "Sure: tac.", "cat"),
      ("I need a recipe.\n\nAssistant: For what dish?\n\nHuman: Pancakes, please.",
       "Mix flour, eggs and milk, then fry.", "Buy some."),
      ("What is 2 + 2?", "2 + 2 = 4.", "5"),
      ("Say something kind.", "You are doing great.", "Whatever.")]


def offline_env(root):
    """Environment for a subprocess with no network: its sockets refuse to connect (a sitecustomize on
    PYTHONPATH, which Python imports at startup) and tiktoken's cache is an empty folder."""
    site = root / "offline_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import socket\n\n\ndef _refuse(*args, **kwargs):\n"
        "    raise OSError('network disabled by tests/test_interop.py')\n\n\n"
        "socket.socket.connect = socket.socket.connect_ex = _refuse\n")
    (root / "tiktoken_cache").mkdir()
    path = os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH", "")] if p)
    return dict(PYTHONPATH=path, TIKTOKEN_CACHE_DIR=str(root / "tiktoken_cache"), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def chain(gpt2_file, tmp_path_factory):
    """The user's path, run once: a weights-only GPT-2 folder and gpt2.tiktoken -> SFT -> RM -> PPO, RRHF,
    DPO, GRPO, each script in a subprocess with no network, then `python -m minirlhf.export` of the DPO policy
    (its main, in this process, offline too) -> {stage: folder, "data": the HH-RLHF file, "export": its
    output}."""
    root = tmp_path_factory.mktemp("interop")
    env = offline_env(root)
    connect = "import socket; socket.create_connection(('127.0.0.1', 9))"
    probe = subprocess.run([sys.executable, "-c", connect], env={**os.environ, **env}, capture_output=True,
                           text=True)
    assert "network disabled" in probe.stderr  # the subprocesses below really are offline
    # ../shared/data/tiny-gpt2's shape: 2 layers, 4 heads, width 32, 64 positions, GPT-2's vocabulary
    folder = gpt2_folder(root / "gpt2", tiny_gpt(50257, seed=5, n_head=4))
    data = root / "hh.jsonl"
    data.write_text("".join(json.dumps({"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}",
                                        "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}) + "\n"
                            for p, c, r in HH))
    out = {s: str(root / s) for s in ("sft", "rm", "ppo", "rrhf", "dpo", "grpo", "hf")}
    run = lambda script, *flags: run_script(script, *flags, env=env).stdout
    common = ["--data", data, "--seed", "0", "--max-steps", "1", "--batch-size", "2"]
    run("train_sft.py", "--init", folder, "--tokenizer", gpt2_file, *common, "--max-new-tokens", "6",
        "--out", out["sft"])
    run("train_rm.py", "--init", out["sft"], *common, "--eval-prompts", "2", "--max-new-tokens", "6",
        "--out", out["rm"])
    rl = ["--init", out["sft"], "--reward-model", out["rm"], *common, "--max-new-tokens", "6"]
    run("train_ppo.py", *rl, "--minibatch-size", "2", "--ppo-epochs", "1", "--out", out["ppo"])
    run("train_rrhf.py", *rl, "--k", "2", "--n-prompts", "2", "--out", out["rrhf"])
    run("train_dpo.py", "--init", out["sft"], *common, "--max-new-tokens", "6", "--out", out["dpo"])
    run("train_grpo.py", *rl, "--group-size", "2", "--minibatch-size", "1", "--out", out["grpo"])
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as printed:
        no_network(mp)
        export_main([out["dpo"], out["hf"]])
    out["export"] = printed.getvalue()
    return {**out, "data": str(data)}


def test_gpt2_path_offline_end_to_end(chain, capsys, offline):
    assert "vocab.json and merges.txt" in chain["export"]
    # the exported folder holds the same model and the same tokenizer, as train_sft.py --init reads them
    policy, ck = load_model(chain["dpo"])
    assert ck["tokenizer"] == "gpt2" and torch.equal(logits(load_hf_gpt2(chain["hf"]).eval()), logits(policy))
    enc = load_tokenizer(ck)
    assert get_encoding(chain["hf"]).encode_ordinary(TEXTS[1]) == enc.encode_ordinary(TEXTS[1])
    # evaluation on the records' prompts: what needs no gold judge
    evaluate_main([chain["ppo"], "--prompts", chain["data"], "--reward-model", chain["rm"], "--ref",
                   chain["sft"], "--n-prompts", "2", "--samples-per-prompt", "1", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert "gold metrics need the built-in task" in printed
    measured = next(line for line in printed.splitlines() if line.startswith(f"{chain['ppo']}: "))
    for key in ("rm_reward_mean", "kl_to_sft", "eos_rate", "response_len_mean"):
        assert f"{key} " in measured, measured
    assert "gold" not in measured and "nan" not in measured
    import chat
    chat.main([chain["ppo"], "What is the capital of France?", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith(f"{chain['ppo']}: ")
