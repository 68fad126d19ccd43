"""Training a token-tagger head (`edge-agent tagger train`, in `cli.tagger`).

Examples are `{"text", "entities": [{"start", "end", "type"}]}` rows (character offsets, end exclusive),
or MaintIE rows converted by `from_maintie`. `train` encodes them once with the int8 encoder, labels the
pieces with `tagger.labels` and fits the numpy head with Adam; with dev rows it keeps the epoch with the
best micro-F1 (`entity_f1`). Features, decoding and the head itself live in `tasks.tagger`, which is all the
daemon loads at run time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..tasks.tagger import Features, TaggerHead, featurize, labels
from .examples import read_jsonl

# ---------------------------------------------------------------- examples and scoring

def check_examples(rows: Iterable[Any], where: str = "examples") -> list[dict[str, Any]]:
    """Validate `{"text", "entities": [{"start", "end", "type"}]}` rows (character offsets, end exclusive)."""
    out = []
    for n, row in enumerate(rows, 1):
        text, ents = (row.get("text"), row.get("entities", [])) if isinstance(row, dict) else (None, None)
        if not isinstance(text, str) or not isinstance(ents, list):
            raise InputError(f"{where} row {n}: need a string `text` and a list `entities`")
        for e in ents:
            ok = isinstance(e, dict) and isinstance(e.get("type"), str) and e["type"] != ""
            ok = ok and all(type(e.get(k)) is int for k in ("start", "end"))
            if not (ok and 0 <= e["start"] < e["end"] <= len(text)):
                raise InputError(f"{where} row {n}: bad entity {e!r} (need a non-empty type and character "
                                     "offsets 0 <= start < end <= len(text))")
        out.append({"text": text, "entities": [{k: e[k] for k in ("start", "end", "type")} for e in ents]})
    return out


def from_maintie(row: dict[str, Any], level: int = 1) -> dict[str, Any]:
    """A MaintIE row (word `tokens`, entity token offsets, end exclusive) -> an example over " ".join(tokens);
    `level` cuts the type path (1: PhysicalObject, Activity, State, Process, Property)."""
    starts = np.cumsum([0] + [len(t) + 1 for t in row["tokens"]])
    return {"text": " ".join(row["tokens"]),
            "entities": [{"start": int(starts[e["start"]]), "end": int(starts[e["end"]] - 1),
                          "type": "/".join(e["type"].split("/")[:level])} for e in row["entities"]]}


def load_examples(path: Path, fmt: str = "edge-agent") -> list[dict[str, Any]]:
    """JSONL examples, checked; `fmt="maintie"` converts MaintIE rows with `from_maintie`."""
    rows = [row for _, row in read_jsonl(path)]
    return check_examples([from_maintie(r) for r in rows] if fmt == "maintie" else rows, str(path))


def entity_f1(gold: Sequence[Sequence[dict[str, Any]]], pred: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Micro precision/recall/F1 over exact (start, end, type), overall and per type."""
    g = {(i, e["start"], e["end"], e["type"]) for i, es in enumerate(gold) for e in es}
    p = {(i, e["start"], e["end"], e["type"]) for i, es in enumerate(pred) for e in es}

    def prf(gs: set[Any], ps: set[Any]) -> dict[str, Any]:
        tp = len(gs & ps)
        pr, rc = tp / max(len(ps), 1), tp / max(len(gs), 1)
        return {"precision": pr, "recall": rc, "f1": 2 * pr * rc / max(pr + rc, 1e-12), "support": len(gs)}

    types = sorted({x[3] for x in g | p})
    return {**prf(g, p), "per_type": {t: prf({x for x in g if x[3] == t}, {x for x in p if x[3] == t}) for t in types}}


# ---------------------------------------------------------------- training

def train(encoder: Any, examples: Sequence[dict[str, Any]], opts: Features = Features(),
          dev: Sequence[dict[str, Any]] | None = None, progress: Any = None) -> TaggerHead:
    """Fit a head on checked examples. With `dev` rows, keep the epoch with the best dev micro-F1."""
    say = progress or (lambda _msg: None)
    t0 = time.monotonic()
    types = sorted({e["type"] for ex in examples for e in ex["entities"]})
    if not types:
        raise InputError("the examples hold no entities: nothing to learn")
    texts = [ex["text"] for ex in examples]
    feats = [featurize(t, s, opts) for t, s in zip(texts, encoder.token_states(texts), strict=True)]
    stats: dict[str, int] = {}
    y = np.concatenate([labels(f[0], ex["entities"], types, opts.layers, stats)
                        for f, ex in zip(feats, examples, strict=True)])
    dense, ids = np.concatenate([f[1] for f in feats]), np.concatenate([f[2] for f in feats])
    if not len(y):
        raise InputError("the examples hold no words the encoder sees: nothing to learn")
    say(f"{len(examples)} examples, {len(y)} pieces, {len(types)} types, encoded in {time.monotonic() - t0:.1f} s")
    rng = np.random.default_rng(opts.seed)
    (n, d), h, n_tags = dense.shape, opts.hidden, 1 + 2 * len(types)
    mu, sigma = dense.mean(axis=0), dense.std(axis=0) + 1e-3
    x_all = (dense - mu) / sigma
    params = {"w1": rng.standard_normal((d, h)) * np.sqrt(2 / d), "b1": np.zeros(h),
              "emb": np.zeros((1 << opts.hash_bits, h)),  # rows of unseen features stay 0: the file compresses
              "w2": rng.standard_normal((h, opts.layers * n_tags)) * np.sqrt(1 / h),
              "b2": np.zeros(opts.layers * n_tags)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    head = TaggerHead({**params, "mu": mu, "sigma": sigma}, types, opts, TaggerHead.model_identity(encoder.manifest))
    dev_states = encoder.token_states([ex["text"] for ex in dev]) if dev else []
    best: tuple[float, int, dict[str, np.ndarray]] = (-1.0, opts.epochs, {})
    offsets, step = np.arange(opts.layers) * n_tags, 0
    for epoch in range(1, opts.epochs + 1):
        lr = opts.lr * (1 - (epoch - 1) / opts.epochs)
        for batch in np.array_split(rng.permutation(n), max(1, n // opts.batch)):
            x, ib = x_all[batch], ids[batch]
            z = x @ params["w1"] + params["emb"][ib].sum(axis=1) + params["b1"]
            keep = (rng.random(z.shape, dtype=np.float32) >= opts.dropout) / np.float32(1 - opts.dropout)
            a = np.maximum(z, 0) * keep
            out = (a @ params["w2"] + params["b2"]).reshape(len(batch), opts.layers, n_tags)
            p = np.exp(out - out.max(axis=2, keepdims=True))
            g_out = (p / p.sum(axis=2, keepdims=True)).reshape(len(batch), -1)
            g_out[np.arange(len(batch))[:, None], y[batch] + offsets] -= 1  # softmax cross-entropy, each layer
            g_out /= len(batch)
            g_z = (g_out @ params["w2"].T) * keep * (z > 0)
            order = np.argsort(ib.reshape(-1), kind="stable")  # the embedding rows used, and their gradient sums
            rows, first = np.unique(ib.reshape(-1)[order], return_index=True)
            g_emb = np.add.reduceat(np.repeat(g_z, ib.shape[1], axis=0)[order], first, axis=0)
            step += 1
            grads = {"w2": (slice(None), a.T @ g_out), "b2": (slice(None), g_out.sum(axis=0)),
                     "w1": (slice(None), x.T @ g_z), "b1": (slice(None), g_z.sum(axis=0)), "emb": (rows, g_emb)}
            for k, (r, g) in grads.items():  # Adam with weight decay; lazy (touched rows only) for the embedding
                m, v = moments[k]
                g = g + opts.weight_decay * params[k][r]
                m[r] = 0.9 * m[r] + 0.1 * g
                v[r] = 0.999 * v[r] + 0.001 * g * g
                params[k][r] -= lr * (m[r] / (1 - 0.9**step)) / (np.sqrt(v[r] / (1 - 0.999**step)) + 1e-8)
        if dev:
            f1 = entity_f1([ex["entities"] for ex in dev], head.predict([ex["text"] for ex in dev], dev_states))["f1"]
            say(f"epoch {epoch}: dev micro-F1 {f1:.4f}")
            if f1 > best[0]:
                best = (f1, epoch, {k: v.copy() for k, v in params.items()})
    head.params.update(best[2])
    head.info = {"examples": len(examples), "pieces": int(n), "label_stats": stats, "epoch": best[1],
                 "dev_f1": round(best[0], 4) if dev else None, "train_seconds": round(time.monotonic() - t0, 2)}
    return head
