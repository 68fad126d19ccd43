"""Decode: the payload rule of DESIGN.md, and fuzzing that nothing but DecodeError ever escapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.decode import decode
from edge_agent.errors import DecodeError
from edge_agent.results import mark_replayed, result_id, result_payload


def test_plain_text_and_json() -> None:
    assert decode(b"pump P-1 leaking") == ("pump P-1 leaking", None)
    assert decode(b'  {"text": "hi", "id": 7}', id_field="id") == ("hi", "7")
    assert decode(
        b'{"note": {"body": "x", "meta": {"id": "a1"}}}', text_field="note.body", id_field="note.meta.id"
    ) == ("x", "a1")
    assert decode(b'{"text": "hi"}', id_field="id") == ("hi", None)  # the producer id is optional
    assert decode(b"[1, 2]") == ("[1, 2]", None)  # only a leading '{' means JSON


@pytest.mark.parametrize(
    ("payload", "kwargs", "kind", "reason"),
    [
        (b"\xc3\x28", {}, "invalid_utf8", "invalid UTF-8 at byte 0"),
        (b"a" * 11, {"max_bytes": 10}, "too_large", "payload too large: 11 bytes, limit 10"),
        (b"{", {}, "invalid_json",
         "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        (b'{"text": Infinity}', {}, "invalid_json", "invalid JSON: Infinity is not allowed"),
        (b'{"text": "P-101 leak", "counter": ' + b"1" * 5000 + b"}", {}, "invalid_json",
         "invalid JSON: an integer of 5000 digits, limit 4300"),
        (b'{"text": "x", "id": -' + b"9" * 4301 + b"}", {"id_field": "id"}, "invalid_json",
         "invalid JSON: an integer of 4301 digits, limit 4300"),
        (b'{"a": {"b": {"c": 1}}, "text": "x"}', {"max_depth": 2}, "too_deep", "JSON nested deeper than 2 levels"),
        (b'{"text": ["x"]}', {}, "wrong_type", "field 'text' is a array, expected a string"),
        (b'{"text": true}', {}, "wrong_type", "field 'text' is a boolean, expected a string"),
        (b'{"note": "x"}', {"text_field": "note.body"}, "missing_field", "missing field 'note.body'"),
        (b'{"text": " \\n "}', {}, "empty", "field 'text' is empty"),
        (b'{"text": "x", "id": true}', {"id_field": "id"}, "wrong_type",
         "field 'id' is a boolean, expected a string or integer"),
        (b"\n\t ", {}, "empty", "empty text"),
    ],
)
def test_reasons(payload: bytes, kwargs: dict, kind: str, reason: str) -> None:
    with pytest.raises(DecodeError) as ei:
        decode(payload, **kwargs)
    assert (ei.value.kind, ei.value.reason) == (kind, reason)


def test_the_longest_integer_python_converts_still_decodes() -> None:
    text, input_id = decode(b'{"text": "x", "id": ' + b"7" * 4300 + b"}", id_field="id")
    assert (text, input_id) == ("x", "7" * 4300)


def test_lone_surrogates_become_replacement_characters() -> None:
    text, input_id = decode(b'{"text": "pump \\ud800 leak", "id": "a\\udfff"}', id_field="id")
    assert text == "pump \ufffd leak" and input_id == "a\ufffd"
    text.encode("utf-8")  # publishable


def test_deep_nesting_beyond_python_recursion_is_a_reason() -> None:
    payload = b'{"text": "x", "a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(DecodeError, match="nested deeper than 32"):
        decode(payload, max_bytes=10**7)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["text", "id", "x"]), json_values, max_size=3).map(
            lambda d: json.dumps(d).encode()
        ),
    )
)
def test_fuzz_only_decode_errors(payload: bytes) -> None:
    try:
        text, input_id = decode(payload, id_field="id", max_bytes=200, max_depth=5)
    except DecodeError as e:
        assert e.reason
    else:
        assert isinstance(text, str) and text.strip()
        text.encode("utf-8")
        assert input_id is None or isinstance(input_id, str)


def test_result_id_is_deterministic_and_discriminating() -> None:
    a = result_id("gw", "t/1", "out/t/1", "n1", b"x")
    assert a == result_id("gw", "t/1", "out/t/1", "n1", b"other payload")  # the producer id wins
    assert a != result_id("gw", "t/2", "out/t/1", "n1", b"x")
    assert result_id("gw", "t", "o", None, b"p1") != result_id("gw", "t", "o", None, b"p2")


def test_replayed_flag_rewrite() -> None:
    p = result_payload(
        rid="r", input_id=None, topic="t", received_at=0.0, text="é", results={}, processed_at=1.0, gateway="g"
    )
    obj = json.loads(p)
    assert obj["replayed"] is False and obj["source"]["received_at"] == "1970-01-01T00:00:00.000Z"
    again = json.loads(mark_replayed(p))
    assert again.pop("replayed") is True and obj.pop("replayed") is False
    assert again == obj
