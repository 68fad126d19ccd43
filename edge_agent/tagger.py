"""Token tagger: entity spans from the int8 encoder's token states and a small numpy head.

Grounded by construction: the head labels *pieces* of the note (white-space separated words with outer
brackets, quotes and trailing punctuation split off) and an entity is always `text[start:end]` over whole
pieces. Nested entities ("air filters" contains "filters") are tagged in layers: layer 0 holds the
outermost spans, layer d the spans inside d others; each layer is a BIO sequence decoded by Viterbi (I-X
only after B-X or I-X), and a layer-d span is kept only strictly inside a kept layer-(d-1) span.

Features per piece: the mean of its tokens' states and the same for +-`window` neighbours (standardised),
plus hashed lexical features (the word, its neighbours, affixes, shape; crc32, stable across processes).
The head is a one-hidden-layer MLP trained with Adam in numpy (seconds on a gateway CPU), saved as `.npz`
without pickle and bound to the sha256 of the encoder's model.bin.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeAgentError, ModelError

FORMAT = "edge-agent/tagger-head/1"
Piece = tuple[int, int, int, int]  # char start, char end, first token, end token


@dataclass(frozen=True)
class Options:
    """Feature and training settings, stored in the head. Chosen on MaintIE dev rows (bench/accuracy_maintie.py)."""

    window: int = 2  # neighbour pieces whose states are concatenated, each side
    hash_bits: int = 14  # lexical features hash into 2**hash_bits embedding rows
    hidden: int = 256
    layers: int = 2  # nesting depth tagged (1 = flat)
    epochs: int = 8  # with dev rows: the best of these epochs on dev
    batch: int = 64
    lr: float = 2e-3  # decays linearly over the epochs
    dropout: float = 0.3
    weight_decay: float = 1e-4
    seed: int = 0


# ---------------------------------------------------------------- pieces and features

_WORD = re.compile(r"""[(\[{"']|[)\]}"'.,;:!?]+(?=\s|$)|[^\s]+?(?=[)\]}"'.,;:!?]*(?:\s|$))""")


def pieces(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[bool]) -> list[Piece]:
    """A piece is a white-space separated word with opening brackets/quotes and closing brackets, quotes and
    punctuation split off: "(P-101)," -> "(", "P-101", "),"; `<id>`, `de-ice`, `u/s`, `3.5bar` stay whole.
    A piece covers the tokens that overlap it; pieces past the (truncated) tokens are left out."""
    toks = [(s, e, i) for i, ((s, e), sp) in enumerate(zip(offsets, special, strict=True)) if not sp and s < e]
    out, k = [], 0
    for m in _WORD.finditer(text):
        while k < len(toks) and toks[k][1] <= m.start():
            k += 1
        j = k
        while j < len(toks) and toks[j][0] < m.end():
            j += 1
        if j > k:
            out.append((m.start(), m.end(), toks[k][2], toks[j - 1][2] + 1))
    return out


def _shape(word: str) -> str:
    shape = "".join("X" if c.isupper() else "x" if c.isalpha() else "d" if c.isdigit() else c for c in word)
    return "".join(c for i, c in enumerate(shape) if i == 0 or c != shape[i - 1])[:6]


def _lexical(text: str, spans: list[Piece], bits: int) -> np.ndarray:
    """[n_pieces, 16] int32 rows of the hashed embedding table."""
    words = [text[s:e].lower() for s, e, _, _ in spans]
    n = len(words)

    def w(j: int) -> str:
        return words[j] if 0 <= j < n else ("<s>" if j < 0 else "</s>")

    ids = []
    for i, (s, e, _, _) in enumerate(spans):
        ws, we = s, e  # the white-space separated token around the piece
        while ws > 0 and not text[ws - 1].isspace():
            ws -= 1
        while we < len(text) and not text[we].isspace():
            we += 1
        x = words[i]
        feats = [f"w={x}", f"w-1={w(i - 1)}", f"w+1={w(i + 1)}", f"w-2={w(i - 2)}", f"w+2={w(i + 2)}",
                 f"w-1w={w(i - 1)}|{x}", f"ww+1={x}|{w(i + 1)}", f"p3={x[:3]}", f"s2={x[-2:]}", f"s3={x[-3:]}",
                 f"s4={x[-4:]}", f"shape={_shape(text[s:e])}", f"tok={text[ws:we].lower()}",
                 f"at={'b' if ws == s else 'm'}{'e' if we == e else 'm'}",
                 f"pos={'first' if i == 0 else 'last' if i == n - 1 else 'mid'}", "bias"]
        ids.append([zlib.crc32(f.encode()) & ((1 << bits) - 1) for f in feats])
    return np.asarray(ids, dtype=np.int32).reshape(n, 16)


def featurize(text: str, ts: Any, opts: Options) -> tuple[list[Piece], np.ndarray, np.ndarray]:
    """Pieces, dense features [n, (2*window+1)*dim] (zeros past the ends) and lexical ids [n, 16]."""
    spans = pieces(text, ts.offsets, ts.special)
    n, w, dim = len(spans), opts.window, ts.states.shape[1]
    padded = np.zeros((n + 2 * w, dim), dtype=np.float32)
    if n:
        first, end = np.array([sp[2] for sp in spans]), np.array([sp[3] for sp in spans])
        sums = np.concatenate([np.zeros((1, dim), np.float32), np.cumsum(ts.states, axis=0, dtype=np.float32)])
        padded[w : w + n] = (sums[end] - sums[first]) / (end - first)[:, None]
    dense = np.concatenate([padded[k : k + n] for k in range(2 * w + 1)], axis=1)
    return spans, dense, _lexical(text, spans, opts.hash_bits)


# ---------------------------------------------------------------- labels and decoding

def _depths(entities: Sequence[dict[str, Any]]) -> list[int]:
    """Nesting depth of each entity: how many others strictly contain it; -1 where two cross."""
    spans = [(e["start"], e["end"]) for e in entities]
    return [-1 if any(s < e2 and s2 < e and not (s <= s2 and e2 <= e) and not (s2 <= s and e <= e2)
                      for s2, e2 in spans)
            else sum(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in spans) for s, e in spans]


def labels(spans: Sequence[Piece], entities: Sequence[dict[str, Any]], types: Sequence[str], layers: int,
           stats: dict[str, int]) -> np.ndarray:
    """[n_pieces, layers] tag ids; entities that cannot be represented are counted in `stats`."""
    y = np.zeros((len(spans), layers), dtype=np.int64)
    for ent, depth in zip(entities, _depths(entities), strict=True):
        inside = [k for k, (s, e, _, _) in enumerate(spans) if s < ent["end"] and ent["start"] < e]
        if depth < 0 or depth >= layers or not inside:
            stats["dropped"] = stats.get("dropped", 0) + 1
            continue
        if (spans[inside[0]][0], spans[inside[-1]][1]) != (ent["start"], ent["end"]):
            stats["widened"] = stats.get("widened", 0) + 1  # an entity boundary inside a piece
        t = 1 + 2 * types.index(ent["type"])
        y[inside, depth] = t + 1
        y[inside[0], depth] = t
    return y


@functools.lru_cache(maxsize=8)
def _bio(n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Which tags are I-X, and the transition scores: 0 where allowed, -inf for I-X after anything but B-X/I-X."""
    is_i = (np.arange(n_tags) % 2 == 0) & (np.arange(n_tags) > 0)
    allowed = np.tile(~is_i, (n_tags, 1))
    for t in np.flatnonzero(is_i):
        allowed[t - 1, t] = allowed[t, t] = True
    return is_i, np.where(allowed, 0.0, -np.inf)


def viterbi(logp: np.ndarray) -> list[int]:
    """Most probable tag path; tags are [O, B-type0, I-type0, B-type1, ...], I-X only after B-X or I-X."""
    n, n_tags = logp.shape
    is_i, trans = _bio(n_tags)
    score, back = np.where(is_i, -np.inf, logp[0]), np.zeros((n, n_tags), dtype=np.int64)
    for k in range(1, n):
        cand = score[:, None] + trans
        back[k] = cand.argmax(axis=0)
        score = cand.max(axis=0) + logp[k]
    path = [int(score.argmax())]
    for k in range(n - 1, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1]


def _runs(path: Sequence[int], probs: np.ndarray) -> list[tuple[int, int, int, float]]:
    """(first piece, end piece, type index, mean tag probability) for each B I* run of the path."""
    out, k = [], 0
    while k < len(path):
        j = k + 1
        if path[k] % 2 == 1:
            while j < len(path) and path[j] == path[k] + 1:
                j += 1
            out.append((k, j, (path[k] - 1) // 2, float(np.mean(probs[np.arange(k, j), path[k:j]]))))
        k = j
    return out


# ---------------------------------------------------------------- the head

class TaggerHead:
    def __init__(self, params: dict[str, np.ndarray], types: list[str], opts: Options, model: dict[str, str],
                 info: dict[str, Any] | None = None) -> None:
        self.params, self.types, self.opts, self.model, self.info = params, types, opts, model, info or {}

    @staticmethod
    def model_identity(manifest: dict[str, Any]) -> dict[str, str]:
        return {"name": str(manifest.get("name")), "sha256": str(manifest["files"]["model.bin"])}

    def save(self, path: Path | str) -> None:
        meta = {"format": FORMAT, "types": self.types, "options": asdict(self.opts), "model": self.model,
                "info": self.info}
        with open(path, "wb") as f:  # np.savez given a path would append ".npz"
            arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta)), **self.params}
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: Path | str, manifest: dict[str, Any] | None = None) -> TaggerHead:
        """Read a head; given the encoder's manifest, refuse a head trained on another encoder."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                params = {k: z[k] for k in z.files if k != "meta"}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file; train one with `edge-agent tagger train`")
            head = cls(params, list(meta["types"]), Options(**meta["options"]), meta["model"], meta.get("info"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"cannot read tagger head {path}: {e}") from e
        have = cls.model_identity(manifest) if manifest is not None else head.model
        if have["sha256"] != head.model["sha256"]:
            raise ModelError(f"tagger head {path} was trained on encoder {head.model['name']!r} (model.bin sha256 "
                             f"{head.model['sha256'][:12]}…) but the configured model is {have['name']!r} (sha256 "
                             f"{have['sha256'][:12]}…); retrain the head on this model with `edge-agent tagger train`")
        return head

    def logits(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        p = self.params
        z = ((dense - p["mu"]) / p["sigma"]) @ p["w1"] + p["emb"][ids].sum(axis=1) + p["b1"]
        return np.maximum(z, 0) @ p["w2"] + p["b2"]

    def decode(self, text: str, spans: Sequence[Piece], logits: np.ndarray) -> list[dict[str, Any]]:
        z = logits.reshape(len(spans), self.opts.layers, 1 + 2 * len(self.types))
        z = z - z.max(axis=2, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=2, keepdims=True))
        found: list[dict[str, Any]] = []
        outer: list[tuple[int, int]] | None = None
        for d in range(self.opts.layers if spans else 0):
            kept = []
            for a, b, t, score in _runs(viterbi(logp[:, d]), np.exp(logp[:, d])):
                start, end = spans[a][0], spans[b - 1][1]
                if outer is None or any(s <= start and end <= e and (s, e) != (start, end) for s, e in outer):
                    kept.append((start, end))
                    found.append({"text": text[start:end], "start": start, "end": end, "type": self.types[t],
                                  "score": round(score, 4)})
            outer = kept
        return sorted(found, key=lambda e: (e["start"], -e["end"]))

    def predict(self, texts: Sequence[str], states: Sequence[Any]) -> list[list[dict[str, Any]]]:
        """Entities per text, from the encoder's token_states of those texts (one head pass for all)."""
        feats = [featurize(t, s, self.opts) for t, s in zip(texts, states, strict=True)]
        if not any(len(f[0]) for f in feats):
            return [[] for _ in feats]
        z = self.logits(np.concatenate([f[1] for f in feats]), np.concatenate([f[2] for f in feats]))
        cut = np.cumsum([0] + [len(f[0]) for f in feats])
        return [self.decode(t, f[0], z[cut[k] : cut[k + 1]]) for k, (t, f) in enumerate(zip(texts, feats, strict=True))]


# ---------------------------------------------------------------- training

def check_examples(rows: Iterable[Any], where: str = "examples") -> list[dict[str, Any]]:
    """Validate `{"text", "entities": [{"start", "end", "type"}]}` rows (character offsets, end exclusive)."""
    out = []
    for n, row in enumerate(rows, 1):
        text, ents = (row.get("text"), row.get("entities", [])) if isinstance(row, dict) else (None, None)
        if not isinstance(text, str) or not isinstance(ents, list):
            raise EdgeAgentError(f"{where} row {n}: need a string `text` and a list `entities`")
        for e in ents:
            ok = isinstance(e, dict) and isinstance(e.get("type"), str) and e["type"] != ""
            ok = ok and all(type(e.get(k)) is int for k in ("start", "end"))
            if not (ok and 0 <= e["start"] < e["end"] <= len(text)):
                raise EdgeAgentError(f"{where} row {n}: bad entity {e!r} (need a non-empty type and character "
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


def train(encoder: Any, examples: Sequence[dict[str, Any]], opts: Options = Options(),
          dev: Sequence[dict[str, Any]] | None = None, progress: Any = None) -> TaggerHead:
    """Fit a head on checked examples. With `dev` rows, keep the epoch with the best dev micro-F1."""
    say = progress or (lambda _msg: None)
    t0 = time.monotonic()
    types = sorted({e["type"] for ex in examples for e in ex["entities"]})
    if not types:
        raise EdgeAgentError("the examples hold no entities: nothing to learn")
    texts = [ex["text"] for ex in examples]
    feats = [featurize(t, s, opts) for t, s in zip(texts, encoder.token_states(texts), strict=True)]
    stats: dict[str, int] = {}
    y = np.concatenate([labels(f[0], ex["entities"], types, opts.layers, stats)
                        for f, ex in zip(feats, examples, strict=True)])
    dense, ids = np.concatenate([f[1] for f in feats]), np.concatenate([f[2] for f in feats])
    if not len(y):
        raise EdgeAgentError("the examples hold no words the encoder sees: nothing to learn")
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


# ---------------------------------------------------------------- the task and the CLI

class TaggerTask:
    """Pipeline task: one token_states call per batch of notes; `{"entities": [...]}` per note."""

    def __init__(self, name: str, cfg: Any, encoder: Any) -> None:
        self.name, self.encoder = name, encoder
        self.head = TaggerHead.load(cfg.head, encoder.manifest)

    def process(self, notes: Sequence[Any]) -> list[dict[str, Any]]:
        texts = [n.text for n in notes]
        return [{"entities": ents} for ents in self.head.predict(texts, self.encoder.token_states(texts))]

    def close(self) -> None:
        pass


def load_examples(path: Path, fmt: str = "edge-agent") -> list[dict[str, Any]]:
    """JSONL examples, checked; `fmt="maintie"` converts MaintIE rows with `from_maintie`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rows.extend([json.loads(line)] if line.strip() else [])
            except ValueError as e:
                raise EdgeAgentError(f"{path} line {n}: not JSON ({e})") from e
    return check_examples([from_maintie(r) for r in rows] if fmt == "maintie" else rows, str(path))


def _encoder(args: argparse.Namespace) -> Any:
    from .encoder import Encoder

    return Encoder(args.model, intra_threads=args.threads, max_length=args.max_length)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        examples = load_examples(args.examples, args.format)
        dev = load_examples(args.dev, args.format) if args.dev else None
        opts = replace(Options(), **{k: v for k in ("epochs", "seed") if (v := getattr(args, k)) is not None})
        head = train(_encoder(args), examples, opts, dev, lambda m: print(f"edge-agent tagger: {m}", file=sys.stderr))
        head.save(args.out)
    except (EdgeAgentError, OSError) as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"head": str(args.out), "types": head.types, **head.info}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    try:
        encoder = _encoder(args)
        head = TaggerHead.load(args.head, encoder.manifest)
    except (EdgeAgentError, OSError) as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2

    def tag(lines: list[str]) -> None:
        rows: list[dict[str, Any]] = []
        for line in lines:
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError("need a JSON object with a string `text`")
                rows.append({"text": row["text"]})
            except ValueError as e:
                rows.append({"error": str(e)})
        texts = [r["text"] for r in rows if "text" in r]
        found = iter(head.predict(texts, encoder.token_states(texts)))
        for r in rows:
            print(json.dumps(r if "error" in r else {"entities": next(found)}, ensure_ascii=False), flush=True)

    lines: list[str] = []
    for line in sys.stdin:
        lines.append(line)
        if len(lines) >= args.batch_size:
            tag(lines)
            lines = []
    tag(lines)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `tagger train` and `tagger predict` on the CLI's subparsers."""
    sub = subparsers.add_parser("tagger", help="token tagger: train a head, tag notes").add_subparsers(
        dest="tagger_command", required=True)
    train_p = sub.add_parser("train", help="train a tagger head from span-annotated examples")
    predict_p = sub.add_parser("predict", help="JSONL {text} on stdin -> JSONL {entities} on stdout, same order")
    for p in (train_p, predict_p):
        p.add_argument("--model", type=Path, required=True, help="encoder directory (edge-agent models build)")
        p.add_argument("--threads", type=int, default=0, help="encoder threads (0: one per core)")
        p.add_argument("--max-length", type=int, default=128, help="tokens per note; longer notes are truncated")
    train_p.add_argument("--examples", type=Path, required=True,
                         help='JSONL rows {"text", "entities": [{"start", "end", "type"}]}, character offsets')
    train_p.add_argument("--out", type=Path, required=True, help="head file to write (.npz)")
    train_p.add_argument("--dev", type=Path, help="held-out rows: keep the epoch with the best dev micro-F1")
    train_p.add_argument("--format", choices=("edge-agent", "maintie"), default="edge-agent",
                         help="maintie: MaintIE rows (word tokens, token offsets), top-level types")
    train_p.add_argument("--epochs", type=int)
    train_p.add_argument("--seed", type=int)
    train_p.set_defaults(func=cmd_train)
    predict_p.add_argument("--head", type=Path, required=True)
    predict_p.add_argument("--batch-size", type=int, default=32)
    predict_p.set_defaults(func=cmd_predict)
