"""The int8 token tagger: real encoder, real MaintIE work orders, grounded spans, bound heads."""

from __future__ import annotations

import argparse
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.cli import tagger as cli_tagger
from edge_agent.errors import EdgeAgentError, ModelError
from edge_agent.message import Note
from edge_agent.tasks import tagger
from edge_agent.train import tagger as tagger_train

REPO = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("EDGE_AGENT_MODEL_DIR", REPO / "models" / "minilm-l6"))
DATA = REPO.parent / "shared" / "data" / "maintie_gold.jsonl"
OPTS = tagger.Features()  # the defaults: 8 epochs, seed 0
# Measured on these 50 rows after training on the 150: micro-F1 0.764 (seed 0; seeds 1-3: 0.771, 0.755, 0.727).
# The floor leaves room for CPU/BLAS differences and still fails when the head stops learning: tagging
# every word as a PhysicalObject scores 0.31 here.
F1_FLOOR = 0.65

needs_model = pytest.mark.skipif(not (MODEL / "manifest.json").is_file(),
                                 reason=f"no int8 encoder at {MODEL}: run `edge-agent models build minilm-l6` "
                                        "or set EDGE_AGENT_MODEL_DIR")
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is not beside this checkout")


def _rows() -> list[dict]:
    rows = sorted((json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()), key=lambda r: r["id"])
    return [tagger_train.from_maintie(r) for r in rows]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    if not DATA.is_file():
        pytest.skip(f"{DATA} is not beside this checkout")
    return _rows()


@pytest.fixture(scope="module")
def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """150 training rows and 50 other rows, spread over the (alphabetical) file."""
    return rows[0::7][:150], rows[3::21][:50]


@pytest.fixture(scope="module")
def encoder():
    if not (MODEL / "manifest.json").is_file():
        pytest.skip(f"no int8 encoder at {MODEL}: run `edge-agent models build minilm-l6` or set EDGE_AGENT_MODEL_DIR")
    from edge_agent.models.encoder import Encoder

    return Encoder(MODEL, intra_threads=2, max_length=128)


@pytest.fixture(scope="module")
def head(encoder, split) -> tagger.TaggerHead:
    return tagger_train.train(encoder, split[0], OPTS)


@pytest.fixture(scope="module")
def task(encoder, head, tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "maintie.npz"
    head.save(path)
    cfg = argparse.Namespace(head=path)
    return tagger.TaggerTask("tags", cfg, encoder)


# ---------------------------------------------------------------- pure parts (no model)

@needs_data
def test_maintie_conversion_gives_character_offsets(rows) -> None:
    raw = sorted((json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()), key=lambda r: r["id"])
    for r, ex in zip(raw, rows, strict=True):
        assert [ex["text"][e["start"] : e["end"]] for e in ex["entities"]] == [e["text"] for e in r["entities"]]
        assert {e["type"] for e in ex["entities"]} <= {"PhysicalObject", "Activity", "State", "Process", "Property"}


def test_pieces_split_words_and_outer_punctuation() -> None:
    text = "(P-101), <id> de-ice u/s 3.5bar!"
    # one fake token per character that is not a space, as a tokenizer might produce
    offsets = [(0, 0)] + [(i, i + 1) for i, c in enumerate(text) if not c.isspace()] + [(0, 0)]
    special = [True] + [False] * (len(offsets) - 2) + [True]
    words = [text[s:e] for s, e, _, _ in tagger.pieces(text, offsets, special)]
    assert words == ["(", "P-101", "),", "<id>", "de-ice", "u/s", "3.5bar", "!"]


def test_pieces_leave_out_truncated_words() -> None:
    found = tagger.pieces("pump seal leaking", [(0, 0), (0, 4), (0, 0)], [True, False, True])
    assert [p[:2] for p in found] == [(0, 4)]


@needs_data
@needs_model
def test_labels_then_decode_give_back_the_gold_entities(rows) -> None:
    """The encoding is lossless for every entity nested at most `layers` deep (MaintIE: all but 23)."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    tok.no_padding()
    types = sorted({e["type"] for ex in rows for e in ex["entities"]})
    decoder = tagger.TaggerHead({}, types, tagger.Features(layers=2), {})
    lost = 0
    for ex in rows:
        enc = tok.encode(ex["text"])
        spans = tagger.pieces(ex["text"], enc.offsets, [bool(s) for s in enc.special_tokens_mask])
        stats: dict[str, int] = {}
        y = tagger.labels(spans, ex["entities"], types, 2, stats)
        logits = np.where(np.eye(1 + 2 * len(types))[y] > 0, 10.0, -10.0).reshape(len(spans), -1)
        got = {(e["start"], e["end"], e["type"]) for e in decoder.decode(ex["text"], spans, logits)}
        want = {(e["start"], e["end"], e["type"]) for e in ex["entities"]}
        assert got <= want
        assert len(want - got) == stats.get("dropped", 0)
        lost += len(want - got)
    assert lost == 23


@given(st.integers(1, 12), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_viterbi_path_is_valid_bio(n: int, n_types: int, seed: int) -> None:
    logp = np.random.default_rng(seed).normal(size=(n, 1 + 2 * n_types))
    path = tagger.viterbi(logp)
    for prev, tag in zip([0, *path], path, strict=False):
        if tag and tag % 2 == 0:  # I-X must follow B-X or I-X
            assert prev in (tag - 1, tag)


def test_entity_f1_counts_exact_span_and_type() -> None:
    gold = [[{"start": 0, "end": 4, "type": "A"}, {"start": 5, "end": 9, "type": "B"}]]
    pred = [[{"start": 0, "end": 4, "type": "A"}, {"start": 5, "end": 8, "type": "B"},
             {"start": 5, "end": 9, "type": "A"}]]
    r = tagger_train.entity_f1(gold, pred)
    assert (r["precision"], r["recall"]) == (pytest.approx(1 / 3), 0.5)
    assert r["per_type"]["A"]["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("row", [{"text": 3}, {"text": "ab", "entities": [{"start": 1, "end": 5, "type": "X"}]},
                                 {"text": "ab", "entities": [{"start": 0, "end": 1, "type": ""}]},
                                 {"text": "ab", "entities": [{"start": True, "end": 1, "type": "X"}]}])
def test_bad_examples_are_refused(row) -> None:
    with pytest.raises(EdgeAgentError, match="row 1"):
        tagger_train.check_examples([row])


# ---------------------------------------------------------------- the real int8 encoder

def test_f1_on_held_out_rows(encoder, head, split) -> None:
    texts = [ex["text"] for ex in split[1]]
    pred = head.predict(texts, encoder.token_states(texts))
    report = tagger_train.entity_f1([ex["entities"] for ex in split[1]], pred)
    assert report["f1"] >= F1_FLOOR, report


def test_entities_are_slices_of_the_note(task, split) -> None:
    notes = [Note(text=ex["text"].upper() + "  , (P-101)", topic="t") for ex in split[1]]
    results = task.process(notes)
    assert len(results) == len(notes)
    assert sum(len(r["entities"]) for r in results) > len(notes)
    for note, result in zip(notes, results, strict=True):
        for e in result["entities"]:
            assert e["text"] == note.text[e["start"] : e["end"]] and e["text"].strip() == e["text"] != ""
            assert e["type"] in {"PhysicalObject", "Activity", "State", "Process", "Property"}
            assert 0 < e["score"] <= 1
        json.dumps(result)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_any_text_is_tagged_without_raising_and_in_bounds(task, texts) -> None:
    results = task.process([Note(text=t, topic="t") for t in texts])
    assert len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        for e in result["entities"]:
            assert 0 <= e["start"] < e["end"] <= len(text) and e["text"] == text[e["start"] : e["end"]]


def test_long_notes_are_truncated_not_refused(task) -> None:
    text = "replace hydraulic pump seal " * 200
    (result,) = task.process([Note(text=text, topic="t")])
    assert result["entities"] and max(e["end"] for e in result["entities"]) < len(text)


def test_head_round_trips_without_pickle(head, tmp_path) -> None:
    path = tmp_path / "h.npz"
    head.save(path)
    with np.load(path, allow_pickle=False) as z:
        assert "meta" in z.files
    again = tagger.TaggerHead.load(path)
    assert again.types == head.types and again.opts == head.opts and again.model == head.model
    for k, v in head.params.items():
        np.testing.assert_array_equal(again.params[k], v)


def test_head_for_another_model_is_refused(encoder, head, tmp_path) -> None:
    path = tmp_path / "h.npz"
    head.save(path)
    other = {**encoder.manifest, "name": "other-encoder",
             "files": {**encoder.manifest["files"], "model.bin": "0" * 64}}
    with pytest.raises(ModelError, match=r"trained on encoder 'minilm-l6'.*'other-encoder'.*retrain"):
        tagger.TaggerHead.load(path, other)
    fake = argparse.Namespace(manifest=other)
    with pytest.raises(ModelError, match="retrain"):
        tagger.TaggerTask("tags", argparse.Namespace(head=path), fake)


def test_a_file_that_is_not_a_head_is_refused(tmp_path) -> None:
    bad = tmp_path / "h.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot read tagger head"):
        tagger.TaggerHead.load(bad)
    with pytest.raises(ModelError, match="cannot read tagger head"):
        tagger.TaggerHead.load(tmp_path / "absent.npz")
    np.savez(tmp_path / "weights.npz", w=np.zeros(3))
    with pytest.raises(ModelError, match="cannot read tagger head"):
        tagger.TaggerHead.load(tmp_path / "weights.npz")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "someone-else/1"})))
    with pytest.raises(ModelError, match=r"not an edge-agent/tagger-head/1 file; train one"):
        tagger.TaggerHead.load(tmp_path / "other.npz")


def test_training_is_deterministic(encoder, split) -> None:
    opts = replace(OPTS, epochs=3)
    a = tagger_train.train(encoder, split[0][:60], opts)
    b = tagger_train.train(encoder, split[0][:60], opts)
    for k, v in a.params.items():
        np.testing.assert_array_equal(b.params[k], v)
    texts = [ex["text"] for ex in split[1]]
    states = encoder.token_states(texts)
    assert a.predict(texts, states) == b.predict(texts, states)


def test_cli_train_and_predict(encoder, split, tmp_path, monkeypatch, capsys) -> None:
    examples = tmp_path / "train.jsonl"
    examples.write_text("".join(json.dumps(ex) + "\n" for ex in split[0][:60]))
    parser = argparse.ArgumentParser()
    cli_tagger.add_parser(parser.add_subparsers(dest="command", required=True))
    head = tmp_path / "h.npz"
    args = parser.parse_args(["tagger", "train", "--model", str(MODEL), "--examples", str(examples),
                              "--out", str(head), "--epochs", "3", "--threads", "2"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["types"]
    lines = [json.dumps({"text": split[1][0]["text"]}), "not json", json.dumps({"txt": "x"}), json.dumps({"text": ""})]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    args = parser.parse_args(["tagger", "predict", "--model", str(MODEL), "--head", str(head), "--threads", "2"])
    assert args.func(args) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 4 and "entities" in out[0] and "error" in out[1] and "error" in out[2]
    assert out[3] == {"entities": []}
