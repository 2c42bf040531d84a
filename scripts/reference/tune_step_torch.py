#!/usr/bin/env python3
"""PyTorch + PEFT reference for LLaRA's training step, replaying the exact batches `llara tune` trained on.

`llara tune ... --dump-batches B.jsonl` writes one line per micro-batch: the optimizer step, whether the
step is hybrid, and per row the token ids (prompt + answer), where the answer starts and the recommender
item behind each [HistoryEmb]/[CansEmb] slot. This script runs the same steps the way a careful PyTorch
implementation would: the same GGUF weights (dequantized to f32), LLaRA's four added tokens with the mean
embedding row, PEFT LoRA on the same projections, the projector `Linear(d_sr, d) -> GELU -> Linear(d, d)`
on the recommender's item embeddings written into the slot positions, right-padded micro-batches with an
attention mask, the loss on the answer tokens only (the LM head applied to those rows alone), gradient
accumulation, AdamW. Prints one JSON line with tokens/s (real tokens, as llara counts them) and peak RSS.

    pip install torch transformers peft gguf
    python3 scripts/reference/tune_step_torch.py --gguf M.gguf --sr SR/model.safetensors --batches B.jsonl
"""
import argparse
import json
import os
import resource
import time
from collections import OrderedDict

import torch
from safetensors.torch import load_file

ADDED = ["[PH]", "[HistoryEmb]", "[CansEmb]", "[ItemEmb]"]

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--sr", required=True, help="the recommender's model.safetensors (item_embeddings.weight)")
ap.add_argument("--batches", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--warmup", type=int, default=1, help="optimizer steps left out of the timing")
ap.add_argument("--lora-r", type=int, default=8)
ap.add_argument("--lora-alpha", type=float, default=32.0)
ap.add_argument("--lora-dropout", type=float, default=0.1)
ap.add_argument("--lr", type=float, default=7e-4)
ap.add_argument("--bf16", action="store_true", help="autocast the forward pass to bf16")
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

folder, name = os.path.split(os.path.abspath(a.gguf))
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
vocab = model.get_input_embeddings().weight.shape[0]
with torch.no_grad():
    mean = model.get_input_embeddings().weight.mean(0)
    model.resize_token_embeddings(vocab + len(ADDED), mean_resizing=False)
    model.get_input_embeddings().weight[vocab:] = mean
d = model.config.hidden_size
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))
model.train()
items = load_file(a.sr)["item_embeddings.weight"].float()
projector = torch.nn.Sequential(torch.nn.Linear(items.shape[1], d), torch.nn.GELU(), torch.nn.Linear(d, d))
params = [p for p in model.parameters() if p.requires_grad] + list(projector.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
slot_ids = torch.tensor([vocab + 1, vocab + 2])  # [HistoryEmb], [CansEmb]
inner = model.get_base_model()
embed = inner.get_input_embeddings()
head = inner.get_output_embeddings()

steps = OrderedDict()
for line in open(a.batches):
    b = json.loads(line)
    steps.setdefault(b["step"], []).append(b)


def micro_step(batch, share):
    rows = batch["rows"]
    t = max(len(r["ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["ids"])] = torch.tensor(r["ids"])
        mask[i, : len(r["ids"])] = 1
    x = embed(ids)
    if batch["hybrid"]:
        where = torch.isin(ids, slot_ids) & mask.bool()
        slot_items = torch.tensor([it for r in rows for it in r["slot_items"]], dtype=torch.long)
        x = x.clone()
        x[where] = projector(items[slot_items])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
        h = inner.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        pos = [(i, p - 1) for i, r in enumerate(rows) for p in range(r["answer_start"], len(r["ids"]))]
        tgt = torch.tensor([rows[i]["ids"][p + 1] for i, p in pos])
        rows_h = h[torch.tensor([i for i, _ in pos]), torch.tensor([p for _, p in pos])]
        logits = head(rows_h).float()
    loss = torch.nn.functional.cross_entropy(logits, tgt)
    (loss * share).backward()
    return loss.item(), int(mask.sum())


timed, tokens, losses = 0.0, 0, []
for k, (step, batches) in enumerate(steps.items()):
    n = sum(len(b["rows"]) for b in batches)
    start = time.perf_counter()
    step_loss, step_tokens = 0.0, 0
    for b in batches:
        l, tk = micro_step(b, len(b["rows"]) / n)
        step_loss += l * len(b["rows"]) / n
        step_tokens += tk
    opt.step()
    opt.zero_grad(set_to_none=True)
    if k >= a.warmup:
        timed += time.perf_counter() - start
        tokens += step_tokens
    losses.append(step_loss)
print(json.dumps({
    "impl": "pytorch+peft" + ("+bf16" if a.bf16 else ""), "threads": a.threads, "torch": torch.__version__,
    "steps": len(steps), "timed_steps": max(len(steps) - a.warmup, 0),
    "tokens_per_second": tokens / timed if timed else None,
    "losses": losses,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
