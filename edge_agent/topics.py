"""Topic templates, the one grammar: placeholders, their validation (config) and filling (pipeline).

A template is a topic with `{name}` placeholders: `{topic}` (the inbound topic), `{gateway}`, the route's
named inbound levels and, in `retain_latest_topic`, `{asset}`.

Unified Namespace: `topic_segments` names the inbound topic's levels (enterprise/site/area/line…); `{asset}`
in `retain_latest_topic` is the first asset the route's tasks extracted: the patterns task's first asset tag,
else the tagger's first entity typed "asset". A result without an asset has no "latest" to retain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
SEGMENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a name in topic_segments
RESERVED = ("topic", "gateway", "asset")  # placeholders that no segment may be named
_NOT_IN_A_LEVEL = re.compile(r"[/+#\0]")


def check_template(template: str, known: Iterable[str]) -> str:
    """Raise ValueError for an unknown placeholder or an unbalanced brace; return the literal text (the
    template without its placeholders), for the caller's own checks."""
    known = set(known)
    for name in PLACEHOLDER.findall(template):
        if name not in known:
            raise ValueError(f"unknown placeholder {{{name}}}: use one of {{{'}, {'.join(sorted(known))}}}")
    literal = PLACEHOLDER.sub("", template)
    if "{" in literal or "}" in literal:
        raise ValueError("unbalanced '{' or '}'")
    return literal


def output_topic(template: str, topic: str, gateway: str, fields: Mapping[str, str] | None = None) -> str:
    """Fill a topic template. `fields` (named inbound levels, the asset) each fill exactly one level.
    The inbound topic is text a publisher chose: braces in it (`plant/{gateway}/x`, `{0.__class__}`) must
    come out as they went in, never filled or formatted, so `{topic}` is filled last (or in one pass)."""
    if not fields:
        return template.replace("{gateway}", gateway).replace("{topic}", topic)
    values = {**{k: topic_level(v) for k, v in fields.items()}, "topic": topic, "gateway": gateway}
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), "_"), template)


def topic_level(value: str) -> str:
    """A value made safe as one topic level: '/', '+', '#' and NUL become '_', and empty becomes '_'
    (an empty level would merge with its neighbours in a subscriber's view, a wildcard cannot be published)."""
    return _NOT_IN_A_LEVEL.sub("_", value) or "_"


def segments(names: tuple[str, ...], topic: str) -> dict[str, str]:
    """{name: level} for the named levels of an inbound topic ('' where the topic is shorter)."""
    levels = topic.split("/")
    return {name: levels[i] if i < len(levels) else "" for i, name in enumerate(names)}


def first_asset(results: Mapping[str, Any]) -> str | None:
    """The first asset in task order: a patterns `assets` item, else a tagger entity of type asset."""
    for out in results.values():
        if not isinstance(out, dict):
            continue
        for item in out.get("assets") or ():
            return str(item["text"])
        for ent in out.get("entities") or ():
            if str(ent.get("type", "")).lower() == "asset":
                return str(ent["text"])
    return None
