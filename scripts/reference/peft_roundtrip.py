#!/usr/bin/env python3
"""Checks that an adapter llara saved loads in Python PEFT and gives llara's logits.

    llara llm logits --llm DIR --adapter ADAPTER --prompt "..." --out llara.safetensors
    python3 scripts/reference/peft_roundtrip.py --llm DIR --adapter ADAPTER --logits llara.safetensors --prompt "..."

Prints the max absolute logit difference (transformers + PEFT vs llara) and exits 1 above --tol.
"""
import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--llm", required=True)
ap.add_argument("--adapter", required=True)
ap.add_argument("--logits", required=True)
ap.add_argument("--prompt", required=True)
ap.add_argument("--tol", type=float, default=1e-4)
a = ap.parse_args()
tok = AutoTokenizer.from_pretrained(a.llm)
model = AutoModelForCausalLM.from_pretrained(a.llm, dtype=torch.float32)
model = PeftModel.from_pretrained(model, a.adapter).eval()
ours = load_file(a.logits)
ids = tok(a.prompt, return_tensors="pt").input_ids
assert ids[0].tolist() == ours["ids"].tolist(), (ids[0].tolist(), ours["ids"].tolist())
with torch.no_grad():
    theirs = model(input_ids=ids).logits[0]
d = (theirs - ours["logits"]).abs().max().item()
print(f"max |logit difference| PEFT vs llara: {d:.3e}")
sys.exit(0 if d <= a.tol else 1)
