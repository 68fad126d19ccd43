"""Fitting a classifier head, in numpy: by `edge-agent classifier train`, and on the gateway by a task that
learns from corrections (edge_agent.learn), so it lives on the run path (numpy only, seconds).

`train` fits multinomial logistic regression (L2, sklearn's `C` convention) by L-BFGS on the hybrid features
of `tasks.classifier`, then one temperature on out-of-fold logits (k-fold cross-validation) so `score` is a
calibrated probability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .classifier import Features, Head, _Rows, centred, char_ngram_counts

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
        raise InputError(f"need examples of at least two labels, got {classes}")
    if f.w_emb and (emb is None or len(emb) != len(texts)):
        raise ValueError("emb must hold one embedding per text when w_emb > 0")
    y = np.searchsorted(classes, labels)
    k = len(classes)
    use_emb = emb is not None and bool(f.w_emb)

    def fit_on(idx: np.ndarray) -> Head:
        mean = None
        block = np.zeros((len(idx), 0))
        if use_emb:
            assert emb is not None
            mean = emb[idx].astype(np.float32).mean(axis=0) if f.center else None
            block = (emb[idx] if mean is None else centred(emb[idx], mean)).astype(np.float64) * f.w_emb
        vocab, idf = np.zeros(0, np.int64), np.zeros(0)
        rows = _Rows(np.zeros(len(idx) + 1, np.int64), vocab, idf)  # no char block unless w_char > 0
        if f.w_char:
            counts = char_ngram_counts([texts[i] for i in idx], f)
            vocab, inverse = np.unique(counts.indices, return_inverse=True)
            idf = np.log((1 + len(idx)) / (1 + np.bincount(inverse, minlength=len(vocab)))) + 1.0
            rows = _Rows(counts.indptr, inverse, (1.0 + np.log(counts.data)) * idf[inverse]).normalise()
            rows.data = rows.data.astype(np.float64) * f.w_char
        we, wc, b = _fit(block, rows, len(vocab), y[idx], k, c)
        return Head(classes, f, we.astype(np.float32), vocab.astype(np.int64), idf.astype(np.float32),
                    wc.astype(np.float32), b.astype(np.float32), 1.0, encoder_sha, dict(meta or {}), mean)

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
