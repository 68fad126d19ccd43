"""Accuracy of the on-device models on real data, against a baseline in the same run.

    python -m bench.accuracy [fmc|bgl|all] --json OUT [--model DIR] [--fp32-model DIR] [--tuned-model DIR]

Protocol (never tune on test rows):
- FMC (../shared/data/fmc_mwo2kg.jsonl, 22 failure modes): every method is trained on `train`, its settings
  (C, feature weights, analyzer) are chosen by accuracy on `dev` (ties: macro-F1, then the earlier grid
  entry), and the chosen setting is retrained on `train` and reported once on `test`. Macro-F1 is sklearn's
  (over the labels present in gold or predictions). The temperature is fitted by 5-fold cross-validation
  on `train`. The scikit-learn baseline (TF-IDF char n-grams + LogisticRegression) gets the same dev search.
  `--tuned-model` adds the same search on a contrastively tuned encoder (python -m
  edge_agent.train.finetune_classifier --examples fmc_mwo2kg.jsonl --split train --out DIR): tuned on train rows only.
- BGL (../shared/data/bgl_2k.jsonl): alert vs normal, split fixed by id: crc32(id) % 10 < 7 is train, the rest
  test; default settings (no search), the baseline likewise.

Each section is a function `(args) -> list of rows` {"name", "metric", "value", "baseline", "split", ...};
`maintie` (the token tagger) lives in bench/accuracy_maintie.py and is run from here when present.
scikit-learn is a dev dependency of this script only; edge_agent never imports it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# One BLAS thread: the numpy fits are small, and OpenBLAS threads spinning against the CTranslate2 threads
# (or other work on a 2-core gateway) made them up to 10x slower in wall time.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from edge_agent.models.encoder import Encoder
from edge_agent.tasks import classifier as clf
from edge_agent.tasks import fit as classifier_train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDGE_AGENT_DATA") or REPO.parent / "shared" / "data")

C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
CHAR_WEIGHTS = (0.5, 0.75, 1.0, 1.5, 2.0)  # hybrid: w_emb = 1, w_char from here
ANCHORS = {"fine-tuned GPT-3.5": 0.81, "Flair": 0.60, "GPT-3.5 zero-shot": 0.46}  # FMC test accuracy


def read(name: str) -> list[dict[str, Any]]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def scores(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(gold, pred)), "macro_f1": float(f1_score(gold, pred, average="macro"))}


def ece(probs: np.ndarray, gold_idx: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top label, equal-width confidence bins."""
    conf, hit = probs.max(axis=1), probs.argmax(axis=1) == gold_idx
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - hit[m].mean())
    return float(total)


class Split:
    """One data split with its texts, gold labels and (lazily) embeddings per encoder."""

    def __init__(self, rows: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> None:
        self.texts = [r["text"] for r in rows]
        self.labels = [label(r) for r in rows]
        self._emb: dict[str, np.ndarray] = {}

    def emb(self, enc: Encoder) -> np.ndarray:
        key = str(enc.model_dir)
        if key not in self._emb:
            self._emb[key] = enc.embed(self.texts)
        return self._emb[key]


def predict(head: clf.Head, split: Split, enc: Encoder | None, temperature: float | None = None) -> np.ndarray:
    emb = split.emb(enc) if enc is not None and head.features.w_emb else None
    z = head.logits(emb, split.texts)
    return clf._softmax(z / (head.temperature if temperature is None else temperature))


def fit(train: Split, enc: Encoder, features: clf.Features, c: float, folds: int = 0) -> clf.Head:
    emb = train.emb(enc) if features.w_emb else None
    return classifier_train.train(train.texts, train.labels, emb, encoder_sha=clf.encoder_sha256(enc),
                                  features=features, c=c, folds=folds)


def choose(candidates: list[tuple[Any, ...]], evaluate: Callable[..., dict[str, float]]) -> tuple[Any, dict]:
    """The candidate with the best dev accuracy (then macro-F1, then earliest)."""
    best, best_key, best_dev = None, None, {}
    for cand in candidates:
        dev = evaluate(*cand)
        key = (dev["accuracy"], dev["macro_f1"])
        if best_key is None or key > best_key:
            best, best_key, best_dev = cand, key, dev
    return best, best_dev


def labels_of(head: clf.Head, probs: np.ndarray) -> list[str]:
    return [head.labels[i] for i in probs.argmax(axis=1)]


def sklearn_baseline(train: Split) -> Callable[[str, float], Callable[[Split], list[str]]]:
    """make(analyzer, C) -> a predict function, trained on `train`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def make(analyzer: str, c: float) -> Callable[[Split], list[str]]:
        vec = TfidfVectorizer(analyzer=analyzer, ngram_range=(2, 5), sublinear_tf=True, lowercase=True)
        model = LogisticRegression(C=c, max_iter=5000).fit(vec.fit_transform(train.texts), train.labels)
        return lambda split: list(model.predict(vec.transform(split.texts)))

    return make


def _encoder_rows(tag: str, model: Path, data: dict[str, Split], rows: list[dict[str, Any]],
                  base: dict[str, float], note: str) -> tuple[Encoder, dict[str, Any]]:
    """Dev search for hybrid / embedding-only / char-only heads on one encoder; test rows appended."""
    enc = Encoder(model, intra_threads=2)
    train, dev, test = data["train"], data["dev"], data["test"]
    methods = {
        "hybrid": [(clf.Features(w_emb=1.0, w_char=w), c) for w in CHAR_WEIGHTS for c in C_GRID],
        "embedding-only": [(clf.Features(w_emb=1.0, w_char=0.0), c) for c in C_GRID],
        "char-only": [(clf.Features(w_emb=0.0, w_char=1.0), c) for c in C_GRID],
    }
    if tag != "int8":
        methods.pop("char-only")  # the same on every encoder
    chosen: dict[str, Any] = {}
    for method, cands in methods.items():
        def on_dev(f: clf.Features, c: float) -> dict[str, float]:
            head = fit(train, enc, f, c)
            return scores(dev.labels, labels_of(head, predict(head, dev, enc)))

        (f, c), dev_scores = choose(cands, on_dev)
        start = time.process_time()
        head = fit(train, enc, f, c, folds=5)
        seconds = time.process_time() - start
        probs = predict(head, test, enc)
        test_scores = scores(test.labels, labels_of(head, probs))
        gold = np.searchsorted(head.labels, test.labels)
        setting = {"w_emb": f.w_emb, "w_char": f.w_char, "C": c, "temperature": round(head.temperature, 3)}
        for metric, value in test_scores.items():
            rows.append({"name": f"fmc/{method}-{tag}", "metric": metric, "value": value, "baseline": base[metric],
                         "split": "test", "chosen_on_dev": setting, "dev": dev_scores, "note": note})
        rows.append({"name": f"fmc/{method}-{tag}", "metric": "ece", "value": ece(probs, gold),
                     "baseline": ece(predict(head, test, enc, temperature=1.0), gold), "split": "test",
                     "note": "baseline = the same head before temperature scaling (T = 1)"})
        rows.append({"name": f"fmc/{method}-{tag}", "metric": "train_cpu_seconds", "value": round(seconds, 2),
                     "baseline": None, "split": "train",
                     "note": "numpy fit + 5-fold temperature calibration, embeddings precomputed"})
        chosen[method] = (f, c, head, dev_scores)
    return enc, chosen


def fmc(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_in = read("fmc_mwo2kg.jsonl")
    data = {s: Split([r for r in rows_in if r["split"] == s], lambda r: r["label"]) for s in ("train", "dev", "test")}
    train, dev, test = data["train"], data["dev"], data["test"]
    rows: list[dict[str, Any]] = []

    # Baseline: scikit-learn TF-IDF char n-grams + LogisticRegression, same dev search.
    make = sklearn_baseline(train)
    cands = [(a, c) for a in ("char_wb", "char") for c in C_GRID]
    (analyzer, c), base_dev = choose(cands, lambda a, c: scores(dev.labels, make(a, c)(dev)))
    base = scores(test.labels, make(analyzer, c)(test))
    for metric, value in base.items():
        rows.append({"name": "fmc/sklearn-tfidf-char-lr", "metric": metric, "value": value, "baseline": value,
                     "split": "test", "chosen_on_dev": {"analyzer": analyzer, "ngram_range": [2, 5], "C": c},
                     "dev": base_dev})

    enc, chosen = _encoder_rows("int8", args.model, data, rows, base, "MiniLM-L6 int8 as shipped")

    # Zero-shot from the label names alone.
    labels = sorted(set(train.labels))
    label_vecs = enc.embed(labels)
    zprobs = clf._softmax(test.emb(enc) @ label_vecs.T / clf.ZERO_SHOT_TEMPERATURE)
    zpred = [labels[i] for i in zprobs.argmax(axis=1)]
    for metric, value in scores(test.labels, zpred).items():
        rows.append({"name": "fmc/zero-shot-int8", "metric": metric, "value": value, "baseline": base[metric],
                     "split": "test", "note": f"label names as descriptions, T={clf.ZERO_SHOT_TEMPERATURE}"})
    rows.append({"name": "fmc/zero-shot-int8", "metric": "ece", "value": ece(zprobs, np.searchsorted(labels,
                 test.labels)), "baseline": None, "split": "test"})

    # int8 vs fp32: the same pipeline (same chosen settings) on the fp32 build of the same weights.
    if args.fp32_model and Path(args.fp32_model).is_dir():
        fenc = Encoder(args.fp32_model, intra_threads=2, compute_type="float32")  # else CT2 quantizes on load
        for method in ("hybrid", "embedding-only"):
            f, c, ihead, _ = chosen[method]
            iprobs = predict(ihead, test, enc)
            a = labels_of(ihead, iprobs)
            same = labels_of(ihead, predict(ihead, test, fenc))  # the deployed head, fp32 embeddings
            sure = iprobs.max(axis=1) >= 0.5
            rows.append({"name": f"fmc/{method}-int8-vs-fp32-same-head", "metric": "label_agreement_score>=0.5",
                         "value": float(np.mean([x == y for x, y, s in zip(a, same, sure, strict=True) if s])),
                         "baseline": None, "split": f"test, the {int(sure.sum())} notes with int8 score >= 0.5"})
            fhead = fit(train, fenc, f, c)
            b = labels_of(fhead, predict(fhead, test, fenc))  # the whole pipeline in fp32
            for kind, other, note in (("same-head", same, "the int8-trained head on int8 vs fp32 embeddings"),
                                      ("own-head", b, "a head trained on each encoder's embeddings, same settings")):
                rows.append({"name": f"fmc/{method}-int8-vs-fp32-{kind}", "metric": "label_agreement",
                             "value": float(np.mean([x == y for x, y in zip(a, other, strict=True)])),
                             "baseline": None, "split": "test", "note": note})
            rows.append({"name": f"fmc/{method}-fp32", "metric": "accuracy",
                         "value": scores(test.labels, b)["accuracy"], "baseline": base["accuracy"], "split": "test"})
        cos = np.sum(test.emb(enc) * test.emb(fenc), axis=1)
        rows.append({"name": "fmc/embedding-int8-vs-fp32", "metric": "min_cosine", "value": float(cos.min()),
                     "baseline": None, "split": "test"})

    candidates = {"hybrid-int8": chosen["hybrid"]}
    for model in args.tuned_model:
        _, tuned = _encoder_rows(f"tuned-int8:{model.name}", model, data, rows, base,
                                 f"MiniLM-L6 tuned on FMC train rows only ({model}), int8")
        candidates[f"hybrid-tuned-int8:{model.name}"] = tuned["hybrid"]
    # Ours: the encoder + head with the best dev accuracy (then macro-F1), reported once on test.
    pick = max(candidates, key=lambda k: (candidates[k][3]["accuracy"], candidates[k][3]["macro_f1"]))
    for row in [r for r in rows if r["name"] == f"fmc/{pick}" and r["metric"] in ("accuracy", "macro_f1")]:
        rows.append({**row, "name": "fmc/ours-chosen-on-dev", "picked": pick})
    for row in rows:
        if row["metric"] == "accuracy" and row["split"] == "test":
            row["anchors"] = ANCHORS
    return rows


def bgl_split(row_id: str) -> str:
    return "train" if zlib.crc32(row_id.encode()) % 10 < 7 else "test"


def bgl(args: argparse.Namespace) -> list[dict[str, Any]]:
    from sklearn.metrics import f1_score, precision_score, recall_score

    rows_in = read("bgl_2k.jsonl")
    alert = lambda r: "alert" if r["label"] != "normal" else "normal"  # noqa: E731
    train = Split([r for r in rows_in if bgl_split(r["id"]) == "train"], alert)
    test = Split([r for r in rows_in if bgl_split(r["id"]) == "test"], alert)
    enc = Encoder(args.model, intra_threads=2)
    split = f"test: crc32(id) % 10 >= 7 ({len(test.texts)} rows, {test.labels.count('alert')} alerts)"

    def binary(pred: Sequence[str]) -> dict[str, float]:
        kw = {"pos_label": "alert", "zero_division": 0.0}
        return {"f1": float(f1_score(test.labels, pred, **kw)),
                "precision": float(precision_score(test.labels, pred, **kw)),
                "recall": float(recall_score(test.labels, pred, **kw))}

    base = binary(sklearn_baseline(train)("char_wb", 10.0)(test))
    rows = [{"name": "bgl/sklearn-tfidf-char-lr", "metric": m, "value": v, "baseline": v, "split": split}
            for m, v in base.items()]
    train.emb(enc), test.emb(enc)  # embeddings first: the timings below are the head's fit alone
    for method, f in (("hybrid", clf.Features()), ("embedding-only", clf.Features(w_char=0.0)),
                      ("char-only", clf.Features(w_emb=0.0))):
        start = time.process_time()
        head = fit(train, enc, f, 10.0, folds=5)
        seconds = time.process_time() - start
        for m, v in binary(labels_of(head, predict(head, test, enc))).items():
            rows.append({"name": f"bgl/{method}-int8", "metric": m, "value": v, "baseline": base[m], "split": split,
                         "note": f"C=10, w_emb={f.w_emb}, w_char={f.w_char} (defaults, no search)"})
        rows.append({"name": f"bgl/{method}-int8", "metric": "train_cpu_seconds", "value": round(seconds, 2),
                     "baseline": None, "split": f"train ({len(train.texts)} rows)"})
    return rows


def maintie(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The token tagger on MaintIE: owned by bench/accuracy_maintie.py."""
    from bench import accuracy_maintie

    return accuracy_maintie.maintie(quick=args.quick)


SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {"fmc": fmc, "bgl": bgl}
if (Path(__file__).parent / "accuracy_maintie.py").is_file():
    SECTIONS["maintie"] = maintie


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'name':44} {'metric':26} {'value':>8} {'baseline':>9}"]
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"{r['name']:44} {r['metric']:26} {fmt(r['value']):>8} {fmt(r.get('baseline')):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", nargs="?", default="all", choices=[*SECTIONS, "all"])
    ap.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    ap.add_argument("--quick", action="store_true", help="passed to sections that have a quick mode (maintie)")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "minilm-l6", help="int8 encoder")
    ap.add_argument("--fp32-model", type=Path, default=REPO / "models" / "minilm-l6-float32",
                    help="float32 build of the same weights, for the int8-vs-fp32 agreement")
    ap.add_argument("--tuned-model", type=Path, action="append", default=[],
                    help="int8 encoder tuned on FMC train only (python -m edge_agent.train.finetune_classifier); "
                    "repeatable")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name in SECTIONS if args.section == "all" else [args.section]:
        rows += SECTIONS[name](args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
