#!/usr/bin/env python3
"""PyTorch + PEFT reference for `llara llm bench`: the same LoRA training step (forward, backward,
AdamW on the adapters, loss on the last --answer-len tokens of each row) and the same greedy
generation (--gen-new-tokens after a --gen-prompt-len prompt, adapters merged), on the same
weights (a GGUF dequantized to f32 by transformers, or a Hugging Face folder), or random weights of
a config's shape (`--llm random:configs/llama2-7b.json`, as `llara llm bench --llm builtin:random:…`).
`--dtype bf16` keeps the model in bf16; `--checkpoint` turns on transformers' gradient checkpointing
(per decoder layer, as llara's `--checkpoint`). Prints one JSON line.

    pip install torch transformers peft gguf
    python3 scripts/reference/lora_step_torch.py --llm ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 scripts/reference/lora_step_torch.py --llm random:configs/llama2-7b.json --dtype bf16 --batch 1 --seq-len 512 --checkpoint
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--llm", required=True, help="a .gguf file or a Hugging Face model folder")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--answer-len", type=int, default=32)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--lora-r", type=int, default=8)
ap.add_argument("--lora-alpha", type=float, default=16.0)
ap.add_argument("--lora-dropout", type=float, default=0.05)
ap.add_argument("--gen-prompt-len", type=int, default=256)
ap.add_argument("--gen-new-tokens", type=int, default=32)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
ap.add_argument("--checkpoint", action="store_true")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
load_start = time.perf_counter()
if args.llm.startswith("random:"):
    from transformers import AutoConfig  # noqa: E402

    cfg = AutoConfig.from_pretrained(args.llm[len("random:"):])
    torch.set_default_dtype(dt)
    model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
elif args.llm.endswith(".gguf"):
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.llm)), gguf_file=os.path.basename(args.llm), dtype=dt
    )
else:
    model = AutoModelForCausalLM.from_pretrained(args.llm, dtype=dt)
load_seconds = time.perf_counter() - load_start
rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if args.checkpoint:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
vocab = model.config.vocab_size
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(
    model,
    LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
               target_modules=targets, task_type="CAUSAL_LM"),
)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(args.seed)
b, t, a = args.batch, args.seq_len, min(args.answer_len, args.seq_len - 1)
timed, losses = 0.0, []
for step in range(args.warmup + args.steps):
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t - a] = -100  # transformers shifts: positions t-a-1 .. t-2 predict the last a tokens
    start = time.perf_counter()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step >= args.warmup:
        timed += time.perf_counter() - start
        losses.append(out.loss.item())
rss_after_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"train_seconds_per_step": timed / max(args.steps, 1), "train_losses": losses,
                  "peak_rss_after_train_bytes": rss_after_train, "load_seconds": load_seconds}),
      file=sys.stderr, flush=True)

head = {"impl": "pytorch+peft", "llm": args.llm, "threads": args.threads, "dtype": args.dtype,
        "checkpoint": args.checkpoint, "torch": torch.__version__}
train_report = {
    "train_tokens_per_second": b * t * args.steps / timed,
    "train_seconds_per_step": timed / args.steps,
    "train_losses": losses,
    "peak_rss_after_load_bytes": rss_after_load,
    "peak_rss_after_train_bytes": rss_after_train,
    "load_seconds": load_seconds,
}
if args.gen_new_tokens == 0:
    # Training only (`--gen-new-tokens 0`).
    print(json.dumps({**head, "report": {**train_report, "peak_rss_bytes": rss_after_train}}))
    sys.exit(0)
model.eval()
merged = model.merge_and_unload()
prompt = torch.randint(0, vocab, (1, args.gen_prompt_len), generator=g)
with torch.no_grad():
    # The first call after merging (cold), then the prefill again, warm (as llara's bench does).
    start = time.perf_counter()
    merged.generate(prompt, max_new_tokens=1, do_sample=False)
    first_prefill = time.perf_counter() - start
    start = time.perf_counter()
    merged.generate(prompt, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    gen = merged.generate(prompt, max_new_tokens=args.gen_new_tokens, min_new_tokens=args.gen_new_tokens,
                          do_sample=False)
    total = time.perf_counter() - start
n = gen.shape[1] - prompt.shape[1]
print(json.dumps({**head, "report": {
    **train_report,
    "gen_prefill_seconds": prefill,
    "gen_first_prefill_seconds": first_prefill,
    "gen_decode_tokens_per_second": (n - 1) / max(total - prefill, 1e-9),
    "gen_new_tokens": int(n),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}}))
