"""MaintIE: 5-class entity recognition (PhysicalObject, Activity, State, Process, Property) with the int8
token tagger, against a baseline in the same run.

    python -m bench.accuracy_maintie [--quick] [--json OUT] [--write-splits DIR]

Data: ../shared/data/maintie_gold.jsonl (1,076 expert-annotated work orders, nlp-tlp/maintie @825e771).
Split: rows sorted by id (= the release's order), first 80 % train, next 10 % dev, last 10 % test. This is
the split of the published anchor: MaintIE's `models/create_datasets.py` shuffles a copy but splits the
unshuffled list 80/10/10, and its SpERT 5-class test support (347 entities) is exactly ours. The release is
in alphabetical order of text, so test holds the notes from "re-gas ..." to "wiper ..." (many "replace",
"remove", "repair") and dev the ones just before it: dev is closer to test than train is.

Metric: micro-F1 over exact (start, end, type) entities, nested ones included (11 % of the entities sit
inside another, e.g. "air filters" contains "filters"), as in the anchor's evaluation.

Rows (each with the baseline's test F1 beside it):
- `maintie_tagger_int8_minilm`: numpy head on the default int8 MiniLM (`models/minilm-l6` or
  EDGE_AGENT_MODEL_DIR), trained on train, epoch picked on dev (options were chosen on dev).
- `..._finetuned`: the same head on an encoder fine-tuned on train (epoch picked on dev), when
  EDGE_AGENT_TAGGER_MODEL_DIR (default `models/minilm-l6-maintie`) holds one.
- `..._finetuned_refit`: encoder and head refit on train + dev with the epoch counts chosen before (no
  selection left), when EDGE_AGENT_TAGGER_REFIT_MODEL_DIR (default `models/minilm-l6-maintie-refit`) holds
  one. Not comparable with the anchor, which trained on train only.
Build the fine-tuned encoders (torch, the `convert` extra; ~8 and ~15 min on 2 busy cores):

    python -m bench.accuracy_maintie --write-splits /tmp/maintie
    python -m edge_agent.train.finetune_tagger --format maintie --examples /tmp/maintie/train.jsonl \
        --dev /tmp/maintie/dev.jsonl --out models/minilm-l6-maintie --threads 1
    python -m edge_agent.train.finetune_tagger --format maintie --examples /tmp/maintie/traindev.jsonl \
        --epochs 9 --out models/minilm-l6-maintie-refit --threads 1

Baseline: per-word multinomial logistic regression (scikit-learn, dev-only dependency) on hand features
(word, neighbours +-2, bigrams, affixes, shape, position), same nested layers and Viterbi decoder, C chosen
on dev.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from edge_agent.tasks import tagger
from edge_agent.train import tagger as tagger_train

REPO = Path(__file__).resolve().parent.parent

DATA = Path(os.environ.get("EDGE_AGENT_DATA_DIR", REPO.parent / "shared" / "data")) / "maintie_gold.jsonl"
ANCHOR = 0.874  # SpERT (BERT, fine-tuned, GPU), 5 classes, same test split: nlp-tlp/maintie RESULTS.md
TARGET = 0.85


def split() -> dict[str, list[dict[str, Any]]]:
    rows = sorted((json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()), key=lambda r: r["id"])
    a, b = int(0.8 * len(rows)), int(0.9 * len(rows))
    return {"train": rows[:a], "dev": rows[a:b], "test": rows[b:]}


def _describe(parts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {k: {"rows": len(v), "ids": f"{v[0]['id']}..{v[-1]['id']}", "entities": sum(len(r["entities"]) for r in v)}
            for k, v in parts.items()} | {"rule": "sorted by id; first 80% train, next 10% dev, last 10% test "
                                                  "(the MaintIE release's own SpERT split)"}


def _round(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items() if k != "per_type"}
    if "per_type" in report:
        out["per_type"] = {t: _round(r) for t, r in report["per_type"].items()}
    return out


# ---------------------------------------------------------------- baseline (scikit-learn, dev only)

def _word_features(tokens: list[str], i: int) -> dict[str, int]:
    def w(j: int) -> str:
        return tokens[j].lower() if 0 <= j < len(tokens) else ("<s>" if j < 0 else "</s>")

    x = w(i)
    return {f"w={x}": 1, f"w-1={w(i - 1)}": 1, f"w+1={w(i + 1)}": 1, f"w-2={w(i - 2)}": 1, f"w+2={w(i + 2)}": 1,
            f"bi-={w(i - 1)}|{x}": 1, f"bi+={x}|{w(i + 1)}": 1, f"p3={x[:3]}": 1, f"s2={x[-2:]}": 1,
            f"s3={x[-3:]}": 1, f"shape={tagger._shape(tokens[i])}": 1, f"pos={min(i, 3)}": 1}


def baseline(parts: dict[str, list[dict[str, Any]]], quick: bool) -> dict[str, Any]:
    """Word-level logistic regression; predictions mapped to the same character offsets as the tagger."""
    import numpy as np
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    layers = 2
    conv = {k: [tagger_train.from_maintie(r) for r in v] for k, v in parts.items()}
    types = sorted({e["type"] for ex in conv["train"] for e in ex["entities"]})
    n_tags = 1 + 2 * len(types)

    def word_spans(tokens: list[str]) -> list[tuple[int, int, int, int]]:
        out, at = [], 0
        for k, t in enumerate(tokens):
            out.append((at, at + len(t), k, k + 1))
            at += len(t) + 1
        return out

    def xy(rows: list[dict[str, Any]], exs: list[dict[str, Any]]) -> tuple[list[dict[str, int]], Any]:
        x = [_word_features(r["tokens"], i) for r in rows for i in range(len(r["tokens"]))]
        y = np.concatenate([tagger.labels(word_spans(r["tokens"]), ex["entities"], types, layers, {})
                            for r, ex in zip(rows, exs, strict=True)])
        return x, y

    t0 = time.monotonic()
    vec = DictVectorizer()
    x_raw, y = xy(parts["train"], conv["train"])
    x = vec.fit_transform(x_raw)
    head = tagger.TaggerHead({}, types, tagger.Features(layers=layers), {})

    def predict(fitted: list[Any], rows: list[dict[str, Any]], exs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        out = []
        for r, ex in zip(rows, exs, strict=True):
            xr = vec.transform([_word_features(r["tokens"], i) for i in range(len(r["tokens"]))])
            z = np.full((len(r["tokens"]), layers, n_tags), -30.0)
            for d, m in enumerate(fitted):
                z[:, d, m.classes_] = m.predict_log_proba(xr)
            out.append(head.decode(ex["text"], word_spans(r["tokens"]), z.reshape(len(r["tokens"]), -1)))
        return out

    def gold(exs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return [ex["entities"] for ex in exs]

    best: tuple[float, float, list[Any]] = (-1.0, 0.0, [])
    for c in (3.0,) if quick else (0.3, 1.0, 3.0, 10.0):
        fitted = [LogisticRegression(C=c, max_iter=3000).fit(x, y[:, d]) for d in range(layers)]
        f1 = tagger_train.entity_f1(gold(conv["dev"]), predict(fitted, parts["dev"], conv["dev"]))["f1"]
        if f1 > best[0]:
            best = (f1, c, fitted)
    test = tagger_train.entity_f1(gold(conv["test"]), predict(best[2], parts["test"], conv["test"]))
    x_raw, y = xy(parts["train"] + parts["dev"], conv["train"] + conv["dev"])
    x = vec.fit_transform(x_raw)
    refit = [LogisticRegression(C=best[1], max_iter=3000).fit(x, y[:, d]) for d in range(layers)]
    test_refit = tagger_train.entity_f1(gold(conv["test"]), predict(refit, parts["test"], conv["test"]))
    return {"name": "word logistic regression (scikit-learn), hand features, same nested-BIO Viterbi decoder",
            "C": best[1], "dev": _round({"f1": best[0]}), "test": _round(test),
            "test_refit_train_dev": _round(test_refit), "seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------- the tagger

def _throughput(encoder: Any, head: tagger.TaggerHead, texts: list[str], batch: int = 32) -> float:
    """Notes/s through the pipeline task (one token_states call per batch), encoder at 2 threads."""
    from edge_agent.message import Note

    with tempfile.TemporaryDirectory() as tmp:
        head.save(Path(tmp) / "head.npz")
        task = tagger.TaggerTask("bench", argparse.Namespace(head=Path(tmp) / "head.npz"), encoder)
    notes = [Note(text=t, topic="plant/bench/notes") for t in texts]
    task.process(notes[:batch])  # warm-up
    t0 = time.perf_counter()
    for k in range(0, len(notes), batch):
        task.process(notes[k : k + batch])
    return len(notes) / (time.perf_counter() - t0)


def tagger_row(name: str, model_dir: Path, parts: dict[str, list[dict[str, Any]]], quick: bool,
               baseline_f1: float, refit: bool = False) -> dict[str, Any]:
    from edge_agent.models.encoder import Encoder

    conv = {k: [tagger_train.from_maintie(r) for r in v] for k, v in parts.items()}
    encoder = Encoder(model_dir, intra_threads=2, max_length=128)
    states = {k: encoder.token_states([ex["text"] for ex in v]) for k, v in conv.items()}
    train_rows, dev_rows = (conv["train"] + conv["dev"], None) if refit else (conv["train"], conv["dev"])

    def evaluate(head: tagger.TaggerHead, part: str) -> dict[str, Any]:
        pred = head.predict([ex["text"] for ex in conv[part]], states[part])
        return _round(tagger_train.entity_f1([ex["entities"] for ex in conv[part]], pred))

    opts = tagger.Features()
    t0 = time.monotonic()
    head = tagger_train.train(encoder, train_rows, opts, dev=dev_rows)
    train_s = time.monotonic() - t0
    test = evaluate(head, "test")
    seeds = [test["f1"]]  # the spread over training seeds, same split and options
    for seed in () if quick else (1, 2):
        again = tagger_train.train(encoder, train_rows, replace(opts, seed=seed), dev=dev_rows)
        seeds.append(evaluate(again, "test")["f1"])
    texts = [ex["text"] for part in ("train", "dev", "test") for ex in conv[part]]
    return {
        "name": name, "metric": "entity micro-F1, exact span + type, 5 classes, test", "value": test["f1"],
        "baseline": baseline_f1, "anchor": ANCHOR, "target": TARGET, "model": str(model_dir),
        "model_manifest_name": head.model["name"], "model_sha256": head.model["sha256"],
        "trained_on": "train + dev (refit)" if refit else "train; epoch chosen on dev",
        "dev": None if refit else evaluate(head, "dev"), "test": test, "test_f1_by_seed": seeds,
        "epoch": head.info["epoch"], "label_stats": head.info["label_stats"], "options": asdict(opts),
        "train_seconds": round(train_s, 1), "train_pieces": head.info["pieces"],
        "notes_per_s_batch32_2threads": round(_throughput(encoder, head, texts[: 256 if quick else None]), 1),
    }


def maintie(quick: bool = False) -> list[dict[str, Any]]:
    parts = split()
    base = baseline(parts, quick)
    models = REPO / "models"
    candidates = [
        ("maintie_tagger_int8_minilm", os.environ.get("EDGE_AGENT_MODEL_DIR", models / "minilm-l6"), False),
        ("maintie_tagger_int8_minilm_finetuned",
         os.environ.get("EDGE_AGENT_TAGGER_MODEL_DIR", models / "minilm-l6-maintie"), False),
        ("maintie_tagger_int8_minilm_finetuned_refit",
         os.environ.get("EDGE_AGENT_TAGGER_REFIT_MODEL_DIR", models / "minilm-l6-maintie-refit"), True),
    ]
    rows = []
    for name, model_dir, refit in candidates:
        if (Path(model_dir) / "manifest.json").is_file():
            base_f1 = base["test_refit_train_dev" if refit else "test"]["f1"]
            rows.append(tagger_row(name, Path(model_dir), parts, quick, base_f1, refit))
    for row in rows:
        row["split"] = _describe(parts)
        row["baseline_detail"] = base
    return rows


def write_splits(out: Path) -> None:
    """The split's MaintIE rows as JSONL (train, dev, test, traindev) for `edge_agent.train.finetune_tagger`."""
    out.mkdir(parents=True, exist_ok=True)
    parts = split()
    for name, rows in {**parts, "traindev": parts["train"] + parts["dev"]}.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write-splits", type=Path, metavar="DIR", help="write the split as JSONL and exit")
    args = ap.parse_args(argv)
    if args.write_splits:
        write_splits(args.write_splits)
        return 0
    text = json.dumps(maintie(args.quick), indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
