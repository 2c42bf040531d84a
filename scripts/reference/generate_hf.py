#!/usr/bin/env python3
"""Generation-based evaluation with Hugging Face transformers `generate`, on the prompts llara evaluated.

Reads llara's `predictions.jsonl` (from `llara eval --run RUN`, text-only runs: their prompts are plain
text), loads the same GGUF weights (dequantized to f32, as llara does), adds LLaRA's four special tokens with
the mean embedding row (as llara does), merges the run's PEFT adapter, and answers the same prompts greedily
in batches of --batch (left-padded), at most --max-new-tokens tokens, stopping at a newline.

    python3 scripts/reference/generate_hf.py --gguf M.gguf --adapter RUN/adapter \
        --predictions RUN/eval-test/predictions.jsonl --limit 32 --threads 2

Prints one JSON line: rows, seconds (generation only, after loading), rows_per_s, and how many answers are
identical to llara's (a check that both ran the same model on the same prompts).
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ADDED = ["[PH]", "[HistoryEmb]", "[CansEmb]", "[ItemEmb]"]

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--adapter")
ap.add_argument("--predictions", required=True)
ap.add_argument("--limit", type=int)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

rows = [json.loads(l) for l in open(a.predictions)]
if a.limit:
    rows = rows[: a.limit]
folder, name = os.path.split(os.path.abspath(a.gguf))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
vocab = model.get_input_embeddings().weight.shape[0]
tok.add_special_tokens({"additional_special_tokens": ADDED})
with torch.no_grad():
    mean = model.get_input_embeddings().weight.mean(0)
    model.resize_token_embeddings(vocab + len(ADDED), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    emb[vocab:] = mean
    head = model.get_output_embeddings().weight
    if head.data_ptr() != emb.data_ptr():
        head[vocab:] = head[:vocab].mean(0)
if a.adapter:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, a.adapter).merge_and_unload()
model.eval()
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token

same = 0
started = time.perf_counter()
for i in range(0, len(rows), a.batch):
    chunk = rows[i : i + a.batch]
    enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=a.max_new_tokens,
            do_sample=False,
            stop_strings=["\n"],
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
        )
    for r, ids in zip(chunk, out[:, enc.input_ids.shape[1] :]):
        text = tok.decode(ids, skip_special_tokens=True).split("\n")[0]
        same += text.strip() == r["output"].strip()
seconds = time.perf_counter() - started
print(json.dumps({"rows": len(rows), "seconds": seconds, "rows_per_s": len(rows) / seconds, "same_answers": same}))
