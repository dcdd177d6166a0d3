"""A checkpoint -> a Hugging Face GPT-2 folder, so a trained policy can leave this project.

    python -m minirlhf.export out/ppo hf/ppo
    python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('hf/ppo')"
    python train_sft.py --init hf/ppo --data more.jsonl      # and back in

Writes, for a language model (kind "lm": the SFT, PPO, RRHF, DPO and GRPO checkpoints):

  config.json         GPT-2's Hugging Face config: GPT2LMHeadModel, n_positions = n_ctx = block_size
  model.safetensors   the weights in the layout transformers' own save_pretrained writes, so it loads
                      with no missing or unexpected keys: names with the `transformer.` prefix, no
                      lm_head.weight (tied to transformer.wte.weight, and tied back on load), no
                      attention-mask buffers, each linear weight transposed into Conv1D's (in, out)
  vocab.json, merges.txt, tokenizer_config.json
                      for the "gpt2" tokenizer only: derived offline from the ranks the checkpoint
                      carries (tokenizer.hf_vocab_and_merges), so transformers' GPT2Tokenizer gives
                      the ids tiktoken gives, and `--init OUT` reads the tokenizer back with no flag

The "bytes" tokenizer gets no tokenizer files: transformers has no tokenizer that is one token per UTF-8
byte with EOS at 256 and the two role markers at 257 and 258 (the ids of text are
`list(text.encode("utf-8"))`); the script says so.

A reward model (kind "scalar") is refused: its score is Linear(n_embd, 1) with a bias, read at the last
response token, which no transformers GPT-2 class computes (GPT2ForSequenceClassification's head has no
bias and reads the last non-padding token), and its trunk alone would not be a reward model.

The safetensors file is written here by hand: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the raw little-endian bytes back to back
(model.read_safetensors is the reader).
"""

import argparse
import json
import os
import sys

import torch

from minirlhf.checkpoint import CheckpointError, build_model, ckpt_path, load_checkpoint
from minirlhf.model import GPT2_CONV1D, GPT, GPTConfig
from minirlhf.tokenizer import EOS, ROLES, eos_id, hf_vocab_and_merges, load_tokenizer, ranks_of

SAFETENSORS_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write `tensors` as a safetensors file (the format model.read_safetensors reads)."""
    assert sys.byteorder == "little", "safetensors holds little-endian bytes; this writer copies memory as is"
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # the raw bytes of the elements
        header[name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad the header with spaces so the tensor bytes start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in chunks:
            f.write(data)


def hf_config(config: GPTConfig, eos: int) -> dict:
    """GPTConfig -> GPT-2's Hugging Face config.json (the keys of ../shared/data/tiny-gpt2/config.json)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # the older name of n_positions, which some readers still look for
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "use_cache": True,
        "summary_type": "cls_index",  # the summary_* keys configure GPT2DoubleHeadsModel; unused here
        "summary_use_proj": True,
        "summary_activation": None,
        "summary_proj_to_labels": True,
        "summary_first_dropout": 0.1,
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' GPT2LMHeadModel names (ours already are GPT-2's), Conv1D weights."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # the same tensor as transformer.wte.weight (tied)
        out[name] = t.t().contiguous() if name.endswith(GPT2_CONV1D) else t
    return out


def export(path: str, out: str) -> tuple[list[str], str]:
    """Write the checkpoint at `path` into the folder `out` -> (files written, a line about the tokenizer)."""
    ck = load_checkpoint(path)
    if ck["kind"] != "lm":
        raise CheckpointError(f"{ckpt_path(path)}: a reward model (kind {ck['kind']!r}) has no "
                              "GPT2LMHeadModel form: its scalar head has a bias and reads the last response "
                              "token; export a policy (out/sft, out/ppo, ...)")
    if not ck["config"].get("bias", True):
        raise CheckpointError(f"{ckpt_path(path)}: a model without biases has no GPT-2 form (GPT-2 has them)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a folder")
    model, enc = build_model(ck), load_tokenizer(ck)
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, f) for f in ("config.json", "model.safetensors")]
    with open(files[0], "w") as f:
        json.dump(hf_config(model.config, eos_id(enc)), f, indent=2)
    write_safetensors(files[1], hf_state_dict(model), {"format": "pt"})  # transformers reads "format"
    if enc.name != "gpt2":
        return files, (f"tokenizer {enc.name!r}: no tokenizer files written (transformers has no tokenizer "
                       "that is one token per UTF-8 byte; the ids of text are list(text.encode('utf-8')), "
                       f"EOS is {eos_id(enc)}, the role markers "
                       + " and ".join(f"{r!r} {enc.encode_single_token(r)}" for r in ROLES) + ")")
    vocab, merges = hf_vocab_and_merges(ranks_of(enc))
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size,
                        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "add_prefix_space": False}
    for name, text in [("vocab.json", json.dumps(vocab, ensure_ascii=False)),
                       ("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
                       ("tokenizer_config.json", json.dumps(tokenizer_config, indent=2))]:
        files.append(os.path.join(out, name))
        with open(files[-1], "w", encoding="utf-8") as f:
            f.write(text)
    return files, "tokenizer 'gpt2': vocab.json and merges.txt, derived from the checkpoint's BPE ranks"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a minirlhf checkpoint as a Hugging Face GPT-2 folder.")
    ap.add_argument("checkpoint", help="a language-model checkpoint folder or file (out/sft, out/ppo, ...)")
    ap.add_argument("out", help="the folder to write (created if absent; files of these names are replaced)")
    args = ap.parse_args(argv)
    files, tokenizer_note = export(args.checkpoint, args.out)
    print(f"wrote {', '.join(os.path.basename(f) for f in files)} to {args.out}")
    print(tokenizer_note)
    return files


if __name__ == "__main__":
    from minirlhf.cli import report_user_errors
    sys.excepthook = report_user_errors  # a bad checkpoint path: one line and exit status 2, as in the stages
    main()
