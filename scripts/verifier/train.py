"""Train the `local` verifier: a cross-encoder that reads (query, cached prompt) and says
whether the cached answer answers the query. Initialised from all-MiniLM-L6-v2 (the local
embedder's weights); only low-rank adapters and a few small tensors are trained, so the file
the dataplane loads (`--out`) is a couple of megabytes that sit on top of weights every
machine running the local embedder already has.

Data: the Quora Question Pairs dev subset in ../shared/data. The first `--held-out` pairs
are never trained on, and neither is any pair that shares a question (case and white space
folded) with them: those pairs are what BENCHMARKS.md measures the verifier on. Of the rest,
`--validation` pairs (seeded) are kept aside to pick the decision threshold; the others train.

Reproduce: `bash scripts/verifier/train.sh` (CPU only; about an hour on two cores).
"""

import argparse
import gzip
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from model import CrossEncoder  # noqa: E402


def fold(s):
    return " ".join(s.lower().split())


def load_pairs(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def split(pairs, held_out, validation, seed):
    test = pairs[:held_out]
    seen = {fold(p["a"]) for p in test} | {fold(p["b"]) for p in test}
    rest = [p for p in pairs[held_out:] if fold(p["a"]) not in seen and fold(p["b"]) not in seen]
    rng = random.Random(seed)
    rng.shuffle(rest)
    return rest[validation:], rest[:validation], test, len(pairs) - held_out - len(rest)


def augment(train, model_dir, config, tok, cluster_positives, mined_negatives, seed):
    """More training pairs from the training pairs alone (nothing held out is touched):
    positives between questions the labels join into one duplicate cluster (transitively),
    at most `cluster_positives` per cluster; and `mined_negatives` hard negatives, each a
    training question's nearest neighbour by the embedder (cosine ≥ 0.8) that its cluster
    does not contain — what the verifier sees at serving, where the nearest stored prompt of
    another question is the usual wrong candidate."""
    from calibrate import Clusters, embed

    rng = random.Random(seed)
    clusters = Clusters(train)
    labelled = {(fold(p["a"]), fold(p["b"])) for p in train} | {(fold(p["b"]), fold(p["a"])) for p in train}
    members = {}
    for p in train:
        for q in (p["a"], p["b"]):
            members.setdefault(clusters.find(fold(q)), {}).setdefault(fold(q), q)
    extra = []
    for texts in members.values():
        texts = list(texts.values())
        if len(texts) < 3:
            continue
        pairs = [(a, b) for i, a in enumerate(texts) for b in texts[i + 1 :] if (fold(a), fold(b)) not in labelled]
        rng.shuffle(pairs)
        extra += [{"a": a, "b": b, "duplicate": True} for a, b in pairs[:cluster_positives]]
    positives = len(extra)
    if mined_negatives:
        texts = sorted({q for p in train for q in (p["a"], p["b"])})
        base = CrossEncoder(model_dir / "model.safetensors", config, rank=0)
        base.eval()
        print(f"mining hard negatives among {len(texts)} training questions", flush=True)
        vecs = torch.from_numpy(embed(base, tok, texts))
        order = list(range(len(texts)))
        rng.shuffle(order)
        mined = []
        for start in range(0, len(order), 2048):
            rows = order[start : start + 2048]
            sims = vecs[rows] @ vecs.T
            sims[torch.arange(len(rows)), torch.tensor(rows)] = -1
            top = sims.topk(4, dim=1)
            for r, (vals, idx) in zip(rows, zip(top.values.tolist(), top.indices.tolist())):
                for v, j in zip(vals, idx):
                    if v < 0.8:
                        break
                    if not clusters.right(texts[r], texts[j]):
                        mined.append({"a": texts[j], "b": texts[r], "duplicate": False})
                        break
            if len(mined) >= mined_negatives:
                break
        extra += mined[:mined_negatives]
    print(f"augmented with {positives} cluster positives and {len(extra) - positives} mined negatives", flush=True)
    return extra


def encode(tok, pairs, max_len, both_orders):
    """(ids, types, label) per example; both orders of each pair when training."""
    firsts, seconds, labels = [], [], []
    for p in pairs:
        orders = [(p["b"], p["a"]), (p["a"], p["b"])] if both_orders else [(p["b"], p["a"])]
        for q, c in orders:
            firsts.append(q)
            seconds.append(c)
            labels.append(1.0 if p["duplicate"] else 0.0)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len, strategy="longest_first")
    encs = tok.encode_batch(list(zip(firsts, seconds)))
    return [(e.ids, e.type_ids, y) for e, y in zip(encs, labels)]


def batches(examples, batch_size, shuffle, rng):
    """Batches of similar length (less padding), in random order when training."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    for chunk in chunks:
        t = max(len(examples[i][0]) for i in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        types = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros(len(chunk), t, dtype=torch.long)
        y = torch.tensor([examples[i][2] for i in chunk])
        for row, i in enumerate(chunk):
            n = len(examples[i][0])
            ids[row, :n] = torch.tensor(examples[i][0])
            types[row, :n] = torch.tensor(examples[i][1])
            mask[row, :n] = 1
        yield chunk, ids, types, mask, y


@torch.no_grad()
def scores(model, examples, batch_size=128):
    model.eval()
    out = np.zeros(len(examples), dtype=np.float32)
    for chunk, ids, types, mask, _ in batches(examples, batch_size, False, None):
        out[chunk] = torch.sigmoid(model(ids, types, mask)).numpy()
    model.train()
    return out


def auc(labels, s):
    order = np.argsort(s)
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def progress(done, total, started, extra=""):
    rate = done / max(time.time() - started, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"  {done}/{total}  {rate:.0f}/s  eta {eta/60:.1f} min  {extra}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model-dir", required=True, help="all-MiniLM-L6-v2: model.safetensors, tokenizer.json, config.json")
    ap.add_argument("--out", required=True, help="the verifier file to write (safetensors)")
    ap.add_argument("--report", help="write the training figures here (JSON)")
    ap.add_argument("--held-out", type=int, default=10_000)
    ap.add_argument("--validation", type=int, default=3_000)
    ap.add_argument("--limit", type=int, help="train on at most this many pairs (quick trials)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4, help="encoder layers the verifier keeps (the first N of the base)")
    ap.add_argument("--full", action="store_true", help="train the encoder's dense weights themselves instead of low-rank adapters (a larger file)")
    ap.add_argument("--cluster-positives", type=int, default=0, help="extra positives per duplicate cluster")
    ap.add_argument("--mined-negatives", type=int, default=0, help="hard negatives mined by the embedder")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    pairs = load_pairs(args.data)
    train, valid, test, dropped = split(pairs, args.held_out, args.validation, args.seed)
    if args.limit:
        train = train[: args.limit]
    print(
        f"pairs {len(pairs)}: held out {len(test)} (never trained on), dropped {dropped} sharing a "
        f"question with them, validation {len(valid)}, training {len(train)}",
        flush=True,
    )
    if args.cluster_positives or args.mined_negatives:
        train = train + augment(
            train, model_dir, dict(config), tok, args.cluster_positives, args.mined_negatives, args.seed
        )
    train_ex = encode(tok, train, args.max_len, both_orders=True)
    valid_ex = encode(tok, valid, args.max_len, both_orders=False)
    valid_y = np.array([y for _, _, y in valid_ex])

    config = dict(config, num_hidden_layers=args.layers)
    model = CrossEncoder(
        model_dir / "model.safetensors", config, rank=0 if args.full else args.rank, alpha=args.alpha, full=args.full
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    print(f"trainable parameters {n_trainable}", flush=True)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_ex) / args.batch_size)
    total = int(steps_per_epoch * args.epochs)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    step, started, history = 0, time.time(), []
    while step < total:
        running = 0.0
        for n, (_, ids, types, mask, y) in enumerate(batches(train_ex, args.batch_size, True, rng)):
            loss = loss_fn(model(ids, types, mask), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            running += loss.item()
            step += 1
            if step % 200 == 0:
                progress(step * args.batch_size, total * args.batch_size, started, f"loss {running / (n + 1):.4f}")
            if step % 1000 == 0:
                # A checkpoint, so an interrupted run is not all lost.
                save_file({k: v.to(torch.float16) for k, v in model.export().items()}, args.out + ".partial")
            if step >= total:
                break
        v = scores(model, valid_ex)
        history.append({"step": step, "validation_auc": float(auc(valid_y, v)), "train_loss": running / (n + 1)})
        print(f"step {step}: validation AUC {history[-1]['validation_auc']:.4f}", flush=True)

    weights = model.export()
    meta = {
        "format": "semantis-verifier-lora",
        "base": "all-MiniLM-L6-v2",
        "rank": str(args.rank),
        "max_len": str(args.max_len),
        "layers": str(args.layers),
        # Placeholders until calibrate.py measures the operating point.
        "min_score": "0.5",
        "min_similarity": "0.8",
    }
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, args.out, metadata=meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)", flush=True)
    if args.report:
        report = {
            "args": vars(args),
            "held_out_pairs": len(test),
            "dropped_pairs": dropped,
            "validation_pairs": len(valid),
            "training_pairs": len(train),
            "trainable_parameters": n_trainable,
            "seconds": round(time.time() - started),
            "history": history,
        }
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
