"""Unified Namespace: the values that fill a route's ISA-95 topic templates.

`topic_segments` names the inbound topic's levels (enterprise/site/area/line…); `{asset}` in
`retain_latest_topic` is the first asset the route's tasks extracted: the patterns task's first asset tag,
else the tagger's first entity typed "asset". A result without an asset has no "latest" to retain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
