"""Corrections from the people who read the results: validated here, stored durably with the batch.

A correction names a task and either a published result (`result_id`: its text comes from the results the
outbox file keeps) or the note's `text`, and gives a `label` (classifier tasks) or `fields` (span tasks: the
generator's fields, the tagger's types; every value must occur in the note, as every extracted span does):

    {"result_id": "5b1c…", "task": "category", "label": "leak"}
    {"text": "P-101 seal leaking", "task": "category", "label": "leak"}
    {"result_id": "5b1c…", "task": "extract", "fields": {"asset": "P-101"}}

Anything else (an unknown task or result id, a label the task does not have unless it allows new labels, a
span not in the note) is a dead letter with the reason (kind `bad_feedback`). A correction of a published
result also says whether the live model agreed (the label it published).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import DeadLetterKind, DecodeError

MAX_TEXT_CHARS = 10_000


@dataclass(frozen=True, slots=True)
class Correction:
    task: str
    text: str
    label: str | None  # classifier tasks
    fields: dict[str, str] | None  # span tasks
    result_id: str | None
    agreed: bool | None  # the live result already said so (None: no published result to compare)

    def row(self, received_at: float, source: str) -> tuple[float, str, str, str | None, str | None, str | None,
                                                          int | None, str]:
        fields = None if self.fields is None else json.dumps(self.fields, ensure_ascii=False, sort_keys=True)
        agreed = None if self.agreed is None else int(self.agreed)
        return (received_at, self.task, self.text, self.label, fields, self.result_id, agreed, source)


def _bad(reason: str) -> DecodeError:
    return DecodeError(DeadLetterKind.BAD_FEEDBACK, f"feedback: {reason}")


def parse(payload: bytes, tasks: Mapping[str, Any], allow_new_labels: Callable[[str], bool],
          published: Callable[[str], bytes | None]) -> Correction:
    """A valid correction, or DecodeError(bad_feedback, reason). `published(result_id)` is the stored result."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise _bad(f"not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _bad("expected a JSON object")
    name = obj.get("task")
    if not isinstance(name, str) or name not in tasks:
        raise _bad(f"unknown task {name!r} (tasks: {', '.join(sorted(tasks))})")
    task = tasks[name]
    result: dict[str, Any] | None = None
    rid = obj.get("result_id")
    if rid is not None:
        if not isinstance(rid, str):
            raise _bad("'result_id' must be a string")
        stored = published(rid)
        if stored is None:
            raise _bad(f"unknown result id {rid!r} (not published here, or older than the results kept)")
        result = json.loads(stored)
        text = result.get("text")
    else:
        text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _bad("give 'result_id' of a published result, or the note's 'text'")
    if len(text) > MAX_TEXT_CHARS:
        raise _bad(f"'text' longer than {MAX_TEXT_CHARS} characters")
    live = result.get("results", {}).get(name) if result is not None else None  # what was published

    if "label" in obj:
        labels = getattr(task, "labels", None)
        if labels is None:
            raise _bad(f"task {name!r} gives no labels; correct its spans with 'fields'")
        label = obj["label"]
        if not isinstance(label, str) or not label.strip():
            raise _bad("'label' must be a non-empty string")
        if label not in labels and not allow_new_labels(name):
            raise _bad(f"label {label!r} is not one of task {name!r}'s: {', '.join(labels)}")
        agreed = None if not isinstance(live, dict) else live.get("label") == label
        return Correction(name, text, label, None, rid, agreed)

    fields = obj.get("fields")
    spans = _span_names(task)
    if not isinstance(fields, dict) or not fields:
        raise _bad("give 'label' (classifier tasks) or 'fields' (span tasks)")
    if spans is None:
        raise _bad(f"task {name!r} has no spans; correct it with 'label'")
    for field, value in fields.items():
        if field not in spans:
            raise _bad(f"task {name!r} has no field {field!r} (fields: {', '.join(spans)})")
        if not isinstance(value, str) or not value.strip() or value not in text:
            raise _bad(f"the value of {field!r} must be text that occurs in the note")
    agreed = None
    if isinstance(live, dict) and isinstance(live.get("fields"), dict):
        agreed = all((live["fields"].get(f) or {}).get("text") == v for f, v in fields.items())
    return Correction(name, text, None, {str(k): v for k, v in fields.items()}, rid, agreed)


def _span_names(task: Any) -> list[str] | None:
    fields = getattr(task, "fields", None)
    if isinstance(fields, Mapping):
        return list(fields)
    head = getattr(task, "head", None)
    types = getattr(head, "types", None)
    return list(types) if types else None
