#!/usr/bin/env python3
"""Aggregates scripts/sr_quality.sh's runs into a markdown table (mean ± std over seeds)."""
import glob
import json
import os
import statistics
import sys

out, epochs, patience = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {}
for path in sorted(glob.glob(f"{out}/runs/*/metrics.json")):
    name = os.path.basename(os.path.dirname(path))
    d, m, s = name.rsplit("-", 2)
    met = json.load(open(path))
    log = [json.loads(l) for l in open(os.path.join(os.path.dirname(path), "train_log.jsonl"))]
    eps = statistics.median(e["examples_per_second"] for e in log)
    rows.setdefault((d, m), []).append((met["hr@1"], met["ndcg@5"], met["best_epoch"], len(log), met["train_seconds"], eps))


def ms(xs):
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"


print("# Sequential recommenders: llara vs. LLaRA's released checkpoints\n")
print(f"Fixed 20-candidate test sets from `llara data prepare --from llara-jsonl` (seed 42, min history 3).")
print(f"llara: `llara train-sr --epochs {epochs} --patience {patience}` with default hyper-parameters "
      "(Adam lr 1e-3, L2 1e-4, batch 256, dropout 0.1, hidden 64, BCE with one negative), seeds as listed; "
      "best epoch by valid HR@1. Released: `llara eval-sr` on LLaRA's weights in `../shared/recmodels`. "
      "Runs went two at a time on the 2-core machine (one thread each), so examples/s here is below the "
      "quiet-machine figure of `scripts/bench_sr.sh`. Command: `scripts/sr_quality.sh`.\n")
print("| dataset | model | source | seeds | HR@1 | NDCG@5 | best epoch (mean) | epochs run (mean) | train s (mean) | examples/s (median) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (d, m), rs in sorted(rows.items()):
    hr, nd, be, er, sec, eps = zip(*rs)
    print(f"| {d} | {m} | llara | {len(rs)} | {ms(hr)} | {ms(nd)} | {statistics.mean(be):.1f} | {statistics.mean(er):.1f} | {statistics.mean(sec):.0f} | {statistics.median(eps):.0f} |")
    rel = f"{out}/released-{d}-{m}.json"
    if os.path.exists(rel):
        r = json.load(open(rel))
        print(f"| {d} | {m} | LLaRA released | - | {r['hr@1']:.4f} | {r['ndcg@5']:.4f} | - | - | - | - |")
