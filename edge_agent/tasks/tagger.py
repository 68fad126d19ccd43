"""Token tagger: entity spans from the int8 encoder's token states and a small numpy head.

Grounded by construction: the head labels *pieces* of the note (white-space separated words with outer
brackets, quotes and trailing punctuation split off) and an entity is always `text[start:end]` over whole
pieces. Nested entities ("air filters" contains "filters") are tagged in layers: layer 0 holds the
outermost spans, layer d the spans inside d others; each layer is a BIO sequence decoded by Viterbi (I-X
only after B-X or I-X), and a layer-d span is kept only strictly inside a kept layer-(d-1) span.

Features per piece: the mean of its tokens' states and the same for +-`window` neighbours (standardised),
plus hashed lexical features (the word, its neighbours, affixes, shape; crc32, stable across processes).
The head is a one-hidden-layer MLP trained with Adam in numpy (seconds on a gateway CPU, `tagger_train`),
saved as `.npz` without pickle and bound to the sha256 of the encoder's model.bin.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

HEAD_FORMAT = "edge-agent/tagger-head/1"
Piece = tuple[int, int, int, int]  # char start, char end, first token, end token


@dataclass(frozen=True)
class Features:
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


def featurize(text: str, ts: Any, opts: Features) -> tuple[list[Piece], np.ndarray, np.ndarray]:
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
    def __init__(self, params: dict[str, np.ndarray], types: list[str], opts: Features, model: dict[str, str],
                 info: dict[str, Any] | None = None) -> None:
        self.params, self.types, self.opts, self.model, self.info = params, types, opts, model, info or {}

    @staticmethod
    def model_identity(manifest: dict[str, Any]) -> dict[str, str]:
        return {"name": str(manifest.get("name")), "sha256": str(manifest["files"]["model.bin"])}

    def save(self, path: Path | str) -> None:
        meta = {"format": HEAD_FORMAT, "types": self.types, "options": asdict(self.opts), "model": self.model,
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
            if meta.get("format") != HEAD_FORMAT:
                raise ValueError(f"not an {HEAD_FORMAT} file; train one with `edge-agent tagger train`")
            head = cls(params, list(meta["types"]), Features(**meta["options"]), meta["model"], meta.get("info"))
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


# ---------------------------------------------------------------- the task

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
