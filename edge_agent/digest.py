"""The shift handover digest: per asset, what happened, what was done, what is still open.

Built from the results already in hand (the outbox file keeps published results for `digest.keep_s`), never
from a second pass over the raw text with a model: the asset is the one the tasks found (patterns tag, tagger
or generator field), a note reports work done when an extraction task found an action or a classifier gave
one of `digest.done_labels`, the urgency is the `digest.urgency_task` label. Per asset, the item is "done"
when its latest note reports work done, else "open"; two or more problem notes make it recurring.

Grounded like every result: each item cites the input ids of its notes, and every asset tag, alarm code and
measurement that a sentence of `summary` or `text` names must occur in one of the notes that sentence cites
(checked by the patterns extractor before publishing); a sentence that fails is dropped and counted. The
`text` is templated from the items; a writer (e.g. a generator model) may be plugged in, and its sentences
pass the same check.

Windows: the schedule's shift ends, in `digest.timezone`; a digest covers [previous shift end, this one).
Its id hashes gateway and window, so a digest produced again (a restart while it was due) has the same id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .config import DigestConfig
from .results import instant, rfc3339
from .tasks.patterns import extract
from .topics import first_asset

DIGEST_SCHEMA = "edge-agent/digest/1"
_RANK = {"high": 0, "medium": 1, "low": 2}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")

# A writer turns the items into prose sentences, each with the note ids it draws on.
Writer = Callable[[Sequence[dict[str, Any]]], list[tuple[str, list[str]]]]


@dataclass(slots=True)
class _Note:
    id: str  # the producer's input id, else the result id
    received_at: float
    text: str
    asset: str | None
    line: str  # the inbound topic
    urgency: str | None
    symptom: str | None
    action: str | None
    done: bool
    measurements: list[dict[str, Any]] = field(default_factory=list)


def _span(out: Mapping[str, Any], name: str) -> str | None:
    """A grounded generator field, or the first tagger entity of that type."""
    fields = out.get("fields")
    if isinstance(fields, dict) and isinstance(fields.get(name), dict):
        return str(fields[name].get("text") or "") or None
    for ent in out.get("entities") or ():
        if str(ent.get("type", "")).lower() in {name, {"symptom": "state", "action": "activity"}.get(name, name)}:
            return str(ent["text"])
    return None


def _note(payload: bytes, cfg: DigestConfig) -> _Note | None:
    try:
        rec = json.loads(payload)
        results: dict[str, Any] = rec.get("results") or {}
        received = instant(rec["source"]["received_at"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not a result of ours: nothing to say about it
    symptom = action = None
    done = False
    measurements: list[dict[str, Any]] = []
    for out in results.values():
        if not isinstance(out, dict):
            continue
        symptom = symptom or _span(out, "symptom")
        action = action or _span(out, "action")
        if out.get("label") in cfg.done_labels:
            done = True
        measurements.extend(m for m in out.get("measurements") or () if isinstance(m, dict))
    ranked = results.get(cfg.urgency_task)
    urgency = ranked.get("label") if isinstance(ranked, dict) else None
    return _Note(
        id=str(rec.get("input_id") or rec.get("id")),
        received_at=received,
        text=str(rec.get("text") or ""),
        asset=first_asset(results),
        line=str(rec["source"].get("topic", "")),
        urgency=urgency if urgency in _RANK else None,
        symptom=symptom,
        action=action,
        done=done or action is not None,
        measurements=measurements,
    )


class Digester:
    def __init__(self, cfg: DigestConfig, gateway: str, writer: Writer | None = None) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.zone = ZoneInfo(cfg.timezone)
        self._writer = writer
        self.ungrounded = 0  # sentences dropped by the grounding check, since start

    # -- windows ------------------------------------------------------------------------------------
    def shift_ends(self, start: float, end: float) -> list[float]:
        """Schedule points in (start, end], oldest first (local times in the configured zone)."""
        out: list[float] = []
        day = datetime.fromtimestamp(start, self.zone).date()
        last = datetime.fromtimestamp(end, self.zone).date()
        while day <= last:
            for hhmm in self.cfg.schedule:
                h, m = map(int, hhmm.split(":"))
                t = datetime(day.year, day.month, day.day, h, m, tzinfo=self.zone).timestamp()
                if start < t <= end:
                    out.append(t)
            day += timedelta(days=1)
        return out

    def previous_end(self, t: float) -> float:
        """The schedule point before t: where the window ending at t starts."""
        ends = self.shift_ends(t - 2 * 24 * 3600, t - 1e-6)
        return ends[-1] if ends else t - 24 * 3600

    def digest_id(self, start: float, end: float, request_id: str | None = None) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"digest\0{self.gateway}\0{start:.3f}\0{end:.3f}".encode())
        if request_id is not None:
            h.update(b"\0request\0" + request_id.encode())
        return h.hexdigest()

    # -- the digest ---------------------------------------------------------------------------------
    def build(self, payloads: Iterable[bytes], start: float, end: float, request_id: str | None = None) -> dict:
        dropped_before = self.ungrounded
        notes = sorted((n for p in payloads if (n := _note(p, self.cfg)) is not None), key=lambda n: n.received_at)
        groups: dict[str, list[_Note]] = {}
        for n in notes:
            groups.setdefault(n.asset or f"line:{n.line}", []).append(n)
        items = [self._item(group) for group in groups.values()]
        items.sort(key=lambda it: (_RANK.get(it["urgency"], 3), it["status"] != "open", -len(it["note_ids"])))
        items = items[: self.cfg.max_items]
        by_id = {n.id: n for n in notes}
        for it in items:
            it["summary"] = " ".join(self._grounded(_SENTENCE.split(it["summary"]), it["note_ids"], by_id))
        sentences = self._writer(items) if self._writer is not None else _template(items)
        text = " ".join(s for s, cited in sentences if self._grounded([s], cited, by_id))
        digest: dict[str, Any] = {
            "schema": DIGEST_SCHEMA,
            "id": self.digest_id(start, end, request_id),
            "gateway": self.gateway,
            "from": rfc3339(start),
            "to": rfc3339(end),
            "notes": len(notes),
            "items": items,
            "text": text,
            "ungrounded_dropped": self.ungrounded - dropped_before,  # sentences the grounding check removed
        }
        if request_id is not None:
            digest["request_id"] = request_id
        digest["replayed"] = False
        return digest

    def _item(self, group: list[_Note]) -> dict[str, Any]:
        last = group[-1]
        problems = [n for n in group if not n.done]
        status = "done" if last.done else "open"
        urgency = min((n.urgency for n in group if n.urgency), key=_RANK.__getitem__, default=None)
        name = last.asset or last.line
        what = next((n.symptom for n in reversed(problems) if n.symptom), None) or _clip(
            (problems[-1] if problems else last).text)
        parts = [f"{name}: {what}."]
        if len(problems) >= 2:
            parts.append(f"Reported {len(problems)} times this shift.")
        if status == "done":
            parts.append(f"Done: {last.action}." if last.action else "Work reported done.")
        else:
            parts.append("Still open.")
        measurements = []
        for n in group:
            for m in n.measurements:
                entry = {k: m[k] for k in ("text", "value", "unit", "quantity", "normalized") if k in m}
                entry["note_id"] = n.id
                if self._out_of_range(m):
                    entry["out_of_range"] = True
                    parts.append(f"{m['text']} is out of range.")
                measurements.append(entry)
        return {
            "asset": last.asset,
            "line": last.line,
            "summary": " ".join(parts),
            "urgency": urgency,
            "status": status,
            "recurring": len(problems) >= 2,
            "note_ids": [n.id for n in group],
            "measurements": measurements,
        }

    def _out_of_range(self, m: Mapping[str, Any]) -> bool:
        limit = self.cfg.limits.get(str(m.get("quantity")))
        norm = m.get("normalized") or {}
        value = norm.get("value", m.get("value")) if isinstance(norm, dict) else m.get("value")
        if limit is None or not isinstance(value, int | float):
            return False
        return (limit.min is not None and value < limit.min) or (limit.max is not None and value > limit.max)

    def _grounded(self, sentences: Iterable[str], cited: Sequence[str], by_id: Mapping[str, _Note]) -> list[str]:
        """The sentences whose every asset tag, code and measurement occurs in a cited note."""
        sources = " \n ".join(by_id[i].text for i in cited if i in by_id).casefold()
        kept = []
        for s in sentences:
            if not s:
                continue
            found = extract(s)  # the grounding check names what the patterns task would find
            names = [x["text"] for key in ("assets", "codes", "measurements") for x in found.get(key, ())]
            if all(name.casefold() in sources for name in names):
                kept.append(s)
            else:
                self.ungrounded += 1
        return kept


def _template(items: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The prose text without a model: open items first within each urgency, one or two sentences each."""
    return [(s, it["note_ids"]) for it in items for s in _SENTENCE.split(it["summary"]) if s]


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def dumps(digest: Mapping[str, Any]) -> bytes:
    return json.dumps(digest, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
