"""A classifier task that learns from corrections on the gateway (`learn = true`).

After `retrain_every` new corrections (or `retrain_interval_s` with any new one) the pipeline thread, between
two batches, fits a new head (tasks.fit, numpy, seconds) on the task's original examples (`examples`), its
label descriptions (a zero-shot task's only knowledge: each description and each label name is one seed row)
and the corrections, the latest label per text. A share of the corrections (`holdout`, chosen by a hash of
the text, so the same notes are held out every time) is kept out of the fit; the live head and the new one
label them, and the new head is swapped in only when it is not worse. Each head swapped in is saved as
`<outbox dir>/heads/<task>-v<N>.npz` and recorded in the outbox file (the active version and its history),
so a restart keeps it and `edge-agent classifier rollback` can go back one version. Results carry
`head_version` once a learned head is in use.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from .tasks.classifier import Head, encoder_sha256
from .tasks.fit import train

if TYPE_CHECKING:
    from .config import ClassifierTaskConfig
    from .outbox.store import Outbox
    from .tasks.classifier import ClassifierTask

log = structlog.get_logger(__name__)


def meta_key(task: str) -> str:
    """Where the outbox file records a task's head versions: {"active": N | 0, "versions": [...]}."""
    return f"head.{task}"


def heads_dir(outbox_path: Path) -> Path:
    return Path(outbox_path).resolve().parent / "heads"


def _held_out(text: str, share: float) -> bool:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big") % 1000 < share * 1000


def read_rows(path: Path) -> list[tuple[str, str]]:
    """The original {"text", "label"} rows (JSONL), without the training package (not on the run path)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((str(row["text"]), str(row["label"])))
    return rows


class Learner:
    def __init__(self, name: str, task: ClassifierTask, cfg: ClassifierTaskConfig, outbox: Outbox,
                 heads: Path) -> None:
        self.name, self.task, self.cfg, self.outbox, self.heads = name, task, cfg, outbox, heads
        self.retrains = self.swaps = self.rejections = 0
        self.agreement: deque[bool] = deque(maxlen=100)  # did the live result agree with each correction?
        self._new = 0
        self._last = time.monotonic()
        self._originals = read_rows(cfg.examples) if cfg.examples else []

    # -- state in the outbox file ----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        raw = self.outbox.get_meta(meta_key(self.name))
        return json.loads(raw) if raw else {"active": 0, "versions": []}

    def restore(self) -> None:
        """At start: the head version that was active, if any (a rollback may have changed it)."""
        state = self._state()
        entry = next((v for v in state["versions"] if v["version"] == state["active"]), None)
        if entry is not None:
            self.task.use_head(Head.load(entry["path"]), entry["version"])
            log.info("learn.restored", task=self.name, head_version=entry["version"])

    # -- when ---------------------------------------------------------------------------------------
    def noted(self, corrections: int, agreed: list[bool]) -> None:
        self._new += corrections
        self.agreement.extend(agreed)

    def due(self) -> bool:
        if self._new >= self.cfg.retrain_every:
            return True
        return self._new > 0 and time.monotonic() - self._last >= self.cfg.retrain_interval_s

    # -- the retrain --------------------------------------------------------------------------------
    def retrain(self) -> dict[str, Any]:
        """Fit, judge on held-out corrections, swap when not worse; what happened, for the log."""
        self._new, self._last = 0, time.monotonic()
        self.retrains += 1
        latest: dict[str, str] = {}
        for text, label in self.outbox.corrections(self.name):
            latest[text] = label  # the last word on a text wins
        held = [(t, lab) for t, lab in latest.items() if _held_out(t, self.cfg.holdout)]
        fit_rows = [(t, lab) for t, lab in latest.items() if not _held_out(t, self.cfg.holdout)]
        seeds = [(d or k, k) for k, d in self.task.descriptions.items()] + [(k, k) for k in self.task.descriptions]
        rows = self._originals + seeds + fit_rows
        outcome: dict[str, Any] = {"task": self.name, "corrections": len(latest), "held_out": len(held),
                                   "rows": len(rows)}
        if len(held) < 2 or len({lab for _, lab in rows}) < 2:
            self.rejections += 1
            return {**outcome, "swapped": False, "why": "too few corrections to judge a new head"}
        texts, labels = [t for t, _ in rows], [lab for _, lab in rows]
        enc = self.task.encoder
        head = train(texts, labels, enc.embed(texts), encoder_sha=encoder_sha256(enc),
                     meta={"learned_from": len(fit_rows), "originals": len(self._originals)})
        held_texts, truth = [t for t, _ in held], np.array([lab for _, lab in held])
        old = np.array(self.task.labels)[self.task.probabilities(held_texts).argmax(axis=1)]
        new = np.array(head.labels)[head.probabilities(enc.embed(held_texts), held_texts).argmax(axis=1)]
        old_acc, new_acc = float((old == truth).mean()), float((new == truth).mean())
        outcome.update(old_accuracy=round(old_acc, 4), new_accuracy=round(new_acc, 4))
        if new_acc < old_acc:
            self.rejections += 1
            return {**outcome, "swapped": False, "why": "the new head is worse on the held-out corrections"}
        state = self._state()
        version = 1 + max((v["version"] for v in state["versions"]), default=0)
        self.heads.mkdir(parents=True, exist_ok=True)
        path = self.heads / f"{self.name}-v{version}.npz"
        head.save(path)
        state["versions"].append({"version": version, "path": str(path), "at": time.time(), **outcome})
        state["active"] = version
        self.outbox.set_meta(meta_key(self.name), json.dumps(state))
        self.task.use_head(head, version)
        self.swaps += 1
        return {**outcome, "swapped": True, "head_version": version}
