"""The generator's JSON key skeleton as text: its keys, where a generated value ends, what is kept of it.

Standard library only, so that a benchmark peer (llama-cpp-python in its own interpreter) follows exactly
the procedure of the generator task. A key stops at its colon: the model itself writes what follows, an
opening quote or the empty value (`""` is a single token in SmolLM2's and Qwen's vocabularies, `"",` in both
too), so that "not mentioned" stays as reachable as in the worked example. A prefix that ended with the
value's opening quote made it unreachable: every field was filled.
"""

from __future__ import annotations

VALUE_STOPS = '",}\n'  # what ends a value written without quotes (null, none)


def key(name: str, first: bool) -> str:
    """The text of a field's key, up to its colon (`{"asset":`, `, "symptom":`)."""
    return ('{"' if first else ', "') + name + '":'


def value_end(pieces: list[str], eos: list[bool] | None = None) -> int | None:
    """The index of the piece that ends a value generated after a key's colon, or None while it goes on:
    the piece with its closing quote; for a value written without quotes (`null`), the first piece with a
    quote, comma, brace or line break; an end-of-turn piece (`eos`) ends any value."""
    text = ""
    opened: bool | None = None  # None while only white space was written
    for n, piece in enumerate(pieces):
        if eos is not None and eos[n]:
            return n
        text += piece
        if opened is None and text.strip():
            opened = text.lstrip().startswith('"')
        if opened is None:
            continue
        if (text.count('"') >= 2) if opened else any(c in piece for c in VALUE_STOPS):
            return n
    return None


def cut(pieces: list[str], eos: list[bool]) -> tuple[int, str]:
    """Where a generated value ends: (pieces kept, the text of the ending piece that belongs to the value:
    up to and with its closing quote). A quoted value cut off (max tokens, end of turn) gets its quote."""
    end = value_end(pieces, eos)
    keep = len(pieces) if end is None else end
    before = "".join(pieces[:keep])
    opened = before.lstrip().startswith('"')
    if end is None or eos[end]:
        return keep, '"' if opened and before.count('"') < 2 else ""
    piece = pieces[end]
    if opened or (not before.strip() and piece.lstrip().startswith('"')):
        need = 2 - before.count('"')  # quotes of this piece up to the closing one
        at = [i for i, c in enumerate(piece) if c == '"'][need - 1]
        return keep, piece[: at + 1]
    return keep, piece[: min(piece.index(c) for c in VALUE_STOPS if c in piece)]


def value_text(raw: str) -> str:
    """A value without its white space and quotes (` "pump P-204"` -> `pump P-204`)."""
    raw = raw.strip()
    if raw.startswith('"'):
        raw = raw[1:]
    return raw[:-1] if raw.endswith('"') else raw
