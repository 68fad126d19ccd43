"""Heads trained on English notes, scored on German and Spanish ones (real int8 encoders, FMC data).

The German/Spanish notes are bench/data/fmc_dev_multilingual.jsonl: our own translations of 80 FMC train+dev
notes, whose English sources are held out of the heads here (the FMC test translations are left to the
benchmark). The aligned encoder (edge_agent.train.align_encoder) is EDGE_AGENT_ALIGNED_MODEL, else
<repo>/models/multilingual-e5-small-aligned; it is built on a workstation, so its test skips without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pytest

from edge_agent.errors import ModelError
from edge_agent.tasks import classifier
from edge_agent.tasks import fit as classifier_train
from edge_agent.train import align_encoder

REPO = Path(__file__).resolve().parents[1]
FMC = REPO.parent / "shared" / "data" / "fmc_mwo2kg.jsonl"
DEV = REPO / "bench" / "data" / "fmc_dev_multilingual.jsonl"
E5 = REPO / "models" / "multilingual-e5-small"
ALIGNED = Path(os.environ.get("EDGE_AGENT_ALIGNED_MODEL") or REPO / "models" / "multilingual-e5-small-aligned")


def _encoder(path: Path):
    if not (path / "manifest.json").is_file():
        pytest.skip(f"no int8 encoder at {path}")
    from edge_agent.models.encoder import Encoder

    return Encoder(path, intra_threads=2)


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    if not FMC.is_file():
        pytest.skip(f"{FMC} is missing (the shared development data sits beside the checkout)")
    dev = [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = {r["id"] for r in dev}
    rows = [json.loads(line) for line in FMC.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r["split"] in ("train", "dev") and r["id"] not in held]
    return {"train": train, "dev": dev}


def _accuracy_by_language(encoder, data, features: classifier.Features) -> dict[str, float]:
    texts = [r["text"] for r in data["train"]]
    head = classifier_train.train(texts, [r["label"] for r in data["train"]], encoder.embed(texts),
                                  encoder_sha="test", features=features, folds=0)
    out = {}
    english = list({r["id"]: r for r in data["dev"]}.values())
    for lang, rows in (("en", None), ("de", "de"), ("es", "es")):
        rs = english if rows is None else [r for r in data["dev"] if r["lang"] == lang]
        tx = [r["english"] for r in rs] if rows is None else [r["text"] for r in rs]
        pred = head.logits(encoder.embed(tx), tx).argmax(axis=1)
        out[lang] = float(np.mean([head.labels[i] == r["label"] for i, r in zip(pred, rs, strict=True)]))
    return out


def test_german_notes_by_a_head_trained_on_english(data):
    """The shipped multilingual encoder carries an English head (embeddings only) to German and Spanish notes
    at all: measured 0.45 / 0.45 (the same notes in English 0.79), well above always answering the most
    frequent label (0.24); char n-grams alone would not (0.26 / 0.29)."""
    acc = _accuracy_by_language(_encoder(E5), data, classifier.Features(w_char=0.0))
    majority = max(sum(r["label"] == lab for r in data["dev"] if r["lang"] == "de")
                   for lab in {r["label"] for r in data["dev"]}) / 80
    assert acc["de"] > majority + 0.1 and acc["es"] > majority + 0.1, (acc, majority)


def test_aligned_encoder_carries_english_heads_further(data):
    """Same head recipe (the default: centred embeddings + char n-grams), English training rows only: the
    aligned encoder scores the German and Spanish notes higher than the shipped one, English no lower
    than 0.05 below it."""
    base = _accuracy_by_language(_encoder(E5), data, classifier.Features())
    aligned = _accuracy_by_language(_encoder(ALIGNED), data, classifier.Features())
    assert aligned["de"] + aligned["es"] >= base["de"] + base["es"] + 0.1, (base, aligned)
    assert aligned["en"] >= base["en"] - 0.05, (base, aligned)


def test_clean_translation():
    assert align_encoder.clean_translation(' "pumpt nicht".\nmore') == "pumpt nicht"
    assert align_encoder.clean_translation('The German translation of "hot" is "heiß".') == "heiß"
    assert align_encoder.clean_translation("no bombea") == "no bombea"


def test_pairs_skip_unchanged_and_empty_translations():
    rows = [{"english": "leaking", "lang": "de", "text": "undicht"},
            {"english": "DPR 1", "lang": "de", "text": "dpr 1"},
            {"english": "noisy", "lang": "es", "text": "  "}]
    assert align_encoder.pairs_from(rows) == [("leaking", "undicht")]


def test_translations_come_from_the_cache_first(tmp_path):
    cache = tmp_path / "tr.jsonl"
    cache.write_text(json.dumps({"english": "leaking", "lang": "de", "text": "undicht"}) + "\n", encoding="utf-8")
    # every pair is cached: the generator (a path that does not exist) is never opened
    rows = align_encoder.translations_for(["leaking", "leaking"], ["de"], tmp_path / "no-model", cache)
    assert rows == [{"english": "leaking", "lang": "de", "text": "undicht"}]
    with pytest.raises(ModelError, match="tokenizer_config"):  # a missing pair needs the generator
        align_encoder.translations_for(["noisy"], ["de"], tmp_path / "no-model", cache)
