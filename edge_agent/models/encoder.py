"""The int8 sentence encoder at run time: CTranslate2 + tokenizers + numpy, nothing else.

Loaded from a model directory built by `edge_agent.models.build` (hashes verified first). Two outputs:
`embed` gives mean-pooled, L2-normalised sentence vectors (what all-MiniLM-L6-v2 was trained for);
`token_states` gives each token's last hidden state with its character span, for token taggers.
CTranslate2 releases the GIL, so one Encoder may be shared by threads (up to `inter_threads` at once).
With `inter_threads` > 1 one call also runs that many sub-batches at once, each on `intra_threads` threads
(batches hold notes of one token length, so a note's vector never depends on how a call is cut). On the
shared 2-core bench machine `intra_threads=1, inter_threads=2` was no faster than the default
`intra_threads=2`, so that stays.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import ctranslate2
import numpy as np
import tokenizers

from ..errors import ModelError
from ..progress import heartbeat
from .manifest import verify


class TokenStates(NamedTuple):
    """One text's tokens: `states` [n_tokens, dim] float32, `offsets` (start, end) character spans in the
    text, `special` True for tokens the tokenizer added ([CLS], [SEP], <s>…; their span is (0, 0))."""

    states: np.ndarray
    offsets: list[tuple[int, int]]
    special: list[bool]


class Encoder:
    def __init__(self, model_dir: Path | str, *, intra_threads: int = 0, inter_threads: int = 1,
                 max_length: int | None = None, compute_type: str | None = None) -> None:
        """`max_length` truncates inputs (tokens, specials included); default: the manifest's value
        (the length the model was trained for, 256 for MiniLM), else 512. `intra_threads=0` lets
        CTranslate2 choose (one per core). `compute_type` defaults to the manifest's quantization, so a
        float32 reference build is not silently run in int8."""
        self.model_dir = Path(model_dir)
        self.manifest: dict[str, Any] = verify(self.model_dir)
        if self.manifest["kind"] != "encoder":
            raise ModelError(f"{self.model_dir} holds a {self.manifest['kind']}, not an encoder")
        self.max_length = int(max_length or self.manifest.get("max_length") or 512)
        # Put before every text `embed` sees, when the model was trained that way (e5: "query: ").
        self.prefix = str(self.manifest.get("prefix") or "")
        self.inter_threads = max(1, inter_threads)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # Shipped sentence-transformers tokenizers pad every input to 128: padding is done per batch here.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        try:
            compute_type = compute_type or self.manifest.get("quantization", "int8")
            self._model = ctranslate2.Encoder(str(self.model_dir), device="cpu", compute_type=compute_type,
                                              intra_threads=intra_threads, inter_threads=inter_threads)
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"CTranslate2 could not load {self.model_dir}: {e}") from e
        self.dim = int(np.asarray(self._model.forward_batch([[0]]).last_hidden_state).shape[-1])
        self._last: tuple[Any, np.ndarray] | None = None  # (texts, embeddings) of the last embed() call

    def _forward(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Ids of one length (see _batches) → last_hidden_state [batch, length, dim]."""
        dense = np.array(ids, dtype=np.int32)
        lengths = np.full(len(ids), dense.shape[1], dtype=np.int32)
        out = self._model.forward_batch(ctranslate2.StorageView.from_array(dense),
                                        ctranslate2.StorageView.from_array(lengths))
        return np.asarray(out.last_hidden_state)

    def _forwards(self, encodings: Sequence[tokenizers.Encoding], batch_size: int
                  ) -> Iterator[tuple[list[int], np.ndarray]]:
        """(indices, hidden states) per length-sorted sub-batch; up to `inter_threads` sub-batches at once
        (CTranslate2 drops the GIL). A call with fewer than `inter_threads` full batches is cut into that
        many smaller ones, so every thread gets work."""
        nonempty = sum(1 for e in encodings if e.ids)
        if self.inter_threads > 1:
            batch_size = max(1, min(batch_size, -(-nonempty // self.inter_threads)))
        batches = self._batches(encodings, batch_size)

        def run(idx: list[int]) -> tuple[list[int], np.ndarray]:
            return idx, self._forward([encodings[i].ids for i in idx])

        parallel = self.inter_threads > 1 and len(batches) > 1
        with ThreadPoolExecutor(min(self.inter_threads, len(batches))) if parallel else nullcontext() as pool:
            for r in pool.map(run, batches) if pool else map(run, batches):
                heartbeat()  # one sub-batch done, in the caller's thread (where the pipeline's beat context is)
                yield r

    def _encode(self, texts: Sequence[str]) -> list[tokenizers.Encoding]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        return self.tokenizer.encode_batch(list(texts))

    @staticmethod
    def _batches(encodings: Sequence[tokenizers.Encoding], batch_size: int) -> list[list[int]]:
        """Indices of non-empty encodings in batches of one token length each: no padding at all.

        With int8, padding moves a note's vector (up to 0.017 in one component, measured on FMC notes), so a
        note's label could depend on what arrived in the same batch. Equal lengths make every vector the one
        the note gets alone, and cost nothing measurable (2000 notes: 67 batches instead of 54, same CPU)."""
        order = sorted((i for i, e in enumerate(encodings) if e.ids), key=lambda i: len(encodings[i].ids))
        batches: list[list[int]] = []
        for _, same in itertools.groupby(order, key=lambda i: len(encodings[i].ids)):
            group = list(same)
            batches += [group[start : start + batch_size] for start in range(0, len(group), batch_size)]
        return batches

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """[len(texts), dim] float32 (read-only): mean over the tokens (specials included, as
        sentence-transformers does), L2-normalised. A text with no tokens at all gets a zero vector.
        The manifest's `prefix` (e5: "query: ") is put before each text first; `token_states` gets none,
        so its offsets stay the text's own.

        The last call's result is kept: tasks on one route that share this encoder (a category and an
        urgency classifier) get the batch's embeddings from the first of them, not one forward pass each."""
        key = (texts if isinstance(texts, str) else tuple(texts), batch_size)
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        out = self._embed(texts, batch_size)
        out.setflags(write=False)
        self._last = (key, out)
        return out

    def _embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        encodings = self._encode([self.prefix + t for t in texts] if self.prefix else texts)
        out = np.zeros((len(encodings), self.dim), dtype=np.float32)
        for idx, hidden in self._forwards(encodings, batch_size):
            out[idx] = hidden.mean(axis=1)  # no padding: every position is a token of its note
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def token_states(self, texts: Sequence[str], batch_size: int = 32) -> list[TokenStates]:
        """Per text: every token's last hidden state and its character offsets, input order kept."""
        encodings = self._encode(texts)
        empty = TokenStates(np.zeros((0, self.dim), dtype=np.float32), [], [])
        result: list[TokenStates] = [empty] * len(encodings)
        for idx, hidden in self._forwards(encodings, batch_size):
            for row, i in enumerate(idx):
                enc = encodings[i]
                result[i] = TokenStates(hidden[row].copy(), list(enc.offsets),
                                        [bool(s) for s in enc.special_tokens_mask])
        return result
