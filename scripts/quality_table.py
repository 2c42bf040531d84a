#!/usr/bin/env python3
"""The quality table of scripts/quality.sh: every model's HR@1 on the same fixed test candidates with a
95% Wilson interval over users, and paired comparisons on the same users (exact McNemar test on the
per-user hits).

usage: scripts/quality_table.py OUT DATASET VARIANT...   (reads OUT/llara-VARIANT/eval-test-score/scores.jsonl,
       OUT/llara-VARIANT/eval-test/metrics.json, OUT/{sasrec,popularity,markov,cooccurrence}/scores.jsonl)
"""
import json
import math
import os
import sys


def ranks(path):
    rows = [json.loads(l) for l in open(path)]
    return {r["row"]: r["rank"] for r in rows}


def wilson(k, n, z=1.959964):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


def mcnemar(a, b):
    """Exact two-sided McNemar p-value for paired hits a, b (dicts row -> bool) on their common rows."""
    common = sorted(set(a) & set(b))
    n10 = sum(1 for r in common if a[r] and not b[r])
    n01 = sum(1 for r in common if b[r] and not a[r])
    n = n10 + n01
    if n == 0:
        return 1.0, n10, n01
    k = min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail), n10, n01


def fmt_p(p):
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def main():
    out, dataset, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
    models = []  # (name, hits dict, extra dict)
    for v in variants:
        run = os.path.join(out, f"llara-{v}")
        sp = os.path.join(run, "eval-test-score", "scores.jsonl")
        if not os.path.exists(sp):
            continue
        rk = ranks(sp)
        sm = json.load(open(os.path.join(run, "eval-test-score", "metrics.json")))
        gen = os.path.join(run, "eval-test", "metrics.json")
        gm = json.load(open(gen)) if os.path.exists(gen) else None
        log = [json.loads(l) for l in open(os.path.join(run, "train_log.jsonl"))]
        train_s = sum(l["tokens"] / l["tokens_per_second"] for l in log)
        toml = open(os.path.join(run, "tune.toml")).read()
        samples = next((l.split("=")[1].strip() for l in toml.splitlines() if l.startswith("max_train_samples")), "all")
        seed = next((l.split("=")[1].strip() for l in toml.splitlines() if l.startswith("seed")), "?")
        models.append((f"llara {v}", {r: k == 0 for r, k in rk.items()}, {
            "hr5": sm.get("hr@5"), "ndcg10": sm.get("ndcg@10"), "scorer": sm.get("scorer", "answer"),
            "gen": gm, "steps": len(log), "rows": samples, "train_s": train_s, "seed": seed,
        }))
    for b in ["sasrec", "popularity", "markov", "cooccurrence"]:
        sp = os.path.join(out, b, "scores.jsonl")
        if os.path.exists(sp):
            m = json.load(open(os.path.join(out, b, "metrics.json")))
            models.append((b, {r: k == 0 for r, k in ranks(sp).items()}, {
                "hr5": m.get("hr@5"), "ndcg10": m.get("ndcg@10"), "source": m.get("source"),
            }))
    by = {n: h for n, h, _ in models}
    sas = by.get("sasrec")
    text = by.get("llara text-only")

    def hr(h):
        k, n = sum(h.values()), len(h)
        lo, hi = wilson(k, n)
        return k / max(n, 1), lo, hi, n

    lines = []
    best = next((m for m in models if m[0] == "llara hybrid-prior"), None)
    if best and sas and text:
        b, _, _, _ = hr(best[1])
        lo, hi = wilson(sum(best[1].values()), len(best[1]))
        p, _, _ = mcnemar(best[1], text)
        lines.append(
            f"{dataset} HR@1 (scoring): llara hybrid {b:.2f} [{lo:.2f}, {hi:.2f}] vs SASRec {hr(sas)[0]:.2f} "
            f"vs text-only {hr(text)[0]:.2f} (p{'<0.001' if p < 0.001 else f'={p:.3f}'}), {best[2]['train_s'] / 3600:.1f} h train"
        )
        lines.append("")
    lines.append(f"# Quality on {dataset}: HR@1 on the fixed test candidates (20 per user, chance 0.05)")
    lines.append("")
    lines.append("HR@1 with a 95% Wilson interval over users; p-values: exact McNemar test on the per-user hits, "
                 "paired on the same users and candidates (n10/n01: users only the row's model / only the other got right).")
    lines.append("")
    lines.append("| model | HR@1 [95% CI] | users | HR@5 | NDCG@10 | vs SASRec: p (n10/n01) | vs text-only: p (n10/n01) | generation HR@1 (valid ratio, rows) | train rows / steps / time | seed |")
    lines.append("|---|---|---:|---:|---:|---|---|---|---|---:|")
    for name, h, x in models:
        v, lo, hi, n = hr(h)
        cmp = []
        for other in (sas, text):
            if other is None or other is h:
                cmp.append("-")
            else:
                p, a, b = mcnemar(h, other)
                cmp.append(f"{fmt_p(p)} ({a}/{b})")
        g = x.get("gen")
        gen = f"{g['hr@1']:.3f} ({g['valid_ratio']:.2f}, {g['rows']})" if g else "-"
        tr = f"{x['rows']} / {x['steps']} / {x['train_s'] / 60:.0f} min" if "steps" in x else "-"
        f = lambda y: "-" if y is None else f"{y:.3f}"
        lines.append(f"| {name} | {v:.3f} [{lo:.3f}, {hi:.3f}] | {n} | {f(x.get('hr5'))} | {f(x.get('ndcg10'))} | "
                     f"{cmp[0]} | {cmp[1]} | {gen} | {tr} | {x.get('seed', '-')} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
