#!/usr/bin/env python3
"""Tiny random Qwen2 and Qwen3 checkpoints and their transformers logits, for llara's parity tests.

For each architecture: a Hugging Face folder (config.json, model.safetensors, a byte-level
tokenizer.json), the same weights as GGUF in f32 and in Q8_0 (written with the `gguf` package the way
llama.cpp's converter names them: `qwen2` / `qwen3` architecture, no Q/K row permutation), and
`reference.safetensors`: transformers' logits at every position of two fixed id sequences.

    pip install torch transformers gguf
    python3 scripts/reference/qwen_tiny.py --out tests/fixtures/qwen

The weights are drawn from a fixed seed by transformers' own initialisation; nothing is copied from
a released model.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="tests/fixtures/qwen")
a = ap.parse_args()

IDS = [[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100], [200, 3, 17, 250, 9, 64, 64, 128]]
VOCAB = 257  # the 256 byte tokens and one merge, "Ġt"


def byte_tokens():
    """GPT-2's byte-to-unicode table: the 256 byte-level tokens, and one merged token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, [chr(c) for c in cs]))
    return [table[b] for b in range(256)] + ["Ġt"]


def tokenizer_json(tokens):
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [["Ġ", "t"]]},
    }


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    m = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{m[module]}.{kind}"


def write_gguf(path, arch, cfg, state, tokens, quant):
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ t"])
    w.add_eos_token_id(0)
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.detach().float().numpy()
        g = gguf_name(name)
        if quant and x.ndim == 2 and g != "token_embd.weight" and x.shape[1] % 32 == 0:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=0)
models = {
    # Qwen2: a bias on q/k/v, untied head.
    "qwen2": (Qwen2Config(**common, tie_word_embeddings=False), Qwen2ForCausalLM),
    # Qwen3: q/k norms, head_dim 16 (not hidden / heads = 8), tied head.
    "qwen3": (Qwen3Config(**common, head_dim=16, tie_word_embeddings=True), Qwen3ForCausalLM),
}
tokens = byte_tokens()
for arch, (cfg, cls) in models.items():
    torch.manual_seed(7)
    m = cls(cfg).float().eval()
    with torch.no_grad():
        # Norm weights away from 1 and biases away from 0, so that they are tested.
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    d = os.path.join(a.out, arch)
    os.makedirs(d, exist_ok=True)
    m.save_pretrained(d, safe_serialization=True)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(tokens), f)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    write_gguf(os.path.join(a.out, f"{arch}-f32.gguf"), arch, cfg, state, tokens, False)
    write_gguf(os.path.join(a.out, f"{arch}-q8_0.gguf"), arch, cfg, state, tokens, True)
    ref = {}
    with torch.no_grad():
        for i, ids in enumerate(IDS):
            ref[f"ids{i}"] = torch.tensor(ids, dtype=torch.int64)
            ref[f"logits{i}"] = m(torch.tensor([ids])).logits[0].float().contiguous()
    save_file(ref, os.path.join(a.out, f"{arch}-reference.safetensors"))
    print(arch, "written to", a.out)
