#!/usr/bin/env python3
"""Export a training checkpoint to models/tiny-arith/ in the LLaDA layout:
model.safetensors (bf16), config.json (LLaDA field set), tokenizer.json,
tokenizer_config.json.

  python3 tools/export.py                  # tools/work/tiny-arith-ckpt/ckpt.pt -> models/tiny-arith
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def llada_config(cfg, max_seq=tasks.MAX_SEQUENCE):
    # same field set as a LLaDA config.json (see shared/golden/llada_tiny_s1/config.json)
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": cfg["d_model"],
        "embedding_dropout": 0.0,
        "embedding_size": cfg["embedding_size"],
        "eos_token_id": cfg["eos_token_id"],
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "cpu",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": cfg["mask_token_id"],
        "max_sequence_length": max_seq,
        "mlp_hidden_size": cfg["mlp_hidden_size"],
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": cfg["n_heads"],
        "n_kv_heads": cfg["n_kv_heads"],
        "n_layers": cfg["n_layers"],
        "pad_token_id": cfg["eos_token_id"],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": float(cfg["rope_theta"]),
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": cfg["vocab_size"],
        "weight_tying": False,
    }


def build_tokenizer():
    """Character-level tokenizer: a BPE model with no merges over the 95
    printable ASCII characters (one token per character, no pre-tokenizer, so
    spaces are tokens too), a Fuse decoder, and the special tokens as added
    special tokens."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers import AddedToken
    vocab = {c: i for i, c in enumerate(tasks.PRINTABLE)}
    for tok, i in tasks.SPECIALS:
        vocab[tok] = i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=tasks.UNK_TOKEN))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok, _ in tasks.SPECIALS])
    return tk


def check_tokenizer(path):
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(path)
    for r in tasks.eval_set(50):
        p = r["prompt"]
        enc = tk.encode(p, add_special_tokens=False).ids
        assert enc == tasks.encode(p), (p, enc)
        assert len(enc) == len(p)
        a = tasks.encode(r["answer"]) + [tasks.EOS_ID] * 3
        assert tk.decode(a, skip_special_tokens=True) == r["answer"]
    s = "add 4821+937=<|mask|><|eos|>"
    ids = tk.encode(s, add_special_tokens=False).ids
    assert ids == tasks.encode("add 4821+937=") + [tasks.MASK_ID, tasks.EOS_ID], ids
    assert tk.token_to_id(tasks.MASK_TOKEN) == tasks.MASK_ID
    assert tk.token_to_id(tasks.EOS_TOKEN) == tasks.EOS_ID
    assert tk.get_vocab_size() == tasks.N_TOKENS
    print(f"tokenizer ok: {path}: 'add 4821+937=' -> {tk.encode('add 4821+937=').ids}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=os.path.join(tasks.CKPT_DIR, "ckpt.pt"))
    ap.add_argument("--out", default="models/tiny-arith")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    st = torch.load(args.ckpt, weights_only=False, map_location="cpu")
    cfg = st["config"]
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in st["model"].items()}
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(llada_config(cfg), f, indent=1)
        f.write("\n")
    tk = build_tokenizer()
    tk_path = os.path.join(args.out, "tokenizer.json")
    tk.save(tk_path)
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in tasks.SPECIALS}
    tcfg = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": tasks.EOS_TOKEN,
        "mask_token": tasks.MASK_TOKEN,
        "model_max_length": 256,
        "pad_token": tasks.EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": tasks.UNK_TOKEN,
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=1)
        f.write("\n")
    check_tokenizer(tk_path)
    print(f"exported step {st['step']} to {args.out}: {sorted(os.listdir(args.out))}")
    for k in list(tensors)[:3] + [k for k in tensors if not k.startswith("model.transformer.blocks")]:
        print(f"  {k} {list(tensors[k].shape)} {tensors[k].dtype}")


if __name__ == "__main__":
    main()
