"""Inbound payload → text (+ producer id), or a DecodeError with a precise reason.

The rule (DESIGN.md): valid UTF-8 that does not start with `{` (after leading white space) is plain
text. A payload that starts with `{` must be a JSON object whose `text_field` is a string. Anything
else — invalid UTF-8, too large, invalid JSON, too deep, missing field, wrong type — is dead-lettered.
The decoder never evaluates payload content; it only parses JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .config import RouteConfig
from .errors import DeadLetterKind as K
from .errors import DecodeError

_JSON_WS = " \t\r\n"
# A JSON "\ud800" escape decodes to a lone surrogate: not encodable as UTF-8, so it could never be
# published (nor tokenized). It becomes U+FFFD, the replacement character, like any other broken text.
_SURROGATE = re.compile("[\ud800-\udfff]")


# json.loads turns every integer literal into an int, and CPython refuses to convert one of more than
# 4,300 digits (a denial-of-service guard, sys.set_int_max_str_digits) with a plain ValueError. Such a
# payload is refused by name here, wherever in the object the integer sits; nothing real needs that many.
MAX_INT_DIGITS = 4300


def _parse_int(digits: str) -> int:
    n = len(digits.lstrip("-"))
    if n > MAX_INT_DIGITS:
        raise DecodeError(K.INVALID_JSON, f"invalid JSON: an integer of {n} digits, limit {MAX_INT_DIGITS}")
    return int(digits)


def _reject_constant(name: str) -> Any:
    raise DecodeError(K.INVALID_JSON, f"invalid JSON: {name} is not allowed")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in node if isinstance(child, dict | list))
    return deepest


def _lookup(obj: dict[str, Any], path: str) -> Any:
    node: Any = obj
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(path.split(".")[: i + 1])
            raise DecodeError(K.MISSING_FIELD, f"missing field {where!r}")
        node = node[part]
    return node


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def decode(
    payload: bytes,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    max_bytes: int = 256 * 1024,
    max_depth: int = 32,
) -> tuple[str, str | None]:
    """Return (text, input_id) for one payload or raise DecodeError(kind, reason)."""
    if len(payload) > max_bytes:
        raise DecodeError(K.TOO_LARGE, f"payload too large: {len(payload)} bytes, limit {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(K.INVALID_UTF8, f"invalid UTF-8 at byte {e.start}") from None
    if not text.lstrip(_JSON_WS).startswith("{"):
        if not text.strip():
            raise DecodeError(K.EMPTY, "empty text")
        return text, None

    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise DecodeError(K.INVALID_JSON, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DecodeError(K.TOO_DEEP, f"JSON nested deeper than {max_depth} levels") from None
    if not isinstance(obj, dict):
        raise DecodeError(K.NOT_AN_OBJECT, f"JSON payload is a {_kind(obj)}, expected an object")
    if _depth(obj) > max_depth:
        raise DecodeError(K.TOO_DEEP, f"JSON nested deeper than {max_depth} levels")

    value = _lookup(obj, text_field)
    if not isinstance(value, str):
        raise DecodeError(K.WRONG_TYPE, f"field {text_field!r} is a {_kind(value)}, expected a string")
    if not value.strip():
        raise DecodeError(K.EMPTY, f"field {text_field!r} is empty")
    value = _SURROGATE.sub("\ufffd", value)

    input_id: str | None = None
    if id_field is not None:
        try:
            raw_id = _lookup(obj, id_field)
        except DecodeError:
            raw_id = None  # the producer id is optional
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int | None):
            raise DecodeError(K.WRONG_TYPE, f"field {id_field!r} is a {_kind(raw_id)}, expected a string or integer")
        input_id = None if raw_id is None else _SURROGATE.sub("\ufffd", str(raw_id))
    return value, input_id


def decode_notes(
    payload: bytes, topic: str, route: RouteConfig, *, max_bytes: int, max_depth: int
) -> list[tuple[str, str | None]]:
    """Every (text, input_id) one payload holds for one route: exactly one for JSON or plain text, one per
    text metric for Sparkplug B (possibly none). Raises DecodeError(kind, reason) for a payload to dead-letter."""
    if route.format == "sparkplug":
        from .sparkplug import decode_sparkplug  # protobuf loads only when a route speaks Sparkplug

        return decode_sparkplug(payload, topic, route.text_metric, max_bytes=max_bytes)
    text_field, id_field = route.text_field, route.id_field
    return [decode(payload, text_field=text_field, id_field=id_field, max_bytes=max_bytes, max_depth=max_depth)]
