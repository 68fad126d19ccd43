"""Text classification on the int8 encoder: a numpy head over hybrid features, or zero-shot.

Features (why hybrid: operator notes are short and abbreviated — "hyd hose brst", "no out put" — and on
such text character n-grams beat frozen sentence embeddings; the two together do best):
- the encoder's L2-normalised mean-pooled embedding, times `w_emb`; with `center` (the default) the training
  examples' mean embedding is subtracted first and the result L2-normalised again. Sentence encoders put all
  notes in a narrow cone (e5 most of all); centring spreads them. FMC, 5-fold CV x 2 on train+dev, C=10
  (bench/accuracy_fmc.py), accuracy/macro-F1: e5 + char n-grams 0.711/0.481 -> 0.742/0.524 centred (the best
  of all, so the default); MiniLM + char n-grams 0.730/0.502 -> 0.723/0.495 (within noise; `--no-center`);
- hashed character 2-5-grams of the lower-cased note (padded with a space at each end), sublinear tf
  times an idf learned at training, L2-normalised, times `w_char`. The hash is FNV-1a over code points with
  a murmur finaliser, computed in numpy: stable across runs, processes and machines (unlike `hash()`).
Head: multinomial logistic regression (L2, sklearn's `C` convention) fitted by L-BFGS in numpy, then one
temperature fitted on out-of-fold logits (k-fold cross-validation) so `score` is a calibrated probability.

Zero-shot (no head): softmax over cosine(note, label description) / ZERO_SHOT_TEMPERATURE.

The head is one `.npz` (no pickle) and names the sha256 of the encoder weights it was trained on; loading it
with another encoder raises ModelError. Runtime needs numpy and the Encoder only. Training (`train`) and the
`edge-agent classifier train|predict` commands live in `classifier_train`, which the daemon never imports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError

if TYPE_CHECKING:
    from ..config import ClassifierTaskConfig
    from ..message import Note
    from ..models.encoder import Encoder

HEAD_FORMAT = "edge-agent/classifier-head/1"
# Cosine similarities of MiniLM sentence vectors span roughly 0 to 0.7; / 0.1 turns a 0.1 gap into e = 2.7x odds.
# On FMC dev (22 label names as descriptions) the NLL-optimal temperature is 0.13; ECE 0.08 at 0.1, 0.20 at 0.05.
ZERO_SHOT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class Features:
    """How a note becomes a feature vector. Defaults: the best on the FMC dev split (bench/accuracy.py)."""

    w_emb: float = 1.0  # 0 = char n-grams only
    w_char: float = 1.0  # 0 = embedding only
    center: bool = True  # subtract the training examples' mean embedding, renormalise (heads before: False)
    ngram_min: int = 2
    ngram_max: int = 5
    buckets: int = 1 << 20


# ---------------------------------------------------------------- sparse rows, by hand (numpy only)

def _segment_sum(values: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Sums of values[ptr[i]:ptr[i+1]] along axis 0; empty segments give 0."""
    out = np.zeros((len(ptr) - 1, *values.shape[1:]), dtype=values.dtype)
    full = ptr[:-1] < ptr[1:]
    if full.any():
        out[full] = np.add.reduceat(values, ptr[:-1][full], axis=0)
    return out


@dataclass
class _Rows:
    """CSR matrix: row i holds columns indices[indptr[i]:indptr[i+1]] with values data[...].
    (np.take + reduceat: 5-10x faster than fancy indexing here, measured.)"""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    def dot(self, w: np.ndarray) -> np.ndarray:
        g = np.take(w, self.indices, axis=0)
        g *= self.data[:, None]
        return _segment_sum(g, self.indptr)

    def tdot(self, g: np.ndarray, n_cols: int) -> np.ndarray:
        """self.T @ g (training only): one bincount per column of g."""
        if not hasattr(self, "_row_of"):
            self._row_of = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        gt = np.ascontiguousarray(g.T)
        return np.stack([np.bincount(self.indices, weights=np.take(col, self._row_of) * self.data, minlength=n_cols)
                         for col in gt], axis=1)

    def normalise(self) -> _Rows:
        norms = np.sqrt(_segment_sum(self.data**2, self.indptr))
        scale = np.repeat(1.0 / np.maximum(norms, 1e-12), np.diff(self.indptr))
        return _Rows(self.indptr, self.indices, (self.data * scale).astype(np.float32))


_FNV_PRIME, _FNV_OFFSET = np.uint64(0x100000001B3), np.uint64(0xCBF29CE484222325)
_MIX1, _MIX2, _S33 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)


def char_ngram_counts(texts: Sequence[str], f: Features) -> _Rows:
    """Hashed character n-gram counts per text (columns = bucket numbers, sorted within a row)."""
    padded = [" " + " ".join(t.lower().replace("\x00", " ").split()) + " " for t in texts]
    raw = "\x00".join(padded).encode("utf-32-le", "surrogatepass")  # code points, lone surrogates too
    cps = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
    doc = np.cumsum(cps == 0)  # text number of each position
    keys = []
    for n in range(f.ngram_min, f.ngram_max + 1):
        if len(cps) < n:
            continue
        win = np.lib.stride_tricks.sliding_window_view(cps, n)
        keep = ~(win == 0).any(axis=1)  # no window crosses a text boundary
        h = np.full(int(keep.sum()), _FNV_OFFSET ^ np.uint64(n), dtype=np.uint64)
        for j in range(n):
            h = (h ^ win[keep, j]) * _FNV_PRIME
        h = (h ^ (h >> _S33)) * _MIX1
        h = (h ^ (h >> _S33)) * _MIX2
        h ^= h >> _S33
        keys.append(doc[:len(win)][keep].astype(np.uint64) * np.uint64(f.buckets) + h % np.uint64(f.buckets))
    uniq, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.uint64), return_counts=True)
    rows = (uniq // np.uint64(f.buckets)).astype(np.int64)
    indptr = np.searchsorted(rows, np.arange(len(texts) + 1)).astype(np.int64)
    return _Rows(indptr, (uniq % np.uint64(f.buckets)).astype(np.int64), counts.astype(np.float64))


def _clean(text: str) -> str:
    """Lone surrogates (from a JSON "\\ud800" escape) make the tokenizer raise: replace them with '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")


def centred(emb: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """emb - mean, each row L2-normalised again (float32)."""
    out = emb.astype(np.float32) - mean.astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- the head

@dataclass
class Head:
    labels: list[str]
    features: Features
    w_emb: np.ndarray  # [dim, K]
    vocab: np.ndarray  # [V] int64 bucket numbers seen in training, sorted
    idf: np.ndarray  # [V]
    w_char: np.ndarray  # [V, K]
    bias: np.ndarray  # [K]
    temperature: float
    encoder_sha256: str
    meta: dict[str, Any]
    emb_mean: np.ndarray | None = None  # [dim] the training examples' mean embedding, when features.center

    def emb_features(self, emb: np.ndarray) -> np.ndarray:
        """The embedding block the weights w_emb multiply: centred and renormalised when features.center."""
        if self.features.center and self.emb_mean is not None:
            return centred(emb, self.emb_mean)
        return emb.astype(np.float32)

    def char_rows(self, texts: Sequence[str]) -> _Rows:
        """TF-IDF rows over this head's vocabulary (unseen n-grams dropped, as sklearn does)."""
        counts = char_ngram_counts(texts, self.features)
        pos = np.searchsorted(self.vocab, counts.indices).clip(0, max(len(self.vocab) - 1, 0))
        known = self.vocab[pos] == counts.indices if len(self.vocab) else np.zeros(len(pos), dtype=bool)
        row = np.repeat(np.arange(len(texts)), np.diff(counts.indptr))[known]
        indptr = np.searchsorted(row, np.arange(len(texts) + 1)).astype(np.int64)
        data = (1.0 + np.log(counts.data[known])) * self.idf[pos[known]]
        return _Rows(indptr, pos[known], data).normalise()

    def logits(self, emb: np.ndarray | None, texts: Sequence[str]) -> np.ndarray:
        z = np.tile(self.bias, (len(texts), 1)).astype(np.float32)
        if self.features.w_emb:
            if emb is None:
                raise ValueError("this head uses the encoder's embeddings: pass them")
            z += (self.features.w_emb * self.emb_features(emb)) @ self.w_emb
        if self.features.w_char:
            z += self.features.w_char * self.char_rows(texts).dot(self.w_char)
        return z

    def probabilities(self, emb: np.ndarray | None, texts: Sequence[str]) -> np.ndarray:
        return _softmax(self.logits(emb, texts) / self.temperature)

    def save(self, path: Path | str) -> None:
        config = {"format": HEAD_FORMAT, "labels": self.labels, "features": asdict(self.features),
                  "temperature": self.temperature, "encoder_sha256": self.encoder_sha256, "meta": self.meta}
        with open(path, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, config=np.array(json.dumps(config)), w_emb=self.w_emb, vocab=self.vocab, idf=self.idf,
                     w_char=self.w_char, bias=self.bias,
                     emb_mean=np.zeros(0, np.float32) if self.emb_mean is None else self.emb_mean)

    @classmethod
    def load(cls, path: Path | str) -> Head:
        try:
            with np.load(path, allow_pickle=False) as z:  # no pickle: a head file cannot run code
                config = json.loads(str(z["config"]))
                arrays = {k: z[k] for k in ("w_emb", "vocab", "idf", "w_char", "bias")}
                mean = z["emb_mean"] if "emb_mean" in z.files and z["emb_mean"].size else None
            if config["format"] != HEAD_FORMAT:
                raise ValueError(f"format {config['format']!r}, expected {HEAD_FORMAT!r}")
            # heads written before centring existed have no `center` key: they were not centred
            features = Features(**{"center": False, **config["features"]})
            head = cls(labels=list(config["labels"]), features=features,
                       temperature=float(config["temperature"]), encoder_sha256=config["encoder_sha256"],
                       meta=config.get("meta", {}), emb_mean=mean, **arrays)
            k, v = len(head.labels), len(head.vocab)
            if not (head.bias.shape == (k,) and head.w_emb.shape[1] == k and head.w_char.shape == (v, k)
                    and head.idf.shape == (v,)
                    and (mean is None or mean.shape == (head.w_emb.shape[0],))):
                raise ValueError("inconsistent array shapes")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ModelError(f"{path} is not a classifier head (made by `edge-agent classifier train`): {e}") from e
        return head

    def check_encoder(self, encoder: Encoder, path: Any = "head") -> None:
        sha = encoder_sha256(encoder)
        if sha != self.encoder_sha256:
            raise ModelError(f"{path} was trained on encoder {self.meta.get('encoder', '?')} (model.bin sha256 "
                             f"{self.encoder_sha256[:12]}…), not on {encoder.model_dir} ({sha[:12]}…); "
                             "train a head for this model with `edge-agent classifier train`")


def encoder_sha256(encoder: Encoder) -> str:
    return str(encoder.manifest["files"]["model.bin"])


# ---------------------------------------------------------------- the task

class ClassifierTask:
    """Labels each note with a trained head, or zero-shot from the configured label descriptions."""

    def __init__(self, name: str, cfg: ClassifierTaskConfig, encoder: Encoder) -> None:
        self.name = name
        self.threshold = cfg.threshold
        self.encoder = encoder
        self.head: Head | None = None
        self.head_version: int | None = None  # set once a head learned on the gateway is in use (edge_agent.learn)
        self.descriptions = dict(cfg.labels)
        if cfg.head is not None:
            self.head = Head.load(cfg.head)
            self.head.check_encoder(encoder, cfg.head)
            self.labels = self.head.labels
        else:
            self.labels = list(cfg.labels)
            self._label_vectors = encoder.embed([cfg.labels[k] or k for k in self.labels])

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), len(self.labels)] calibrated probabilities; one encoder call for the batch."""
        texts = [_clean(t) for t in texts]
        if self.head is None:
            return _softmax(self.encoder.embed(texts) @ self._label_vectors.T / ZERO_SHOT_TEMPERATURE)
        return self.head.probabilities(self.encoder.embed(texts) if self.head.features.w_emb else None, texts)

    def results(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        out = []
        for p in self.probabilities(texts) if texts else []:
            best = int(p.argmax())
            r = {"label": self.labels[best], "score": round(float(p[best]), 6),
                 "scores": {k: round(float(v), 6) for k, v in zip(self.labels, p, strict=True)},
                 "review": bool(p[best] < self.threshold)}
            if self.head_version is not None:
                r["head_version"] = self.head_version
            out.append(r)
        return out

    def use_head(self, head: Head, version: int) -> None:
        """Swap in a head (the pipeline calls this between two batches, so no note sees half of it)."""
        head.check_encoder(self.encoder, f"head v{version}")
        self.head, self.labels, self.head_version = head, list(head.labels), version

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        return self.results([n.text for n in notes])

    def close(self) -> None:
        self.encoder = None  # type: ignore[assignment]  # the shared encoder is freed by its owner (Models)
