"""Pick the local verifier's operating point and write it into the verifier file.

The dataplane serves a semantic hit when a candidate is at or above a cosine floor, passes
the text checks (numbers, text past the embedder's window) and the verifier scores it at or
above a threshold; the first such candidate by similarity wins. This script runs that rule
over pairs the verifier was not trained on, as `semantis-dataplane eval` does: every `a` is
stored in one scope (with distractors, so the store is as crowded as the held-out
evaluation's), every `b` looked up with the best four candidates. It then picks the cosine
floor and score threshold with the highest recall whose precision reaches `--precision`
(a margin above the 0.90 goal), and stores both in the file's metadata as `min_similarity`
and `min_score`: the defaults a tenant gets.

`--pairs held-out` runs the same measurement on the held-out pairs instead and writes
nothing (a preview of `eval`; BENCHMARKS.md reports `eval`'s own figures).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from model import CrossEncoder, from_file  # noqa: E402
from train import fold, load_pairs, split  # noqa: E402

CANDIDATES = 4


def numbers(text):
    """`semantis_cache::verify::numbers`: digit runs with group and decimal separators,
    without leading zeros or trailing decimal zeros, sorted."""
    out = []
    for m in re.finditer(r"\d+(?:,(?=\d)\d*)*(?:\.(?=\d)\d+)?", text):
        s = m.group(0)
        int_part, _, frac = s.partition(".")
        int_part = int_part.replace(",", "").lstrip("0") or "0"
        frac = frac.rstrip("0")
        out.append(f"{int_part}.{frac}" if frac else int_part)
    return sorted(out)


@torch.no_grad()
def embed(model, tok, texts, batch=256):
    """all-MiniLM-L6-v2's sentence vectors: mean pooling, unit length (the local embedder)."""
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=256)
    out = []
    for i in range(0, len(texts), batch):
        encs = tok.encode_batch(texts[i : i + batch])
        ids = torch.tensor([e.ids for e in encs])
        mask = torch.tensor([e.attention_mask for e in encs])
        h = model.encode(ids, torch.zeros_like(ids), mask)
        m = mask.unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
        out.append(torch.nn.functional.normalize(v, dim=-1))
    tok.no_padding()
    return torch.cat(out).numpy()


@torch.no_grad()
def verify(model, tok, pairs, max_len, batch=128):
    tok.no_padding()
    tok.enable_truncation(max_length=max_len, strategy="longest_first")
    encs = tok.encode_batch(pairs)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
    out = np.zeros(len(encs), dtype=np.float32)
    for s in range(0, len(order), batch):
        chunk = order[s : s + batch]
        t = max(len(encs[i].ids) for i in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(chunk):
            n = len(encs[i].ids)
            ids[r, :n] = torch.tensor(encs[i].ids)
            types[r, :n] = torch.tensor(encs[i].type_ids)
            mask[r, :n] = 1
        out[chunk] = torch.sigmoid(model(ids, types, mask)).numpy()
    return out


class Clusters:
    """Questions the dataset labels duplicates of each other, transitively (union-find over
    every labelled pair of the file, case and white space folded): a served prompt in the
    query's cluster, or the same question, is a right answer; anything else counts wrong."""

    def __init__(self, pairs):
        self.parent = {}
        for p in pairs:
            if p["duplicate"]:
                self.parent[self.find(fold(p["a"]))] = self.find(fold(p["b"]))

    def find(self, x):
        while self.parent.setdefault(x, x) != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def right(self, query, served):
        q, s = fold(query), fold(served)
        return q == s or self.find(q) == self.find(s)


def lookups(base, tok, verifier, max_len, stored, queries, clusters, floor_min=0.6):
    """For each query (b, own index in `stored`, duplicate): its candidates at or above
    `floor_min` as (similarity, right, rejected, score), and whether an exact hit was right."""
    a_vec = embed(base, tok, stored)
    b_vec = embed(base, tok, [q for q, _, _ in queries])
    sims = b_vec @ a_vec.T
    folded = {}
    for i, a in enumerate(stored):
        folded.setdefault(fold(a), i)
    results, to_score = [], []
    for qi, (q, own, dup) in enumerate(queries):
        exact = folded.get(fold(q))
        if exact is not None:
            results.append({"exact": True, "cands": [], "dup": dup})
            continue
        top = np.argsort(-sims[qi])[:CANDIDATES]
        cands = []
        for j in top:
            s = float(sims[qi, j])
            if s < floor_min:
                break
            rejected = numbers(q) != numbers(stored[j])
            cands.append([s, clusters.right(q, stored[j]), rejected, None])
            if not rejected:
                to_score.append((len(results), len(cands) - 1, q, stored[j]))
        results.append({"exact": None, "cands": cands, "dup": dup})
    scores = verify(verifier, tok, [(q, c) for _, _, q, c in to_score], max_len)
    for (r, c, _, _), s in zip(to_score, scores):
        results[r]["cands"][c][3] = float(s)
    return results


def measure(results, floor, min_score):
    hits = right = 0
    dups = sum(r["dup"] for r in results)
    recalled = 0
    for r in results:
        if r["exact"] is not None:
            served = r["exact"]
        else:
            served = None
            for s, ok, rejected, score in r["cands"]:
                if s < floor:
                    break
                if not rejected and (min_score is None or score >= min_score):
                    served = ok
                    break
        if served is None:
            continue
        hits += 1
        right += served
        recalled += served and r["dup"]
    precision = right / hits if hits else 1.0
    return precision, recalled / dups, hits / len(results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--verifier", required=True, help="the file train.py wrote; calibrated in place")
    ap.add_argument("--report", help="add the calibration to this JSON report")
    ap.add_argument("--held-out", type=int, default=10_000)
    ap.add_argument("--validation", type=int, default=3_000)
    ap.add_argument("--store-size", type=int, default=10_000, help="entries in the store (validation a's plus training a's as distractors)")
    ap.add_argument("--precision", type=float, default=0.92)
    ap.add_argument("--min-recall", type=float, default=0.60, help="when no point reaches --precision: the most precise point with at least this recall")
    ap.add_argument("--pairs", choices=["validation", "held-out"], default="validation")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    verifier, meta = from_file(model_dir / "model.safetensors", config, args.verifier)
    base = CrossEncoder(model_dir / "model.safetensors", config, rank=0)
    base.eval()
    max_len = int(meta.get("max_len", 128))

    all_pairs = load_pairs(args.data)
    clusters = Clusters(all_pairs)
    train, valid, test, _ = split(all_pairs, args.held_out, args.validation, args.seed)
    pairs = valid if args.pairs == "validation" else test
    stored = [p["a"] for p in pairs]
    distractors = [p["a"] for p in train[: max(0, args.store_size - len(stored))]]
    queries = [(p["b"], i, p["duplicate"]) for i, p in enumerate(pairs)]
    print(f"{args.pairs}: {len(pairs)} lookups against {len(stored) + len(distractors)} entries; a hit is right when the dataset labels it a duplicate of the query, transitively", flush=True)
    results = lookups(base, tok, verifier, max_len, stored + distractors, queries, clusters)

    floors = [round(0.70 + 0.01 * i, 2) for i in range(21)]
    scores = [round(0.05 + 0.01 * i, 2) for i in range(91)]
    table = []
    for f in floors:
        p, r, h = measure(results, f, None)
        table.append({"floor": f, "min_score": None, "precision": p, "recall": r, "hit_rate": h})
        for s in scores:
            p, r, h = measure(results, f, s)
            table.append({"floor": f, "min_score": s, "precision": p, "recall": r, "hit_rate": h})
    cosine = [t for t in table if t["min_score"] is None]
    for t in cosine[::5]:
        print(f"  cosine {t['floor']:.2f}: precision {t['precision']:.3f} recall {t['recall']:.3f}")
    # The goal is precision ≥ --precision while recall ≥ --min-recall: the most recall among
    # points meeting both; failing that, the most precise point that keeps the recall (a
    # verifier that serves almost nothing is no cache); failing that, the precision alone.
    verified = [t for t in table if t["min_score"] is not None]
    both = [t for t in verified if t["precision"] >= args.precision and t["recall"] >= args.min_recall]
    enough = [t for t in verified if t["recall"] >= args.min_recall]
    precise = [t for t in verified if t["precision"] >= args.precision]
    reached = bool(both)
    if both:
        best = max(both, key=lambda t: (t["recall"], t["precision"]))
    elif enough:
        print(f"no operating point reaches precision {args.precision} at recall {args.min_recall}; taking the most precise with that recall", flush=True)
        best = max(enough, key=lambda t: (t["precision"], t["recall"]))
    elif precise:
        best = max(precise, key=lambda t: (t["recall"], t["precision"]))
    else:
        best = None
    for target in (0.85, 0.90, 0.92, 0.95):
        cand = [t for t in table if t["min_score"] is not None and t["precision"] >= target]
        if cand:
            b = max(cand, key=lambda t: t["recall"])
            print(f"  precision ≥ {target:.2f}: floor {b['floor']:.2f} score {b['min_score']:.2f} -> precision {b['precision']:.3f} recall {b['recall']:.3f}")
    if best is None:
        print("no operating point reaches the precision or the recall; the file keeps its thresholds", flush=True)
        return
    print(
        f"operating point: cosine floor {best['floor']:.2f}, score {best['min_score']:.2f}: "
        f"precision {best['precision']:.3f}, recall {best['recall']:.3f}, hit rate {best['hit_rate']:.3f}",
        flush=True,
    )
    if args.pairs != "validation":
        return
    with safe_open(args.verifier, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = dict(meta)
    meta["min_similarity"] = f"{best['floor']:.2f}"
    meta["min_score"] = f"{best['min_score']:.2f}"
    save_file(tensors, args.verifier, metadata=meta)
    print(f"wrote min_similarity {meta['min_similarity']} and min_score {meta['min_score']} into {args.verifier}")
    if args.report:
        report = json.loads(Path(args.report).read_text()) if Path(args.report).exists() else {}
        report["calibration"] = {"pairs": args.pairs, "store_size": len(stored) + len(distractors), "target_precision": args.precision, "target_reached": reached, "min_recall": args.min_recall, **best}
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
