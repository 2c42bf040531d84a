#!/usr/bin/env python3
"""docs/results/sr_recipe_search.md from scripts/sr_recipe_search.sh's runs (one line per recipe)."""
import glob
import json
import os
import statistics
import sys

out = sys.argv[1]
groups = {}
for path in sorted(glob.glob(f"{out}/*/metrics.json")):
    name = os.path.basename(os.path.dirname(path))
    rest, s = name.rsplit("-s", 1)
    recipe, d, m = rest.rsplit("-", 2)
    met = json.load(open(path))
    cfg = json.load(open(os.path.join(os.path.dirname(path), "config.json")))["training"]
    groups.setdefault((d, m, recipe), []).append((int(s), met, cfg))

released = {("lastfm", "sasrec"): 0.2869,  # expected HR@1 0.2890 ("movielens", "sasrec"): 0.3789, ("movielens", "gru4rec"): 0.4105,
            ("movielens", "caser"): 0.3789}
print("# Recipe search for llara's recommenders (exploration, 1-3 seeds)\n")
print("How the default recipe of `llara train-sr` was found: single runs (seeds 1-3 where promising), "
      "LastFM's 122 / MovieLens' 95 fixed test candidate sets. Single runs on these test sets cannot separate "
      "0.05 (a 95% interval over users is about ±0.08); expected HR@1 (HR@1 averaged over every candidate set) "
      "removes the candidate draw's share of that noise, not the users'. The chosen recipe is then measured "
      "with 5 seeds in `sr_quality.md`. Every run selects its epoch by expected valid HR@1. Command: "
      "`scripts/sr_recipe_search.sh` (AMD EPYC, 2 cores, two runs at a time).\n")
print("| dataset | model | recipe | loss | L2 | lr | dropout | hidden | batch | EMA | seeds | test HR@1 per seed | mean | expected HR@1 (mean) | valid expected HR@1 (mean) | best epoch (mean) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (d, m, recipe), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], statistics.mean(x[1].get("expected_hr@1", 0) for x in kv[1]))):
    rs.sort(key=lambda x: x[0])
    c = rs[0][2]
    hr = [x[1]["hr@1"] for x in rs]
    ex = [x[1].get("expected_hr@1", float("nan")) for x in rs]
    vex = [x[1]["valid"].get("expected_hr@1", float("nan")) for x in rs]
    be = [x[1]["best_epoch"] for x in rs]
    loss = c["loss"] + (f" ({c.get('negatives')} neg)" if c["loss"] in ("sampled", "gbce") else "")
    print(f"| {d} | {m} | {recipe} | {loss} | {c['l2']:g} | {c['lr']:g} | {c['dropout']} | {c['hidden']} | {c['batch_size']} | "
          f"{c.get('ema', 0) or '-'} | {','.join(str(x[0]) for x in rs)} | {' / '.join(f'{h:.3f}' for h in hr)} | "
          f"{statistics.mean(hr):.3f} | {statistics.mean(ex):.3f} | {statistics.mean(vex):.3f} | {statistics.mean(be):.0f} |")
print()
for (d, m), r in released.items():
    print(f"- LLaRA's released {m} on {d}: test HR@1 {r:.4f}.")
print("- The `ema-d6` runs used a constant decay 0.999 from the first step; the shipped `--ema` ramps the "
      "decay up as (1 + t) / (10 + t), which only changes the average's first ~9,000 steps (≈ 48 LastFM epochs; "
      "the best epochs are past 100).")
