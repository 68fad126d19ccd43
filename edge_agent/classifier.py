"""Text classification on the int8 encoder: a numpy head over hybrid features, or zero-shot.

Features (why hybrid: operator notes are short and abbreviated — "hyd hose brst", "no out put" — and on
such text character n-grams beat frozen sentence embeddings; the two together do best):
- the encoder's L2-normalised mean-pooled embedding, times `w_emb`;
- hashed character 2-5-grams of the lower-cased note (padded with a space at each end), sublinear tf
  times an idf learned at training, L2-normalised, times `w_char`. The hash is FNV-1a over code points with
  a murmur finaliser, computed in numpy: stable across runs, processes and machines (unlike `hash()`).
Head: multinomial logistic regression (L2, sklearn's `C` convention) fitted by L-BFGS in numpy, then one
temperature fitted on out-of-fold logits (k-fold cross-validation) so `score` is a calibrated probability.

Zero-shot (no head): softmax over cosine(note, label description) / ZERO_SHOT_TEMPERATURE.

The head is one `.npz` (no pickle) and names the sha256 of the encoder weights it was trained on; loading it
with another encoder raises ModelError. Runtime needs numpy and the Encoder only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EdgeAgentError, ModelError

if TYPE_CHECKING:
    from .config import ClassifierTaskConfig
    from .encoder import Encoder
    from .processors import Note

HEAD_FORMAT = "edge-agent/classifier-head/1"
# Cosine similarities of MiniLM sentence vectors span roughly 0 to 0.7; / 0.1 turns a 0.1 gap into e = 2.7x odds.
# On FMC dev (22 label names as descriptions) the NLL-optimal temperature is 0.13; ECE 0.08 at 0.1, 0.20 at 0.05.
ZERO_SHOT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class Features:
    """How a note becomes a feature vector. Defaults: the best on the FMC dev split (bench/accuracy.py)."""

    w_emb: float = 1.0  # 0 = char n-grams only
    w_char: float = 1.0  # 0 = embedding only
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
            z += (self.features.w_emb * emb.astype(np.float32)) @ self.w_emb
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
                     w_char=self.w_char, bias=self.bias)

    @classmethod
    def load(cls, path: Path | str) -> Head:
        try:
            with np.load(path, allow_pickle=False) as z:  # no pickle: a head file cannot run code
                config = json.loads(str(z["config"]))
                arrays = {k: z[k] for k in ("w_emb", "vocab", "idf", "w_char", "bias")}
            if config["format"] != HEAD_FORMAT:
                raise ValueError(f"format {config['format']!r}, expected {HEAD_FORMAT!r}")
            head = cls(labels=list(config["labels"]), features=Features(**config["features"]),
                       temperature=float(config["temperature"]), encoder_sha256=config["encoder_sha256"],
                       meta=config.get("meta", {}), **arrays)
            k, v = len(head.labels), len(head.vocab)
            if not (head.bias.shape == (k,) and head.w_emb.shape[1] == k and head.w_char.shape == (v, k)
                    and head.idf.shape == (v,)):
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


# ---------------------------------------------------------------- training (numpy, seconds)

def _vdot(a: np.ndarray, b: np.ndarray) -> float:
    # numpy's own loop, not BLAS: OpenBLAS threads a long ddot, and on a busy 2-core machine its spinning
    # threads made each call ~100x slower (measured 15 ms vs 0.2 ms for 135k elements).
    return float(np.einsum("i,i", a, b))


def _lbfgs(fg: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray, max_iter: int = 300,
           m: int = 10, tol: float = 1e-6) -> np.ndarray:
    """Minimise a smooth convex function: L-BFGS two-loop recursion with Armijo backtracking."""
    f, g = fg(x)
    hist: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(max_iter):
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(hist):
            alphas.append(rho * _vdot(s, q))
            q -= alphas[-1] * y
        if hist:  # initial Hessian guess: s.y / y.y
            q *= _vdot(hist[-1][0], hist[-1][1]) / _vdot(hist[-1][1], hist[-1][1])
        else:
            q /= max(1.0, float(np.abs(g).sum()))
        for (s, y, rho), a in zip(hist, reversed(alphas), strict=True):
            q += s * (a - rho * _vdot(y, q))
        slope = -_vdot(g, q)
        if slope >= 0:  # not a descent direction: restart from the gradient
            hist, q = [], g / max(1.0, float(np.abs(g).sum()))
            slope = -_vdot(g, q)
        step = 1.0
        while True:
            x_new = x - step * q
            f_new, g_new = fg(x_new)
            if f_new <= f + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = x_new - x, g_new - g
        if (sy := _vdot(s, y)) > 1e-12:
            hist = [*hist[-(m - 1):], (s, y, 1.0 / sy)]
        done = f - f_new <= tol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x


def _fit(emb: np.ndarray, rows: _Rows, n_cols: int, y: np.ndarray, k: int, c: float
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression on [emb | rows], loss = C * sum(NLL) + |W|^2 / 2 (bias free).
    A block may be empty (emb with 0 columns, rows with n_cols = 0)."""
    d, v = emb.shape[1], n_cols
    onehot = np.eye(k)[y]

    def fg(theta: np.ndarray) -> tuple[float, np.ndarray]:
        we, wc, b = theta[:d * k].reshape(d, k), theta[d * k:(d + v) * k].reshape(v, k), theta[(d + v) * k:]
        z = emb @ we + rows.dot(wc) + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        gz = c * (np.exp(logp) - onehot)
        grad = np.concatenate([(emb.T @ gz + we).ravel(), (rows.tdot(gz, v) + wc).ravel(), gz.sum(axis=0)])
        return float(-c * (logp * onehot).sum() + 0.5 * ((we**2).sum() + (wc**2).sum())), grad

    theta = _lbfgs(fg, np.zeros((d + v + 1) * k))
    return theta[:d * k].reshape(d, k), theta[d * k:(d + v) * k].reshape(v, k), theta[(d + v) * k:]


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising NLL of softmax(logits / T): golden-section search over log T in [-3, 3]."""
    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

    lo, hi, r = -3.0, 3.0, (5**0.5 - 1) / 2
    for _ in range(60):
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


def train(texts: Sequence[str], labels: Sequence[str], emb: np.ndarray | None, *, encoder_sha: str,
          features: Features | None = None, c: float = 10.0, folds: int = 5, seed: int = 0,
          meta: dict[str, Any] | None = None) -> Head:
    """Fit a head on (texts, labels); `emb` = encoder.embed(texts) (may be None when w_emb == 0)."""
    f = features or Features()
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise EdgeAgentError(f"need examples of at least two labels, got {classes}")
    if f.w_emb and (emb is None or len(emb) != len(texts)):
        raise ValueError("emb must hold one embedding per text when w_emb > 0")
    y = np.searchsorted(classes, labels)
    k = len(classes)
    emb_all = (emb if emb is not None and f.w_emb else np.zeros((len(texts), 0))).astype(np.float64) * f.w_emb

    def fit_on(idx: np.ndarray) -> Head:
        vocab, idf = np.zeros(0, np.int64), np.zeros(0)
        rows = _Rows(np.zeros(len(idx) + 1, np.int64), vocab, idf)  # no char block unless w_char > 0
        if f.w_char:
            counts = char_ngram_counts([texts[i] for i in idx], f)
            vocab, inverse = np.unique(counts.indices, return_inverse=True)
            idf = np.log((1 + len(idx)) / (1 + np.bincount(inverse, minlength=len(vocab)))) + 1.0
            rows = _Rows(counts.indptr, inverse, (1.0 + np.log(counts.data)) * idf[inverse]).normalise()
            rows.data = rows.data.astype(np.float64) * f.w_char
        we, wc, b = _fit(emb_all[idx], rows, len(vocab), y[idx], k, c)
        return Head(classes, f, we.astype(np.float32), vocab.astype(np.int64), idf.astype(np.float32),
                    wc.astype(np.float32), b.astype(np.float32), 1.0, encoder_sha, dict(meta or {}))

    # Out-of-fold logits for the temperature: every example is scored by a head that did not see it.
    order = np.random.default_rng(seed).permutation(len(y))
    oof = np.zeros((len(y), k), dtype=np.float32)
    if folds >= 2 and len(y) >= 2 * folds:
        for part in np.array_split(order, folds):
            rest = np.setdiff1d(order, part)
            oof[part] = fit_on(rest).logits(emb[part] if emb is not None else None, [texts[i] for i in part])
        temperature = fit_temperature(oof, y)
    else:
        temperature = 1.0
    head = fit_on(np.arange(len(y)))
    head.temperature = temperature
    head.meta.update(c=c, examples=len(y), folds=folds)
    return head


# ---------------------------------------------------------------- the task

class ClassifierTask:
    """Labels each note with a trained head, or zero-shot from the configured label descriptions."""

    def __init__(self, name: str, cfg: ClassifierTaskConfig, encoder: Encoder) -> None:
        self.name = name
        self.threshold = cfg.threshold
        self.encoder = encoder
        self.head: Head | None = None
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
            out.append({"label": self.labels[best], "score": round(float(p[best]), 6),
                        "scores": {k: round(float(v), 6) for k, v in zip(self.labels, p, strict=True)},
                        "review": bool(p[best] < self.threshold)})
        return out

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        return self.results([n.text for n in notes])

    def close(self) -> None:
        self.encoder = None  # type: ignore[assignment]  # the shared encoder is freed by its owner (Models)


# ---------------------------------------------------------------- CLI: edge-agent classifier train|predict

def _read_examples(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
                if not isinstance(text, str) or not isinstance(label, str) or not label:
                    raise TypeError("text and label must be strings")
            except (ValueError, KeyError, TypeError) as e:
                raise EdgeAgentError(f"{path}:{n}: expected {{\"text\": str, \"label\": str}} ({e})") from None
            texts.append(_clean(text))
            labels.append(label)
    return texts, labels


def _encoder(args: argparse.Namespace) -> Encoder:
    from .encoder import Encoder

    return Encoder(args.model, intra_threads=args.threads)


def cli_train(args: argparse.Namespace) -> int:
    try:
        texts, labels = _read_examples(args.examples)
        dev = _read_examples(args.dev) if args.dev else None
        encoder = _encoder(args)
        features = Features(w_emb=args.emb_weight, w_char=args.char_weight)
        start = time.monotonic()
        emb = encoder.embed(texts) if features.w_emb else None
        head = train(texts, labels, emb, encoder_sha=encoder_sha256(encoder), features=features, c=args.c,
                     meta={"encoder": encoder.manifest.get("name"), "examples_file": str(args.examples)})
        seconds = time.monotonic() - start
        head.save(args.out)
    except EdgeAgentError as e:
        print(f"edge-agent classifier train: {e}", file=sys.stderr)
        return 2 if not isinstance(e, ModelError) else 1
    except OSError as e:
        print(f"edge-agent classifier train: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(texts)} examples, {len(head.labels)} labels, trained in {seconds:.1f} s "
          f"(embedding + fit + calibration, temperature {head.temperature:.2f})")
    if dev:
        dev_texts, dev_labels = dev
        p = head.probabilities(encoder.embed(dev_texts) if features.w_emb else None, dev_texts)
        acc = float(np.mean([head.labels[i] == y for i, y in zip(p.argmax(axis=1), dev_labels, strict=True)]))
        print(f"dev: {len(dev_texts)} examples, accuracy {acc:.3f}")
    return 0


def cli_predict(args: argparse.Namespace) -> int:
    from .config import ClassifierTaskConfig

    try:
        cfg = ClassifierTaskConfig.model_validate({"kind": "classifier", "model": args.model, "head": args.head})
        task = ClassifierTask("predict", cfg, _encoder(args))
    except EdgeAgentError as e:
        print(f"edge-agent classifier predict: {e}", file=sys.stderr)
        return 1

    def flush(batch: list[str | dict[str, Any]]) -> None:
        results = iter(task.results([x for x in batch if isinstance(x, str)]))
        for item in batch:
            if isinstance(item, str):
                item = next(results)
                del item["review"]
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    batch: list[str | dict[str, Any]] = []  # a text to classify, or the error line for a bad input line
    for line in sys.stdin:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError('expected a JSON object with a string "text"')
            batch.append(row["text"])
        except ValueError as e:
            batch.append({"error": str(e)})
        if len(batch) >= args.batch_size:
            flush(batch)
            batch = []
    flush(batch)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `classifier train|predict` on the edge-agent command's subparsers."""
    p = subparsers.add_parser("classifier", help="train a classifier head, or run one over JSONL")
    sub = p.add_subparsers(dest="classifier_command", required=True)
    t = sub.add_parser("train", help="train a head from labelled examples (numpy, seconds)")
    t.add_argument("--model", type=Path, required=True, help="encoder directory (edge-agent models build)")
    t.add_argument("--examples", type=Path, required=True, help='JSONL rows {"text", "label"}')
    t.add_argument("--out", type=Path, required=True, help="head file to write (.npz)")
    t.add_argument("--dev", type=Path, help="JSONL rows {text, label} to report accuracy on")
    t.add_argument("--c", type=float, default=10.0, help="inverse L2 strength (default: best on FMC dev)")
    t.add_argument("--emb-weight", type=float, default=Features.w_emb, help="0 = character n-grams only")
    t.add_argument("--char-weight", type=float, default=Features.w_char, help="0 = embedding only")
    t.add_argument("--threads", type=int, default=0, help="encoder threads (0 = one per core)")
    t.set_defaults(func=cli_train)
    q = sub.add_parser("predict", help='JSONL {"text"} on stdin -> {"label", "score", "scores"} on stdout')
    q.add_argument("--model", type=Path, required=True, help="the encoder the head was trained on")
    q.add_argument("--head", type=Path, required=True)
    q.add_argument("--batch-size", type=int, default=64, help="lines per encoder call")
    q.add_argument("--threads", type=int, default=0, help="encoder threads (0 = one per core)")
    q.set_defaults(func=cli_predict)
    return p
