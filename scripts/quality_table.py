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


def position_bias(path):
    """The share of rows whose top-scored candidate sits at the most frequent list position (1/K when
    a model has no position preference and targets are spread evenly), and that position (1-based)."""
    counts = {}
    n = 0
    for l in open(path):
        r = json.loads(l)
        s = r["scores"]
        top = max(range(len(s)), key=lambda i: s[i])
        counts[top] = counts.get(top, 0) + 1
        n += 1
    pos, c = max(counts.items(), key=lambda kv: kv[1])
    return c / max(n, 1), pos + 1


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


def hours(seconds):
    """Training time in hours for the headline: one decimal, two below 0.1 h (a 3-minute run is 0.05 h, not 0.0)."""
    h = seconds / 3600
    return f"{h:.1f}" if h >= 0.1 else f"{h:.2f}"


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
        con = os.path.join(run, "eval-test-constrained", "metrics.json")
        cm = json.load(open(con)) if os.path.exists(con) else None
        extra = {}
        for s in os.environ.get("CAND_SEEDS", "").split():
            ep = os.path.join(run, f"eval-test-score-cands{s}", "scores.jsonl")
            if os.path.exists(ep):
                extra[s] = {r: k == 0 for r, k in ranks(ep).items()}
        log = [json.loads(l) for l in open(os.path.join(run, "train_log.jsonl"))]
        train_s = sum(l["tokens"] / l["tokens_per_second"] for l in log)
        toml = open(os.path.join(run, "tune.toml")).read()
        samples = next((l.split("=")[1].strip() for l in toml.splitlines() if l.startswith("max_train_samples")), "all")
        seed = next((l.split("=")[1].strip() for l in toml.splitlines() if l.startswith("seed")), "?")
        models.append((f"llara {v}", {r: k == 0 for r, k in rk.items()}, {
            "hr5": sm.get("hr@5"), "ndcg10": sm.get("ndcg@10"), "scorer": sm.get("scorer", "answer"),
            "gen": gm, "con": cm, "steps": len(log), "rows": samples, "train_s": train_s, "seed": seed,
            "cands": extra, "bias": position_bias(sp),
        }))
    for b in ["sasrec", "sasrec-llara", "gru4rec", "caser", "popularity", "markov", "cooccurrence"]:
        sp = os.path.join(out, b, "scores.jsonl")
        if os.path.exists(sp):
            m = json.load(open(os.path.join(out, b, "metrics.json")))
            extra = {}
            for s in os.environ.get("CAND_SEEDS", "").split():
                ep = os.path.join(out, f"{b}-cands{s}", "scores.jsonl")
                if os.path.exists(ep):
                    extra[s] = {r: k == 0 for r, k in ranks(ep).items()}
            models.append((b, {r: k == 0 for r, k in ranks(sp).items()}, {
                "hr5": m.get("hr@5"), "ndcg10": m.get("ndcg@10"), "source": m.get("source"), "cands": extra,
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
            f"vs text-only {hr(text)[0]:.2f} (p{'<0.001' if p < 0.001 else f'={p:.3f}'}), {hours(best[2]['train_s'])} h train"
        )
        lines.append("")
    lines.append(f"# Quality on {dataset}: HR@1 on the fixed test candidates (20 per user, chance 0.05)")
    lines.append("")
    lines.append("HR@1 with a 95% Wilson interval over users; p-values: exact McNemar test on the per-user hits, "
                 "paired on the same users and candidates (n10/n01: users only the row's model / only the other got right). "
                 "Top position share: how often the model's top candidate sits at its most frequent list position (position bias; about 0.05–0.1 for a model without one).")
    lines.append("")
    lines.append("| model | HR@1 [95% CI] | users | HR@5 | NDCG@10 | vs SASRec: p (n10/n01) | vs text-only: p (n10/n01) | generation HR@1 (valid ratio, rows) | constrained generation HR@1 (rows) | top position share (position) | train rows / steps / time | seed |")
    lines.append("|---|---|---:|---:|---:|---|---|---|---|---|---|---:|")
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
        c = x.get("con")
        con = f"{c['hr@1']:.3f} ({c['rows']})" if c else "-"
        bias = f"{x['bias'][0]:.2f} ({x['bias'][1]})" if "bias" in x else "-"
        tr = f"{x['rows']} / {x['steps']} / {x['train_s'] / 60:.0f} min" if "steps" in x else "-"
        f = lambda y: "-" if y is None else f"{y:.3f}"
        lines.append(f"| {name} | {v:.3f} [{lo:.3f}, {hi:.3f}] | {n} | {f(x.get('hr5'))} | {f(x.get('ndcg10'))} | "
                     f"{cmp[0]} | {cmp[1]} | {gen} | {con} | {bias} | {tr} | {x.get('seed', '-')} |")
    seeds = os.environ.get("CAND_SEEDS", "").split()
    if seeds:
        lines.append("")
        lines.append(f"## Other candidate sets (`data prepare --seed S`, the same users and models)")
        lines.append("")
        lines.append("HR@1 by scoring on each candidate seed [95% Wilson interval]; the last column: mean ± sd over the seeds.")
        lines.append("")
        allseeds = ["42"] + seeds
        lines.append("| model | " + " | ".join(f"seed {s}" for s in allseeds) + " | mean ± sd |")
        lines.append("|---|" + "---|" * len(allseeds) + "---|")
        for name, h, x in models:
            sets = [h] + [x.get("cands", {}).get(s) for s in seeds]
            if any(v is None for v in sets):
                continue
            vals = [hr(v) for v in sets]
            ms = [v[0] for v in vals]
            mean = sum(ms) / len(ms)
            sd = math.sqrt(sum((m - mean) ** 2 for m in ms) / max(len(ms) - 1, 1))
            cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi, _ in vals]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} ± {sd:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
